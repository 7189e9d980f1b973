"""Predicted vs measured peak GPU memory: full fine-tuning vs bigtrain's LoRA, with and without
activation checkpointing, on one GPU.

For each preset × {full, lora} × {no checkpointing, checkpointing} it runs ``--steps`` training steps
on random tokens and compares ``torch.cuda.max_memory_allocated()`` (reset before the model is built)
with :func:`bigtrain.memory.per_gpu` for the same inputs, without the CUDA context and fragmentation
allowance (which ``max_memory_allocated`` does not see). ``max_memory_reserved`` is reported beside it.

Recipes (both bf16 autocast, sdpa attention, AdamW):

* ``full``: plain PyTorch, one process, no DeepSpeed. fp32 weights (the master copy), fp32 grads,
  AdamW m and v in fp32 (fused on CUDA: no temporaries); autocast makes the bf16 copies of the
  weights that the matmuls use. The estimator's ``full_recipe="torch-amp"``.
* ``lora``: ``bigtrain.engine.core.Engine`` at ZeRO stage 3 with world size 1 (the base partitioned into a
  single partition, fetched a decoder layer at a time), base stored in bf16, fp32 adapters r=8 on
  q_proj and v_proj, fused torch AdamW. The estimator's LoRA column at world size 1.

Usage (one H200):  python bench/memory_gpu.py --out results/memory_h200
CPU smoke test:    python bench/memory_gpu.py --device cpu --presets tiny-opt --seq-len 64 --steps 1 --out /tmp/m
On CPU nothing is measured (the table shows the prediction only).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bigtrain.memory import GiB, Setup, model_shape, peak_bytes, per_gpu  # noqa: E402
from bigtrain.presets import hf_config_for  # noqa: E402

LORA_R, LORA_ALPHA, TARGETS = 8, 16.0, ("q_proj", "v_proj")


def setup_for(mode: str, args, checkpointing: bool) -> Setup:
    """The estimator's inputs for one configuration: exactly what the run below does."""
    common = dict(world_size=1, micro_batch=args.micro_batch, seq_len=args.seq_len,
                  checkpointing=checkpointing, lora_r=LORA_R, lora_targets=TARGETS, dtype="bfloat16",
                  include_context=False)
    if mode == "full":
        return Setup(zero_stage=0, full_recipe="torch-amp", **common)
    return Setup(zero_stage=3, **common)


def _adamw(params, device):
    kw = {"fused": True} if device.type == "cuda" else {"foreach": False}
    return torch.optim.AdamW(params, lr=1e-5, **kw)


def run_one(preset: str, mode: str, checkpointing: bool, args, device: torch.device) -> dict:
    import transformers as tf

    cfg = hf_config_for(preset, vocab_size=512)
    cuda = device.type == "cuda"
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base0 = torch.cuda.memory_allocated() if cuda else 0
    engine = None
    if mode == "full":
        with torch.device(device):
            model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa")
        params = [p for p in model.parameters() if p.requires_grad]
        lora = None
    else:
        from bigtrain.config import ZeroConfig
        from bigtrain.engine.core import Engine
        from bigtrain.inject import inject_lora

        engine = Engine(ZeroConfig(stage=3), device=device.type)
        model = engine.build_base(cfg, dtype="bfloat16", attn_implementation="sdpa")
        lora = inject_lora(model, list(TARGETS), r=LORA_R, alpha=LORA_ALPHA, device=device)
        params = list(lora.parameters())
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if mode == "lora":
            model.enable_input_require_grads()  # so the checkpointed blocks see a grad-requiring input
    opt = _adamw(params, device)
    V = cfg.vocab_size
    g = torch.Generator(device="cpu").manual_seed(0)
    times = []
    for _ in range(args.steps):
        x = torch.randint(0, V, (args.micro_batch, args.seq_len), generator=g).to(device)
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        if engine is not None:
            engine.after_backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    measured = (torch.cuda.max_memory_allocated() - base0) if cuda else None
    reserved = torch.cuda.max_memory_reserved() if cuda else None
    if lora is not None:
        lora.remove_hooks()
    del model, opt, params, lora
    if engine is not None:
        engine.close()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    shape = model_shape(preset)
    st = setup_for(mode, args, checkpointing)
    pred = per_gpu(shape, st, mode)
    predicted = peak_bytes(pred, st, mode)
    return {"preset": preset, "mode": mode, "checkpointing": checkpointing, "seq_len": args.seq_len,
            "micro_batch": args.micro_batch, "params": shape.total_params,
            "predicted_bytes": predicted, "predicted": pred, "measured_bytes": measured,
            "max_reserved_bytes": reserved,
            "error_pct": None if measured is None else 100.0 * (predicted - measured) / measured,
            "step_s": min(times) if times else None, "loss": float(loss.item())}


