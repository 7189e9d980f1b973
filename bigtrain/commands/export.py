"""``bigtrain export`` (a checkpoint as a PEFT adapter) and ``bigtrain merge`` (the adapters merged
into the base, a Hugging Face checkpoint): their parsers and commands; :mod:`bigtrain.export` does
the work."""

from __future__ import annotations

import argparse
import sys

EXPORT_EPILOG = """\
examples:
  bigtrain export runs/demo/checkpoints/step-00000500 --format peft out/peft-adapter
  bigtrain export runs/demo --format peft out/peft-adapter --dtype bf16     # latest checkpoint of a run

then, with PEFT:
  base = AutoModelForCausalLM.from_pretrained(BASE); model = PeftModel.from_pretrained(base, "out/peft-adapter")
"""

MERGE_EPILOG = """\
examples:
  bigtrain merge runs/demo/checkpoints/step-00000500 out/merged
  bigtrain merge runs/demo out/merged --base /models/opt-1.3b --max-shard-size 5GB --dtype bf16

  bigtrain merge runs/nf4 out/merged-nf4 --into-quantized   # a model.quantize run: its quantized base

The result loads with plain transformers: AutoModelForCausalLM.from_pretrained("out/merged").
The base is streamed tensor by tensor; memory held is about one output shard. W0 is the base as
stored on disk, also for a run trained with model.quantize; --into-quantized writes the base the
adapters were trained against instead (each quantized weight quantized and dequantized as the run's
ranks held it, at the world size of its checkpoint; in the run's model.dtype), the one whose eval
loss is the run's own (docs/quantized.md gives the difference).
"""


def cmd_export(args) -> int:
    from ..export import FORMATS, export_peft  # the command's module: torch, safetensors, transformers

    if args.format not in FORMATS:
        raise ValueError(f"--format {args.format!r}: unknown export format (known: {', '.join(FORMATS)})")
    out = export_peft(args.checkpoint, args.out, dtype=args.dtype, base=args.base)
    print(f"PEFT adapter written to {out}")
    return 0


def cmd_merge(args) -> int:
    from ..export import merge_checkpoint  # the command's module: torch, safetensors, transformers

    st = merge_checkpoint(args.checkpoint, args.out, base=args.base, max_shard_size=args.max_shard_size,
                          dtype=args.dtype, progress=not args.no_progress and sys.stderr.isatty(),
                          into_quantized=args.into_quantized)
    q = st.get("quantized")
    into = (f" (its {q['weights']} quantized weights as model.quantize={q['scheme']} held them at "
            f"{q['world_size']} rank(s))" if q else "")
    print(f"merged {st['merged_weights']} weights of {st['base']}{into} into {st['out']}: "
          f"{len(st['shards'])} shard(s), {st['total_bytes']:,} bytes")
    return 0


# export and merge read one bigtrain checkpoint into OUT: (help, description, epilog, OUT's help,
# --base's help) of each
_SUBCOMMANDS = {
    "export": ("convert a bigtrain checkpoint to a PEFT LoRA adapter",
               "Convert a bigtrain adapter checkpoint to another format (PEFT: adapter_config.json + "
               "adapter_model.safetensors).", EXPORT_EPILOG, "output directory",
               "base model dir (default: the checkpoint's base_model); read for its config only"),
    "merge": ("merge adapters into the base, write a Hugging Face checkpoint",
              "Write W0 + s·B·A for every adapted weight as a plain Hugging Face checkpoint (sharded "
              "safetensors, config, tokenizer).", MERGE_EPILOG, "output directory (must not exist or be empty)",
              "base model dir (default: the checkpoint's base_model)"),
}


def add_parser(subparsers) -> None:
    p = {}
    for name, (help_, description, epilog, out_help, base_help) in _SUBCOMMANDS.items():
        p[name] = subparsers.add_parser(name, help=help_, description=description, epilog=epilog,
                                        formatter_class=argparse.RawDescriptionHelpFormatter)
        p[name].add_argument("checkpoint", metavar="CKPT",
                             help="checkpoint dir (step-N), or a run dir (uses its latest)")
        p[name].add_argument("out", metavar="OUT", help=out_help)
        p[name].add_argument("--base", metavar="DIR", default=None, help=base_help)
    e, m = p["export"], p["merge"]
    e.add_argument("--format", default="peft", help="output format (only: peft)")
    e.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                   help="adapter tensor dtype (default: as stored in the checkpoint)")
    e.set_defaults(func=cmd_export)
    m.add_argument("--max-shard-size", default="2GB", help="largest output shard, e.g. 2GB, 500MB (default 2GB)")
    m.add_argument("--dtype", choices=("bf16", "fp32", "fp16"), default=None,
                   help="dtype of the written weights (default: the base's)")
    m.add_argument("--into-quantized", action="store_true",
                   help="for a run trained with model.quantize: merge into its quantized base (dequantized, "
                        "as its ranks held it) instead of the unquantized weights on disk")
    m.add_argument("--no-progress", action="store_true",
                   help="no progress bar (it is shown on a terminal only, by input bytes)")
    m.set_defaults(func=cmd_merge)
