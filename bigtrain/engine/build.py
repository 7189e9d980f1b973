"""The partitioned frozen base: built one decoder layer at a time under ZeRO-3, and its storage.

* ``build_streamed``: a meta-device skeleton, each decoder layer made on the device, initialised by
  the architecture's own ``_init_weights`` or read from a checkpoint, partitioned by
  ``deepspeed.zero.Init(module=layer)`` and (``model.quantize``) quantized before the next layer
  exists; ``build_partitioned``: the whole model under ``zero.Init`` (full fine-tuning);
* ``zero_from_row``: zeroing the padded vocabulary rows of a partitioned parameter;
* ``local_param_bytes``: the bytes of base parameters this rank holds.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math

import torch
import torch.distributed as dist
import transformers as tf
from accelerate import init_empty_weights
from torch import nn
from transformers import PreTrainedModel
from transformers.integrations import HfDeepSpeedConfig
from transformers.integrations import deepspeed as hf_ds

from ..presets import decoder_layer_classes
from .ds_config import check_param_attrs

# Deferred imports: deepspeed is imported where used: its import takes seconds (its op builders)
# and writes to stdout, and stage-0 runs and the CPU-only tools never need it (engine/__init__.py).


def build_partitioned(hf_config, torch_dtype: torch.dtype, attn_implementation: str, ds: dict):
    """The causal LM built under ``zero.Init``: each rank holds only its partitions, initialised from
    the full tensors. Returns (model, the HfDeepSpeedConfig, which the caller must keep referenced
    while models are built: transformers holds it only weakly)."""
    hf_ds = HfDeepSpeedConfig(ds)  # before from_config: zero.Init + proper init
    model = tf.AutoModelForCausalLM.from_config(
        hf_config, dtype=torch_dtype, attn_implementation=attn_implementation)
    check_param_attrs(model)
    return model, hf_ds


@contextlib.contextmanager
def _hf_zero3_off():
    """``transformers`` builds a model under its own ``zero.Init`` while an ``HfDeepSpeedConfig`` is
    alive (an earlier build's, in the same process): off for the meta-device skeleton."""
    if not hasattr(hf_ds, "_hf_deepspeed_config_weak_ref"):  # another transformers: nothing to turn off
        yield
        return
    ref = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = ref


def _post_order(module: nn.Module):
    """``module``'s submodules children first, as ``transformers``' ``smart_apply`` visits them."""
    for child in module.children():
        yield from _post_order(child)
    yield module


def _init_owners(model: nn.Module) -> dict[int, nn.Module]:
    """id(module) -> the innermost ``PreTrainedModel`` containing it (itself if it is one): whose
    ``_init_weights`` initialises it, as ``smart_apply`` dispatches in a composite model."""
    out: dict[int, nn.Module] = {}

    def walk(m: nn.Module, owner: nn.Module) -> None:
        owner = m if isinstance(m, PreTrainedModel) else owner
        out[id(m)] = owner
        for c in m.children():
            walk(c, owner)

    walk(model, model)
    return out


def _materialize(modules: list, device: torch.device) -> list:
    """Replace the meta-device parameters owned by ``modules`` with empty ones on ``device`` (same
    shape, dtype and requires_grad; a tied parameter stays one object). Returns the new ones."""
    new: dict[int, nn.Parameter] = {}
    for m in modules:
        for name, p in list(m._parameters.items()):
            if p is None or not p.is_meta:
                continue
            q = new.get(id(p))
            if q is None:
                q = new[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device),
                                              requires_grad=p.requires_grad)
            m._parameters[name] = q
    return list(new.values())


@torch.no_grad()
def _init_modules(modules: list, owners: dict) -> None:
    """The architecture's own random initialisation (``_init_weights``) of each of ``modules``, in
    the order given, on their whole (not yet partitioned) parameters."""
    try:
        from transformers.initialization import guard_torch_init_functions
    except ImportError:  # transformers 4.x
        guard_torch_init_functions = contextlib.nullcontext
    with guard_torch_init_functions():
        for m in modules:
            owners[id(m)]._init_weights(m)


