"""Memory accounting: what LoRA saves against full fine-tuning with Adam, per GPU, up to GPT-3 175B.

Two halves:

* **Predicted** (``estimate``, ``predict_states``, ``bigtrain estimate``): per-GPU bytes by category for
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

Everything here is CPU-only and never allocates model storage.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import logging
import re
import sys
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from .config import DTYPE_BYTES, QUANTIZE_CHOICES
from .presets import PRESETS, hf_config_for, meta_model, position_limit

# Deferred imports: torch, transformers, deepspeed, accelerate, matplotlib and the modules that load
# torch (inject, lora, losses, quantize) are imported where used: `bigtrain estimate --help` builds this
# module's parser without loading torch, and the comparisons with other tools are optional.

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
DEFAULT_PERSISTENCE = 100000  # DeepSpeed stage3_param_persistence_threshold


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


def _hf_config(source):
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
    from .inject import _is_linear, output_layer_names
    from .lora import linear_shape
    from .quantize import quantizable_weights

    cfg = getattr(model, "config", None)
    order = tuple(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())  # tied once
    numels = Counter(order)
    linears = {n: linear_shape(m) for n, m in model.named_modules() if _is_linear(m)}
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
        outs = [linear_shape(m)[1] for m in layers_mod[0].modules() if _is_linear(m)]
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
def _meta_cached(source: str):

    return meta_model(_hf_config(source)[1])


@functools.lru_cache(maxsize=16)
def _shape_cached(source: str) -> ModelShape:
    return shape_from_model(_meta_cached(source), _hf_config(source)[0])


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

    name, cfg = _hf_config(source)
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

    @property
    def lora_stage(self) -> int:
        return 0 if self.zero_stage == 0 else 3

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


def _lora_input_bytes(shape: ModelShape, lora: dict, act: int, r: int, compiled: bool) -> int:
    """Per token, over all layers: what the adapters add to the stored activations. Each adapter keeps
    its r-wide intermediate (for B's gradient) and its input (for A's); an input already stored is
    not stored twice: an MLP's down projection reads the ffn-wide product, kept for the adapter alone;
    the attention's output projection reads sdpa's output, which sdpa keeps anyway; the projections
    reading one normalised input (q, k, v; gate, up) share one bf16 copy of it where it is bf16 before
    they read it (RMSNorm returns the storage dtype; a compiled layer casts once inside its graph), but
    each makes its own autocast copy of a LayerNorm's fp32 output in an eager layer."""
    import re

    shared = shape.rms_norm or compiled
    total, groups = 0, set()
    for name, (d_in, _) in lora.items():
        parent, _, leaf = name.rpartition(".")
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
                         compiled: bool = False) -> int:
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

    plus, either way, what the adapters keep (:func:`_lora_input_bytes`). Against saved-tensor counts
    of one Llama-2-7B layer (q, k, v, o at r=16): eager 34.2 vs 35.2·s·b·h, compiled 24.8 vs 25.8
    (the counts include the adapters' autocast weight copies, ~1·s·b·h at s·b = 256); on an H200
    (micro-batch 2, sequence 4096) the measured peaks imply 35.1 and 25.8."""
    if not lora:
        return 34 * s * b * shape.hidden * act // 2
    h = shape.hidden
    if compiled:
        per_token = act * (6 * h + shape.ffn * min(shape.ffn_maps, 2))
    else:
        per_token = 8 * h + act * (4 * h + shape.ffn * (3 if shape.ffn_maps >= 2 else 1))
    extra = _lora_input_bytes(shape, lora, act, r, compiled) // max(shape.layers, 1)
    return s * b * (per_token + extra)


def checkpointed_activation_bytes(layers: int, k: int, inp: int, layer: int) -> int:
    """Stored activations of ``layers`` decoder layers of which the first ``k`` are recomputed in
    backward (each keeps only its input, ``inp`` bytes) and the rest keep everything (``layer``
    bytes). The peak is at the end of forward (k inputs and L-k whole layers), or, when every layer
    is recomputed, while the last is recomputed (L inputs and one whole layer): the first layers'
    recomputation comes after every later layer's activations are freed, which is why bigtrain
    recomputes the first layers rather than the last."""
    k = max(0, min(k, layers))
    return k * inp + max(layers - k, 1 if k else 0) * layer


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

    ``total = units + all_gather + dequant_temp + root``."""
    from .quantize import NF4_SCALE_BLOCK, QUANT_BLOCK, quantized_bytes

    N, w, q = st.world_size, DTYPE_BYTES[st.dtype], st.quantize
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
    N = st.world_size
    st.check_quantize()
    pred = predict_states(shape, list(st.lora_targets), st.lora_r, N, st.dtype, st.persistence_threshold,
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
        elif N > 1:
            # bigtrain's per-layer gather (zero.gather=layers): the layer computing, the next one
            # gathered ahead, and that one's all-gather output while it is copied out; plus
            # everything outside the layers (embeddings, head), gathered for the whole step. At
            # world size 1 every partition is the whole tensor and nothing is gathered.
            unit = shape.layer_params or shape.largest_module_params
            root = max(0, shape.total_params - shape.layers * shape.layer_params)
            buffers += DTYPE_BYTES[st.dtype] * (3 * unit + root)
    if N > 1:
        buffers += pred["trainable_weights"]  # the flat fp32 all-reduce of the adapter gradients
    c["zero_buffers"] = buffers
    return c


def _activations(shape: ModelShape, st: Setup, lora: bool) -> tuple[int, int]:
    s, b = st.seq_len, st.micro_batch
    act = DTYPE_BYTES[st.dtype]
    shapes = shape.lora_shapes(list(st.lora_targets)) if lora else None
    layer = _act_bytes_per_layer(shape, s, b, act, shapes, st.lora_r, st.compiled and lora)
    k = st.checkpoint_layers if (lora and st.checkpoint_layers is not None) else (
        shape.layers if st.checkpointing else 0)
    acts = checkpointed_activation_bytes(shape.layers, k, act * s * b * shape.hidden, layer)
    if lora:
        # bigtrain's loss projects the target positions through the head in chunks of at most
        # CHUNK_LOGITS logits (bigtrain/losses.py): one chunk's logits (act), their fp32 copy and its
        # gradient (4 + 4) exist at a time, plus the gradient w.r.t. the hidden states
        from .losses import CHUNK_LOGITS

        rows = min(s * b, max(1, CHUNK_LOGITS // max(1, shape.vocab)))
        logits = rows * shape.vocab * (act + 4 + 4) + act * s * b * shape.hidden
    else:
        logits = s * b * shape.vocab * (act + 4 + 4)
    return acts, logits


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
    c["activations"], c["logits_loss"] = _activations(shape, st, which == "lora")
    return _finish(c, st)


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
    world sizes DeepSpeed accepts, so the search runs over those."""

    unit = max(1, st.hpz)

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
    * ``run``: on a CPU run everything the GPU would hold (partitions, adapters, activations).
    """
    act = DTYPE_BYTES[st.dtype]
    unit = shape.layer_params or shape.largest_module_params
    out = {"runtime": HOST_RUNTIME_BYTES.get(device, HOST_RUNTIME_BYTES["cuda"]), "build": 0, "run": 0}
    if device == "cpu":
        out["build"] = 2 * act * unit + (HOST_QUANT_TEMP_BYTES if st.quantize else 0)
        out["run"] = sum(per_gpu(shape, replace(st, include_context=False), "lora").values())
    elif from_checkpoint:
        n = max(1, st.world_size)
        out["build"] = act * (-(-unit // n) + 2 * -(-shape.largest_module_params // n))
    out["total"] = sum(out.values())
    return out


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
               persistence_threshold=cfg.zero.persistence_threshold, quantize=cfg.model.quantize)
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


def _bin(n: int) -> str:
    """Bytes in binary units: GiB (2**30) from 1 GiB up, else MiB (2**20)."""
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / 2**20:.2f} MiB"


def format_savings(sv: dict) -> str:
    """One line for the end of a run."""
    if "ratio" not in sv:
        return "memory: nothing measured"
    what = ("peak per GPU" if sv["basis"] == "peak" else "model states per rank (no GPU peak on CPU)")
    line = (f"memory, {what} at {sv['world_size']} rank(s): LoRA measured {_bin(sv['lora_measured_bytes'])} "
            f"vs full fine-tuning with Adam estimated {_bin(sv['full_ft_estimated_bytes'])}: "
            f"saved {_bin(sv['saved_bytes'])} ({sv['ratio']:.2f}x less)")
    if sv["basis"] == "peak":
        err = sv["lora_estimated_peak_bytes"] / sv["lora_measured_bytes"] - 1
        line += f"; the estimate for this LoRA run was {_bin(sv['lora_estimated_peak_bytes'])} ({err:+.1%})"
    return line


# ---------------------------------------------------------------------------------------------
# The LoRA paper's GPT-3 175B figures, and what the usual tools say.

PAPER_FULL_VRAM = 1.2e12  # Hu et al. 2021, §4.2: "from 1.2TB to 350GB"
PAPER_LORA_VRAM = 350e9
PAPER_CHECKPOINT = 35e6  # "from 350GB to 35MB"


def paper_figures(model="gpt3-175b") -> dict:
    """The paper's headline figures recomputed from the meta-built model.

    * trainable parameters, W_q and W_v: r=1 and r=4 (the paper's setting);
    * adapter checkpoint at r=4 in bf16 (the paper's "35 MB" is 37.7 MB = 18,874,368 × 2 bytes);
    * the LoRA training VRAM "350 GB" is the 16-bit frozen weights, 2Ψ; adapter state (16Φ ≈ 0.3 GB)
      and activations are small beside it;
    * the full fine-tuning "1.2 TB" is the paper's own measured figure: no itemised accounting is
      given. It is ≈ 6.9 bytes/param, i.e. 16-bit weights + 16-bit Adam m and v (6Ψ = 1.05 TB) plus part
      of the 16-bit gradients live at once (all of them: 8Ψ = 1.40 TB); it is not the 16Ψ (2.79 TB) of
      mixed-precision Adam with an fp32 master copy, which is what ``bigtrain estimate`` reports.
    """
    shape = model_shape(model)
    P = shape.total_params
    r1 = shape.lora_params(["q_proj", "v_proj"], 1)
    r4 = shape.lora_params(["q_proj", "v_proj"], 4)
    return {
        "total_params": P, "lora_params_r1": r1, "lora_params_r4": r4,
        "param_reduction": P / r4,
        "checkpoint_full_bytes_bf16": 2 * P, "checkpoint_lora_bytes_bf16": 2 * r4,
        "checkpoint_reduction": P / r4,
        "paper_full_vram_bytes": PAPER_FULL_VRAM, "paper_lora_vram_bytes": PAPER_LORA_VRAM,
        "paper_checkpoint_bytes": PAPER_CHECKPOINT,
        "lora_vram_bf16_weights": 2 * P,
        "lora_vram_with_adapter_state": 2 * P + 16 * r4,
        "full_vram_implied_bytes_per_param": PAPER_FULL_VRAM / P,
        "full_vram_16bit_weights_adam": 6 * P,
        "full_vram_16bit_weights_grads_adam": 8 * P,
        "full_vram_mixed_precision_adam": 16 * P,
        "vram_reduction_paper": PAPER_FULL_VRAM / PAPER_LORA_VRAM,
    }


def quantize_comparison(shape: ModelShape, st: Setup, world_size: int = 64) -> dict:
    """What model.quantize changes for LoRA on ``world_size`` GPUs (the LoRA paper's 175B setup: 8
    nodes × 8), ``st`` otherwise (its ZeRO-3 base, no hpZ or offload): per GPU the frozen base bytes, the
    gather buffers and the LoRA peak, and the whole job's, for the unquantized base and each scheme."""
    out = {"world_size": world_size, "rows": []}
    for q in (None, *QUANTIZE_CHOICES):
        s = replace(st, world_size=world_size, quantize=q, zero_stage=3, hpz=1, offload_param=False)
        c = per_gpu(shape, s, "lora")
        total = peak_bytes(c, s, "lora")
        out["rows"].append({"quantize": q, "base": q or st.dtype, "frozen_weights": c["frozen_weights"],
                            "zero_buffers": c["zero_buffers"], "per_gpu_total": total,
                            "job_total": total * world_size})
    return out


# HF PEFT's "Use PEFT QLoRA and DeepSpeed with ZeRO3 for finetuning large models on multiple GPUs"
# (peft docs/source/accelerate/deepspeed.md; examples/sft/run_peft_qlora_deepspeed_stage3.sh and
# configs/deepspeed_config_z3_qlora.yaml): Llama-2-70B on 2 × 40 GB A100s, "36.6 GB" per GPU.
PEFT_QLORA = {"model": "llama2-70b", "gpus": 2, "gpu_mem_gib": 40, "micro_batch": 2, "grad_accum": 2,
              "seq_len": 2048, "lora_r": 8, "lora_alpha": 16, "lora_targets": "all-linear", "quantize": "nf4",
              "reported_gb_per_gpu": 36.6}


def peft_qlora_anchor() -> dict:
    """bigtrain's estimate for the job of PEFT's ZeRO-3 + QLoRA example (``PEFT_QLORA``): 2 GPUs,
    micro-batch 2 of 2,048 packed tokens, activation checkpointing, LoRA r=8 on every linear layer,
    an nf4 base, bf16 compute; with the CUDA context and fragmentation allowance (what
    nvidia-smi-like figures include) and without it (``torch.cuda.max_memory_allocated``)."""
    a = PEFT_QLORA
    st = Setup(world_size=a["gpus"], micro_batch=a["micro_batch"], seq_len=a["seq_len"], checkpointing=True,
               lora_r=a["lora_r"], lora_targets=(a["lora_targets"],), quantize=a["quantize"],
               gpu_mem_bytes=a["gpu_mem_gib"] * GiB)
    shape = model_shape(a["model"])
    c = per_gpu(shape, st, "lora")
    bare = per_gpu(shape, replace(st, include_context=False), "lora")
    bf16 = per_gpu(shape, replace(st, quantize=None), "lora")
    return {**a, "per_gpu": c, "per_gpu_total": peak_bytes(c, st, "lora"),
            "per_gpu_allocated": peak_bytes(bare, st, "lora"),
            "gather": quantized_gather_bytes(shape, st),
            "bf16_base_per_gpu_total": peak_bytes(bf16, st, "lora"),
            "fits": peak_bytes(c, st, "lora") <= st.gpu_mem_bytes}


def tool_estimates(model, num_gpus_per_node: int = 8, num_nodes: int = 1) -> dict:
    """What ``accelerate`` and DeepSpeed's estimators say, called for real on the meta model.

    * accelerate: ``calculate_maximum_sizes`` on the meta model (fp32 sizes), then
      ``estimate_training_usage(bytes=16-bit size, "float16")``: whole-job totals for full fine-tuning
      at batch 1, with no notion of LoRA, sharding or activations (model 2Ψ, gradients 3Ψ, optimizer
      and step 4Ψ). The ``accelerate estimate-memory`` command (which needs the Hub) passes the fp32
      size to the same function, so its float16 row says 8Ψ (1.40 TB for 175B): ``cli_float16_row_peak``.
    * DeepSpeed: ``estimate_zero3_model_states_mem_needs_all_live`` prints and returns nothing, and its
      ``model_to_params`` de-duplicates parameters by ``data_ptr()``, which is 0 for every meta tensor
      (it then sees only one parameter). We run it for real and report what it printed, then call the
      same formula it uses, ``estimate_zero3_model_states_mem_needs``, with the real counts: per GPU
      ``4·largest_layer + 18·Ψ/N`` bytes, every parameter charged 18 bytes whatever its requires_grad,
      so it gives LoRA the same figure as full fine-tuning.
    """
    if isinstance(model, str):
        mm = _meta_cached(model)
    elif hasattr(model, "parameters"):
        mm = model
    else:

        mm = meta_model(_hf_config(model)[1])
    shape = model_shape(model)
    out: dict = {}
    try:
        from accelerate.commands.estimate import estimate_training_usage
        from accelerate.utils import calculate_maximum_sizes

        total_size, largest = calculate_maximum_sizes(mm)  # bytes, in the meta model's fp32
        sizes = estimate_training_usage(total_size // 2, "float16")
        # the `accelerate estimate-memory` command itself passes the fp32 size for every dtype row
        cli = estimate_training_usage(total_size, "float16")
        out["accelerate"] = {"ran": True, "model_bytes_fp32": int(total_size),
                             "params_counted": int(total_size // 4), **{k: int(v) for k, v in sizes.items()},
                             "peak": int(max(sizes.values())),
                             "cli_float16_row_peak": int(max(cli.values())),
                             "note": "whole job, full fine-tuning, no sharding/LoRA/activations"}
    except Exception as e:  # pragma: no cover - depends on the installed accelerate
        out["accelerate"] = {"ran": False, "error": repr(e)}
    N = num_gpus_per_node * num_nodes
    ds: dict = {}
    try:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            # imported here too: DeepSpeed's logger writes its "Setting accelerator" warning to the
            # stdout of the moment, which would otherwise come before --json's JSON
            from deepspeed.runtime.zero import stage3 as s3

            logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
            s3.estimate_zero3_model_states_mem_needs_all_live(mm, num_gpus_per_node, num_nodes)
        ds["all_live_output"] = "\n".join(  # its table, without DeepSpeed's log lines
            ln for ln in buf.getvalue().strip().splitlines() if not re.match(r"\[\d{4}-\d\d-\d\d ", ln))
        ds["all_live_params_seen"] = s3.model_to_params(mm)[0]
        cpu, gpu, largest_mem = s3.estimate_zero3_model_states_mem_needs(
            total_params=shape.total_params, largest_layer_params=shape.largest_module_params,
            num_gpus_per_node=num_gpus_per_node, num_nodes=num_nodes, cpu_offload=False,
            cpu_offload_params=False, zero_init=True)
        ds.update(ran=True, gpu_per_gpu=int(gpu), cpu_per_node=int(cpu),
                  formula="4*largest_layer + 18*params/N per GPU")
    except Exception as e:  # pragma: no cover - depends on the installed deepspeed
        ds.update(ran=False, error=repr(e),
                  gpu_per_gpu=4 * shape.largest_module_params + int(18 * shape.total_params / N),
                  formula="computed from DeepSpeed's documented formula: 4*largest_layer + 18*params/N")
    out["deepspeed_zero3"] = ds
    return out


# ---------------------------------------------------------------------------------------------
# Output: table, JSON, plot; the ``estimate`` command.


def _gb(x: float) -> str:
    return f"{x / GB:,.2f}"


def format_table(est: dict, paper: dict | None = None, tools: dict | None = None) -> str:
    st = est["setup"]
    N = st["world_size"]
    q = st.get("quantize")
    W = 26 if q else 22  # the LoRA column's width
    lines = [
        f"{est['model']}: {est['total_params']:,} parameters (meta build); LoRA r={st['lora_r']} on "
        f"{','.join(st['lora_targets'])}: {est['lora_params']:,} trainable "
        f"({100 * est['lora_params'] / est['total_params']:.4f} %)",
        f"{N} GPU(s), seq {st['seq_len']}, micro-batch {st['micro_batch']}, "
        + (f"checkpointing {'on' if st['checkpointing'] else 'off'}" if st["checkpoint_layers"] is None else
           f"LoRA checkpointing the first {st['checkpoint_layers']} layers (full FT: "
           f"{'on' if st['checkpointing'] else 'off'})")
        + (", LoRA layers compiled" if st["compiled"] else "") + f", {st['dtype']}, "
        f"GPU memory {st['gpu_mem_bytes'] / GiB:g} GiB"
        + (", parameters offloaded to CPU" if st["offload_param"] else "")
        + (f", hpZ over {st['hpz']} GPUs" if st.get("hpz", 1) > 1 else "")
        + (f", LoRA's base quantized {q} (model.quantize={q}: the decoder layers' linear weights)" if q else ""),
        "",
        f"{'per GPU, GB (1e9 bytes)':<32}{'full FT (ZeRO-' + str(est['full']['stage']) + ')':>20}"
        f"{'LoRA (ZeRO-' + str(est['lora']['stage']) + (f', {q}' if q else '') + ' base)':>{W}}",
    ]
    for k in CATEGORIES:
        lines.append(f"{CATEGORY_LABELS[k]:<32}{_gb(est['full']['per_gpu'][k]):>20}"
                     f"{_gb(est['lora']['per_gpu'][k]):>{W}}")
    lines.append("-" * (52 + W))
    f, lo = est["full"], est["lora"]
    lines += [
        f"{'peak per GPU':<32}{_gb(f['per_gpu_total']):>20}{_gb(lo['per_gpu_total']):>{W}}",
        f"{'whole job (x' + str(N) + ')':<32}{_gb(f['job_total']):>20}{_gb(lo['job_total']):>{W}}",
        f"{'host memory per rank (peak)':<32}{'-':>20}{_gb(lo['host_per_rank']):>{W}}",
        f"{'fits the GPU':<32}{'yes' if f['fits'] else 'NO':>20}{'yes' if lo['fits'] else 'NO':>{W}}",
        f"{'fewest GPUs that fit':<32}{str(f['fewest_gpus'] or 'none'):>20}"
        f"{str(lo['fewest_gpus'] or 'none'):>{W}}",
        f"full / LoRA: {est['ratio_per_gpu']:.2f}x per GPU, {est['ratio_job']:.2f}x whole job",
    ]
    if st["full_recipe"] == "torch-amp":
        lines.append("(torch-amp: gradients and activations never coexist, so the full FT peak is below "
                     "the sum of its rows)")
    lines += ["", *_legend(est)]
    if paper:
        p = paper
        lines += [
            "",
            "LoRA paper (Hu et al. 2021), GPT-3 175B, recomputed from the meta build:",
            f"  trainable params W_q,W_v: r=1 {p['lora_params_r1']:,}, r=4 {p['lora_params_r4']:,} "
            f"({p['param_reduction']:,.0f}x fewer than {p['total_params']:,}; paper: ~10,000x)",
            f"  adapter checkpoint r=4 bf16: {p['checkpoint_lora_bytes_bf16'] / 1e6:.1f} MB (paper: 35 MB) "
            f"vs full {p['checkpoint_full_bytes_bf16'] / GB:.1f} GB (paper: 350 GB)",
            f"  training VRAM, whole job: paper 1.2 TB -> 350 GB ({p['vram_reduction_paper']:.1f}x)",
            f"    350 GB = the bf16 frozen weights 2*Psi = {p['lora_vram_bf16_weights'] / GB:.1f} GB "
            f"(+ adapter state {16 * p['lora_params_r4'] / GB:.2f} GB)",
            f"    1.2 TB = the paper's own measurement, {p['full_vram_implied_bytes_per_param']:.2f} bytes/param: "
            f"between 16-bit weights+Adam m,v (6*Psi = {p['full_vram_16bit_weights_adam'] / 1e12:.2f} TB) and "
            f"with 16-bit grads too (8*Psi = {p['full_vram_16bit_weights_grads_adam'] / 1e12:.2f} TB);",
            f"    mixed-precision Adam with an fp32 master (16*Psi, this tool's 'full FT') is "
            f"{p['full_vram_mixed_precision_adam'] / 1e12:.2f} TB before activations",
        ]
    if paper and paper.get("quantized"):
        qc = paper["quantized"]
        lines += ["", f"What model.quantize changes for LoRA, {est['model']} on {qc['world_size']} GPUs "
                      f"(8 nodes x 8, the paper's setup; the rest as above), GB:",
                  f"  {'base':<10}{'base per GPU':>14}{'gather buffers':>16}{'LoRA per GPU':>14}"
                  f"{'LoRA whole job':>16}{'base, whole job':>17}"]
        for r in qc["rows"]:
            lines.append(f"  {r['base']:<10}{_gb(r['frozen_weights']):>14}{_gb(r['zero_buffers']):>16}"
                         f"{_gb(r['per_gpu_total']):>14}{_gb(r['job_total']):>16}"
                         f"{_gb(r['frozen_weights'] * qc['world_size']):>17}")
    if paper and paper.get("qlora_anchor"):
        a = paper["qlora_anchor"]
        lines += [
            "",
            "Anchor: HF PEFT's DeepSpeed ZeRO-3 + QLoRA example (PEFT docs, accelerate/deepspeed; "
            "examples/sft/run_peft_qlora_deepspeed_stage3.sh):",
            f"  Llama-2-70B, {a['gpus']} x {a['gpu_mem_gib']} GB A100, micro-batch {a['micro_batch']} x "
            f"{a['seq_len']} packed tokens, checkpointing, LoRA r={a['lora_r']} all-linear, bnb nf4 + double "
            f"quant, bf16: reported {a['reported_gb_per_gpu']} GB per GPU",
            f"  bigtrain estimate {a['model']} --gpus-per-node {a['gpus']} --micro-batch {a['micro_batch']} "
            f"--seq-len {a['seq_len']} --lora-r {a['lora_r']} --lora-targets {a['lora_targets']} --quantize "
            f"{a['quantize']} --gpu-mem-gib {a['gpu_mem_gib']}:",
            f"    {_gb(a['per_gpu_total'])} GB per GPU ({a['per_gpu_total'] / GiB:.2f} GiB; "
            f"{a['per_gpu_total'] / (a['reported_gb_per_gpu'] * GB) - 1:+.1%} against 36.6 GB), "
            f"{_gb(a['per_gpu_allocated'])} GB without the CUDA context and fragmentation allowance; "
            f"with a bf16 base {_gb(a['bf16_base_per_gpu_total'])} GB",
            f"    of which: nf4 base partition {_gb(a['per_gpu']['frozen_weights'])}, gather buffers "
            f"{_gb(a['per_gpu']['zero_buffers'])} (3 dequantized bf16 layers {_gb(a['gather']['units'])}, "
            f"embeddings and head {_gb(a['gather']['root'])}), activations {_gb(a['per_gpu']['activations'])}, "
            f"replicated fp32 adapters + AdamW "
            f"{_gb(sum(a['per_gpu'][k] for k in ('trainable_weights', 'gradients', 'optimizer_state')))}",
            "    (docs/quantized_estimate.md: what differs, and what DeepSpeed ZeRO-3 does with bitsandbytes' "
            "4-bit weights)",
        ]
    if tools:
        a, d = tools.get("accelerate", {}), tools.get("deepspeed_zero3", {})
        lines += ["", "What the usual estimators say for this model:"]
        if a.get("ran"):
            lines.append(f"  accelerate estimate_training_usage (fp16, whole job, batch 1): model {_gb(a['model'])}, "
                         f"gradients {_gb(a['gradients'])}, optimizer {_gb(a['optimizer'])}, step "
                         f"{_gb(a['step'])} GB; no LoRA, no sharding, no activations")
            lines.append(f"    (the `accelerate estimate-memory` command passes the fp32 size: its float16 row "
                         f"says {_gb(a['cli_float16_row_peak'])} GB)")
        else:
            lines.append(f"  accelerate: could not run ({a.get('error')})")
        lines.append(f"  DeepSpeed estimate_zero3_model_states_mem_needs ({d.get('formula')}): "
                     f"{_gb(d.get('gpu_per_gpu', 0))} GB per GPU on {N} GPUs, the same for LoRA: it charges "
                     f"18 bytes to every parameter, frozen or not, and counts no activations")
        if "all_live_params_seen" in d:
            lines.append(f"    (its _all_live variant on a meta model sees {d['all_live_params_seen']:,} params: "
                         f"it de-duplicates by data_ptr(), 0 for every meta tensor)")
        lines.append(f"  bigtrain: LoRA keeps no grads/Adam for the base and shards it: "
                     f"{_gb(lo['per_gpu_total'])} GB per GPU including activations and buffers")
    return "\n".join(lines)


def _legend(est: dict) -> list[str]:
    """What each row of :func:`format_table` counts, for this setup (the two rows that are not a
    tensor the model owns above all: the gather buffers and the CUDA allowance)."""
    st = est["setup"]
    N, w = st["world_size"], st["dtype"]
    full_st, lora_st = est["full"]["stage"], est["lora"]["stage"]
    if full_st == 3:
        full_buf = "the largest module gathered + DeepSpeed's prefetch bucket (5e7) + reduce bucket (5e8)"
    elif full_st >= 1:
        full_buf = "DeepSpeed's reduce bucket (5e8 elements)"
    else:
        full_buf = ("autocast's 16-bit copy of every weight" if st["full_recipe"] == "torch-amp" else "none")
    q = st.get("quantize")
    if lora_st == 3 and q:
        lora_buf = (f"3 decoder layers dequantized to {w} (the one computing, the next prefetched, one more in "
                    f"flight)" + (f" + the packed {q} all-gather output of one layer + embeddings and head, "
                                  f"gathered for the whole step" if N > 1 else
                                  " (at 1 GPU too: the gatherer dequantizes layer by layer; embeddings and head "
                                  "are not copied)")
                    + "; the dequantization temporaries of the largest weight"
                    + ("; and the fp32 all-reduce of the adapter gradients" if N > 1 else ""))
    elif lora_st == 3 and N > 1:
        lora_buf = (f"3 decoder layers gathered in {w} (the one computing, the next prefetched, its "
                    f"all-gather output) + embeddings and head, gathered for the whole step; and the fp32 "
                    f"all-reduce of the adapter gradients")
    elif N > 1:
        lora_buf = "the fp32 all-reduce of the adapter gradients"
    else:
        lora_buf = "none at 1 GPU (each partition is the whole tensor: nothing is gathered)"
    ctx = (f"{CUDA_CONTEXT_BYTES / GiB:g} GiB CUDA context + {FRAGMENTATION:.0%} of every other row for "
           f"the allocator's fragmentation; neither is in torch.cuda.max_memory_allocated"
           if st.get("include_context", True) else "not counted in this estimate")
    return [
        "what the rows count (per GPU):",
        (f"  frozen weights      LoRA: this GPU's ZeRO-3 partition of the base, the decoder layers' linear "
         f"weights in {q} with their scales, the rest in {w} plus small parameters kept whole" if q else
         f"  frozen weights      LoRA: this GPU's ZeRO-3 partition of the base ({w}), plus small parameters "
         f"kept whole (persistence threshold)" if lora_st == 3 else
         f"  frozen weights      LoRA: the whole base ({w}) on every GPU"),
        "  trainable weights   full FT: the 16-bit weights; LoRA: the fp32 adapters (A, B)",
        "  gradients           of the trainable weights only (LoRA: the adapters')",
        "  optimizer state     full FT: fp32 master + Adam m, v; LoRA: AdamW m, v of the adapters",
        (f"  activations         kept for backward, LoRA: the first {st['checkpoint_layers']} layers' inputs "
         f"(recomputed) + the other layers' activations{' (compiled layers)' if st['compiled'] else ''}"
         if st["checkpoint_layers"] is not None else
         "  activations         kept for backward: each layer's input + one layer being recomputed "
         "(checkpointing)" if st["checkpointing"] else "  activations         kept for backward, every layer"
         + (" (LoRA: compiled layers)" if st["compiled"] else "")),
        "  logits + loss       the logits, their fp32 copy and the log-softmax kept for backward "
        "(LoRA: one chunk at a time)",
        f"  ZeRO/comm buffers   full FT: {full_buf}",
        f"                      LoRA: {lora_buf}",
        f"  CUDA context + frag {ctx}",
    ]


def write_plot(est: dict, path: str, shape: ModelShape | None = None, st: Setup | None = None) -> str:
    """Stacked bars (full vs LoRA per GPU, by category) and per-GPU total vs GPU count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    bottoms = [0.0, 0.0]
    for k in CATEGORIES:
        vals = [est["full"]["per_gpu"][k] / GB, est["lora"]["per_gpu"][k] / GB]
        ax1.bar(["full FT", "LoRA"], vals, bottom=bottoms, label=CATEGORY_LABELS[k])
        bottoms = [b + v for b, v in zip(bottoms, vals)]
    gpu = est["setup"]["gpu_mem_bytes"] / GB
    ax1.axhline(gpu, color="k", ls="--", lw=1, label=f"GPU {est['setup']['gpu_mem_bytes'] / GiB:g} GiB")
    ax1.set_ylabel("GB per GPU")
    ax1.set_title(f"{est['model']} on {est['setup']['world_size']} GPU(s)")
    ax1.legend(fontsize=7)
    if shape is not None and st is not None:
        ns = [n for n in (2 ** i for i in range(0, 11)) if n % st.hpz == 0] or \
            [st.hpz * 2 ** i for i in range(0, 8)]
        for which, lab in (("full", "full FT"), ("lora", "LoRA")):
            ys = [sum(per_gpu(shape, replace(st, world_size=n), which).values()) / GB for n in ns]
            ax2.plot(ns, ys, marker="o", label=lab)
        ax2.axhline(gpu, color="k", ls="--", lw=1)
        ax2.set_xscale("log", base=2)
        ax2.set_yscale("log")
        ax2.set_xlabel("GPUs")
        ax2.set_ylabel("GB per GPU")
        ax2.set_title("per-GPU memory vs GPU count")
        ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


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
  Parameter counts come from the real model built on the meta device.

examples:
  bigtrain estimate gpt3-175b --nodes 8 --gpus-per-node 8
  bigtrain estimate gpt3-175b --paper                 # the LoRA paper's figures, and accelerate/DeepSpeed's
  bigtrain estimate gpt3-6.7b --gpus-per-node 1 --zero-stage 0 --no-checkpointing --micro-batch 2
  bigtrain estimate gpt3-13b --gpus-per-node 8 --zero-stage 2 --gpu-mem-gib 141 --json
  bigtrain estimate gpt3-175b --nodes 4 --gpus-per-node 8 --hpz 8   # ds_configs/zero3_hpz.json
  bigtrain estimate llama2-70b --gpus-per-node 2 --micro-batch 2 --lora-r 8 --lora-targets all-linear \\
      --quantize nf4 --gpu-mem-gib 40        # QLoRA-style: PEFT's ZeRO-3 + QLoRA example (--paper)
  bigtrain estimate ./my-model-dir --lora-targets all-linear --lora-r 16 --plot mem.png
"""


def add_estimate_parser(subparsers) -> argparse.ArgumentParser:
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
    p.add_argument("--paper", action="store_true",
                   help="also print the LoRA paper's GPT-3 175B figures and what accelerate/DeepSpeed estimate")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--plot", metavar="FILE.png", help="write stacked bars and a per-GPU-vs-GPU-count plot")
    p.set_defaults(func=run_estimate)
    return p


def setup_from_args(args) -> Setup:
    return Setup(world_size=args.nodes * args.gpus_per_node, zero_stage=args.zero_stage,
                 micro_batch=args.micro_batch, seq_len=args.seq_len, checkpointing=args.checkpointing,
                 lora_r=args.lora_r, lora_targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()),
                 dtype=args.dtype, offload_param=args.offload_param,
                 persistence_threshold=args.persistence_threshold, hpz=args.hpz,
                 full_recipe=args.full_recipe,
                 gpu_mem_bytes=int(args.gpu_mem_gib * GiB), quantize=getattr(args, "quantize", None),
                 checkpoint_layers=getattr(args, "checkpoint_layers", None), compiled=getattr(args, "compiled", False))


def run_estimate(args) -> int:
    if args.nodes < 1 or args.gpus_per_node < 1:
        print("error: --nodes and --gpus-per-node must be >= 1", file=sys.stderr)
        return 2
    for flag, v in (("--lora-r", args.lora_r), ("--micro-batch", args.micro_batch),
                    ("--num-layers", 1 if args.num_layers is None else args.num_layers),
                    ("--seq-len", args.seq_len), ("--gpu-mem-gib", args.gpu_mem_gib)):
        if v <= 0:
            print(f"error: {flag} must be > 0, got {v}", file=sys.stderr)
            return 2
    world = args.nodes * args.gpus_per_node
    if args.hpz < 1 or world % args.hpz:
        print(f"error: --hpz {args.hpz} must be >= 1 and divide the GPU count {world} "
              f"(--nodes x --gpus-per-node)", file=sys.stderr)
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
        limit = position_limit(_hf_config(args.model)[1])
        if limit and args.seq_len > limit:
            print(f"error: --seq-len {args.seq_len} exceeds {args.model}'s {limit} positions (its learned position "
                  f"table; training refuses data.max_length above it too)", file=sys.stderr)
            return 2
        est = estimate(shape, st)
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bigtrain.memory")
    sub = parser.add_subparsers(dest="command", required=True)
    add_estimate_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
