"""``bigtrain measure``: its parser and the command, which reads the config and checks every
argument before any process, store or model; :mod:`bigtrain.measure` then runs the modes."""

from __future__ import annotations

import argparse

from ..config import ConfigError, load_config
from ..measure_report import MODES

EPILOG = """\
examples:
  bigtrain measure model.path=null model.preset=tiny-opt model.dtype=bfloat16 --steps 3
  torchrun --nproc_per_node 2 -m bigtrain measure --config my.yaml --modes lora,full-zero3
  torchrun --nproc_per_node 8 -m bigtrain measure model.path=/models/opt-6.7b model.dtype=bfloat16 \\
      data.max_length=2048 train.micro_batch_size=2 model.gradient_checkpointing=true
  BT_COMMAND=measure BT_MEASURE_ARGS="--steps 4" sbatch --nodes=2 slurm/train_torchrun.sbatch --config my.yaml

Each mode runs --steps optimizer steps (>= 2: model states are compared in steady state) in a child
process per rank; a mode that does not fit ends as "out of memory at step N" with the estimate's
fewest GPUs that fit, and the other modes still run. Outputs go to --out (default
<train.output_dir>/measure): measure.json, measure.png, <mode>/rank<R>.log.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "measure", help="measure per-GPU memory and speed of LoRA vs full fine-tuning on this job",
        description="Run K steps of LoRA and of full fine-tuning (DeepSpeed ZeRO-3/2/1, bf16, AdamW) "
                    "for the job as configured, each mode in a clean process per rank, and report "
                    "per-GPU peak memory, model states by kind, activations and tokens/s beside "
                    "bigtrain estimate's prediction.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="YAML config file, as for bigtrain train")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for bigtrain train")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per mode (>= 2, default 4)")
    p.add_argument("--modes", default="lora,full-zero3",
                   help=f"comma-separated, run in this order (default lora,full-zero3); of {', '.join(MODES)}")
    p.add_argument("--out", metavar="DIR", help="output directory (default <train.output_dir>/measure)")
    p.add_argument("--mem-cap-gib", type=float, default=None, metavar="G",
                   help="cap each rank's memory at G GiB (GPU: the allocator's limit; CPU: the model "
                        "states counted after setup and after every step), to see a mode run out")
    p.add_argument("--gpu-mem-gib", type=float, default=None, metavar="G",
                   help="GPU memory for the estimate's 'fewest GPUs that fit' (default: the cap, else "
                        "the GPU's own, else 80)")
    p.add_argument("--mode-timeout-s", type=float, default=3600.0,
                   help="a mode still running after this long is stopped (default 3600)")
    p.set_defaults(func=cmd_measure)
    return p


def _check_args(args) -> list[str]:
    """Every error that bad arguments can cause, before any process or store starts."""
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ConfigError(f"--modes: {','.join(bad) or repr(args.modes)} is not a mode; choose from "
                          f"{', '.join(MODES)}")
    if len(set(modes)) != len(modes):
        raise ConfigError(f"--modes: {args.modes!r} names a mode twice")
    if args.steps < 2:
        raise ConfigError(f"--steps must be >= 2 (model states are compared in steady state, after "
                          f"step 2), got {args.steps}")
    for flag, v in (("--mem-cap-gib", args.mem_cap_gib), ("--gpu-mem-gib", args.gpu_mem_gib)):
        if v is not None and not v > 0:
            raise ConfigError(f"{flag} must be > 0, got {v}")
    return modes


def cmd_measure(args) -> int:
    cfg = load_config(args.config, args.overrides)  # config errors first, before any process starts
    modes = _check_args(args)
    # like for like: full fine-tuning has no auto; each auto key is measured as false unless named
    fixed = [f"model.{k}=false" for k in ("gradient_checkpointing", "compile") if getattr(cfg.model, k) == "auto"]
    # the demo's float32 base: DeepSpeed's full fine-tuning keeps 16-bit weights (and fp32 masters),
    # so every mode is measured on the same 16-bit base
    to_bf16 = any(MODES[m] for m in modes) and cfg.model.dtype == "float32"
    if fixed or to_bf16:
        args.overrides = list(args.overrides) + fixed + (["model.dtype=bfloat16"] if to_bf16 else [])
        cfg = load_config(args.config, args.overrides)
    if fixed:
        print(f"[bigtrain measure] {', '.join(fixed)} (auto is not measured: name a value to measure it)", flush=True)
    if to_bf16:
        print("[bigtrain measure] model.dtype=float32 -> bfloat16 for every mode: full fine-tuning runs "
              "DeepSpeed's 16-bit mixed precision (fp32 master weights), and LoRA is measured on the "
              "same base", flush=True)
    from ..measure import measure_job  # the command's module: torch, the training modules, DeepSpeed's engine

    return measure_job(cfg, args, modes)