def return_freed_host_memory() -> None:
    """Give the host memory freed by the layer just built back to the kernel (glibc's ``malloc_trim``;
    a no-op elsewhere). glibc raises its mmap threshold as large blocks are freed, so a layer's
    temporaries (whole weights on a CPU run, quantization's chunks) come from the heap, between
    sections that stay; without this the freed pages stay resident and a CPU build's peak grew by
    about a layer per layer (measured: 0.86 GB at 4 layers, 2.33 GB at 16, tests/e2e/test_build_host_memory.py)."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_libc = None


def build_streamed(hf_config, torch_dtype: torch.dtype, attn_implementation: str, ds: dict,
                   device: torch.device, loader=None, after_layer=None, group=None):
    """The causal LM with ZeRO-3-partitioned parameters, built one decoder layer at a time, so that
    neither the host nor the device ever holds more than one whole layer beyond the partitions
    already made, whatever the model's depth. Returns (model, the ``HfDeepSpeedConfig``, which the
    caller keeps referenced: ``transformers`` holds it only weakly and reads it in ``generate``).

    1. The skeleton: ``from_config`` with every parameter on the meta device (no storage; buffers
       such as RoPE's frequencies are built for real, as a plain build makes them), moved to ``device``.
    2. For each decoder layer, then for the rest (embeddings, final norm, head): its parameters
       made whole on ``device``; initialised by the architecture's own ``_init_weights`` unless a
       checkpoint will overwrite them; handed to DeepSpeed (``zero.Init(module=…)``: rank 0's values
       broadcast, then cut into this rank's partition, as for a module built inside ``zero.Init``);
       with ``loader`` (called with the skeleton, it opens a :class:`bigtrain.loader.PartitionLoader`)
       the layer's slices of the checkpoint are read into its partitions; then ``after_layer(layer)``
       (``model.quantize`` quantizes the layer's partitions there and frees them).

    ``group`` (zero.shard_group, :mod:`bigtrain.layout`): the process group the base is partitioned
    over (``zero.Init``'s ``data_parallel_group``: the group's first rank's values broadcast within
    it, and every parameter's ``ds_process_group``); None: all ranks.

    Building the whole model inside ``zero.Init`` (``HfDeepSpeedConfig`` + ``from_config``) made
    every partition before any was loaded or quantized: with ``model.quantize`` the unquantized
    partitions passed through host memory whole (GPT-3 175B at one rank: 349 GB; the kernel killed
    the rank at 130.5 GB peak RSS on a 125 GiB host)."""
    import deepspeed
    from deepspeed.utils import groups
    with _hf_zero3_off(), init_empty_weights(include_buffers=False):
        model = tf.AutoModelForCausalLM.from_config(hf_config, dtype=torch_dtype,
                                                    attn_implementation=attn_implementation)
    model.tie_weights()  # init_empty_weights makes a tied head a second meta parameter
    hf_ds = HfDeepSpeedConfig(ds)
    for m in model.modules():
        for name, b in m._buffers.items():
            if b is not None:
                m._buffers[name] = b.to(device)
    owners = _init_owners(model)
    classes = tuple(decoder_layer_classes(model))
    layers = [m for m in model.modules() if classes and isinstance(m, classes)]
    inside = {id(m) for layer in layers for m in layer.modules()}
    with loader(model) if loader is not None else contextlib.nullcontext() as reader:
        for unit in layers + [model]:
            mods = [m for m in _post_order(unit) if unit is not model or id(m) not in inside]
            made = {id(p) for p in _materialize(mods, device)}
            if reader is None:
                _init_modules(mods, owners)
            # partitions what is not a ZeRO-3 parameter yet; hpZ's group is made by the first call only
            hpz = groups._get_zero_param_intra_parallel_group()
            deepspeed.zero.Init(module=unit, config_dict_or_path=ds, data_parallel_group=group,
                                **({"zero_param_parallel_group": hpz} if hpz is not None else {}))
            if reader is not None and made:
                reader.fill([n for n, p in model.named_parameters() if id(p) in made])
            if after_layer is not None and unit is not model:
                after_layer(unit)
            return_freed_host_memory()
    check_param_attrs(model)
    return model, hf_ds


@torch.no_grad()
def zero_from_row(p: nn.Parameter, row: int) -> None:
    """Zero rows ``row`` onwards of a partitioned parameter, in this rank's partition (and hpZ
    secondary partition): the flattened range [row·row_len, numel) intersected with each slice."""
    row_len = math.prod(p.ds_shape[1:])
    first = row * row_len
    parts = [(p.ds_tensor, dist.get_rank(group=p.ds_process_group) if dist.is_initialized() else 0)]
    sec = getattr(p, "ds_secondary_tensor", None)
    if sec is not None:
        parts.append((sec, dist.get_rank(group=p.ds_zero_param_process_group)))
    for part, index in parts:
        n = part.numel()
        lo, hi = max(first, n * index), min(p.ds_numel, n * (index + 1))
        if lo < hi:
            part.data.view(-1)[lo - n * index:hi - n * index] = 0


# -- per-rank storage ---------------------------------------------------------------------------
def local_param_bytes(model: nn.Module) -> int:
    """Bytes of base-parameter storage held by this rank (the partition under ZeRO-3; the whole
    tensor too while a parameter is gathered, as persistent ones stay; a quantized weight's stored
    sections: codes or values and scales). Imports no DeepSpeed."""
    total, seen = 0, set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if hasattr(p, "ds_tensor"):  # the partition, plus the whole tensor while gathered/persistent
            whole = p.data.numel() if p.data.data_ptr() != p.ds_tensor.data_ptr() else 0  # aliased: one copy
            total += (p.ds_tensor.numel() + whole) * p.ds_tensor.element_size()
            for t in getattr(p, "bt_sections", {}).values():  # model.quantize (ds_tensor is empty)
                total += t.numel() * t.element_size()
            sec = getattr(p, "ds_secondary_tensor", None)  # hpZ: the partition within the node
            if sec is not None:
                total += sec.numel() * sec.element_size()
        else:
            total += p.numel() * p.element_size()
    return total
