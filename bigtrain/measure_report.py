"""``bigtrain measure``'s report: per mode, measured beside ``bigtrain estimate``'s prediction for the
same setting (:func:`build_report`); the console table (:func:`format_report`), ``measure.json``,
``measure.png`` (:func:`write_plot`) and, with ``logging.wandb=true``, a W&B table and chart
(:func:`write_outputs`). :mod:`bigtrain.measure` runs the modes and hands their results here.
"""

from __future__ import annotations

import json
from pathlib import Path

from .memory import CATEGORY_LABELS, estimate, fmt_binary, setup_for_run, shape_from_model
from .presets import meta_model

# Deferred imports: the config-to-model helpers (data, inject, run, vocab), the loggers and matplotlib
# are imported where used: they load torch, and `bigtrain measure --help` reads MODES from here.

# The modes and the ZeRO stage of each full fine-tuning one (LoRA: None). The command's too; here
# because the report needs them and must not import bigtrain.measure (no import cycles).
MODES = {"lora": None, "full-zero3": 3, "full-zero2": 2, "full-zero1": 1}
GiB = 2 ** 30


def mode_status(results: list) -> str:
    if all(r.get("status") == "ok" for r in results):
        return "ok"
    ooms = [r for r in results if r.get("status") == "oom"]
    if ooms:
        step = min(r["step"] for r in ooms)
        return f"out of memory at step {step}" + (" (building the model and optimizer)" if step == 0 else "")
    bad = next(r for r in results if r.get("status") != "ok")
    return f"{bad['status']} (rank {bad.get('rank')}; see {bad.get('log')})"


STATE_KINDS = ("frozen_weights", "trainable_weights", "gradients", "optimizer_state")


def _setup_for(cfg, mode: str, world: int, gpu_mem: int, context: bool, shard_group: int = 0):
    """``shard_group``: the ranks LoRA's base was partitioned over (zero.shard_group as the run took it)."""
    stage = MODES[mode]  # a full fine-tuning mode's stage; LoRA's from the run's config
    return setup_for_run(cfg, world, gpu_mem_bytes=gpu_mem, include_context=context, shard_group=shard_group,
                         **({"zero_stage": stage} if stage else {}))


