"""``bigtrain estimate``: its parser and the command, which checks the arguments, asks
:mod:`bigtrain.memory` through :mod:`bigtrain.estimate` and prints the table, JSON or plot. Both
modules load no torch until a model is built (on the meta device), so they are imported here at the
top."""

from __future__ import annotations

import argparse
import json
import sys

from ..config import QUANTIZE_CHOICES
from ..estimate import (format_table, layouts, paper_figures, peft_qlora_anchor, quantize_comparison,
                        tool_estimates, training_plan, write_plot)
from ..memory import DEFAULT_PERSISTENCE, GiB, Setup, estimate, named_config, preset_shape
from ..presets import position_limit
from ..steptime import (DEFAULT_GPU_TFLOPS, DEFAULT_INTER_NODE_GBPS, DEFAULT_INTRA_NODE_GBPS, DEFAULT_MFU, Rates,
                        shard_group_size)

# from this sequence length on, the table is followed by the training plan (always in --json)
LONG_CONTEXT = 32768

EPILOG = """\
what it counts (per GPU, bytes; GB = 1e9):
  full FT   mixed-precision Adam, 16 bytes/param: bf16 weights 2, bf16 grads 2, fp32 master+m+v 12,
            split by ZeRO stage 0 (none) / 1 (optimizer) / 2 (+grads) / 3 (+weights)
  LoRA      bigtrain: frozen base bf16 partitioned by ZeRO-3 (--zero-stage 0: whole on every GPU),
            fp32 adapters + grads + AdamW m,v = 16 bytes per adapter parameter, replicated
  both      activations (34*s*b*h bytes per layer, or layer inputs only with --checkpointing),
            logits + loss, ZeRO gather/reduce buffers, CUDA context + 5 %% fragmentation
  --hpz N   ZeRO++ hierarchical partitioning: the 16-bit weights (full FT) or frozen base (LoRA) per
            GPU grow by a secondary partition over N GPUs: 1/world + 1/N of the model
  --quantize int8|nf4  LoRA's base as model.quantize stores it (ZeRO-3 only): the decoder layers'
            linear weights quantized in each partition; the gather buffers become 3 layers
            dequantized to bf16 + the packed all-gather output + the dequantization temporaries
            (at 1 GPU too); full FT's column is unchanged
  --shard-group world|node|K  the LoRA column with the frozen base partitioned over groups of K GPUs
            (zero.shard_group), replicated across groups: base/K per GPU (default world)
  --sequence-parallel N  the LoRA column with each sequence split over N GPUs (train.sequence_parallel,
            Ulysses): its sequence-proportional activations and loss buffers are those of seq-len/N,
            plus the all-to-all's transient buffers; full FT's column is unchanged (not yet measured
            on GPUs)
  layouts   with --nodes > 1, a table of the base's layouts (world, node, 1) under the memory table:
            base and LoRA peak per GPU, whether each fits, the gathers' bytes per micro-step and their
            link, and the PREDICTED step time and tokens/s per GPU: per micro-step
            max(compute, gathers), compute = tokens x FLOPs/token (recomputation included) /
            (--gpu-tflops x --mfu), gathers at --intra-node-bw within a node, --inter-node-bw across
            nodes (GB/s per GPU); per step x --grad-accum + the adapters' all-reduce. The last line
            recommends the fastest layout that fits. --json: under "layouts", at any node count
  plan      at --seq-len >= 32768 or with --host-mem-gib (always under "plan" in --json): what a
            training run takes with model.gradient_checkpointing, model.tiled_mlp and
            model.offload_activations at auto (the rule a run applies): layers recomputed, MLP tiles,
            inputs in host memory, and the LoRA peak per GPU and host memory per GPU that follow
  Parameter counts come from the real model built on the meta device.

examples:
  bigtrain estimate gpt3-175b --nodes 8 --gpus-per-node 8
  bigtrain estimate gpt3-175b --paper                 # the LoRA paper's figures, and accelerate/DeepSpeed's
  bigtrain estimate gpt3-6.7b --gpus-per-node 1 --zero-stage 0 --no-checkpointing --micro-batch 2
  bigtrain estimate gpt3-13b --gpus-per-node 8 --zero-stage 2 --gpu-mem-gib 141 --json
  bigtrain estimate gpt3-175b --nodes 4 --gpus-per-node 8 --hpz 8   # ds_configs/zero3_hpz.json
  bigtrain estimate llama2-70b --nodes 2 --gpus-per-node 8 --seq-len 8192 --lora-r 16 \
      --lora-targets q_proj,k_proj,v_proj,o_proj --inter-node-bw 25   # which zero.shard_group
  bigtrain estimate llama2-70b --gpus-per-node 2 --micro-batch 2 --lora-r 8 --lora-targets all-linear \\
      --quantize nf4 --gpu-mem-gib 40        # QLoRA-style: PEFT's ZeRO-3 + QLoRA example (--paper)
  bigtrain estimate llama2-7b --gpus-per-node 1 --gpu-mem-gib 139 --host-mem-gib 125 --seq-len 524288 \\
      --lora-r 16 --lora-targets q_proj,k_proj,v_proj,o_proj   # long context: what fits where
  bigtrain estimate ./my-model-dir --lora-targets all-linear --lora-r 16 --plot mem.png
  bigtrain estimate llama3-8b --gpus-per-node 8 --seq-len 65536 --sequence-parallel 8   # long context
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``estimate`` on an argparse ``subparsers`` object."""
    p = subparsers.add_parser(
        "estimate", help="predict per-GPU memory: full fine-tuning with Adam vs LoRA",
        description="Predict per-GPU memory of full fine-tuning with mixed-precision Adam (ZeRO stage "
                    "0-3) and of bigtrain's LoRA (ZeRO-3 frozen base, replicated fp32 adapters), side by "
                    "side, with whole-job totals, whether each fits, and the fewest GPUs that do.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="preset name (see bigtrain presets) or a local Hugging Face config directory")
    p.add_argument("--num-layers", type=int, default=None, metavar="N",
                   help="a preset's depth instead of its own (as model.num_layers=N in training)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=3,
                   help="ZeRO stage for full fine-tuning (default 3); LoRA uses a ZeRO-3 base, or a whole "
                        "base per GPU when this is 0")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per GPU per step (default 1)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default 2048)")
    p.add_argument("--checkpointing", dest="checkpointing", action="store_true", default=True,
                   help="activation checkpointing per decoder layer (default)")
    p.add_argument("--no-checkpointing", dest="checkpointing", action="store_false",
                   help="keep every layer's activations")
    p.add_argument("--checkpoint-layers", type=int, default=None, metavar="N",
                   help="LoRA: recompute only the first N decoder layers (model.gradient_checkpointing=N, "
                        "what auto chooses); the others keep their activations")
    p.add_argument("--compiled", action="store_true",
                   help="LoRA: decoder layers torch.compile'd (model.compile, on by default on GPUs): they "
                        "store less (inductor recomputes the pointwise work)")
    p.add_argument("--tiled-mlp", type=int, default=0, metavar="TOKENS",
                   help="LoRA: each MLP computed TOKENS tokens at a time (model.tiled_mlp=N; default 0: untiled)")
    p.add_argument("--offload-activations", type=int, default=0, metavar="N",
                   help="LoRA: the inputs of the first N checkpointed layers in host memory "
                        "(model.offload_activations=N; default 0)")
    p.add_argument("--host-mem-gib", type=float, default=None, metavar="GIB",
                   help="host memory of one node in GiB, shared by its GPUs: bounds the offloaded inputs of "
                        "the training plan (default: unbounded)")
    p.add_argument("--lora-r", type=int, default=4, help="LoRA rank (default 4, the paper's for 175B)")
    p.add_argument("--lora-targets", default="q_proj,v_proj",
                   help="comma-separated module-name suffixes, or all-linear (default q_proj,v_proj)")
    p.add_argument("--offload-param", action="store_true",
                   help="ZeRO-3 parameter partitions live in host memory (stage 3)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                   help="weights/activations dtype (default bfloat16)")
    p.add_argument("--persistence-threshold", type=int, default=DEFAULT_PERSISTENCE,
                   help="ZeRO-3 stage3_param_persistence_threshold in elements (default 1e5)")
    p.add_argument("--hpz", type=int, default=1, metavar="N",
                   help="ZeRO++ hierarchical partitioning, zero_hpz_partition_size (stage 3; usually the "
                        "GPUs per node): adds a secondary partition of every non-persistent parameter "
                        "over N ranks, so backward gathers stay in the node (default 1: off)")
    p.add_argument("--full-recipe", choices=("zero", "torch-amp"), default="zero",
                   help="full FT: zero = mixed-precision Adam, 16 bytes/param (default); torch-amp = plain "
                        "one-GPU PyTorch, fp32 weights+grads+Adam and autocast (needs --zero-stage 0, 1 GPU)")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None,
                   help="LoRA's frozen base as model.quantize stores it: the decoder layers' linear weights "
                        "quantized in each GPU's ZeRO-3 partition (int8: 1 byte + an fp32 scale per 64; nf4: "
                        "4 bits + double-quantized scales), all-gathered as stored and dequantized layer by "
                        "layer, at 1 GPU too. Needs ZeRO stage 3 (not --zero-stage 0, --hpz or "
                        "--offload-param); full fine-tuning's column is unchanged (default: unquantized)")
    p.add_argument("--gpu-mem-gib", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    p.add_argument("--shard-group", default="world", metavar="world|node|K",
                   help="LoRA's frozen base partitioned over groups of K GPUs (zero.shard_group), replicated "
                        "across groups: world (default), node (--gpus-per-node) or an integer dividing the GPU count")
    p.add_argument("--sequence-parallel", type=int, default=1, metavar="N",
                   help="LoRA: each sequence split over N GPUs (train.sequence_parallel; Ulysses): activations "
                        "of seq-len/N per GPU; N must divide the GPU count (default 1: off)")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-steps per optimizer step, for the layouts' step time (default 1)")
    p.add_argument("--gpu-tflops", type=float, default=DEFAULT_GPU_TFLOPS,
                   help=f"a GPU's dense bf16 peak, TFLOP/s, for the layouts' step time (default "
                        f"{DEFAULT_GPU_TFLOPS:g}: H100/H200)")
    p.add_argument("--mfu", type=float, default=DEFAULT_MFU,
                   help=f"the fraction of --gpu-tflops achieved (default {DEFAULT_MFU:g}; measured: 0.58 for "
                        f"Llama-2-13B on one H200, 0.55 for Llama-2-70B on two, recomputation counted)")
    p.add_argument("--intra-node-bw", type=float, default=DEFAULT_INTRA_NODE_GBPS, metavar="GB/S",
                   help=f"per-GPU bandwidth within a node, GB/s one way (default {DEFAULT_INTRA_NODE_GBPS:g}: NVLink 4)")
    p.add_argument("--inter-node-bw", type=float, default=DEFAULT_INTER_NODE_GBPS, metavar="GB/S",
                   help=f"per-GPU bandwidth across nodes, GB/s one way (default {DEFAULT_INTER_NODE_GBPS:g}: "
                        f"400 Gb/s per GPU)")
    p.add_argument("--paper", action="store_true",
                   help="also print the LoRA paper's GPT-3 175B figures and what accelerate/DeepSpeed estimate")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--plot", metavar="FILE.png", help="write stacked bars and a per-GPU-vs-GPU-count plot")
    p.set_defaults(func=cmd_estimate)
    return p


def setup_from_args(args) -> Setup:
    return Setup(world_size=args.nodes * args.gpus_per_node, zero_stage=args.zero_stage,
                 micro_batch=args.micro_batch, seq_len=args.seq_len, checkpointing=args.checkpointing,
                 lora_r=args.lora_r, lora_targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()),
                 dtype=args.dtype, offload_param=args.offload_param,
                 persistence_threshold=args.persistence_threshold, hpz=args.hpz,
                 full_recipe=args.full_recipe,
                 gpu_mem_bytes=int(args.gpu_mem_gib * GiB), quantize=getattr(args, "quantize", None),
                 checkpoint_layers=getattr(args, "checkpoint_layers", None), compiled=getattr(args, "compiled", False),
                 shard_group=_shard_group(getattr(args, "shard_group", "world"), args.nodes, args.gpus_per_node),
                 tiled_mlp=getattr(args, "tiled_mlp", 0), offload_layers=getattr(args, "offload_activations", 0),
                 sequence_parallel=getattr(args, "sequence_parallel", 1))


