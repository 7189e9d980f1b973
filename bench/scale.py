"""Scale runs: the largest models two GPUs hold, measured against the estimator.

Four steps, each a subcommand (the GPU ones write under --out; see bench/README.md for the lease):

  fit      the deepest cut of a preset (model.num_layers) whose LoRA run fits N GPUs by the estimator
           (peak incl. CUDA context and 5 % fragmentation <= --headroom × GPU memory); prints N layers
  resume   a checkpoint and a resume at scale: ``bigtrain train`` to step K with a checkpoint there,
           then the same command to step K+1, which must resume from K; adapter file size, the
           build and step times and both runs' losses to resume.json
  report   the scale table (markdown) from scaling.py rows (bigtrain and FSDP2 + PEFT) and
           resume.json: tokens/s per GPU, MFU, peak per GPU against ``bigtrain estimate`` for the
           same setting, what full fine-tuning with Adam would need, and the targets met or missed
  chart    per-GPU memory of LoRA vs full fine-tuning (estimated, and measured where run) for
           7B, 13B, 70B and 175B over 1-64 GPUs, with one H200's memory drawn (PNG + a markdown table)

  python bench/scale.py fit gpt3-175b --gpus 2 --seq 2048 --lora-r 4 --lora-targets q_proj,v_proj
  python bench/scale.py resume llama2-70b --seq 8192 --lora-r 16 --lora-targets q_proj,k_proj,v_proj,o_proj --out $OUT/resume
  python bench/scale.py report --rows a/scaling.jsonl b/scaling.jsonl --resume $OUT/resume/resume.json --out bench/results
  python bench/scale.py chart --measured bench/results/scale_h200x2.jsonl --out bench/results/memory_chart.png
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bigtrain.memory import GB, GiB, Setup, estimate, fewest_gpus, peak_bytes, per_gpu, preset_shape  # noqa: E402

H200_USABLE_GIB = 139.0  # the H200's "141 GB" as torch sees it: ~139.8 GiB, less what the driver keeps
H200_BYTES = int(H200_USABLE_GIB * GiB)


def setup(world: int, mb: int, seq: int, r: int, targets, mem_gib: float = H200_USABLE_GIB,
          include_context: bool = True) -> Setup:
    return Setup(world_size=world, micro_batch=mb, seq_len=seq, checkpointing=True, lora_r=r,
                 lora_targets=tuple(targets), dtype="bfloat16", gpu_mem_bytes=int(mem_gib * GiB),
                 include_context=include_context)


# ---------------------------------------------------------------------------------------------
# fit


def deepest_fit(preset: str, st: Setup, headroom: float) -> tuple[int, int]:
    """(layers, LoRA peak bytes incl. context) of the deepest cut of ``preset`` that fits."""
    lo, hi = 1, 512
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        shape = preset_shape(preset, mid)
        peak = peak_bytes(per_gpu(shape, st, "lora"), st, "lora")
        if peak <= headroom * st.gpu_mem_bytes:
            best, lo = (mid, peak), mid + 1
        else:
            hi = mid - 1
    if best is None:
        raise SystemExit(f"{preset}: not even 1 layer fits {st.world_size} GPU(s)")
    return best


def cmd_fit(args) -> int:
    st = setup(args.gpus, args.mb, args.seq, args.lora_r, args.lora_targets.split(","), args.mem_gib)
    layers, peak = deepest_fit(args.preset, st, args.headroom)
    print(layers)
    print(f"# {args.preset} with {layers} layers: LoRA estimate {peak / GiB:.1f} GiB per GPU of "
          f"{args.mem_gib:.0f} (headroom {args.headroom:.2f})", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------
# resume


def _train(args, out: Path, steps: int, log: Path) -> tuple[int, float]:
    from scaling import free_port

    data = out / "train.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.gpus),
           "--master_port", str(free_port()), "-m", "bigtrain", "train",
           "model.path=null", f"model.preset={args.preset}", "model.dtype=bfloat16",
           "model.gradient_checkpointing=true", f"data.train={data}", "data.eval=null", "data.pack=true",
           f"data.max_length={args.seq}", f"train.micro_batch_size={args.mb}", f"train.max_steps={steps}",
           "train.log_every=1", f"checkpoint.every={args.steps}", "logging.progress_bar=false",
           f"lora.r={args.lora_r}", f"lora.targets=[{args.lora_targets}]", f"train.output_dir={out / 'run'}"]
    if args.num_layers:
        cmd.append(f"model.num_layers={args.num_layers}")
    if args.cpu:
        cmd.append("train.device=cpu")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [
        p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    if args.cpu:
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=out, env=env)
    return rc, time.perf_counter() - t0


def cmd_resume(args) -> int:
    from scaling import write_data

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_data(out / "train.jsonl", args.mb * args.gpus * args.seq * (args.steps + 2))
    res = {"preset": args.preset, "num_layers": args.num_layers, "gpus": args.gpus, "seq": args.seq,
           "mb": args.mb, "r": args.lora_r, "targets": args.lora_targets.split(",")}
    rc1, t1 = _train(args, out, args.steps, out / "first.txt")
    rows1 = _rows(out / "run" / "train_log.jsonl")
    ck = out / "run" / "checkpoints" / f"step-{args.steps:08d}"
    cks = sorted((out / "run" / "checkpoints").glob("step-*")) if (out / "run" / "checkpoints").is_dir() else []
    ck = cks[-1] if cks else ck
    adapter = ck / "adapter_model.safetensors"
    res.update(first_rc=rc1, first_wall_s=t1, first_losses=[r["loss"] for r in rows1],
               checkpoint=str(ck.name), adapter_bytes=adapter.stat().st_size if adapter.exists() else None,
               checkpoint_bytes=sum(f.stat().st_size for f in ck.rglob("*") if f.is_file()) if ck.exists() else None)
    rc2, t2 = _train(args, out, args.steps + 1, out / "second.txt")
    rows2 = _rows(out / "run" / "train_log.jsonl")
    text = (out / "second.txt").read_text(errors="replace")
    m = re.search(r"resumed from (\S+) at step (\d+)", text)
    res.update(second_rc=rc2, second_wall_s=t2, resumed_at=int(m.group(2)) if m else None,
               second_losses=[r["loss"] for r in rows2[len(rows1):]],
               ranks=json.loads((out / "run" / "ranks.json").read_text()) if (out / "run" / "ranks.json").exists() else None)
    res["ok"] = rc1 == 0 and rc2 == 0 and res["resumed_at"] == args.steps and len(res["second_losses"]) == 1
    (out / "resume.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "ranks"}, indent=1))
    return 0 if res["ok"] else 1


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [r for r in (json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()) if "loss" in r and "step" in r]


# ---------------------------------------------------------------------------------------------
# report


def est_for(row: dict, include_context: bool) -> dict:
    st = setup(row["gpus"], row["mb"], row["seq"], row.get("r", 8), row.get("targets", ["q_proj", "v_proj"]),
               include_context=include_context)
    return estimate(preset_shape(row["model"], row.get("layers")), st)


def cmd_report(args) -> int:
    rows = []
    for f in args.rows:
        rows += [json.loads(ln) for ln in Path(f).read_text().splitlines() if ln.strip()]
    rows = [r for r in rows if r.get("status") == "ok"]
    lines = ["| model | contender | GPUs | seq | LoRA | tokens/s/GPU | MFU | peak GiB/GPU (measured) | "
             "LoRA estimate GiB/GPU | measured / estimate | full FT + Adam (estimate) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    out_rows = []
    for r in rows:
        e = est_for(r, include_context=False)
        e_ctx = est_for(r, include_context=True)
        lora_est = e["lora"]["per_gpu_total"] / GiB
        full = e_ctx["full"]
        ratio = r["peak_gib"] / lora_est if r.get("peak_gib") and r["contender"] == "bigtrain" else None
        full_txt = (f"{full['per_gpu_total'] / GB:,.0f} GB/GPU on {r['gpus']}; fits from "
                    f"{full['fewest_gpus']} × {H200_USABLE_GIB:.0f} GiB GPUs")
        depth = f" ({r['layers']} layers)" if r.get("layers") else ""
        lines.append(f"| {r['model']}{depth} ({e['total_params'] / 1e9:.1f}B) | {r['contender']} | {r['gpus']} | {r['seq']} | "
                     f"r={r.get('r')} {'+'.join(t[0] for t in r.get('targets', []))} | "
                     f"{r['tokens_per_s_per_gpu']:,.0f} | {r.get('mfu', 0):.3f} | {r.get('peak_gib') or 0:.1f} | "
                     f"{lora_est:.1f} | {'' if ratio is None else f'{ratio:.3f}'} | {full_txt} |")
        out_rows.append(dict(r, lora_estimate_gib=lora_est, full_ft_estimate_gb=full["per_gpu_total"] / GB,
                             full_ft_fewest_gpus=full["fewest_gpus"]))
    lines += ["", "## Targets", ""]
    def key(r):
        return r["model"], r.get("layers"), r["gpus"]

    def where(k):
        m, layers, gpus = k
        return f"{m}{f' ({layers} layers)' if layers else ''}, {gpus} GPU{'s' if gpus > 1 else ''}"

    bt = {key(r): r for r in out_rows if r["contender"] == "bigtrain"}
    fs = {key(r): r for r in out_rows if r["contender"] == "fsdp2-peft"}
    for k, b in bt.items():
        m = where(k)
        ratio = b["peak_gib"] / b["lora_estimate_gib"] if b.get("peak_gib") else None
        if ratio is not None:
            lines.append(f"- {m}: peak within 10 % of the estimate: {b['peak_gib']:.1f} vs {b['lora_estimate_gib']:.1f} GiB "
                         f"({(ratio - 1) * 100:+.1f} %) **{'met' if abs(ratio - 1) <= 0.10 else 'missed'}**")
        if k in fs:
            f = fs[k]
            sp = b["tokens_per_s_per_gpu"] / f["tokens_per_s_per_gpu"]
            lines.append(f"- {m}: tokens/s per GPU ≥ 1.18× FSDP2 + PEFT: {b['tokens_per_s_per_gpu']:,.0f} vs "
                         f"{f['tokens_per_s_per_gpu']:,.0f} = {sp:.2f}× **{'met' if sp >= 1.18 else 'missed'}**")
            if k == ("llama2-70b", None, 2):
                lines.append(f"- {m}: ≥ 1,400 tokens/s per GPU: {b['tokens_per_s_per_gpu']:,.0f} "
                             f"**{'met' if b['tokens_per_s_per_gpu'] >= 1400 else 'missed'}**")
            if b.get("peak_gib") and f.get("peak_gib"):
                lines.append(f"- {m}: peak per GPU ≤ FSDP2 + PEFT's: {b['peak_gib']:.1f} vs {f['peak_gib']:.1f} GiB "
                             f"**{'met' if b['peak_gib'] <= f['peak_gib'] else 'missed'}**")
    if args.resume:
        for path in args.resume:
            rs = json.loads(Path(path).read_text())
            rss = [r.get("host_peak_rss_bytes") for r in (rs.get("ranks") or [])]
            lines.append(f"- {rs['preset']}{' (' + str(rs['num_layers']) + ' layers)' if rs.get('num_layers') else ''}: "
                         f"checkpoint at {rs['checkpoint']} (adapter file {(rs.get('adapter_bytes') or 0) / 1e6:.1f} MB, "
                         f"whole checkpoint {(rs.get('checkpoint_bytes') or 0) / 1e6:.1f} MB); the rerun resumed at step "
                         f"{rs.get('resumed_at')} and trained {len(rs.get('second_losses', []))} step(s), loss "
                         f"{', '.join(f'{x:.4f}' for x in rs.get('first_losses', []))} → "
                         f"{', '.join(f'{x:.4f}' for x in rs.get('second_losses', []))}; wall clock "
                         f"{rs['first_wall_s']:.0f} s + {rs['second_wall_s']:.0f} s"
                         + (f"; host peak RSS per rank {max(x for x in rss if x) / 1e9:.1f} GB" if any(rss) else "")
                         + f" **{'met' if rs.get('ok') else 'missed'}**")
    md = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.md").write_text(md)
    with open(out / f"{args.name}.jsonl", "w") as f:
        for r in out_rows:
            f.write(json.dumps(r) + "\n")
    print(md)
    return 0


# ---------------------------------------------------------------------------------------------
# chart


CHART_MODELS = [("llama2-7b", "Llama-2 7B", 4096), ("llama2-13b", "Llama-2 13B", 4096),
                ("llama2-70b", "Llama-2 70B", 8192), ("gpt3-175b", "GPT-3 175B", 2048)]
CHART_GPUS = [1, 2, 4, 8, 16, 32, 64]


def chart_points() -> list[dict]:
    """Estimated per-GPU peak (incl. CUDA context and fragmentation) of LoRA (r=16 on q,k,v,o for
    LLaMA, the paper's r=4 on q,v for GPT-3) and full fine-tuning with Adam (ZeRO-3, 16 bytes per
    parameter), micro-batch 1, activation checkpointing, bf16."""
    pts = []
    for preset, label, seq in CHART_MODELS:
        shape = preset_shape(preset)
        llama = preset.startswith("llama")
        st0 = Setup(micro_batch=1, seq_len=seq, checkpointing=True, lora_r=16 if llama else 4,
                    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj") if llama else ("q_proj", "v_proj"),
                    dtype="bfloat16", gpu_mem_bytes=H200_BYTES)
        for n in CHART_GPUS:
            st = replace(st0, world_size=n)
            for which in ("lora", "full"):
                pts.append({"model": preset, "label": label, "seq": seq, "gpus": n, "which": which,
                            "bytes": peak_bytes(per_gpu(shape, st, which), st, which)})
        for which in ("lora", "full"):
            pts.append({"model": preset, "label": label, "which": which, "fewest_gpus": fewest_gpus(shape, st0, which)})
    return pts


def cmd_chart(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = chart_points()
    measured = []
    for f in args.measured or []:
        measured += [json.loads(ln) for ln in Path(f).read_text().splitlines() if ln.strip()]
    fig, ax = plt.subplots(figsize=(9, 6))
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    for (preset, label, seq), c in zip(CHART_MODELS, colors):
        for which, style in (("full", "--"), ("lora", "-")):
            xs = [p["gpus"] for p in pts if p["model"] == preset and p["which"] == which and "bytes" in p]
            ys = [p["bytes"] / GB for p in pts if p["model"] == preset and p["which"] == which and "bytes" in p]
            ax.plot(xs, ys, style, color=c, marker="o" if which == "lora" else None, markersize=4,
                    label=f"{label} {'LoRA' if which == 'lora' else 'full FT + Adam'} (estimate)")
        for r in measured:
            if r.get("model") == preset and r.get("contender") == "bigtrain" and not r.get("layers") and r.get("peak_gib"):
                ax.plot([r["gpus"]], [r["peak_gib"] * GiB / GB], "*", color=c, markersize=14,
                        markeredgecolor="k", label=f"{label} LoRA measured, {r['gpus']} H200s (allocated, no CUDA context)")
    ax.axhline(H200_BYTES / GB, color="k", linewidth=1)
    ax.text(1.05, H200_BYTES / GB * 1.08, f"one H200 (141 GB; {H200_USABLE_GIB:.0f} GiB = {H200_BYTES / GB:.0f} GB usable)", fontsize=9)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(CHART_GPUS)
    ax.set_xticklabels([str(n) for n in CHART_GPUS])
    ax.set_xlabel("GPUs (ZeRO-3)")
    ax.set_ylabel("peak memory per GPU, GB (log)")
    ax.set_title("Per-GPU memory: LoRA (frozen ZeRO-3 base) vs full fine-tuning with Adam\n"
                 "micro-batch 1, activation checkpointing, bf16; LLaMA r=16 q,k,v,o; GPT-3 r=4 q,v")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    plt.close(fig)
    table = ["| model (seq) | " + " | ".join(f"{n} GPU{'s' if n > 1 else ''}" for n in CHART_GPUS) + " | fewest H200s |",
             "|---|" + "---|" * (len(CHART_GPUS) + 1)]
    for preset, label, seq in CHART_MODELS:
        for which in ("lora", "full"):
            row = [p for p in pts if p["model"] == preset and p["which"] == which]
            few = next(p["fewest_gpus"] for p in row if "fewest_gpus" in p)
            table.append(f"| {label} ({seq}) {'LoRA' if which == 'lora' else 'full FT'} | "
                         + " | ".join(f"{p['bytes'] / GB:,.0f}" for p in row if "bytes" in p) + f" | {few} |")
    md = "\n".join(table) + "\n"
    Path(args.out).with_suffix(".md").write_text(md)
    print(md)
    print(f"chart written to {args.out}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p, need_preset=True):
        if need_preset:
            p.add_argument("preset")
        p.add_argument("--gpus", type=int, default=2)
        p.add_argument("--seq", type=int, default=2048)
        p.add_argument("--mb", type=int, default=1)
        p.add_argument("--lora-r", type=int, default=4)
        p.add_argument("--lora-targets", default="q_proj,v_proj")
        p.add_argument("--mem-gib", type=float, default=H200_USABLE_GIB, help="usable GPU memory (H200: ~139)")

    p = sub.add_parser("fit", help="deepest model.num_layers of a preset that fits")
    common(p)
    p.add_argument("--headroom", type=float, default=0.92, help="fraction of GPU memory the estimate may use")
    p.set_defaults(func=cmd_fit)
    p = sub.add_parser("resume", help="checkpoint at step K, then resume to K+1")
    common(p)
    p.add_argument("--num-layers", type=int, default=None)
    p.add_argument("--steps", type=int, default=2, help="K: steps of the first run (checkpoint there)")
    p.add_argument("--cpu", action="store_true", help="smoke test on the CPU (gloo)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_resume)
    p = sub.add_parser("report", help="the scale table from scaling.py rows and resume.json")
    p.add_argument("--rows", nargs="+", required=True)
    p.add_argument("--resume", nargs="*")
    p.add_argument("--name", default="scale_h200x2")
    p.add_argument("--out", default="bench/results")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("chart", help="LoRA vs full FT memory per GPU over 1-64 GPUs")
    p.add_argument("--measured", nargs="*", help="report jsonl rows with measured peaks")
    p.add_argument("--out", default="bench/results/memory_chart.png")
    p.set_defaults(func=cmd_chart)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