def build_report(cfg, args, modes: list[str], results: dict, world: int) -> dict:
    """Per mode: the outcome, per GPU (max over ranks) measured and predicted; the ratios."""
    shape = _shape(cfg)
    device = next((r.get("device") for rs in results.values() for r in rs if r.get("device")), "cpu")
    total = next((r.get("device_total_bytes") for rs in results.values() for r in rs
                  if r.get("device_total_bytes")), None)
    gpu_mem = int((args.gpu_mem_gib or args.mem_cap_gib or (total / GiB if total else 80)) * GiB)
    out = {"model": shape.name, "total_params": shape.total_params, "world_size": world, "device": device,
           "steps": args.steps, "micro_batch": cfg.train.micro_batch_size, "seq_len": cfg.data.max_length,
           "checkpointing": cfg.model.gradient_checkpointing, "dtype": cfg.model.dtype,
           "quantize": cfg.model.quantize,
           "lora": {"r": cfg.lora.r, "targets": list(cfg.lora.targets)},
           "gpu_mem_bytes": gpu_mem, "mem_cap_bytes": int(args.mem_cap_gib * GiB) if args.mem_cap_gib else None,
           "modes": {}}
    for mode in modes:
        rs = results[mode]
        which = "lora" if MODES[mode] is None else "full"
        shards = max((r.get("base_shards") or 0 for r in rs), default=0) if which == "lora" else 0
        est = estimate(shape, _setup_for(cfg, mode, world, gpu_mem, False, shards))[which]
        # the fewest GPUs that fit: with the CUDA context and fragmentation a GPU really has to hold
        fit = estimate(shape, _setup_for(cfg, mode, world, gpu_mem, device != "cpu", shards))[which]
        pred_states = {k: est["per_gpu"][k] for k in STATE_KINDS}
        pred = {"peak_bytes": est["per_gpu_total"], "states": pred_states,
                "states_total": sum(pred_states.values()),
                "rest_bytes": est["per_gpu_total"] - sum(pred_states.values()),
                "by_category": est["per_gpu"], "fits_with_context": fit["fits"],
                "fewest_gpus": fit["fewest_gpus"]}
        m = {"status": mode_status(rs), "ranks": rs, "predicted": pred}
        if m["status"] == "ok":
            states = {k: max(r["states"].get(k, 0) for r in rs) for k in STATE_KINDS}
            m["states"] = states
            m["states_total"] = max(sum(r["states"].values()) for r in rs)
            if which == "full":
                m["states_detail"] = {k: max(r["states_detail"][k] for r in rs) for k in rs[0]["states_detail"]}
            m["tokens_per_s_per_gpu"] = rs[0].get("tokens_per_s_per_gpu")
            peaks = [r.get("peak_allocated_bytes") for r in rs]
            if all(p is not None for p in peaks):
                m["peak_allocated_bytes"] = max(peaks)
                m["peak_reserved_bytes"] = max(r["peak_reserved_bytes"] for r in rs)
                m["rest_bytes"] = m["peak_allocated_bytes"] - m["states_total"]
                m["error"] = pred["peak_bytes"] / m["peak_allocated_bytes"] - 1
            else:
                m["host_peak_rss_bytes"] = max(r["host_peak_rss_bytes"] for r in rs)
            m["states_error"] = pred["states_total"] / max(1, m["states_total"]) - 1
        elif m["status"].startswith("out of memory"):
            m["oom_step"] = min(r["step"] for r in rs if r.get("status") == "oom")
        out["modes"][mode] = m
    lora = out["modes"].get("lora")
    ratios = {}
    for mode in modes:
        m = out["modes"][mode]
        if MODES[mode] is None or lora is None:
            continue
        r = {"predicted_peak": m["predicted"]["peak_bytes"] / lora["predicted"]["peak_bytes"],
             "predicted_states": m["predicted"]["states_total"] / lora["predicted"]["states_total"]}
        if m["status"] == "ok" and lora["status"] == "ok":
            if "peak_allocated_bytes" in m and "peak_allocated_bytes" in lora:
                r["measured_peak"] = m["peak_allocated_bytes"] / lora["peak_allocated_bytes"]
            r["measured_states"] = m["states_total"] / lora["states_total"]
        ratios[f"{mode}/lora"] = r
    out["ratios"] = ratios
    return out


def _shape(cfg):
    """The run's model shape (its vocabulary padded as inside a run), from a meta-device build."""
    _, build = _configs(cfg)
    name = cfg.model.path if cfg.model.path else cfg.model.preset
    if cfg.model.path is None and cfg.model.num_layers:
        name += f" ({cfg.model.num_layers} layers)"
    return shape_from_model(meta_model(build), name)


def _configs(cfg):
    """(the model's config, the config a run builds: vocabulary padded to a multiple of 64)."""
    from .data import load_tokenizer, tokenizer_source
    from .inject import find_targets, output_layer_names
    from .run import model_config
    from .vocab import run_config

    path = cfg.model.local_path
    tok = load_tokenizer(tokenizer_source(cfg.model.tokenizer, path))
    hf = model_config(cfg, path, len(tok))
    meta = meta_model(hf)
    targets = find_targets(meta, cfg.lora.targets)
    return hf, run_config(hf, head_is_target=bool(set(targets) & output_layer_names(meta)))


def _g(b) -> str:
    return "-" if b is None else f"{b / GiB:.2f}"


def _pct(e) -> str:
    return "-" if e is None else f"{e:+.1%}"


