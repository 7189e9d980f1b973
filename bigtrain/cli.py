"""Command line: ``bigtrain train | presets | estimate | measure | export | merge | generate |
eval`` (also ``python -m bigtrain``)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import textwrap

from .config import ConfigError, describe, load_config
from .presets import PRESETS, count_parameters, hf_config_for, meta_model

# Deferred imports: the training, data, export and estimator modules load torch; `bigtrain --help`
# must answer without it (tests/e2e/test_cli.py), so each command imports its own module.

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


def cmd_train(args) -> int:
    # a preemption signal (SIGTERM, Slurm's SIGUSR1) or Ctrl-C (SIGINT) during the seconds
    # torch/DeepSpeed take to import would kill the rank (Ctrl-C with a traceback): remember it;
    # train() then stops before any work, marked preempted

    pending: list[int] = []
    for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(s, lambda signum, frame: pending.append(signum))
    from .runlock import die_with_parent

    die_with_parent()  # under a launcher: SIGTERM (save and stop) if the launcher dies
    cfg = load_config(args.config, args.overrides)  # every config error is raised here, before any work
    from .dist import exit_after_teardown
    from .trainer import train

    train(cfg, pending)  # returns after the process group is torn down and every output is closed
    exit_after_teardown(0)
    return 0


def cmd_presets(args) -> int:

    print(f"{'name':<12} {'arch':<8} {'layers':>6} {'d_model':>7} {'heads':>5} {'kv':>3} {'ffn':>6} "
          f"{'vocab':>7} {'context':>7} {'params':>16}  source")
    for name, p in PRESETS.items():
        n = count_parameters(meta_model(hf_config_for(name, vocab_size=1024)))
        print(f"{name:<12} {p.arch:<8} {p.layers:>6} {p.d_model:>7} {p.heads:>5} {p.kv_heads or p.heads:>3} "
              f"{p.ffn:>6} {p.vocab or 1024:>7} {p.context:>7} {n:>16,}  {p.source}")
    print("(kv: key/value heads, fewer than heads = grouped-query attention; tiny presets take the "
          "built-in tokenizer's vocabulary, counted here with 1024; model.num_layers=N changes any "
          "preset's depth)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bigtrain",
        description="LoRA fine-tuning of large causal LMs: the frozen base is partitioned with "
                    "DeepSpeed ZeRO-3, the LoRA adapters and their Adam state are replicated.")
    p.add_argument("--version", action="version", version=f"bigtrain {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    t = sub.add_parser("train", help="fine-tune LoRA adapters",
                       description="Fine-tune LoRA adapters on a frozen base model.",
                       epilog=TRAIN_EPILOG + _config_reference(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--config", metavar="FILE", action=_Once,
                   help="YAML config file (see ds_configs/ and docs/configuration.md); once")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=1e-3")
    t.set_defaults(func=cmd_train)
    pr = sub.add_parser("presets", help="list built-in model presets with exact parameter counts")
    pr.set_defaults(func=cmd_presets)
    for register in _optional_commands():
        register(sub)
    return p


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bigtrain")
    except PackageNotFoundError:  # run from a checkout that was not installed
        return "(not installed)"


class _Once(argparse.Action):
    """An option that may be given once: a second ``--config`` used to replace the first, silently."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option_string} given twice ({getattr(namespace, self.dest)} and {values}): "
                         f"give one file, and put further settings as key=value overrides")
        setattr(namespace, self.dest, values)


def _optional_commands():
    """The subcommands that live in their own modules, each registering its parser. Those modules
    import torch only inside their commands, so ``bigtrain --help`` loads none of it
    (tests/e2e/test_cli.py); a module that fails to import fails here, loudly, rather than its
    subcommand going missing."""
    from .estimate import add_estimate_parser
    from .export import add_export_parsers
    from .generate import add_generate_parsers
    from .measure import add_measure_parser

    return [add_estimate_parser, add_measure_parser, add_export_parsers, add_generate_parsers]


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args``, except that ``bigtrain train`` (and ``measure``) takes its key=value overrides on both
    sides of ``--config`` (``train a=1 --config f.yaml b=2``), in the order given. argparse fills a
    ``nargs="*"`` positional once, so the overrides after an option came back as "unrecognized
    arguments"; ``parse_intermixed_args`` refuses parsers with subcommands. Anything left that
    looks like an option is still an error."""
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "command", None) in ("train", "measure"):
        args.overrides = [*args.overrides, *(e for e in extra if not e.startswith("-"))]
        extra = [e for e in extra if e.startswith("-")]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code = args.func(args) or 0
        sys.stdout.flush()  # a closed pipe shows here, not as an "Exception ignored" at exit
        return code
    except BrokenPipeError:  # `bigtrain estimate ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except ConfigError as e:
        print(f"bigtrain: config error: {e}", file=sys.stderr)
        return _leave(2)
    except Exception as e:  # noqa: BLE001 - user-facing errors get one clear line, then the trace
        from .checkpoint import SAVE_FAILED_EXIT, CheckpointError, CheckpointSaveError
        from .data import DataError

        if isinstance(e, CheckpointSaveError):  # every rank agreed; its own code for the Slurm scripts
            print(f"bigtrain: error: {e}", file=sys.stderr)
            return _leave(SAVE_FAILED_EXIT)
        if isinstance(e, (CheckpointError, DataError, FileNotFoundError, KeyError, ValueError, FloatingPointError)):
            print(f"bigtrain: error: {e}", file=sys.stderr)
            return _leave(1)
        raise


def _leave(code: int) -> int:
    """After a one-line error: a process that started a process group (an error the ranks agreed on,
    e.g. different data on different ranks) leaves without the interpreter's finalisation, as a
    finished run does (:func:`bigtrain.dist.exit_after_teardown`: gloo's threads torn down during
    finalisation abort the process now and then, turning exit code 1 into SIGABRT); any other
    process returns the code."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        from .dist import exit_after_teardown  # (torch is loaded already here)

        exit_after_teardown(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