def to_markdown(rows: list[dict], device: str) -> str:
    out = [f"Peak memory per GPU ({device}): predicted by bigtrain.memory vs torch.cuda.max_memory_allocated",
           "", "| model | recipe | checkpointing | seq × batch | predicted GiB | measured GiB | error % "
           "| max reserved GiB | step s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = "n/a" if r["measured_bytes"] is None else f"{r['measured_bytes'] / GiB:.3f}"
        e = "n/a" if r["error_pct"] is None else f"{r['error_pct']:+.1f}"
        rv = "n/a" if r["max_reserved_bytes"] is None else f"{r['max_reserved_bytes'] / GiB:.2f}"
        out.append(f"| {r['preset']} | {'full FT (torch, fp32 master)' if r['mode'] == 'full' else 'LoRA (bigtrain ZeRO-3, bf16 base)'} "
                   f"| {'on' if r['checkpointing'] else 'off'} | {r['seq_len']} × {r['micro_batch']} "
                   f"| {r['predicted_bytes'] / GiB:.3f} | {m} | {e} | {rv} | {r['step_s']:.3f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto, cuda or cpu")
    ap.add_argument("--presets", default="gpt3-large,gpt3-2.7b", help="comma-separated preset names")
    ap.add_argument("--modes", default="full,lora", help="full, lora or both")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--checkpointing", default="off,on", help="off, on or off,on")
    ap.add_argument("--out", required=True, help="output prefix: writes PREFIX.md and PREFIX.json")
    args = ap.parse_args(argv)
    dev = args.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(dev)
    rows = []
    for preset in [p for p in args.presets.split(",") if p]:
        for mode in [m for m in args.modes.split(",") if m]:
            for ck in [c == "on" for c in args.checkpointing.split(",") if c]:
                try:
                    r = run_one(preset, mode, ck, args, device)
                except torch.cuda.OutOfMemoryError as e:  # pragma: no cover - GPU only
                    r = {"preset": preset, "mode": mode, "checkpointing": ck, "error": f"OOM: {e}"}
                    print(f"{preset} {mode} ckpt={ck}: out of memory", flush=True)
                    gc.collect()
                    torch.cuda.empty_cache()
                    rows.append(r)
                    continue
                rows.append(r)
                meas = "n/a" if r["measured_bytes"] is None else f"{r['measured_bytes'] / GiB:.2f} GiB"
                print(f"{preset} {mode} ckpt={ck}: predicted {r['predicted_bytes'] / GiB:.2f} GiB, "
                      f"measured {meas}", flush=True)
    ok = [r for r in rows if "error" not in r]
    md = to_markdown(ok, torch.cuda.get_device_name() if device.type == "cuda" else "cpu")
    failed = [r for r in rows if "error" in r]
    if failed:
        md += "\n\nFailed: " + "; ".join(f"{r['preset']} {r['mode']} ckpt={r['checkpointing']}: {r['error'][:80]}"
                                        for r in failed)
    out = Path(args.out)
    prefix = out.with_suffix("") if out.suffix in (".md", ".json") else out
    prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{prefix}.md").write_text(md + "\n")
    Path(f"{prefix}.json").write_text(json.dumps({"device": str(device), "rows": rows}, indent=2))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
