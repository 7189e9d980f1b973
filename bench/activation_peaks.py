"""The activation peak of one LoRA step, measured against bigtrain's estimate, per memory setting.

Builds a preset's first LAYERS decoder layers the way a run does (random bf16 base, frozen linear
maps that keep no input, fp32 LoRA adapters, bf16 autocast, bigtrain's chunked loss), then for each
setting measures one forward + backward at each sequence length: the bytes allocated above what the
step started with (the GPU's max_memory_allocated; on a CPU the profiler's allocation record), and
bigtrain.memory's estimate of the same (activations + logits and loss + the adapters' gradients).
The difference, in bytes per token per unit of hidden size (``U``), is what the estimate misses.

A setting is ``k=N`` (the first N layers recomputed), plus ``tile`` (model.tiled_mlp: hidden-size
tiles) and ``off=N`` (the inputs of the first N recomputed layers in host memory).

  python bench/activation_peaks.py --model llama2-7b --layers 4 --seq 16384,32768 k=4 k=3 k=4,tile k=4,tile,off=4
  python bench/activation_peaks.py --cpu --model tiny-llama --seq 2048 k=4 k=3 k=4,tile k=4,off=4   # CPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bigtrain import frozen_linear, longctx, recompute  # noqa: E402
from bigtrain.inject import inject_lora  # noqa: E402
from bigtrain.losses import token_loss_sum  # noqa: E402
from bigtrain.memory import Setup, estimate, model_shape  # noqa: E402
from bigtrain.presets import hf_config_for  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def parse_setting(spec: str, layers: int) -> dict:
    out = {"k": layers, "tile": False, "off": 0, "name": spec}
    for part in spec.split(","):
        key, _, val = part.partition("=")
        if key == "k":
            out["k"] = int(val)
        elif key == "tile":
            out["tile"] = True
        elif key == "off":
            out["off"] = int(val)
        else:
            raise SystemExit(f"unknown part {part!r} of setting {spec!r} (k=N, tile, off=N)")
    return out


def build(model_name: str, layers: int, dev: torch.device, hidden: int | None = None, ffn: int | None = None,
          vocab: int | None = None):
    import transformers as tf

    cfg = hf_config_for(model_name, vocab_size=512, num_layers=layers)
    if vocab:
        cfg.vocab_size = vocab
    if hidden:
        cfg.hidden_size, cfg.intermediate_size = hidden, ffn
        cfg.num_attention_heads = cfg.num_key_value_heads = hidden // 64
        cfg.head_dim = 64
    torch.manual_seed(0)
    with torch.device(dev):  # random weights, built where they run
        model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.bfloat16)
    model.requires_grad_(False)
    frozen_linear.install(model)
    lora = inject_lora(model, list(TARGETS), 16, 32, 0.0, False, torch.float32, dev)
    model.eval()
    return model, lora


def step_peak(model, lora, ids, dev, offload) -> int:
    """Bytes allocated above the start of one forward + backward (grads of the adapters included)."""
    def step():
        lora.zero_grad(set_to_none=True)
        with offload:
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                ls, n = token_loss_sum(model, ids, None, ids.clone())
            (ls / n).backward()

    step()  # warm-up: pinned buffers, kernels, the allocator's pool
    lora.zero_grad(set_to_none=True)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    totals, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:  # the allocator's running total at each allocation and free, from the profile's start
        e = stack.pop()
        if e.tag == _EventType.Allocation:
            totals.append(e.extra_fields.total_allocated)
        stack.extend(e.children)
    return max(totals, default=0)


def estimated(model, s: int, st: dict) -> dict:
    shape = model_shape(model)
    setup = Setup(world_size=1, micro_batch=1, seq_len=s, checkpoint_layers=st["k"], lora_r=16, lora_targets=TARGETS,
                  tiled_mlp=shape.hidden if st["tile"] else 0, offload_layers=st["off"], include_context=False)
    c = estimate(shape, setup)["lora"]["per_gpu"]
    return {"activations": c["activations"], "logits_loss": c["logits_loss"], "gradients": c["gradients"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("settings", nargs="+", help="k=N[,tile][,off=N]")
    ap.add_argument("--model", default="llama2-7b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", default="16384,32768", help="comma-separated sequence lengths")
    ap.add_argument("--hidden", type=int, default=None, help="CPU: a narrower layer (with --ffn)")
    ap.add_argument("--ffn", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=None, help="CPU: a smaller vocabulary (the loss's chunk small beside a layer)")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--out", default=None, help="append each row as JSON to this file")
    args = ap.parse_args(argv)
    dev = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    seqs = [int(x) for x in args.seq.split(",")]
    for spec in args.settings:
        st = parse_setting(spec, args.layers)
        model, lora = build(args.model, args.layers, dev, args.hidden, args.ffn, args.vocab)
        n = recompute.apply(model, st["k"])
        if st["tile"]:
            longctx.install_tiled_mlp(model, model.config.hidden_size)
        offload = longctx.CheckpointOffload(st["off"], dev)
        h = model.config.hidden_size
        for s in seqs:
            ids = torch.randint(0, model.config.vocab_size, (1, s), device=dev,
                                generator=torch.Generator(device=dev).manual_seed(1))
            t0 = time.monotonic()
            peak = step_peak(model, lora, ids, dev, offload)
            est = estimated(model, s, st)
            total = sum(est.values())
            U = s * h
            row = {"setting": spec, "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
                   "model": args.model, "layers": args.layers, "hidden": h, "seq": s, "recomputed": n,
                   "measured_bytes": peak, "estimate_bytes": total, **{f"estimate_{k}": v for k, v in est.items()},
                   "measured_U": round(peak / U, 2), "estimate_U": round(total / U, 2),
                   "missed_U": round((peak - total) / U, 2), "seconds": round(time.monotonic() - t0, 1)}
            print(f"[peaks] {spec:>16} s={s:>7}: measured {peak / 2**30:7.3f} GiB = {peak / U:6.2f} U, "
                  f"estimate {total / U:6.2f} U, missed {(peak - total) / U:+6.2f} U", flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
        del model, lora, offload
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
