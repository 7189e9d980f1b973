"""Memory accounting: what LoRA saves against full fine-tuning with Adam, per GPU, up to GPT-3 175B.

Two halves:

* **Predicted** (``estimate``, ``predict_states``; the ``bigtrain estimate`` command that prints it is
  :mod:`bigtrain.estimate`): per-GPU bytes by category for
  full fine-tuning with mixed-precision Adam under ZeRO stage 0-3, and for bigtrain's LoRA (frozen base
  partitioned by ZeRO-3, or whole at stage 0; fp32 adapters and their AdamW state replicated).
* **Measured** (``measure_states``): the same categories for the live objects of this rank.
  ``tests/test_memory_dist.py`` checks measured == predicted exactly, per rank, for 1, 2 and 3 ranks.

Assumptions (every one of them is a choice stated here, not a law):

* Parameter counts come from the real ``transformers`` model built on the meta device
  (:func:`bigtrain.presets.meta_model`), tied weights once; never from a closed formula.
* ZeRO-3 partitions each parameter separately and pads it to a multiple of N, so a rank holds
  ``ceil(numel / N)`` elements of it. A parameter of at most ``persistence_threshold`` elements
  (DeepSpeed's ``stage3_param_persistence_threshold``, default 1e5) additionally stays whole on every
  rank once it has been gathered (after the first forward): it costs ``numel + ceil(numel / N)``.
* Full fine-tuning, recipe ``zero`` (the ZeRO paper's mixed-precision Adam, 16 bytes/param):
  2Ψ bf16 weights + 2Ψ bf16 gradients + 12Ψ fp32 master weights, m and v. Stage 0: all of it on every
  GPU; 1: the 12Ψ sharded; 2: grads too; 3: everything. At stages 1-2 the sharded *flat* buffers
  (grads, optimizer state) are ``ceil(Ψ / N)`` per rank. At stage 3 DeepSpeed flattens the
  per-parameter padded partitions, so they are ``Σ ceil(numel / N)`` per rank (the 16-bit weights
  follow the per-parameter rule above), and torch's AdamW keeps a 4-byte ``step`` per sub-group
  (``sub_group_size``, 1e9 elements): exactly what ``bigtrain measure`` counts on the live optimizer.
* Full fine-tuning, recipe ``torch-amp`` (what ``bench/memory_gpu.py`` runs on one GPU): fp32 weights
  4Ψ, fp32 grads 4Ψ, AdamW m,v 8Ψ, plus the bf16 copies that autocast makes of every weight and
  autograd keeps for backward (2Ψ, counted under "ZeRO/comm buffers + casts").
* LoRA: Φ = Σ over target linear layers of r·(d_in + d_out). Adapter state per rank:
  fp32 weights 4Φ + fp32 grads 4Φ + AdamW m, v 8Φ = 16Φ, plus torch AdamW's fp32 ``step`` counter
  (4 bytes per adapter tensor). Replicated: it does not shrink with N. With N > 1 the flat fp32
  all-reduce of the gradients adds a transient 4Φ.
* Activations, bf16, per decoder layer (Korthikanti et al. 2022): ``34·s·b·h`` bytes without
  recomputation (sdpa/flash attention: the ``5·a·s²·b`` score term is never stored). LoRA adds per
  adapted matrix the r-dim intermediate (2·s·b·r) and the copy of the input that the adapter
  makes when it casts to its own dtype (2·s·b·d_in under bf16 autocast). With full recomputation:
  the layer inputs ``2·s·b·h`` per layer plus one layer's working set while it is recomputed.
* Logits and loss: ``s·b·V`` bf16 logits + their fp32 upcast for the loss + the fp32 log-softmax that
  cross-entropy keeps for backward: ``(2 + 4 + 4)·s·b·V``.
* ZeRO buffers: stage 3 gathers one fetch unit at a time (a whole decoder layer for bigtrain's LoRA,
  which sets ``set_z3_leaf_modules``; the largest module for DeepSpeed full FT) plus the prefetch bucket
  (5e7 elements); full FT at stages 1-3 also holds a reduce bucket (5e8 elements, 16-bit).
* CUDA context 0.5 GiB plus a 5 % fragmentation allowance on everything else; these two are not
  part of ``torch.cuda.max_memory_allocated`` (the bench compares without them).
* A quantized LoRA base (``Setup.quantize``, model.quantize=int8|nf4): the frozen weights are the
  quantized partitions (``quantize.quantized_bytes``) and the gather buffers those of the layer gatherer
  dequantizing layer by layer, at world size 1 too (:func:`quantized_gather_bytes`). Full fine-tuning
  is never quantized.
* LoRA's base partitioned over groups of ``Setup.shard_group`` ranks (zero.shard_group; 0: the
  world), replicated across groups: the frozen weights, the layer-gather buffers and a checkpoint's
  reads follow the group's size (``Setup.base_shards``), the adapters' all-reduce the world's.

Everything here is CPU-only and never allocates model storage.
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from .config import DEFAULT_PERSISTENCE, DTYPE_BYTES, QUANTIZE_CHOICES
from .presets import PRESETS, hf_config_for, meta_model

# Deferred imports: torch, transformers and the modules that load torch (inject, lora, losses,
# quantize, engine.build) are imported where used: the CLI builds `bigtrain estimate`'s parser from
# this module's defaults without loading torch, and estimate loads no engine (tests/unit/test_imports.py).

GiB = 2 ** 30
GB = 10 ** 9

CATEGORIES = ("frozen_weights", "trainable_weights", "gradients", "optimizer_state",
              "activations", "logits_loss", "zero_buffers", "cuda_context")
CATEGORY_LABELS = {
    "frozen_weights": "frozen weights",
    "trainable_weights": "trainable weights",
    "gradients": "gradients",
    "optimizer_state": "optimizer state",
    "activations": "activations",
    "logits_loss": "logits + loss",
    "zero_buffers": "ZeRO/comm buffers + casts",
    "cuda_context": "CUDA context + fragmentation",
}
CUDA_CONTEXT_BYTES = GiB // 2
FRAGMENTATION = 0.05
# A rank's host memory beside the base: Python, torch (with CUDA's libraries on a GPU run),
# DeepSpeed, transformers, the tokenizer and the data's index. Measured as peak RSS less the
# partitions: 0.36 GB on the 2-core CPU machine (tests/e2e/test_build_host_memory.py, before the
# build) and on an H200 host (bench/gpt3_175b_h200.sh; see docs/results.md).
HOST_RUNTIME_BYTES = {"cpu": GiB // 2, "cuda": 3 * GiB}
# Quantization's temporaries on a CPU run: a chunk of 2**24 elements in fp32 and its block
# views and codes (measured 0.5-1.0 GB beyond one layer, tests/e2e/test_build_host_memory.py).
HOST_QUANT_TEMP_BYTES = GiB
PREFETCH_BUCKET = int(5e7)  # DeepSpeed stage3_prefetch_bucket_size (elements)
REDUCE_BUCKET = int(5e8)  # DeepSpeed reduce_bucket_size (elements)
SUB_GROUP_SIZE = int(1e9)  # DeepSpeed zero_optimization.sub_group_size (elements)


# ---------------------------------------------------------------------------------------------
# The model's shape, from the real model on the meta device.


@dataclass
class ModelShape:
    """Everything the estimator needs, read off a meta-device model."""

    name: str
    numels: Counter  # numel -> how many parameters have it (tied weights once)
    total_params: int
    layers: int
    hidden: int
    heads: int
    vocab: int
    layer_params: int  # parameters of one decoder layer (the bigtrain ZeRO-3 fetch unit)
    largest_module_params: int  # the largest module's own parameters (DeepSpeed's "largest layer")
    linears: dict = field(default_factory=dict)  # dotted name -> (d_in, d_out)
    output_layers: frozenset = frozenset()  # the LM head's names (never adapted)
    ffn: int = 0  # the widest output of a decoder layer's linear maps (the MLP's inner width)
    ffn_maps: int = 1  # linear maps of a decoder layer that output ``ffn`` (2: gated MLP, SwiGLU)
    param_numels: tuple = ()  # every parameter's numel in ``model.parameters()`` order, tied once
    quant_numels: Counter = field(default_factory=Counter)  # numel -> count of model.quantize's weights
    # (numel, quantized by model.quantize) of each parameter of one decoder layer (the first), tied once:
    # the layer gatherer's unit, for the buffers of a quantized base
    layer_numels: tuple = ()
    rms_norm: bool = False  # the decoder layer normalises with RMSNorm (LLaMA family), not LayerNorm

    def lora_params(self, targets: list[str], r: int) -> int:
        return sum(r * (i + o) for i, o in self.lora_shapes(targets).values())

    def lora_shapes(self, targets: list[str]) -> dict:
        """(d_in, d_out) of each adapted linear layer, chosen by the same rule as training
        (:func:`bigtrain.inject.select_targets`)."""
        from .inject import select_targets

        return {n: self.linears[n] for n in select_targets(list(self.linears), targets, set(self.output_layers), self.name)}


def named_config(source):
    """A preset name, a local HF config directory, or an HF config object -> (name, config)."""
    if isinstance(source, str):
        if source in PRESETS:
            return source, hf_config_for(source, vocab_size=512)
        if Path(source).is_dir():
            import transformers as tf

            return Path(source).name, tf.AutoConfig.from_pretrained(source)
        raise ValueError(f"{source!r} is neither a preset ({', '.join(PRESETS)}) "
                         f"nor a local Hugging Face config directory")
    return getattr(source, "model_type", "model"), source


def shape_from_model(model, name: str = "model") -> ModelShape:
    """Read a :class:`ModelShape` off a (meta or real) model; ZeRO-3 full shapes when partitioned."""
    from .inject import is_linear, output_layer_names
    from .lora import linear_shape
    from .quantize import quantizable_weights

    cfg = getattr(model, "config", None)
    order = tuple(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())  # tied once
    numels = Counter(order)
    linears = {n: linear_shape(m) for n, m in model.named_modules() if is_linear(m)}
    layer_params, largest = 0, 0
    for m in model.modules():
        own = sum(int(getattr(p, "ds_numel", p.numel())) for p in m.parameters(recurse=False))
        largest = max(largest, own)
    layers_mod = _decoder_layers(model)
    quantized = quantizable_weights(model)
    ffn, ffn_maps, layer_numels, rms_norm = 0, 1, (), False
    if layers_mod is not None and len(layers_mod):
        layer_params = sum(int(getattr(p, "ds_numel", p.numel())) for p in layers_mod[0].parameters())
        layer_numels = tuple((int(getattr(p, "ds_numel", p.numel())), id(p) in quantized)
                             for p in layers_mod[0].parameters())
        outs = [linear_shape(m)[1] for m in layers_mod[0].modules() if is_linear(m)]
        ffn = max(outs, default=0)
        ffn_maps = max(1, outs.count(ffn))
        rms_norm = any("RMSNorm" in type(m).__name__ for m in layers_mod[0].modules())
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 0)
    return ModelShape(
        name=name, numels=numels, total_params=sum(k * v for k, v in numels.items()),
        layers=getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 0),
        hidden=hidden,
        heads=getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", 0),
        vocab=getattr(cfg, "vocab_size", 0), layer_params=layer_params,
        largest_module_params=largest, linears=linears, output_layers=frozenset(output_layer_names(model)),
        ffn=ffn or 4 * hidden, ffn_maps=ffn_maps, param_numels=order,
        quant_numels=Counter(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters()
                             if id(p) in quantized), layer_numels=layer_numels, rms_norm=rms_norm)


def _decoder_layers(model):
    from torch import nn

    best = None
    for _, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and (best is None or len(m) > len(best)):
            best = m
    return best


@functools.lru_cache(maxsize=4)
def meta_cached(source: str):

    return meta_model(named_config(source)[1])


@functools.lru_cache(maxsize=16)
def _shape_cached(source: str) -> ModelShape:
    return shape_from_model(meta_cached(source), named_config(source)[0])


def preset_shape(name: str, num_layers: int | None = None) -> ModelShape:
    """:class:`ModelShape` of a preset, at its own depth or at ``num_layers`` (``model.num_layers``)."""
    if num_layers is None:
        return model_shape(name)
    if name not in PRESETS:
        raise ValueError(f"--num-layers changes a preset's depth; {name!r} is not a preset "
                         f"({', '.join(PRESETS)})")
    cfg = hf_config_for(name, vocab_size=512, num_layers=num_layers)
    return shape_from_model(meta_model(cfg), f"{name} ({num_layers} layers)")


def model_shape(source) -> ModelShape:
    """:class:`ModelShape` of a preset name, a local HF config directory, an HF config or a model.
    Presets are built on the meta device once per process (tiny presets with vocabulary 512)."""
    if isinstance(source, ModelShape):
        return source
    if isinstance(source, str):
        return _shape_cached(source)
    if hasattr(source, "parameters"):
        return shape_from_model(source, type(source).__name__)

    name, cfg = named_config(source)
    return shape_from_model(meta_model(cfg), name)


# ---------------------------------------------------------------------------------------------
# Exact per-rank model states: predicted and measured.


def zero3_local_numel(numel: int, world_size: int, persistence_threshold: int = DEFAULT_PERSISTENCE,
                      hpz: int = 1) -> int:
    """Elements of one ZeRO-3 parameter held by a rank: its padded partition ``ceil(numel/N)``, plus
    the whole tensor if it is persistent (``numel <= threshold``; whole once first gathered). At
    world size 1 the partition *is* the whole tensor and the engine aliases the two: one copy.
    With hierarchical partitioning (``zero_hpz_partition_size`` = hpz > 1) a non-persistent
    parameter also keeps, from its first release on, a secondary partition of the padded tensor
    over the hpz ranks of its group: ``ceil(numel/N)·N/hpz`` elements (DeepSpeed's
    ``ds_secondary_tensor``), the memory hpZ spends to gather within a node."""
    part = -(-numel // world_size)
    if world_size == 1:
        return part
    if numel <= persistence_threshold:
        return part + numel
    return part + (part * (world_size // hpz) if hpz > 1 else 0)


def zero3_flat_numel(shape: ModelShape, world_size: int) -> int:
    """Elements of one rank's share of ZeRO-3's flat optimizer buffers (the 16-bit gradient
    partitions, the fp32 master, Adam's m and v): DeepSpeed pads each parameter to a multiple of N
    and flattens the partitions, so a rank holds ``Σ ceil(numel / N)``, not ``ceil(Ψ / N)``."""
    return sum(c * -(-n // world_size) for n, c in shape.numels.items())


def zero3_sub_groups(shape: ModelShape, world_size: int, sub_group_size: int = SUB_GROUP_SIZE) -> int:
    """How many sub-groups DeepSpeed's ZeRO-3 optimizer cuts a rank's partitions into (each one flat
    fp32 tensor that the wrapped optimizer steps, torch AdamW keeping a 4-byte ``step`` for each):
    DeepSpeed's greedy cut, in parameter order, closing a group once it reaches ``sub_group_size``."""
    parts = [-(-n // world_size) for n in shape.param_numels]
    if not parts or sum(parts) <= sub_group_size:
        return 1
    groups, acc = 0, 0
    for i, n in enumerate(parts):
        acc += n
        if acc >= sub_group_size or i == len(parts) - 1:
            groups, acc = groups + 1, 0
    return groups


def predict_full_states(shape: ModelShape, world_size: int, stage: int = 3, dtype: str = "bfloat16",
                        persistence_threshold: int = DEFAULT_PERSISTENCE) -> dict:
    """This rank's model-state bytes of full fine-tuning under DeepSpeed ZeRO-``stage`` with 16-bit
    mixed precision and torch's AdamW, by the kinds ``bigtrain measure`` counts on the live engine:
    the 16-bit weights, their gradients, the fp32 master weights, Adam's m, v and ``step``. Exact at
    stages 3 and 2 on 2 CPU ranks (``tests/e2e/test_measure.py``), where stage 2 has flat
    ``ceil(Ψ / N)`` shares. Stage 1 keeps the ZeRO paper's whole 16-bit gradients; DeepSpeed at
    ``gradient_accumulation_steps`` 1 was seen holding only their partition, as at stage 2."""
    N, w16 = world_size, DTYPE_BYTES[dtype]
    if stage == 3:
        flat, groups = zero3_flat_numel(shape, N), zero3_sub_groups(shape, N)
        weights = frozen_base_bytes(shape, N, w16, 3, persistence_threshold)
        grads = w16 * flat
    else:
        flat, groups = (-(-shape.total_params // N) if stage >= 1 else shape.total_params), 1
        weights = w16 * shape.total_params
        grads = w16 * (flat if stage == 2 else shape.total_params)
    return {"weights": weights, "gradients": grads, "master_weights": 4 * flat,
            "adam_states": 8 * flat + 4 * groups}


def frozen_base_bytes(shape: ModelShape, world_size: int, base_bytes: int, stage: int = 3,
                      persistence_threshold: int = DEFAULT_PERSISTENCE, hpz: int = 1,
                      quantize: str | None = None) -> int:
    if stage == 0:
        return shape.total_params * base_bytes
    if quantize is not None:  # the quantized partition's stored sections, never persistent
        from .quantize import quantized_bytes

        rest = shape.numels - shape.quant_numels
        return (base_bytes * sum(c * zero3_local_numel(n, world_size, persistence_threshold, hpz)
                                 for n, c in rest.items())
                + sum(c * quantized_bytes(-(-n // world_size), quantize) for n, c in shape.quant_numels.items()))
    return base_bytes * sum(c * zero3_local_numel(n, world_size, persistence_threshold, hpz)
                            for n, c in shape.numels.items())


def predict_states(hf_config_or_model_meta, targets: list[str], r: int, world_size: int,
                   base_dtype: str = "float32", persistence_threshold: int = DEFAULT_PERSISTENCE,
                   stage: int = 3, adapter_dtype: str = "float32", hpz: int = 1,
                   quantize: str | None = None) -> dict:
    """This rank's bytes of model states in steady state (after the second training step: during the
    first, DeepSpeed records its fetch trace and releases persistent parameters too) of bigtrain's LoRA (same keys as
    :func:`measure_states`): the frozen base (ZeRO-3 partitions + persistent whole tensors, or the whole
    base at stage 0), fp32 adapter weights, their grads, and torch AdamW's state (m, v in fp32 and a
    4-byte fp32 ``step`` per adapter tensor). Exact, not approximate. ``quantize`` (model.quantize):
    the decoder layers' linear weights count as their quantized partitions (``quantize.quantized_bytes``)."""
    shape = model_shape(hf_config_or_model_meta)
    ab = DTYPE_BYTES[adapter_dtype]
    shapes = shape.lora_shapes(targets)
    phi = sum(r * (i + o) for i, o in shapes.values())
    n_tensors = 2 * len(shapes)
    return {
        "frozen_weights": frozen_base_bytes(shape, world_size, DTYPE_BYTES[base_dtype], stage,
                                            persistence_threshold, hpz, quantize),
        "trainable_weights": ab * phi,
        "gradients": ab * phi,
        "optimizer_state": 2 * ab * phi + 4 * n_tensors,
    }


def _tensor_bytes(t) -> int:
    return t.numel() * t.element_size()


def measure_states(model, lora, optimizer) -> dict:
    """This rank's bytes held by the live objects, by category: frozen base storage (for a ZeRO-3
    parameter its local partition ``ds_tensor`` plus ``data`` while gathered/persistent, plus the
    hpZ secondary partition if any), adapter
    weights, adapter gradients (call after backward, before ``zero_grad``), optimizer state tensors."""
    from .engine.build import local_param_bytes  # the same count the engine reports; imports no DeepSpeed

    frozen = local_param_bytes(model)
    params = list(lora.parameters())
    opt = 0
    for st in optimizer.state.values():
        for v in st.values():
            if hasattr(v, "numel") and hasattr(v, "element_size"):
                opt += _tensor_bytes(v)
    return {
        "frozen_weights": frozen,
        "trainable_weights": sum(_tensor_bytes(p) for p in params),
        "gradients": sum(_tensor_bytes(p.grad) for p in params if p.grad is not None),
        "optimizer_state": opt,
    }


# ---------------------------------------------------------------------------------------------
# Whole-step per-GPU estimate: full fine-tuning with Adam vs bigtrain's LoRA.


@dataclass
class Setup:
    """The inputs of one estimate (the same ones ``bench/memory_gpu.py`` runs with)."""

    world_size: int = 1
    zero_stage: int = 3  # full fine-tuning's ZeRO stage; LoRA: 0 if this is 0, else 3
    micro_batch: int = 1
    seq_len: int = 2048
    checkpointing: bool = True
    # decoder layers recomputed in backward, the first ones (model.gradient_checkpointing=N or auto);
    # None: every layer if ``checkpointing``, else none (LoRA only: full fine-tuning uses ``checkpointing``)
    checkpoint_layers: int | None = None
    compiled: bool = False  # LoRA's decoder layers torch.compile'd (model.compile): what they store differs
    lora_r: int = 4
    lora_targets: tuple = ("q_proj", "v_proj")
    dtype: str = "bfloat16"  # 16-bit weights/activations (LoRA: the frozen base's storage dtype)
    offload_param: bool = False  # ZeRO-3 parameter partitions in host memory (stage 3 only)
    persistence_threshold: int = DEFAULT_PERSISTENCE
    hpz: int = 1  # ZeRO++ zero_hpz_partition_size (stage 3): a secondary partition per hpz ranks
    full_recipe: str = "zero"  # "zero": 16 bytes/param mixed precision; "torch-amp": see module doc
    gpu_mem_bytes: int = 80 * GiB
    include_context: bool = True  # CUDA context + fragmentation allowance
    quantize: str | None = None  # LoRA's base: model.quantize (None, "int8", "nf4"); full FT is unaffected
    # ranks over which LoRA's frozen base is partitioned (zero.shard_group); 0: the world size. The
    # base is partitioned within each group of this many consecutive ranks and replicated across
    # groups, so a rank holds 1/shard_group of it and gathers its layers within its group; full
    # fine-tuning is unaffected
    shard_group: int = 0
    # LoRA at long context (bigtrain.longctx): the MLP of each decoder layer computed this many tokens
    # at a time (model.tiled_mlp; 0: untiled), and the inputs of the first ``offload_layers``
    # checkpointed layers held in pinned host memory between forward and backward
    # (model.offload_activations)
    tiled_mlp: int = 0
    offload_layers: int = 0
    # LoRA only: train.sequence_parallel, each sequence split over this many ranks (Ulysses); full
    # fine-tuning is estimated without it (bigtrain's full fine-tuning does not run it)
    sequence_parallel: int = 1

    @property
    def lora_stage(self) -> int:
        return 0 if self.zero_stage == 0 else 3

    @property
    def base_shards(self) -> int:
        """The ranks LoRA's frozen base is partitioned over: ``shard_group``, or the world size when it
        is 0 (checked: :meth:`check_shard_group`)."""
        self.check_shard_group()
        return self.shard_group or self.world_size

    def check_shard_group(self) -> None:
        """``shard_group`` must divide the world size (groups of consecutive ranks that tile it), and hpZ
        (a secondary partition over ``hpz`` ranks of a base partitioned over the world) is refused with
        a smaller group: the two are alternative ways of keeping the gathers within a node."""
        K, N = self.shard_group, self.world_size
        if K < 0 or (K and N % K):
            raise ValueError(f"shard_group={K} must be 0 (the world size) or a positive divisor of the world "
                             f"size {N}")
        if self.hpz > 1 and K not in (0, N):
            raise ValueError(f"shard_group={K} cannot be combined with hpZ (hpz={self.hpz}): both keep the base's "
                             f"gathers within a group of ranks; use one (shard_group=0 or {N} with hpZ)")

    def check_quantize(self) -> None:
        """A quantized base needs what training needs (config.Config.validate, engine.ds_config.check_world): the
        ZeRO-3 base and bigtrain's layer gatherer, so no hpZ and no parameter offload."""
        if self.quantize is None:
            return
        if self.quantize not in QUANTIZE_CHOICES:
            raise ValueError(f"quantize={self.quantize!r} is not one of {', '.join(QUANTIZE_CHOICES)}")
        if self.lora_stage != 3:
            raise ValueError(f"quantize={self.quantize} quantizes the ZeRO-3 partitions of LoRA's base: it "
                             f"needs ZeRO stage 3, not {self.zero_stage}")
        if self.hpz > 1 or self.offload_param:
            raise ValueError(f"quantize={self.quantize} cannot be combined with "
                             f"{'hpZ' if self.hpz > 1 else 'parameter offload'} (training refuses it too)")


# The last name of a linear map that projects the attention's output (its input is sdpa's output,
# which sdpa keeps for its own backward: an adapter there stores nothing more of that width).
_ATTN_OUT = frozenset({"o_proj", "out_proj", "dense", "c_proj", "wo", "o", "attn_out"})


_MLP_PARENT = re.compile(r"(^|\.)(mlp|feed_forward|ffn)$")


def _lora_input_bytes(shape: ModelShape, lora: dict, act: int, r: int, compiled: bool, tiled: bool = False) -> int:
    """Per token, over all layers: what the adapters add to the stored activations. Each adapter keeps
    its r-wide intermediate (for B's gradient) and its input (for A's); an input already stored is
    not stored twice: an MLP's down projection reads the ffn-wide product, kept for the adapter alone;
    the attention's output projection reads sdpa's output, which sdpa keeps anyway; the projections
    reading one normalised input (q, k, v; gate, up) share one bf16 copy of it where it is bf16 before
    they read it (RMSNorm returns the storage dtype; a compiled layer casts once inside its graph), but
    each makes its own autocast copy of a LayerNorm's fp32 output in an eager layer. With ``tiled``
    (model.tiled_mlp) the adapters inside the MLP keep nothing beyond one tile (counted apart)."""
    shared = shape.rms_norm or compiled
    total, groups = 0, set()
    for name, (d_in, _) in lora.items():
        parent, _, leaf = name.rpartition(".")
        if tiled and _MLP_PARENT.search(parent):
            continue
        total += act * r
        if shape.ffn != shape.hidden and d_in == shape.ffn:
            total += act * d_in
        elif leaf in _ATTN_OUT and re.search("attn|attention", parent, re.I):
            continue
        elif shared:
            if parent not in groups:
                groups.add(parent)
                total += act * d_in
        else:
            total += act * d_in
    return total


def _act_bytes_per_layer(shape: ModelShape, s: int, b: int, act: int, lora: dict | None, r: int,
                         compiled: bool = False, tiled: bool = False) -> int:
    """One decoder layer's stored activations without recomputation.

    Full fine-tuning: 34·s·b·h (bf16, sdpa; scaled by act/2 for other widths; Korthikanti et al.
    2022), which includes every linear map's input, kept for its weight gradient.

    LoRA (bigtrain): a frozen linear map keeps no input (its input gradient needs only the weight,
    bigtrain/frozen_linear.py), so what stays is, per token of a layer:

    * eager: the two norms' inputs in fp32 (autocast runs LayerNorm in fp32, and LLaMA's RMSNorm
      upcasts itself: 2 × 4·h), sdpa's q, k, v and output (4 × act·h; an upper bound under
      grouped-query attention), the MLP's activation input (act·ffn) or, for a gated MLP (SwiGLU:
      down(silu(gate(x)) · up(x))), the gate's output, its silu and the up projection's output
      (3 × act·ffn);
    * compiled (model.compile): inductor's partitioner recomputes the cheap pointwise work in
      backward, so the layer keeps its input and the residual between attention and MLP in the
      storage dtype (2 × act·h: the norms are recomputed from them), sdpa's q, k, v, output
      (4 × act·h), and the ffn-wide outputs of the MLP's input projections (ffn_maps × act·ffn: the
      activation is recomputed);

    plus, either way, what the adapters keep (:func:`_lora_input_bytes`). With ``tiled``
    (model.tiled_mlp, eager only: bigtrain.longctx) the MLP keeps its input alone (act·h) in place of
    its ffn-wide tensors and its adapters' inputs; one tile's working set is counted once for the
    model (:func:`tile_bytes`). Against saved-tensor counts
    of one Llama-2-7B layer (q, k, v, o at r=16): eager 34.2 vs 35.2·s·b·h, compiled 24.8 vs 25.8
    (the counts include the adapters' autocast weight copies, ~1·s·b·h at s·b = 256); on an H200
    (micro-batch 2, sequence 4096) the measured peaks imply 35.1 and 25.8."""
    if not lora:
        return 34 * s * b * shape.hidden * act // 2
    h = shape.hidden
    if compiled:
        per_token = act * (6 * h + shape.ffn * min(shape.ffn_maps, 2))
    else:
        mlp = h if tiled else shape.ffn * (3 if shape.ffn_maps >= 2 else 1)
        per_token = 8 * h + act * (4 * h + mlp)
    extra = _lora_input_bytes(shape, lora, act, r, compiled, tiled and not compiled) // max(shape.layers, 1)
    return s * b * (per_token + extra)


def checkpointed_activation_bytes(layers: int, k: int, inp: int, layer: int, offloaded: int = 0) -> int:
    """Stored activations of ``layers`` decoder layers of which the first ``k`` are recomputed in
    backward (each keeps only its input, ``inp`` bytes) and the rest keep everything (``layer``
    bytes), at their most: at the end of forward (k inputs and L-k whole layers), or, when every
    layer is recomputed, while the last is recomputed (L inputs and one whole layer): the first
    layers' recomputation comes after every later layer's activations are freed, which is why
    bigtrain recomputes the first layers rather than the last. What backward holds beyond these is
    added by the LoRA estimate's moments (below). The inputs of the first ``offloaded`` of the k
    are in host memory (model.offload_activations); each comes back when its layer is recomputed,
    after every later layer's are freed, so the peak holds k - offloaded inputs."""
    k = max(0, min(k, layers))
    o = max(0, min(offloaded, k))
    return (k - o) * inp + max(layers - k, 1 if k else 0) * layer


# What a LoRA step holds beyond its saved tensors, at the three moments that can set its peak. Measured
# with bench/activation_peaks.py on an H100 (4 Llama-2-7B layers at 16k and 32k tokens, every memory
# setting; bench/results/long_context/h100_lease3/run2/peaks.jsonl): the estimate is within 2% (under
# 1 byte per token per unit of hidden size) of each of the 18 peaks, and of whole-model runs at 64k
# and 128k tokens (tests/unit/test_longctx.py).
#
# * A layer's backward (the last whole layer's, or the last recomputed one's): the gradient arriving
#   (act·h) and the larger of the norm's fp32 backward temporaries (16·h: RMSNorm upcasts) and the
#   MLP's ffn-wide gradients (act·ffn for each of gate, up and their product; two for a plain MLP).
#   Tiled, the MLP's are one tile's (tile_bytes). Measured: 18.3 h untiled, 17.75 h tiled.
# * The final norm's backward, right after the loss's: its fp32 input, the fp32 gradient arriving and
#   the norm's temporaries (4 + 4 + 16 bytes per token per h), with every whole layer still held; it
#   sets the peak when a layer is kept whole. Measured: an H100 at 128k tokens, 31 of 32 Llama-2-7B
#   layers recomputed, 6 bytes per token per h above the layer's backward; on a CPU, 25 h in all.
# * The loss's backward, at the end of forward (every kept input and whole layer still held): the
#   final norm's fp32 input (4·h), the head's input rows, the norm's output and their gradient
#   (3 × act·h), and one chunk of logits as fp32 (losses.CHUNK_LOGITS): the fp32 logits, the
#   log-softmax, and the gradients of each (16 bytes a logit). Measured: 10.2 h + 16.2 bytes a logit.
NORM_BACKWARD = 16
LOSS_HELD_FP32 = 4
LOSS_HELD_ACT = 3
LOGIT_BYTES = 16


def backward_transient_bytes(shape: ModelShape, act: int, tiled: bool) -> int:
    """Per token: what a decoder layer's backward holds beyond its saved tensors (see above)."""
    mlp = 0 if tiled else (3 if shape.ffn_maps >= 2 else 2) * act * shape.ffn
    return act * shape.hidden + max(NORM_BACKWARD * shape.hidden, mlp)


def tile_bytes(shape: ModelShape, tile: int, act: int) -> int:
    """One MLP tile's working set in backward (model.tiled_mlp: ``tile`` tokens): the ffn-wide tensors
    of the tile's recomputed forward and their gradients, four at a time for a gated MLP (two for a
    plain one); measured: 3.6 (bench/activation_peaks.py, Llama-2-7B, tiles of 4,096 tokens)."""
    return tile * act * shape.ffn * (4 if shape.ffn_maps >= 2 else 2) if tile else 0


def _components_full(shape: ModelShape, st: Setup) -> dict:
    N, z = st.world_size, st.zero_stage
    P = shape.total_params
    w16 = DTYPE_BYTES[st.dtype]
    flat = -(-P // N)  # per-rank share of a flat, evenly padded buffer
    c = dict.fromkeys(CATEGORIES, 0)
    buffers = 0
    if st.full_recipe == "torch-amp":
        if N != 1 or z != 0:
            raise ValueError("the torch-amp recipe is plain single-GPU PyTorch: world_size 1, stage 0")
        c["trainable_weights"] = 4 * P
        c["gradients"] = 4 * P
        c["optimizer_state"] = 8 * P
        buffers = w16 * P  # autocast's bf16 copies of the weights, kept by autograd for backward
    else:
        if z == 3:
            c["trainable_weights"] = frozen_base_bytes(shape, N, w16, 3, st.persistence_threshold,
                                                       st.hpz)
            # DeepSpeed flattens per-parameter padded partitions; torch AdamW's step per sub-group
            sflat = zero3_flat_numel(shape, N)
            c["gradients"] = w16 * sflat
            c["optimizer_state"] = 12 * sflat + 4 * zero3_sub_groups(shape, N)
        else:
            c["trainable_weights"] = w16 * P
            c["gradients"] = w16 * (P if z < 2 else flat)
            # stages 1-2: one flat fp32 partition, torch AdamW's 4-byte step for it (measured: stage 2)
            c["optimizer_state"] = 12 * (P if z == 0 else flat) + (4 if z else 0)
        if z >= 1:
            buffers += w16 * REDUCE_BUCKET
        if z == 3:
            buffers += w16 * (shape.largest_module_params + PREFETCH_BUCKET)
    if st.offload_param and z == 3 and st.full_recipe == "zero":
        c["trainable_weights"] = 0
    c["zero_buffers"] = buffers
    return c


def quantized_gather_bytes(shape: ModelShape, st: Setup) -> dict:
    """The layer gatherer's buffers per GPU with a quantized base (``st.quantize``: model.quantize), by
    part, from ``LayerGatherer._issue`` / ``_gather_packed`` / ``_wait`` (bigtrain/engine/gather.py). The gatherer
    runs at every world size, 1 included: it dequantizes layer by layer.

    * ``unit``: one decoder layer dequantized in the compute dtype, ``st.dtype``: each parameter of the
      layer that is not persistent (quantized weights never are; others of at most
      ``persistence_threshold`` elements stay whole, counted under frozen weights) as its padded
      gathered size ``N·ceil(numel/N)``. Three are counted, as on the unquantized path (the layer
      computing, the next one gathered ahead, and one more in flight): ``units = 3·unit``.
    * ``packed``: this rank's packed bytes of one layer, what is all-gathered: the quantized partitions
      (``quantize.quantized_bytes``) and the unquantized non-persistent partitions in ``st.dtype``.
      ``all_gather``: the all-gather output, ``N·packed``, alive while the layer is dequantized from
      it; none at world size 1 (the rank's own bytes are dequantized in place).
    * ``dequant_temp``: the temporaries of dequantizing the largest quantized weight on a GPU, with
      ``nb = ceil(ceil(numel/N)/64)`` blocks per rank's row. The Triton kernels
      (``quantize._triton_kernels``) write the values straight into the layer's buffer when each row is
      whole blocks (``ceil(numel/N)`` a multiple of 64); otherwise into a padded temporary in the
      compute dtype, ``w·N·nb·64``, copied out (int8 also pads its values first, ``N·nb·64``). Besides: int8: at world size > 1 the fp32 scale rows
      copied out contiguous, ``4·N·nb``; nf4: the decoded fp32 block scales, ``4·N·ceil(nb/256)·256``
      (``_nf4_scales``) plus their contiguous copy, ``4·N·nb``, and at world size > 1 the
      second-level scales and offset copied out, ``4·N·(ceil(nb/256) + 1)``. (The CPU paths, eager
      and chunked, are not modelled.)
    * ``root``: the embeddings, final norm and head, gathered for the whole step at world size > 1 (as
      unquantized); at world size 1 aliased to their partitions: none.

    ``N`` throughout is the ranks the base is partitioned over, ``st.base_shards`` (the world size,
    or zero.shard_group): the gather runs within that group.

    ``total = units + all_gather + dequant_temp + root``."""
    from .quantize import NF4_SCALE_BLOCK, QUANT_BLOCK, quantized_bytes

    N, w, q = st.base_shards, DTYPE_BYTES[st.dtype], st.quantize
    layer = shape.layer_numels or ((shape.layer_params or shape.largest_module_params, False),)
    gathered = [(n, quant) for n, quant in layer if quant or n > st.persistence_threshold]
    unit = w * sum(N * -(-n // N) for n, _ in gathered)
    packed = sum(quantized_bytes(-(-n // N), q) if quant else w * -(-n // N) for n, quant in gathered)
    largest = max((n for n, quant in layer if quant), default=0)
    nb = -(-(-(-largest // N)) // QUANT_BLOCK)
    padded = w * N * nb * QUANT_BLOCK if -(-largest // N) % QUANT_BLOCK else 0
    if q == "int8":
        temp = padded + (padded // w if padded else 0) + (4 * N * nb if N > 1 else 0)
    else:
        ng = -(-nb // NF4_SCALE_BLOCK)
        temp = padded + 4 * N * ng * NF4_SCALE_BLOCK + 4 * N * nb + (4 * N * (ng + 1) if N > 1 else 0)
    if not largest:
        temp = 0
    root = w * max(0, shape.total_params - shape.layers * shape.layer_params) if N > 1 else 0
    out = {"unit": unit, "units": 3 * unit, "packed": packed, "all_gather": N * packed if N > 1 else 0,
           "dequant_temp": temp, "root": root}
    out["total"] = out["units"] + out["all_gather"] + out["dequant_temp"] + out["root"]
    return out


def _components_lora(shape: ModelShape, st: Setup) -> dict:
    N, K = st.world_size, st.base_shards  # K: the ranks the frozen base is partitioned over
    st.check_quantize()
    pred = predict_states(shape, list(st.lora_targets), st.lora_r, K, st.dtype, st.persistence_threshold,
                          stage=st.lora_stage, hpz=st.hpz if st.lora_stage == 3 else 1, quantize=st.quantize)
    c = dict.fromkeys(CATEGORIES, 0)
    c.update(pred)
    buffers = 0
    if st.lora_stage == 3:
        if st.offload_param:
            c["frozen_weights"] = 0
        if st.quantize is not None:
            # bigtrain's layer gatherer dequantizing a quantized base (quantized_gather_bytes)
            buffers += quantized_gather_bytes(shape, st)["total"]
        elif K > 1:
            # bigtrain's per-layer gather (zero.gather=layers): the layer computing, the next one
            # gathered ahead, and that one's all-gather output while it is copied out; plus
            # everything outside the layers (embeddings, head), gathered for the whole step. Over
            # one rank (world size 1, or shard_group 1) every partition is the whole tensor and
            # nothing is gathered.
            unit = shape.layer_params or shape.largest_module_params
            root = max(0, shape.total_params - shape.layers * shape.layer_params)
            buffers += DTYPE_BYTES[st.dtype] * (3 * unit + root)
    if N > 1:  # over the whole world, whatever the shard group
        buffers += pred["trainable_weights"]  # the flat fp32 all-reduce of the adapter gradients
    c["zero_buffers"] = buffers
    return c


def _activations(shape: ModelShape, st: Setup, lora: bool) -> tuple[int, int]:
    s, b = st.seq_len, st.micro_batch
    act = DTYPE_BYTES[st.dtype]
    shapes = shape.lora_shapes(list(st.lora_targets)) if lora else None
    # a tiled run's layers run eager (bigtrain.longctx: the run turns compiling off when it tiles)
    tiled = lora and 0 < st.tiled_mlp < s * b
    compiled = lora and st.compiled and not st.tiled_mlp
    layer = _act_bytes_per_layer(shape, s, b, act, shapes, st.lora_r, compiled, tiled)
    k = checkpointed_layers(shape, st) if lora else (shape.layers if st.checkpointing else 0)
    if not lora:
        acts = checkpointed_activation_bytes(shape.layers, k, act * s * b * shape.hidden, layer)
        return acts, s * b * shape.vocab * (act + 4 + 4)
    # LoRA: the largest of three moments (NORM_BACKWARD's comment above). bigtrain's loss projects the
    # target positions through the head in chunks of at most CHUNK_LOGITS logits (bigtrain/losses.py).
    from .losses import CHUNK_LOGITS

    L, h, inp = shape.layers, shape.hidden, act * s * b * shape.hidden
    o = max(0, min(st.offload_layers, k))
    rows = min(s * b, max(1, CHUNK_LOGITS // max(1, shape.vocab)))
    # at the end of forward: the inputs kept on the GPU and the whole layers, and with offload one more
    # input (measured: the last one sent to the host is not yet released when the loss runs)
    held = (k - o + (1 if o else 0)) * inp + (L - k) * layer
    loss = s * b * h * (LOSS_HELD_FP32 + LOSS_HELD_ACT * act) + rows * shape.vocab * LOGIT_BYTES
    # a layer's backward: the last whole layer's (or, every layer recomputed, the last one's, its input
    # back from the host if every input went there)
    in_backward = (checkpointed_activation_bytes(L, k, inp, layer, o) + (inp if o == k == L > 0 else 0)
                   + s * b * backward_transient_bytes(shape, act, tiled)
                   + (tile_bytes(shape, st.tiled_mlp, act) if tiled else 0))
    # the final norm's backward, right after the loss's: its fp32 input, the fp32 gradient and the
    # norm's temporaries, with every whole layer still held
    norm = s * b * h * (4 + 4 + NORM_BACKWARD)
    return max((held, loss), (held + norm, 0), (in_backward, 0), key=sum)


def _finish(c: dict, st: Setup) -> dict:
    c = dict(c)
    if st.include_context:
        rest = sum(v for k, v in c.items() if k != "cuda_context")
        c["cuda_context"] = CUDA_CONTEXT_BYTES + int(FRAGMENTATION * rest)
    else:
        c["cuda_context"] = 0
    return c


def per_gpu(shape: ModelShape, st: Setup, which: str) -> dict:
    """Per-GPU bytes by category (``CATEGORIES``) for ``which`` in {"full", "lora"}."""
    c = _components_full(shape, st) if which == "full" else _components_lora(shape, st)
    c["activations"], c["logits_loss"] = _activations(shape, sequence_shard(st, which), which == "lora")
    c["zero_buffers"] += ulysses_buffer_bytes(shape, st, which)
    return _finish(c, st)


# -- sequence parallelism (train.sequence_parallel, bigtrain/seqpar.py) ------------------------------
def sequence_shard(st: Setup, which: str) -> Setup:
    """The setup whose activations one GPU holds: under sequence parallelism (LoRA) a GPU holds
    ``ceil(seq_len / N)`` positions of each sequence, so every sequence-proportional activation (the
    layers' stored tensors, sdpa's q, k, v and output: all T positions of H/N heads is as many bytes
    as T/N positions of all heads; the hidden states and logit chunks of the loss) is that of the
    shorter sequence. Nothing else changes (the model states and gather buffers are per rank)."""
    n = st.sequence_parallel if which == "lora" else 1
    return st if n <= 1 else replace(st, seq_len=-(-st.seq_len // n))


def ulysses_buffer_bytes(shape: ModelShape, st: Setup, which: str) -> int:
    """Under sequence parallelism (LoRA), the all-to-all's transient buffers of one attention: the
    contiguous send copies of q, k, v and of the output, and the output's received copy, each a
    shard's worth (``s/N·b·h`` elements; GQA's k, v counted as q's, an upper bound)."""
    n = st.sequence_parallel if which == "lora" else 1
    if n <= 1:
        return 0
    return 5 * DTYPE_BYTES[st.dtype] * -(-st.seq_len // n) * st.micro_batch * shape.hidden


def peak_bytes(c: dict, st: Setup, which: str) -> int:
    """The per-GPU peak from the categories of :func:`per_gpu`. Their plain sum, except for full
    fine-tuning with the ``torch-amp`` recipe, whose gradients are freed at every step
    (``zero_grad(set_to_none=True)``) and so never coexist with the stored activations: the peak is the
    larger of the end of forward (everything but gradients) and the optimizer step (model states, no
    activations, logits or autocast copies). Against H200 measurements of plain full
    fine-tuning (another harness, same recipe): GPT-3 2.7B b=4 59.7 vs 59.5 GiB; 6.7B b=2 105.7 vs 105.3;
    with checkpointing 99.2 vs 100.2 (the plain sum would say 69.5, 130.5, 115.1)."""
    total = sum(c.values())
    if which == "full" and st.full_recipe == "torch-amp":
        ctx = c["cuda_context"]
        fwd = total - ctx - c["gradients"]
        step = total - ctx - c["activations"] - c["logits_loss"] - c["zero_buffers"]
        core = max(fwd, step)
        return core + (CUDA_CONTEXT_BYTES + int(FRAGMENTATION * core) if st.include_context else 0)
    return total


def fewest_gpus(shape: ModelShape, st: Setup, which: str, limit: int = 1 << 16) -> int | None:
    """The smallest world size whose per-GPU total fits ``st.gpu_mem_bytes`` (None if none up to
    ``limit``; stage 0 never improves with more GPUs). With hpZ only multiples of ``st.hpz`` are
    world sizes DeepSpeed accepts, so the search runs over those; likewise, for LoRA, multiples of
    ``st.sequence_parallel`` (sequence groups tile the world) and of ``st.shard_group`` (a LoRA
    rank's base is then 1/shard_group whatever the world size: the answer is the group itself when
    it fits)."""
    unit = max(1, st.hpz)
    if which == "lora" and st.shard_group:
        unit = math.lcm(unit, st.shard_group)
    if which == "lora":  # sequence groups tile the world
        unit = math.lcm(unit, max(1, st.sequence_parallel))

    def fits(m: int) -> bool:
        n = m * unit
        return peak_bytes(per_gpu(shape, replace(st, world_size=n), which), st, which) <= st.gpu_mem_bytes

    if st.full_recipe == "torch-amp" and which == "full":
        return 1 if fits(1) else None  # a one-GPU recipe
    limit = max(1, limit // unit)
    if not fits(limit):
        return unit if fits(1) else None
    lo, hi = 1, limit  # per-GPU memory is non-increasing in N: bisect for the first fit
    if fits(1):
        return unit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid
    return hi * unit


def estimate(model, st: Setup | None = None, **kw) -> dict:
    """Full fine-tuning vs LoRA, per GPU and whole job, for ``model`` (preset name, config directory,
    HF config or model) under ``st`` (or ``Setup(**kw)``). Plain dict: JSON-ready."""
    st = st or Setup(**kw)
    shape = model_shape(model)
    out = {"model": shape.name, "total_params": shape.total_params,
           "lora_params": shape.lora_params(list(st.lora_targets), st.lora_r),
           "setup": {k: (list(v) if isinstance(v, tuple) else v) for k, v in st.__dict__.items()}}
    for which in ("full", "lora"):
        c = per_gpu(shape, st, which)
        total = peak_bytes(c, st, which)
        out[which] = {"per_gpu": c, "per_gpu_total": total, "job_total": total * st.world_size,
                      "fits": total <= st.gpu_mem_bytes,
                      "fewest_gpus": fewest_gpus(shape, st, which),
                      "stage": st.zero_stage if which == "full" else st.lora_stage}
    out["lora"]["quantize"] = st.quantize  # which base the LoRA column is for (full FT: never quantized)
    out["lora"]["host_per_rank"] = host_peak(shape, st)["total"]  # a GPU run's, random base
    out["ratio_per_gpu"] = out["full"]["per_gpu_total"] / out["lora"]["per_gpu_total"]
    out["ratio_job"] = out["full"]["job_total"] / out["lora"]["job_total"]
    return out


def host_peak(shape: ModelShape, st: Setup, device: str = "cuda", from_checkpoint: bool = False) -> dict:
    """Each LoRA rank's peak host memory (bytes by part, and ``total``). The base is built one
    decoder layer at a time (``engine.build.build_streamed``), so the build adds at most one layer,
    whatever the depth:

    * ``runtime``: the process itself (:data:`HOST_RUNTIME_BYTES`);
    * ``build``: on a GPU run the layer is made on the GPU, and the host only holds a checkpoint's
      slices while they are read: the layer's file pages, mapped while it is read (this rank's
      share of the layer), and one tensor's slice and its conversion (twice the largest tensor's
      partition in the base dtype); on a CPU run the whole layer and its partition (and with
      ``model.quantize`` the quantization's temporaries);
    * ``run``: on a CPU run everything the GPU would hold (partitions, adapters, activations);
    * ``offload``: the checkpointed layer inputs held in host memory (model.offload_activations:
      ``offload_layers`` of ``act·s·b·h`` bytes each, pinned on a GPU run).
    """
    act = DTYPE_BYTES[st.dtype]
    unit = shape.layer_params or shape.largest_module_params
    out = {"runtime": HOST_RUNTIME_BYTES.get(device, HOST_RUNTIME_BYTES["cuda"]), "build": 0, "run": 0,
           "offload": offload_bytes(shape, st)}
    if device == "cpu":
        out["build"] = 2 * act * unit + (HOST_QUANT_TEMP_BYTES if st.quantize else 0)
        out["run"] = sum(per_gpu(shape, replace(st, include_context=False), "lora").values())
    elif from_checkpoint:
        n = max(1, st.base_shards)  # a rank reads its partitions: 1/shard_group of each tensor
        out["build"] = act * (-(-unit // n) + 2 * -(-shape.largest_module_params // n))
    out["total"] = sum(out.values())
    return out


def layer_input_bytes(shape: ModelShape, st: Setup) -> int:
    """One decoder layer's input (act·s·b·h, s this rank's shard of the sequence): what a checkpointed
    layer keeps, and offloads."""
    return DTYPE_BYTES[st.dtype] * sequence_shard(st, "lora").seq_len * st.micro_batch * shape.hidden


def checkpointed_layers(shape: ModelShape, st: Setup) -> int:
    """LoRA's recomputed decoder layers: ``checkpoint_layers``, or every layer (none) where it is None
    and ``checkpointing`` is on (off)."""
    return st.checkpoint_layers if st.checkpoint_layers is not None else (shape.layers if st.checkpointing else 0)


def offload_bytes(shape: ModelShape, st: Setup) -> int:
    """Host bytes of the offloaded checkpointed layer inputs (model.offload_activations)."""
    return min(st.offload_layers, checkpointed_layers(shape, st)) * layer_input_bytes(shape, st)


def host_offload_budget(host_bytes: int, ranks: int, headroom: float) -> int:
    """The host bytes one rank may pin for offloaded layer inputs: the host's ``host_bytes`` (its
    MemAvailable, or its size for an estimate) less ``headroom``, shared by its ``ranks``."""
    return int(host_bytes * (1 - headroom)) // max(1, ranks)


def setup_for_run(cfg, world: int, **overrides) -> Setup:
    """The estimator's inputs for a run of ``cfg`` (a ``bigtrain.config.Config``) at ``world`` ranks:
    its micro-batch, sequence, checkpointing (``auto`` counts as every layer, the least memory, until
    the run has chosen: pass ``checkpoint_layers``; likewise ``compiled``), LoRA rank and targets, dtype
    and model.quantize (LoRA's
    base as stored; full fine-tuning's is never quantized), LoRA's ZeRO stage (3, or 0 when the run's
    is 0); ``overrides`` replace any field (the engine's persistence threshold, a mode's stage, the
    CUDA context allowance)."""
    gc = cfg.model.gradient_checkpointing
    st = Setup(world_size=world, zero_stage=3 if cfg.zero.stage == 3 else 0,
               micro_batch=cfg.train.micro_batch_size, seq_len=cfg.data.max_length,
               checkpointing=gc is not False and gc != 0,
               checkpoint_layers=gc if type(gc) is int else None, compiled=cfg.model.compile is True,
               lora_r=cfg.lora.r,
               lora_targets=tuple(cfg.lora.targets), dtype=cfg.model.dtype,
               persistence_threshold=cfg.zero.persistence_threshold, quantize=cfg.model.quantize,
               sequence_parallel=cfg.train.sequence_parallel)
    return replace(st, **overrides)


def run_savings(model, st: Setup, measured_peak: int | None, measured_states: dict | None) -> dict:
    """What LoRA saved in one run, per GPU: this run's measured peak (``torch.cuda.max_memory_allocated``,
    the largest over ranks; None on CPU) beside the estimate for full fine-tuning with Adam (ZeRO-3,
    16 bytes per parameter) of the same model on the same GPUs, micro-batch, sequence and
    checkpointing, and the ratio. On CPU, where no peak is measured, the model states measured on the
    rank stand in for it (against full fine-tuning's model states: weights, gradients, Adam)."""
    est = estimate(model, st)
    full = est["full"]["per_gpu"]
    out = {"world_size": st.world_size, "lora_estimated_peak_bytes": est["lora"]["per_gpu_total"],
           "full_ft_estimated_peak_bytes": est["full"]["per_gpu_total"]}
    if measured_peak is not None:
        out.update(basis="peak", lora_measured_bytes=measured_peak,
                   full_ft_estimated_bytes=est["full"]["per_gpu_total"])
    elif measured_states is not None:
        out.update(basis="model states", lora_measured_bytes=sum(measured_states.values()),
                   full_ft_estimated_bytes=sum(full[k] for k in ("trainable_weights", "gradients",
                                                                  "optimizer_state")))
    else:
        return out
    out["saved_bytes"] = out["full_ft_estimated_bytes"] - out["lora_measured_bytes"]
    out["ratio"] = out["full_ft_estimated_bytes"] / max(1, out["lora_measured_bytes"])
    return out


def fmt_binary(n: int) -> str:
    """Bytes in binary units: GiB (2**30) from 1 GiB up, else MiB (2**20)."""
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / 2**20:.2f} MiB"


def format_savings(sv: dict) -> str:
    """One line for the end of a run."""
    if "ratio" not in sv:
        return "memory: nothing measured"
    what = ("peak per GPU" if sv["basis"] == "peak" else "model states per rank (no GPU peak on CPU)")
    line = (f"memory, {what} at {sv['world_size']} rank(s): LoRA measured {fmt_binary(sv['lora_measured_bytes'])} "
            f"vs full fine-tuning with Adam estimated {fmt_binary(sv['full_ft_estimated_bytes'])}: "
            f"saved {fmt_binary(sv['saved_bytes'])} ({sv['ratio']:.2f}x less)")
    if sv["basis"] == "peak":
        err = sv["lora_estimated_peak_bytes"] / sv["lora_measured_bytes"] - 1
        line += f"; the estimate for this LoRA run was {fmt_binary(sv['lora_estimated_peak_bytes'])} ({err:+.1%})"
    return line
