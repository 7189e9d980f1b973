"""Multi-GPU proof (issue 9) in one run: the same model and global batch on 1 GPU and on N GPUs.

    python bench/multi_gpu.py --gpus 2 --preset gpt3-xl --out results/   # needs N GPUs
    python bench/multi_gpu.py --cpu --preset tiny-opt --out /tmp/x        # CPU smoke (gloo)

It saves a randomly initialised preset once with ``save_pretrained`` (so every run loads the same
base through bigtrain's ZeRO-3 partition loader), then runs ``bigtrain train`` under ``torchrun`` with
1 and N processes at the same global batch (micro-batch × processes constant) on packed built-in data,
and prints: per-rank base bytes against the whole (≈ 1/N), whether adapters and AdamW state are
bit-identical on every rank (sha256 per rank), the loss curves side by side with their largest
relative difference, tokens/s per GPU and the weak-scaling efficiency, and GPU peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def save_base(preset: str, out: Path, dtype: str) -> None:
    import torch
    import transformers as tf

    from bigtrain.data import load_tokenizer
    from bigtrain.presets import hf_config_for

    if (out / "config.json").exists():
        return
    tok = load_tokenizer(None)
    torch.manual_seed(0)
    cfg = hf_config_for(preset, vocab_size=len(tok))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(dev):
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    model.save_pretrained(out, max_shard_size="2GB")
    tok.save_pretrained(out)
    del model


def run(nproc: int, args, base: Path, out: Path) -> dict:
    micro = args.global_batch // nproc
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(29500 + nproc), "-m", "bigtrain", "train",
           f"train.output_dir={out}", f"model.path={base}", f"model.dtype={args.dtype}",
           f"train.max_steps={args.steps}", f"train.micro_batch_size={micro}", "train.log_every=1",
           "data.eval=null", "data.pack=true", f"data.max_length={args.seq}", "logging.progress_bar=false",
           "checkpoint.every=0", "zero.persistence_threshold=0", "train.warmup_steps=2", "train.lr=1e-3",
           f"train.device={'cpu' if args.cpu else 'cuda'}",
           f"model.gradient_checkpointing={'true' if args.checkpointing else 'false'}"]
    t0 = time.time()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    (out.parent / f"log_{nproc}.txt").write_text(p.stdout + "\n" + p.stderr)
    if p.returncode != 0:
        print(p.stdout[-3000:], p.stderr[-5000:])
        raise SystemExit(f"{nproc}-process run failed ({p.returncode})")
    rows = [json.loads(l) for l in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    return {"nproc": nproc, "micro": micro, "wall_s": time.time() - t0, "loss": {r["step"]: r["loss"] for r in steps},
            "tokens_per_s": [r["tokens_per_s"] for r in steps],
            "gpu_max_allocated_gib": steps[-1].get("gpu_max_allocated_gib"),
            "mfu": steps[-1].get("mfu"), "ranks": json.loads((out / "ranks.json").read_text())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--preset", default="gpt3-xl")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--global-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = Path(os.environ.get("TMPDIR", "/tmp")) / f"bigtrain_base_{args.preset}_{args.dtype}"
    save_base(args.preset, base, args.dtype)
    total_bytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    res = [run(n, args, base, Path(os.environ.get("TMPDIR", "/tmp")) / f"bt_mg_{n}") for n in (1, args.gpus)]
    one, many = res
    lines = [f"# {args.preset}, seq {args.seq}, global batch {args.global_batch}, {args.steps} steps, "
             f"base {args.dtype}, checkpointing {args.checkpointing}", ""]
    lines.append("| processes | micro-batch | median tokens/s (all) | tokens/s per GPU | MFU | peak GiB (rank 0) | base bytes per rank | of whole | adapters identical | AdamW identical |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    med = {}
    for r in res:
        tps = sorted(r["tokens_per_s"][2:] or r["tokens_per_s"])
        med[r["nproc"]] = tps[len(tps) // 2]
        bb = [x["base_param_bytes"] for x in r["ranks"]]
        lines.append(f"| {r['nproc']} | {r['micro']} | {med[r['nproc']]:,.0f} | {med[r['nproc']] / r['nproc']:,.0f} | "
                     f"{r['mfu'] or float('nan'):.3f} | {r['gpu_max_allocated_gib'] or float('nan'):.2f} | "
                     f"{', '.join(f'{b:,}' for b in bb)} | {max(bb) / total_bytes:.4f} | "
                     f"{len({x['adapter_sha256'] for x in r['ranks']}) == 1} | {len({x['optimizer_sha256'] for x in r['ranks']}) == 1} |")
    diffs = [abs(one["loss"][s] - many["loss"][s]) / abs(one["loss"][s]) for s in one["loss"]]
    lines += ["", f"weak-scaling efficiency (tokens/s per GPU, {args.gpus} vs 1): {med[args.gpus] / args.gpus / med[1]:.3f}",
              f"loss curves (step: 1 process / {args.gpus} processes): " +
              ", ".join(f"{s}: {one['loss'][s]:.4f}/{many['loss'][s]:.4f}" for s in sorted(one["loss"])),
              f"largest relative loss difference: {max(diffs):.2e}", f"whole base on disk: {total_bytes:,} bytes"]
    text = "\n".join(lines)
    print(text)
    (out / "multi_gpu.md").write_text(text + "\n")
    (out / "multi_gpu.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