def format_report(rep: dict) -> str:
    gpu = rep["device"] != "cpu"
    lines = [f"bigtrain measure: {rep['model']} ({rep['total_params']:,} parameters), {rep['world_size']} "
             f"rank(s) on {rep['device']}, micro-batch {rep['micro_batch']}, sequence {rep['seq_len']}, "
             f"checkpointing {'on' if rep['checkpointing'] else 'off'}, {rep['dtype']}, {rep['steps']} steps "
             f"per mode; per GPU, GiB, max over ranks; estimate without the CUDA context"
             + (f"; LoRA's base model.quantize={rep['quantize']} (full fine-tuning's is not quantized)"
                if rep.get("quantize") else "")]
    head = (f"{'mode':<12} {'peak alloc':>10} {'estimate':>9} {'error':>7} {'reserved':>9} "
            f"{'states':>8} {'est.':>8} {'rest':>8} {'est.':>8} {'tokens/s/GPU':>13}  status")
    if not gpu:
        head = (f"{'mode':<12} {'host RSS':>10} {'states, B':>10} {'estimate':>10} {'error':>7} "
                f"{'tokens/s/GPU':>13}  status")
    lines += [head, "-" * len(head)]
    for mode, m in rep["modes"].items():
        p = m["predicted"]
        tps = m.get("tokens_per_s_per_gpu")
        tps = "-" if tps is None else f"{tps:,.0f}"
        status = m["status"]
        if m["status"].startswith("out of memory"):
            status += (f"; the estimate: {p['fewest_gpus']} GPUs of {rep['gpu_mem_bytes'] / GiB:g} GiB at "
                       f"the fewest" if p["fewest_gpus"] else "; the estimate: no GPU count fits")
        if gpu:
            lines.append(f"{mode:<12} {_g(m.get('peak_allocated_bytes')):>10} {_g(p['peak_bytes']):>9} "
                         f"{_pct(m.get('error')):>7} {_g(m.get('peak_reserved_bytes')):>9} "
                         f"{_g(m.get('states_total')):>8} {_g(p['states_total']):>8} "
                         f"{_g(m.get('rest_bytes')):>8} {_g(p['rest_bytes']):>8} {tps:>13}  {status}")
        else:
            st = m.get("states_total")
            lines.append(f"{mode:<12} {_g(m.get('host_peak_rss_bytes')):>10} "
                         f"{'-' if st is None else f'{st:,}':>10} {p['states_total']:>10,} "
                         f"{_pct(m.get('states_error')):>7} {tps:>13}  {status}")
    for mode, m in rep["modes"].items():
        if m["status"] != "ok":
            continue
        kinds = [(CATEGORY_LABELS[k], m["states"][k], m["predicted"]["states"][k]) for k in STATE_KINDS
                 if m["states"][k] or m["predicted"]["states"][k]]
        if "states_detail" in m:  # full fine-tuning: the optimizer state split into master and Adam
            d, pd = m["states_detail"], m["ranks"][0]["predicted_states_detail"]
            kinds[-1:] = [("fp32 master weights", d["master_weights"], pd["master_weights"]),
                          ("Adam m, v, step", d["adam_states"], pd["adam_states"])]
        ph = {}
        for r in m["ranks"]:
            for k, v in (r.get("phase_peak_allocated_bytes") or {}).items():
                ph[k] = max(ph.get(k, 0), v)
        if ph:
            lines.append(f"{mode} peak allocated by phase, GiB: "
                         + ", ".join(f"{k.replace('_', ' ')} {v / GiB:.2f}" for k, v in ph.items()))
        lines.append(f"{mode} model states by kind, measured / estimated: "
                     + "; ".join(f"{lab} {fmt_binary(a)} / {fmt_binary(b)}" for lab, a, b in kinds))
    for k, r in rep["ratios"].items():
        basis = "peak" if gpu else "model states"
        meas = r.get("measured_peak" if gpu else "measured_states")
        pr = r["predicted_peak"] if basis == "peak" else r["predicted_states"]
        lines.append(f"{k}: {basis} measured {'-' if meas is None else f'{meas:.2f}x'}, "
                     f"predicted {pr:.2f}x" + ("" if gpu else " (CPU: model states; the peak needs a GPU)"))
    lines.append("(states: model-state bytes counted on the live tensors: LoRA the frozen base, adapters, "
                 "their gradients and AdamW state; full FT the 16-bit weights and gradients, fp32 master "
                 "and Adam states; rest = peak - states: activations, buffers, logits)")
    return "\n".join(lines)