def _shard_group(value: str, nodes: int, gpus_per_node: int) -> int:
    """--shard-group as Setup.shard_group: 0 for the world (the default layout, whatever the GPU count:
    --plot and the fewest GPUs vary it), else the group's size."""
    k = shard_group_size(value, nodes, gpus_per_node)
    return 0 if value == "world" or k == nodes * gpus_per_node else k


def cmd_estimate(args) -> int:
    if args.nodes < 1 or args.gpus_per_node < 1:
        print("error: --nodes and --gpus-per-node must be >= 1", file=sys.stderr)
        return 2
    for flag, v in (("--tiled-mlp", args.tiled_mlp), ("--offload-activations", args.offload_activations)):
        if v < 0:
            print(f"error: {flag} must be >= 0 (0: off), got {v}", file=sys.stderr)
            return 2
    for flag, v in (("--lora-r", args.lora_r), ("--micro-batch", args.micro_batch),
                    ("--num-layers", 1 if args.num_layers is None else args.num_layers),
                    ("--seq-len", args.seq_len), ("--gpu-mem-gib", args.gpu_mem_gib),
                    ("--grad-accum", args.grad_accum), ("--gpu-tflops", args.gpu_tflops), ("--mfu", args.mfu),
                    ("--intra-node-bw", args.intra_node_bw), ("--inter-node-bw", args.inter_node_bw),
                    ("--host-mem-gib", 1 if args.host_mem_gib is None else args.host_mem_gib)):
        if not v > 0:
            print(f"error: {flag} must be > 0, got {v}", file=sys.stderr)
            return 2
    if args.mfu > 1:
        print(f"error: --mfu is the fraction of --gpu-tflops achieved, at most 1, got {args.mfu}", file=sys.stderr)
        return 2
    world = args.nodes * args.gpus_per_node
    if args.hpz < 1 or world % args.hpz:
        print(f"error: --hpz {args.hpz} must be >= 1 and divide the GPU count {world} "
              f"(--nodes x --gpus-per-node)", file=sys.stderr)
        return 2
    if args.sequence_parallel < 1 or world % args.sequence_parallel:
        print(f"error: --sequence-parallel {args.sequence_parallel} must be >= 1 and divide the GPU count {world} "
              f"(--nodes x --gpus-per-node), as train.sequence_parallel must divide the world size", file=sys.stderr)
        return 2
    if args.hpz > 1 and args.zero_stage != 3:
        print(f"error: --hpz {args.hpz} needs --zero-stage 3 (hierarchical partitioning is ZeRO-3's)",
              file=sys.stderr)
        return 2
    if args.quantize is not None and (args.zero_stage == 0 or args.hpz > 1 or args.offload_param):
        clash = ("--zero-stage 0" if args.zero_stage == 0 else f"--hpz {args.hpz}" if args.hpz > 1
                 else "--offload-param")
        print(f"error: --quantize {args.quantize} needs LoRA's ZeRO-3 base with bigtrain's layer gatherer; "
              f"drop {clash} (training refuses model.quantize with it too)", file=sys.stderr)
        return 2
    try:
        st = setup_from_args(args)
        shape = preset_shape(args.model, args.num_layers)
        limit = position_limit(named_config(args.model)[1])
        if limit and args.seq_len > limit:
            print(f"error: --seq-len {args.seq_len} exceeds {args.model}'s {limit} positions (its learned position "
                  f"table; training refuses data.max_length above it too)", file=sys.stderr)
            return 2
        est = estimate(shape, st)
        if args.zero_stage == 3 and args.hpz == 1 and not args.offload_param:
            plan = training_plan(shape, st, int(args.host_mem_gib * GiB) if args.host_mem_gib else None,
                                 args.gpus_per_node)
            if args.json or args.seq_len >= LONG_CONTEXT or args.host_mem_gib:
                est["plan"] = plan
        est["layouts"] = layouts(shape, st, args.nodes, args.gpus_per_node, args.grad_accum,
                                 Rates(args.gpu_tflops, args.mfu, args.intra_node_bw, args.inter_node_bw))
    except (ValueError, KeyError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    paper = tools = None
    if args.paper:
        paper = paper_figures(args.model)
        paper["quantized"] = quantize_comparison(shape, st)
        paper["qlora_anchor"] = peft_qlora_anchor()
        tools = tool_estimates(args.model, args.gpus_per_node, args.nodes)
        est["paper"], est["tools"] = paper, tools
    if args.plot:
        write_plot(est, args.plot, shape, st)
        est["plot"] = args.plot
    if args.json:
        print(json.dumps(est, indent=2))
    else:
        print(format_table(est, paper, tools))
        if args.plot:
            print(f"\nplot written to {args.plot}")
    return 0
