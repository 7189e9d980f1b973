"""``bigtrain train``: its parser (with the config reference in its help) and the command."""

from __future__ import annotations

import argparse
import signal
import textwrap

from ..config import describe, load_config
from ..runlock import die_with_parent

TRAIN_EPILOG = """\
examples:
  bigtrain train                                   # built-in demo: tiny OPT, built-in data, CPU
  bigtrain train --config my.yaml train.max_steps=500 lora.r=4
  bigtrain train model.path=/models/opt-1.3b model.dtype=bfloat16 lora.targets=[q_proj,v_proj]
  torchrun --nproc_per_node 8 -m bigtrain train --config my.yaml      # ZeRO-3 over 8 ranks
  launch/torchrun.sh, launch/deepspeed.sh, slurm/*.sbatch              # multi-GPU / multi-node

Overrides are dotted keys with YAML values, before or after --config; they apply on top of it, in
the order given. A rerun with the same train.output_dir resumes from its last good checkpoint
(checkpoint.resume=auto).

config keys (key, type, default):
"""


def _config_reference(width: int = 100) -> str:
    lines = []
    for key, tp, default, doc in describe():
        lines.append(f"  {key} ({tp}, default {default})")
        if doc:
            lines += textwrap.wrap(doc, width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


class _Once(argparse.Action):
    """An option that may be given once: a second ``--config`` used to replace the first, silently."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option_string} given twice ({getattr(namespace, self.dest)} and {values}): "
                         f"give one file, and put further settings as key=value overrides")
        setattr(namespace, self.dest, values)


def add_parser(sub) -> None:
    t = sub.add_parser("train", help="fine-tune LoRA adapters",
                       description="Fine-tune LoRA adapters on a frozen base model.",
                       epilog=TRAIN_EPILOG + _config_reference(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--config", metavar="FILE", action=_Once,
                   help="YAML config file (see ds_configs/ and docs/configuration.md); once")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=1e-3")
    t.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    # a preemption signal (SIGTERM, Slurm's SIGUSR1) or Ctrl-C (SIGINT) during the seconds
    # torch/DeepSpeed take to import would kill the rank (Ctrl-C with a traceback): remember it;
    # train() then stops before any work, marked preempted

    pending: list[int] = []
    for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(s, lambda signum, frame: pending.append(signum))
    die_with_parent()  # under a launcher: SIGTERM (save and stop) if the launcher dies
    cfg = load_config(args.config, args.overrides)  # every config error is raised here, before any work
    # deferred: torch and the training modules load only after the signals are caught and the config read
    from ..dist import exit_after_teardown
    from ..trainer import train

    train(cfg, pending)  # returns after the process group is torn down and every output is closed
    exit_after_teardown(0)
    return 0
