"""Command line: ``bigtrain train | presets | estimate | measure | export | merge | generate |
eval`` (also ``python -m bigtrain``)."""

from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import PackageNotFoundError, version

from .commands import estimate, export, generate, measure, presets, train
from .config import ConfigError

# The commands' order in `bigtrain --help`; each module registers its own parser(s).
COMMANDS = (train, presets, estimate, measure, export, generate)
# Deferred imports: the error classes of checkpoint and data, and dist's exit, are imported in
# main's and _leave's error paths only: those modules load torch, and building the parsers (every
# --help) must not (tests/e2e/test_cli.py).


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bigtrain",
        description="LoRA fine-tuning of large causal LMs: the frozen base is partitioned with "
                    "DeepSpeed ZeRO-3, the LoRA adapters and their Adam state are replicated.")
    p.add_argument("--version", action="version", version=f"bigtrain {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return p


def _version() -> str:
    try:
        return version("bigtrain")
    except PackageNotFoundError:  # run from a checkout that was not installed
        return "(not installed)"


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
    # Before CUDA starts: the caching allocator grows segments in place rather than keeping blocks of
    # every size it was asked for. At long context a step allocates many multi-GiB tensors of a few
    # sizes, and without it 11.9 GiB stayed reserved but unusable at 128k tokens on an 80 GB H100
    # (an out-of-memory at 66.5 GiB allocated). A value the user set is kept.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
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
        from .dist import exit_after_teardown

        exit_after_teardown(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