def write_plot(rep: dict, path: Path) -> Path:
    """Per-GPU memory by kind, modes side by side: measured filled, the estimate as outlines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gpu = rep["device"] != "cpu"
    kinds = [("frozen_weights", "frozen weights"), ("trainable_weights", "trainable weights"),
             ("gradients", "gradients"), ("optimizer_state", "optimizer state (master, Adam)")]
    colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3"]
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(rep["modes"]), 5))
    names = list(rep["modes"])
    for x, mode in enumerate(names):
        m = rep["modes"][mode]
        p = m["predicted"]
        vals_p = [p["states"][k] for k, _ in kinds] + ([p["rest_bytes"]] if gpu else [])
        vals_m = ([m["states"][k] for k, _ in kinds] + ([m.get("rest_bytes", 0)] if gpu else [])
                  if m["status"] == "ok" else None)
        bottom = 0.0
        for j, v in enumerate(vals_p):
            ax.bar(x + 0.2, v / GiB, 0.38, bottom=bottom, fill=False, edgecolor=colors[j], lw=1.5)
            bottom += v / GiB
        if vals_m is None:
            ax.text(x - 0.2, bottom * 0.02 + 0.01, m["status"], rotation=90, ha="center", va="bottom",
                    fontsize=8)
            continue
        bottom = 0.0
        for j, v in enumerate(vals_m):
            ax.bar(x - 0.2, v / GiB, 0.38, bottom=bottom, color=colors[j])
            bottom += v / GiB
    labels = [lab for _, lab in kinds] + (["activations + buffers (peak - states)"] if gpu else [])
    for j, lab in enumerate(labels):
        ax.bar([0], [0], color=colors[j], label=lab)
    ax.bar([0], [0], fill=False, edgecolor="k", label="estimate (outline)")
    ax.set_xticks(range(len(names)), [f"{n}\nmeasured | est." for n in names])
    ax.set_ylabel("GiB per GPU" + ("" if gpu else " (model states; CPU)"))
    ax.set_title(f"{rep['model']}, {rep['world_size']} rank(s), mb {rep['micro_batch']}, seq {rep['seq_len']}, "
                 f"ckpt {'on' if rep['checkpointing'] else 'off'}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_outputs(rep: dict, cfg, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    text = format_report(rep)
    print(text, flush=True)
    (out / "measure.json").write_text(json.dumps(rep, indent=1))
    png = write_plot(rep, out / "measure.png")
    print(f"[bigtrain] measure: wrote {out / 'measure.json'} and {png}", flush=True)
    if cfg.logging.wandb and cfg.logging.wandb_mode != "disabled":
        from .metrics import Loggers

        loggers = Loggers.build(cfg.logging, out, {**cfg.to_dict(), "measure": {
            k: v for k, v in rep.items() if k not in ("modes", "ratios")}}, True)
        cols = ["mode", "status", "peak_allocated_GiB", "estimated_GiB", "error", "reserved_GiB",
                "states_GiB", "states_estimated_GiB", "rest_GiB", "rest_estimated_GiB", "tokens_per_s_per_gpu"]
        rows = []
        for mode, m in rep["modes"].items():
            p = m["predicted"]
            f = lambda b: None if b is None else b / GiB  # noqa: E731
            rows.append([mode, m["status"], f(m.get("peak_allocated_bytes")), f(p["peak_bytes"]), m.get("error"),
                         f(m.get("peak_reserved_bytes")), f(m.get("states_total")), f(p["states_total"]),
                         f(m.get("rest_bytes")), f(p["rest_bytes"]), m.get("tokens_per_s_per_gpu")])
        loggers.table("measure/modes", cols, rows)
        loggers.image("measure/chart", str(png))
        loggers.summary({f"measure/{k}/{kk}": v for k, r in rep["ratios"].items() for kk, v in r.items()})
        loggers.close()
