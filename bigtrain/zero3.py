"""Everything that touches DeepSpeed's ZeRO-3 internals: a partitioned frozen base.

This module owns:

* the DeepSpeed config a run uses (defaults, then the user's ``zero.ds_config`` JSON, then the keys
  bigtrain owns), and the checks on it made before any process group starts;
* building the frozen base one decoder layer at a time (``build_streamed``: a meta-device skeleton,
  each layer made on the device, initialised by the architecture's own ``_init_weights`` or read
  from a checkpoint, partitioned by ``deepspeed.zero.Init(module=layer)``, and with
  ``model.quantize`` quantized before the next layer exists), so no rank, host or device, ever holds
  the whole model or more than one unpartitioned layer of it; full fine-tuning (``bigtrain measure``)
  still builds under ``zero.Init`` through ``HfDeepSpeedConfig``;
* gathering the base during a step: by default bigtrain's ``LayerGatherer`` (one all-gather per
  decoder layer over DeepSpeed's partitions, the next layer prefetched), else ZeRO-3's own
  fetch/release hooks through ``DeepSpeedZeRoOffload`` alone (not ``deepspeed.initialize``; hpZ,
  offload and quantized weights need it). Neither needs an optimizer: backward is a plain
  ``loss.backward()``, and frozen parameters get no gradient, no fp32 master and no Adam state;
* gathering whole parameters (``GatheredParameters``), counting this rank's partition bytes, and
  cleaning up after DeepSpeed (the leftovers of backward, its shared-memory buffers).

The adapters are never handed to DeepSpeed: ZeRO-3 would otherwise partition them and their Adam
state and re-gather them after every step (it has no per-module opt-out, DeepSpeed #7271). They are
replicated instead, through the collectives in ``dist.py``.

Several of the APIs used here are private or undocumented (listed in ``PRIVATE_APIS`` and
``PARAM_ATTRS``) and may change between DeepSpeed releases: ``check_deepspeed_version`` checks that
they are there, and warns when the installed DeepSpeed is another minor version than the one this
code was written against. DeepSpeed itself is imported only inside functions: importing it is slow,
and stage 0 runs (and ``bigtrain estimate``) never need it.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import json
import math
import os
import re
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .config import ConfigError, ZeroConfig
from .dist import DistInfo, detect_world, wants_cuda

# Deferred imports: deepspeed (and transformers' DeepSpeed integration) are imported where used, so
# that stage-0 runs and the CPU-only tools never pay DeepSpeed's import time (its op builders).

# The DeepSpeed release this module was written and tested against (pyproject.toml pins it).
DEEPSPEED_VERSION = "0.19.8"

# (module, attribute path) of the private or undocumented DeepSpeed APIs used here.
PRIVATE_APIS = (
    ("deepspeed.runtime.zero.parameter_offload", "DeepSpeedZeRoOffload"),
    ("deepspeed.runtime.zero.parameter_offload", "DeepSpeedZeRoOffload.release_backward_leftovers"),
    ("deepspeed.runtime.zero.parameter_offload", "DeepSpeedZeRoOffload.destroy"),
    ("deepspeed.runtime.zero.config", "DeepSpeedZeroConfig"),
    ("deepspeed.runtime.zero.partition_parameters", "ZeroParamStatus.AVAILABLE"),
    ("deepspeed.utils.groups", "_create_zero_param_parallel_group"),
    ("deepspeed.utils.groups", "_get_zero_param_intra_parallel_group"),
    ("deepspeed.utils", "set_z3_leaf_modules"),
    ("deepspeed", "zero.GatheredParameters"),
    ("deepspeed.comm.torch", "build_shm_op"),
)
# Attributes zero.Init puts on every partitioned parameter, read or written here and by
# ``loader.load_partitions``. Some runs also use ds_persist (persistent parameters) and, with hpZ,
# ds_secondary_tensor and ds_zero_param_process_group; those are read with a default.
PARAM_ATTRS = ("ds_tensor", "ds_status", "ds_numel", "ds_shape", "ds_process_group")

_checked = False  # check_deepspeed_version has passed in this process


def _minor(version: str) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else None


def check_deepspeed_version() -> None:
    """Check, once per process, the installed DeepSpeed against the one this code was written for.

    A private API that is missing is a RuntimeError naming it and the installed version. Another
    minor version (not 0.19.x) that still has them all gets one warning line on stderr naming both
    versions and the private APIs relied on: they may behave differently."""
    global _checked
    if _checked:
        return
    import deepspeed

    installed = str(getattr(deepspeed, "__version__", "unknown"))
    for module, attr in PRIVATE_APIS:
        try:
            obj = importlib.import_module(module)
        except ImportError as e:
            raise RuntimeError(f"DeepSpeed {installed} has no module {module} ({e}); bigtrain needs "
                               f"its {attr} (written against DeepSpeed {DEEPSPEED_VERSION})") from None
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise RuntimeError(f"DeepSpeed {installed} has no {module}.{attr}, which bigtrain's "
                                   f"ZeRO-3 path relies on (written against DeepSpeed "
                                   f"{DEEPSPEED_VERSION}); install deepspeed=={DEEPSPEED_VERSION}")
            obj = getattr(obj, part)
    if _minor(installed) != _minor(DEEPSPEED_VERSION):
        apis = ", ".join(f"{m.rsplit('.', 1)[-1]}.{a}" if a.startswith("_") else a
                         for m, a in PRIVATE_APIS)
        print(f"bigtrain: warning: DeepSpeed {installed} is installed, bigtrain was written against "
              f"{DEEPSPEED_VERSION}; it relies on private DeepSpeed APIs that may have changed: {apis}; "
              f"parameter attributes {', '.join(PARAM_ATTRS)}, ds_secondary_tensor", file=sys.stderr,
              flush=True)
    _checked = True


@contextlib.contextmanager
def no_shm_comm_build():
    """Start DeepSpeed's comm layer without its shared-memory all-reduce op.

    ``deepspeed.init_distributed`` JIT-builds (or loads) the ``deepspeed_shm_comm`` C++ op on CPU at
    every start, under a file lock in torch's extensions cache (``~/.cache/torch_extensions``, or
    ``$TORCH_EXTENSIONS_DIR``). A process killed while it holds the lock (6-10 ms normally, 30-40 s
    when the op is rebuilt) leaves the lock file behind, and every later start by that user then
    waits on it forever, silently. bigtrain never uses the op: it serves DeepSpeed's inference
    all-reduce, while training's collectives (bigtrain's and ZeRO-3's) go through torch.distributed.
    So the build is skipped, and no lock is ever taken."""
    # by module path: ``import deepspeed.comm.torch as m`` binds deepspeed.comm's attribute ``torch``,
    # which is torch itself
    ds_comm = importlib.import_module("deepspeed.comm.torch")
    build = ds_comm.build_shm_op
    ds_comm.build_shm_op = lambda: None
    try:
        yield
    finally:
        ds_comm.build_shm_op = build


def check_param_attrs(model: nn.Module) -> None:
    """After ``zero.Init``: the parameter attributes this code reads are there."""
    p = next(iter(model.parameters()), None)
    if p is None:
        return
    for attr in PARAM_ATTRS:
        if not hasattr(p, attr):
            import deepspeed

            raise RuntimeError(f"DeepSpeed {deepspeed.__version__}: a ZeRO-3 parameter has no {attr}, "
                               f"which bigtrain relies on (written against DeepSpeed {DEEPSPEED_VERSION})")


# -- the DeepSpeed config -----------------------------------------------------------------------
def read_user_ds_config(zero: ZeroConfig) -> dict:
    """The user's DeepSpeed JSON (``zero.ds_config``), or {}; errors name the file and line."""
    if not zero.ds_config:
        return {}
    try:
        user = json.loads(Path(zero.ds_config).read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"zero.ds_config: {zero.ds_config} is not valid JSON "
                          f"(line {e.lineno}): {e.msg}") from None
    zo = user.get("zero_optimization", {})
    if zo.get("stage", 3) != 3:
        raise ConfigError(f"zero.ds_config: {zero.ds_config} sets zero_optimization.stage="
                          f"{zo.get('stage')}; bigtrain partitions the frozen base with stage 3")
    return user


def check_world(zero: ZeroConfig, device: str = "auto", quantize: str | None = None) -> None:
    """Refuse, before any process group starts, a world size or device the configuration cannot use
    (and, with ``quantize`` = model.quantize, a DeepSpeed config whose readers of the partitions
    would see the quantized bytes as weights: hpZ's secondary partitions, parameter offload, DeepSpeed's
    own quantization)."""
    _, world, _ = detect_world()
    zo = read_user_ds_config(zero).get("zero_optimization", {})
    if quantize is not None and zero.stage == 3:
        offload = zo.get("offload_param") or {}
        clash = [k for k, on in (("zero_hpz_partition_size", (zo.get("zero_hpz_partition_size") or 1) > 1),
                                 ("offload_param", offload.get("device", "none") not in (None, "none")),
                                 ("zero_quantized_weights", bool(zo.get("zero_quantized_weights"))),
                                 ("zero_quantized_nontrainable_weights",
                                  bool(zo.get("zero_quantized_nontrainable_weights")))) if on]
        if clash:
            raise ConfigError(f"model.quantize={quantize}: zero.ds_config {zero.ds_config} sets "
                              f"{', '.join(clash)}, which bigtrain's quantized partitions do not support; "
                              f"use ds_configs/zero3.json or model.quantize=null")
    if zero.stage == 3 and zo.get("zero_quantized_nontrainable_weights") and not wants_cuda(device):
        raise ConfigError(f"zero.ds_config: zero_quantized_nontrainable_weights (in {zero.ds_config}) "
                          f"needs GPUs: DeepSpeed's quantizer has no CPU kernel; use ds_configs/zero3.json "
                          f"on CPU")
    if zero.backend == "nccl" and not wants_cuda(device):
        raise ConfigError(f"zero.backend=nccl needs CUDA GPUs, and this run is on the CPU "
                          f"(train.device={device}{', no CUDA device visible' if device == 'auto' else ''}): "
                          f"use zero.backend=auto (gloo on CPU) or gloo")
    hpz = zo.get("zero_hpz_partition_size", 1)
    if zero.stage == 3 and hpz > 1 and world % hpz:
        raise ConfigError(f"zero.ds_config: zero_hpz_partition_size={hpz} (in {zero.ds_config}) does not "
                          f"divide the world size {world}; set it to the GPUs per node")


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


def largest_layer_numel(hf_config) -> int | None:
    """Elements of the model's largest decoder layer, from its shapes alone (a meta-device build)."""
    from .presets import meta_model  # transformers: imported when a base is built

    meta = meta_model(hf_config)
    classes = tuple(decoder_layer_classes(meta))
    sizes = [sum(p.numel() for p in m.parameters()) for m in meta.modules() if classes and isinstance(m, classes)]
    return max(sizes) if sizes else None


def fetch_sizes(layer_numel: int | None) -> dict:
    """ZeRO-3's fetch and release sizes, in elements, from the size of one decoder layer (whole
    layers are the fetch unit, ``zero.leaf_blocks``). DeepSpeed's fixed defaults fit no model:

    * ``stage3_prefetch_bucket_size`` (default 5e7) is below one layer of GPT-3 2.7B (79M) or 6.7B
      (201M), so the next layer was never fetched ahead. One layer: the next layer's all-gather runs
      while this one computes.
    * ``stage3_max_reuse_distance`` (default 1e9): a parameter used again within that many elements
      of modules ahead is not released. 1e9 kept the last ~5 layers of 6.7B (~12 of 2.7B, all of a
      small model) gathered from forward into backward. One layer keeps only the layer where forward
      turns into backward.
    * ``stage3_max_live_parameters`` (default 1e9) caps what prefetch may hold; one layer of GPT-3
      175B is 1.8e9 elements, so prefetch would stop there. Three layers: the one computing, the one
      arriving, and the one DeepSpeed keeps at the forward/backward turn.

    A user's zero.ds_config overrides any of these."""
    if not layer_numel:
        return {}
    return {"stage3_prefetch_bucket_size": layer_numel, "stage3_max_reuse_distance": layer_numel,
            "stage3_max_live_parameters": 3 * layer_numel}


def build_ds_config(zero: ZeroConfig, base_dtype: torch.dtype, micro_batch_size: int, grad_accum: int,
                    world_size: int, layer_numel: int | None = None) -> tuple[dict, list[str]]:
    """Defaults (fetch sizes from the model's largest decoder layer, ``layer_numel`` elements) <- the
    user's JSON (zero.ds_config) <- the keys bigtrain owns. Returns the config and notes on what of the
    user's file was overridden or ignored."""
    # memory_efficient_linear=False: otherwise zero.Init replaces torch.nn.functional.linear,
    # process-wide and for good, with DeepSpeed's LinearFunctionForZeroStage3, which saves every
    # linear layer's input for backward even when the weight is frozen (measured on an H200:
    # +7.6 GiB at GPT-3 2.7B, micro-batch 4, no checkpointing). torch's own linear saves only
    # what the input gradient needs, and computes the same values.
    ds: dict = {"zero_optimization": {"stage": 3,
                                      "stage3_param_persistence_threshold": zero.persistence_threshold,
                                      "memory_efficient_linear": False,
                                      **fetch_sizes(layer_numel)}}
    notes = []
    if zero.ds_config:
        user = read_user_ds_config(zero)
        zo = user.get("zero_optimization", {})
        ds.update({k: v for k, v in user.items() if k != "zero_optimization"})
        ds["zero_optimization"].update(zo)
        t = zo.get("stage3_param_persistence_threshold")
        if t is not None and t != zero.persistence_threshold:
            notes.append(f"stage3_param_persistence_threshold: {t!r} from {zero.ds_config} is "
                         f"used; zero.persistence_threshold={zero.persistence_threshold} is not")
        if "optimizer" in user or "scheduler" in user:
            notes.append("optimizer/scheduler in the DeepSpeed config are ignored: the adapters "
                         "are stepped by bigtrain's AdamW (train.lr, train.schedule)")
    owned = {"train_micro_batch_size_per_gpu": micro_batch_size,
             "gradient_accumulation_steps": grad_accum,
             "train_batch_size": micro_batch_size * grad_accum * world_size,
             "bf16": {"enabled": base_dtype == torch.bfloat16},
             "fp16": {"enabled": base_dtype == torch.float16}}
    for k, v in owned.items():
        if k in ds and ds[k] != v:
            notes.append(f"{k}: {ds[k]!r} in {zero.ds_config} replaced by {v!r} (from bigtrain's config)")
        ds[k] = v
    ds["zero_optimization"]["stage"] = 3
    return ds, notes


# -- the partitioned base -----------------------------------------------------------------------
def build_partitioned(hf_config, torch_dtype: torch.dtype, attn_implementation: str, ds: dict):
    """The causal LM built under ``zero.Init``: each rank holds only its partitions, initialised from
    the full tensors. Returns (model, the HfDeepSpeedConfig, which the caller must keep referenced
    while models are built: transformers holds it only weakly)."""
    import transformers as tf
    from transformers.integrations import HfDeepSpeedConfig

    hf_ds = HfDeepSpeedConfig(ds)  # before from_config: zero.Init + proper init
    model = tf.AutoModelForCausalLM.from_config(
        hf_config, dtype=torch_dtype, attn_implementation=attn_implementation)
    check_param_attrs(model)
    return model, hf_ds


@contextlib.contextmanager
def _hf_zero3_off():
    """``transformers`` builds a model under its own ``zero.Init`` while an ``HfDeepSpeedConfig`` is
    alive (an earlier build's, in the same process): off for the meta-device skeleton."""
    from transformers.integrations import deepspeed as hf_ds

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
    from transformers import PreTrainedModel

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


def _return_freed_host_memory() -> None:
    """Give the host memory freed by the layer just built back to the kernel (glibc's ``malloc_trim``;
    a no-op elsewhere). glibc raises its mmap threshold as large blocks are freed, so a layer's
    temporaries (whole weights on a CPU run, quantization's chunks) come from the heap, between
    sections that stay; without this the freed pages stay resident and a CPU build's peak grew by
    about a layer per layer (measured: 0.86 GB at 4 layers, 2.33 GB at 16, tests/e2e/test_build_host_memory.py)."""
    global _libc
    if _libc is None:
        import ctypes
        import ctypes.util

        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_libc = None


def build_streamed(hf_config, torch_dtype: torch.dtype, attn_implementation: str, ds: dict,
                   device: torch.device, loader=None, after_layer=None):
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

    Building the whole model inside ``zero.Init`` (``HfDeepSpeedConfig`` + ``from_config``) made
    every partition before any was loaded or quantized: with ``model.quantize`` the unquantized
    partitions passed through host memory whole (GPT-3 175B at one rank: 349 GB; the kernel killed
    the rank at 130.5 GB peak RSS on a 125 GiB host)."""
    import deepspeed
    import transformers as tf
    from accelerate import init_empty_weights
    from deepspeed.utils import groups
    from transformers.integrations import HfDeepSpeedConfig

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
            deepspeed.zero.Init(module=unit, config_dict_or_path=ds,
                                **({"zero_param_parallel_group": hpz} if hpz is not None else {}))
            if reader is not None and made:
                reader.fill([n for n, p in model.named_parameters() if id(p) in made])
            if after_layer is not None and unit is not model:
                after_layer(unit)
            _return_freed_host_memory()
    check_param_attrs(model)
    return model, hf_ds


def install_offload(model: nn.Module, ds: dict, zero: ZeroConfig, info: DistInfo, notes: list[str],
                    quantize: str | None = None):
    """Install the hooks that gather ``model``'s partitions during a step. Returns (the gatherer: a
    :class:`LayerGatherer` or a ``DeepSpeedZeRoOffload``; None when there is nothing to gather, and
    whether that is because every partition is a whole tensor at world size 1). With ``quantize``
    (``model.quantize``) the base's linear weights are quantized here, and the gatherer is a
    :class:`LayerGatherer` at every world size, 1 included (it dequantizes layer by layer)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload
    from deepspeed.utils import groups

    zc = DeepSpeedZeroConfig(**ds["zero_optimization"])
    if quantize is not None:
        # refused before start-up otherwise (config.Config.validate, check_world); kept as a guard
        if not (zero.gather == "layers" and zero.leaf_blocks and zc.zero_hpz_partition_size <= 1
                and zc.offload_param is None and not zc.zero_quantized_weights
                and not zc.zero_quantized_nontrainable_weights and decoder_layer_classes(model)):
            raise ConfigError(f"model.quantize={quantize} needs bigtrain's layer gatherer (zero.gather=layers, "
                              f"zero.leaf_blocks=true, no hpZ, parameter offload or DeepSpeed quantization "
                              f"in zero.ds_config, a model with decoder layers)")
        group = next(p.ds_process_group for p in model.parameters() if hasattr(p, "ds_tensor"))
        return LayerGatherer(model, group, info.device, zc.param_persistence_threshold, quantize), False
    if zero.single_rank_plain and info.world_size == 1 and zc.zero_hpz_partition_size <= 1:
        # One rank: every partition is a whole tensor, there is nothing to gather. Alias them and
        # run the module with no ZeRO-3 hooks at all (same values, same memory: one copy).
        params = {id(p): p for p in model.parameters()}
        if alias_unsharded(model, persistent_only=False, device_type=info.device.type) == len(params):
            notes.append("world size 1: ZeRO-3 partitions are whole tensors; "
                         "running the base without ZeRO-3 hooks (zero.single_rank_plain)")
            return None, True
    own = (zero.gather == "layers" and zero.leaf_blocks and zc.zero_hpz_partition_size <= 1
           and zc.offload_param is None and not zc.zero_quantized_weights
           and not zc.zero_quantized_nontrainable_weights and decoder_layer_classes(model))
    if own:
        group = next(p.ds_process_group for p in model.parameters() if hasattr(p, "ds_tensor"))
        return LayerGatherer(model, group, info.device, zc.param_persistence_threshold), False
    if zero.gather == "layers":
        notes.append("zero.gather=layers needs whole decoder layers as fetch units and none of hpZ, "
                     "parameter offload or quantized weights: using DeepSpeed's own fetch hooks")
    if zero.leaf_blocks:
        from deepspeed.utils import set_z3_leaf_modules

        classes = decoder_layer_classes(model)
        if classes:
            set_z3_leaf_modules(model, classes)
    param_group = None
    if zc.zero_hpz_partition_size > 1:
        # zero.Init (run by transformers under HfDeepSpeedConfig) has usually created the hpZ
        # group already; creating it twice is an assertion error inside DeepSpeed
        if groups._get_zero_param_intra_parallel_group() is None:
            groups._create_zero_param_parallel_group(zc.zero_hpz_partition_size)
        param_group = groups._get_zero_param_intra_parallel_group()
    offload = DeepSpeedZeRoOffload(
        model, timers=None, ds_config=ds, overlap_comm=zc.overlap_comm,
        prefetch_bucket_size=zc.prefetch_bucket_size, max_reuse_distance=zc.max_reuse_distance,
        max_live_parameters=zc.max_live_parameters,
        param_persistence_threshold=zc.param_persistence_threshold,
        model_persistence_threshold=zc.model_persistence_threshold,
        offload_param_config=zc.offload_param, zero_param_parallel_group=param_group,
        zero_quantized_weights=zc.zero_quantized_weights,
        zero_quantized_nontrainable_weights=zc.zero_quantized_nontrainable_weights,
        zero_module_granularity_threshold=zc.module_granularity_threshold)
    alias_unsharded(model, persistent_only=True, device_type=info.device.type)
    return offload, False


def alias_unsharded(model: nn.Module, persistent_only: bool, device_type: str) -> int:
    """Where a parameter's partition group has one rank (world size 1), its partition *is* the
    whole tensor: point ``param.data`` at the partition and mark it available, so it is never
    gathered (no copy, no hook work) and holds no second full copy. Values are unchanged; a later
    ``GatheredParameters`` or partition still works (it only drops the view). Offloaded or
    quantized partitions (on another device than ``device_type``, or of another dtype) are left
    alone. With ``persistent_only`` only parameters DeepSpeed keeps gathered anyway (ds_persist).
    Returns the number of parameters aliased."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    n = 0
    for p in model.parameters():
        t = getattr(p, "ds_tensor", None)
        if t is None or (persistent_only and not getattr(p, "ds_persist", False)):
            continue
        group = getattr(p, "ds_process_group", None)
        if (dist.get_world_size(group=group) if dist.is_initialized() else 1) != 1:
            continue
        if t.numel() < p.ds_numel or t.dtype != p.dtype or t.device.type != device_type:
            continue
        p.data = t.data.view(-1).narrow(0, 0, p.ds_numel).view(p.ds_shape)
        p.ds_status = ZeroParamStatus.AVAILABLE
        n += 1
    return n


def release_backward_leftovers(offload) -> None:
    """Return every ZeRO-3 parameter gathered for this step to its partition."""
    if offload is not None:
        offload.release_backward_leftovers()


def gather(params, modify: bool = False):
    """``GatheredParameters``: ``params`` whole on every rank inside the context; with ``modify``,
    changes made on rank 0 are written back to the partitions."""
    import deepspeed

    params = [params] if isinstance(params, torch.Tensor) else list(params)
    return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)


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


def decoder_layer_classes(model: nn.Module) -> list[type]:
    """The transformer-block classes of a ``transformers`` model (its ``_no_split_modules``)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    seen: dict[str, type] = {}
    for m in model.modules():
        if type(m).__name__ in names:
            seen[type(m).__name__] = type(m)
    return list(seen.values())


def unlink_deepspeed_shm(rank: int, world: int, addr: str | None = None, port: str | int | None = None) -> None:
    """Remove this rank's DeepSpeed shared-memory all-reduce buffer, which DeepSpeed never does.

    On CPU, when every rank is on one host and the launcher sets LOCAL_SIZE (the ``deepspeed``
    launcher does), DeepSpeed's comm backend creates a 66 MiB POSIX shared-memory segment per rank
    (``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``) and never unlinks it:
    each such run leaked 132 MiB of RAM on tmpfs until reboot. Peers have it mapped, not open by
    name, so unlinking after the process group is gone is safe. A run killed before this point
    still leaves its segments behind (nothing in-process can help that), unless another process
    unlinks them by the run's rendezvous ``addr`` and ``port``, as ``bigtrain measure`` does after
    each mode's child, however it ended."""
    if os.environ.get("LOCAL_SIZE") != str(world):
        return
    addr = os.environ.get("MASTER_ADDR", "") if addr is None else addr
    port = os.environ.get("MASTER_PORT", "") if port is None else port
    name = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"
    with contextlib.suppress(OSError):
        os.unlink(name)



# -- a quantized frozen base (model.quantize=int8 | nf4) -------------------------------------------
QUANT_BLOCK = 64  # elements per block of both schemes, counted from the start of each rank's partition
NF4_SCALE_BLOCK = 256  # nf4's double quantization: int8 absmax scales, one fp32 scale per 256 of them
# QLoRA's NormalFloat4 code (Dettmers et al. 2023, bitsandbytes' NF4 table): quantiles of N(0, 1)
# scaled to [-1, 1], with an exact zero; 16 values, one 4-bit index each.
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)
_DEQ_CHUNK = 1 << 22  # elements the eager nf4 path dequantizes at a time (bounds its temporaries)


_Q_CHUNK = 1 << 24  # elements quantized at a time: bounds the temporaries (a multiple of every block size)


def _block_chunks(x: torch.Tensor, block: int):
    """``x`` read flat, ``_Q_CHUNK`` elements at a time, as fp32 on x's device viewed as whole
    blocks of ``block`` (zeros pad the last one): yields (first block's index, blocks)."""
    x = x.detach().reshape(-1)
    n = x.numel()
    for a in range(0, max(n, 1), _Q_CHUNK):
        c = x[a:a + _Q_CHUNK].float()
        if c.numel() % block or c.numel() == 0:
            c = torch.cat([c, c.new_zeros(block - c.numel() % block)])
        yield a // block, c.view(-1, block)


def _add_error(sums: list | None, blocks: torch.Tensor, deq: torch.Tensor, dtype: torch.dtype) -> None:
    """Accumulate ``sum x²`` and ``sum (x - deq)²`` into ``sums`` (float64), if given, with ``deq``
    rounded to ``dtype`` as the gather hands it to the forward."""
    if sums is not None:
        x64 = blocks.double()
        sums[0] += float(x64.square().sum())
        sums[1] += float((x64 - deq.to(dtype).double()).square().sum())


@torch.no_grad()
def quantize_blocks(x: torch.Tensor, block: int = QUANT_BLOCK, sums: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric block-wise int8 of a tensor read flat: blocks of ``block`` consecutive elements
    from its start (the last one shorter when ``block`` does not divide it), one fp32 scale each,
    ``absmax / 127``; values ``round(x / scale)`` (half to even), so ``|x - q·scale| <= scale/2``.
    An all-zero block has scale 0 and values 0. Returns (int8 values, fp32 scales) on x's device,
    computed ``_Q_CHUNK`` elements at a time. ``sums``: a list [0.0, 0.0] that
    receives ``sum x²`` and ``sum (x - dequantized)²`` (fp32 dequantized values)."""
    n = x.numel()
    qs, scs = [], []
    for _, blocks in _block_chunks(x, block):
        scales = blocks.abs().amax(dim=1) / 127.0
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        q = torch.round(blocks / safe[:, None]).clamp_(-127, 127)
        _add_error(sums, blocks, q * scales[:, None], x.dtype)
        qs.append(q.to(torch.int8).view(-1))
        scs.append(scales)
    return torch.cat(qs)[:n].clone(), torch.cat(scs)[:-(-n // block)]


def dequantize_blocks(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype,
                      block: int = QUANT_BLOCK, out: torch.Tensor | None = None) -> torch.Tensor:
    """The inverse of :func:`quantize_blocks` along the last dimension (one row per rank at a gather):
    ``q·scale`` in fp32, then one rounding to ``dtype`` (written into ``out`` if given). On a GPU
    one Triton kernel does it (:func:`_triton_kernels`; rows that end inside a block through padded
    copies)."""
    n = q.shape[-1]
    lead = q.shape[:-1]
    nb = scales.shape[-1]
    if block == QUANT_BLOCK and _use_triton(q.device):
        if n != nb * block:  # rows that end inside a block: the kernel reads whole blocks
            padded = torch.zeros(*lead, nb * block, dtype=torch.int8, device=q.device)
            padded[..., :n] = q
            q = padded
        return _dequant_gpu("int8", q, scales, n, dtype, out)
    if n == nb * block:  # whole blocks (any partition of a size divisible by 64): no padded copy
        full = q.reshape(*lead, nb, block).float().mul_(scales.float()[..., None]).view(*lead, n)
    else:
        full = torch.zeros(*lead, nb * block, dtype=torch.float32, device=q.device)
        full[..., :n] = q
        full = full.view(*lead, nb, block).mul_(scales.float()[..., None]).view(*lead, nb * block)[..., :n]
    if out is not None:
        return out.copy_(full)  # the same cast as .to(dtype), without a second temporary
    return full.to(dtype)


_KERNELS: dict = {}  # scheme -> its Triton kernel, built at first use on a GPU


def _use_triton(device: torch.device) -> bool:
    """Whether ``device`` dequantizes with the Triton kernels: a CUDA device with Triton importable.
    Without Triton (a torch build that lacks it) the eager path runs, after one line on stderr."""
    if device.type != "cuda":
        return False
    if "available" not in _KERNELS:
        try:
            _triton_kernels()
            _KERNELS["available"] = True
        except ImportError as e:
            _KERNELS["available"] = False
            print(f"[bigtrain] model.quantize: Triton is not importable ({e}); dequantizing with eager "
                  f"PyTorch, several times slower", file=sys.stderr, flush=True)
    return _KERNELS["available"]


def _triton_kernels() -> dict:
    """The dequantization kernels for a GPU, one element per thread, reading the stored form once
    and writing the compute dtype once (~3 bytes of memory traffic per element for int8, ~2.5 for
    nf4). Eager PyTorch makes fp32 (and, for nf4, int64 index) temporaries of every element on its
    way, ~20-30 bytes per element, and inductor's dynamic-shape kernels reached only 0.2-0.8 TB/s of
    an H200's 4.8 (``bench/quant_gpu.py``): on GPT-3 6.7B at 2 GPUs that cost 14% (int8) and 34%
    (nf4) of the bf16 base's tokens/s. The same operations as the CPU's :func:`dequantize_blocks` and
    :func:`_nf4_values` (an fp32 product, one round-to-nearest-even to the compute dtype), so the
    same values: ``bench/quant_gpu.py`` checks them bit for bit. Triton ships with CUDA builds of
    torch; it is imported only here."""
    if "int8" in _KERNELS:
        return _KERNELS
    import triton
    import triton.language as tl

    @triton.jit
    def int8_kernel(q_ptr, s_ptr, out_ptr, n, QB: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        q = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.float32)
        s = tl.load(s_ptr + offs // QB, mask=mask, other=0.0)
        tl.store(out_ptr + offs, (q * s).to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)

    @triton.jit
    def nf4_kernel(c_ptr, s_ptr, code_ptr, out_ptr, n, QB: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        b = tl.load(c_ptr + offs // 2, mask=mask, other=0).to(tl.int32)
        nib = tl.where(offs % 2 == 0, b >> 4, b & 15)  # the first element of a byte in its high nibble
        v = tl.load(code_ptr + nib, mask=mask, other=0.0)
        s = tl.load(s_ptr + offs // QB, mask=mask, other=0.0)
        tl.store(out_ptr + offs, (v * s).to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)

    _KERNELS.update(int8=int8_kernel, nf4=nf4_kernel, block=4096, grid=lambda n, b: (triton.cdiv(n, b),))
    return _KERNELS


def _dequant_gpu(scheme: str, stored: torch.Tensor, scales: torch.Tensor, n: int, dtype: torch.dtype,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of whole blocks on a GPU (``stored``: ``[..., nb·64]`` values or ``[..., nb·32]`` nf4
    bytes; ``scales``: ``[..., nb]`` fp32), read as one flat run: each value × its block's scale,
    rounded to ``dtype``; the first ``n`` elements of each row, written into ``out`` if given. A
    contiguous ``out`` of whole blocks is written by the kernel directly; otherwise through a
    padded temporary."""
    k = _triton_kernels()
    lead, nb = scales.shape[:-1], scales.shape[-1]
    direct = n == nb * QUANT_BLOCK and (out is None or out.is_contiguous())
    if direct and out is None:
        out = torch.empty(*lead, n, dtype=dtype, device=stored.device)
    dest = out if direct else torch.empty(*lead, nb * QUANT_BLOCK, dtype=dtype, device=stored.device)
    args = (stored.contiguous().view(-1), scales.contiguous().view(-1).float())
    if scheme == "nf4":
        code = _KERNELS.get(("code", dest.device))
        if code is None:
            code = _KERNELS[("code", dest.device)] = torch.tensor(NF4_CODE, dtype=torch.float32, device=dest.device)
        args = args + (code,)
    total = dest.numel()
    k[scheme][k["grid"](total, k["block"])](*args, dest.view(-1), total, QUANT_BLOCK, k["block"])
    if direct:
        return out
    return dest[..., :n].clone() if out is None else out.copy_(dest[..., :n])


@torch.no_grad()
def quantize_nf4(x: torch.Tensor, block: int = QUANT_BLOCK, scale_block: int = NF4_SCALE_BLOCK,
                 sums: list | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """QLoRA's NF4 with double-quantized scales, of a tensor read flat.

    Blocks of ``block`` elements from its start (zeros pad the last one). Each block's absmax
    ``a_j`` is itself quantized (QLoRA's double quantization): ``c = a - mean(a)`` in groups of
    ``scale_block`` blocks, symmetric int8 ``round(c / s2)`` with ``s2 = absmax(c) / 127`` (fp32),
    so the scale used is ``â_j = q2_j·s2 + mean`` (QLoRA stores these 8-bit scales as an 8-bit
    float code; a linear int8 code costs the same bits and is one multiply-add to decode). Then each
    element is the index of the NF4 value nearest to ``x / â_j`` (``â_j`` rather than ``a_j``, so
    the index is the best one for the scale that dequantization will use), two indices per byte,
    the first in the high nibble. Storage: 4 bits per element + 8 bits per 64 + 32 bits per 16,384
    + 32 bits: 4.127 bits, 0.258 of bf16.

    Returns (uint8 codes, ``ceil(n/block)·block/2`` bytes; int8 scales, one per block; fp32
    ``[s2 per group..., mean]``) on x's device, computed ``_Q_CHUNK`` elements at a time (the mean of
    the absmaxes is reduced on that device). ``sums``: as for
    :func:`quantize_blocks`."""
    n = x.numel()
    nb = -(-n // block)
    absmax = torch.cat([blocks.abs().amax(dim=1) for _, blocks in _block_chunks(x, block)])[:nb]
    dev = absmax.device
    mean = absmax.mean()
    ng = -(-nb // scale_block)
    c = torch.zeros(ng * scale_block, dtype=torch.float32, device=dev)
    c[:nb] = absmax - mean
    cg = c.view(ng, scale_block)
    s2 = cg.abs().amax(dim=1) / 127.0
    safe2 = torch.where(s2 > 0, s2, torch.ones_like(s2))
    q2 = torch.round(cg / safe2[:, None]).clamp_(-127, 127).to(torch.int8).view(-1)[:nb].clone()
    s2m = torch.cat([s2, mean.view(1)])
    scale = _nf4_scales(q2, s2m, scale_block)
    safe = torch.where(scale != 0, scale, torch.ones_like(scale))
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=dev)
    mids = (code[1:] + code[:-1]) / 2
    packed = []
    for b0, blocks in _block_chunks(x, block):
        k = blocks.shape[0]
        idx = torch.bucketize(blocks / safe[b0:b0 + k, None], mids)  # the nearest code
        _add_error(sums, blocks, code[idx] * scale[b0:b0 + k, None], x.dtype)
        idx = idx.to(torch.uint8).view(-1, 2)
        packed.append((idx[:, 0] << 4) | idx[:, 1])
    return torch.cat(packed)[:nb * block // 2], q2, s2m


def _nf4_scales(q2: torch.Tensor, s2m: torch.Tensor, scale_block: int = NF4_SCALE_BLOCK) -> torch.Tensor:
    """Each block's scale ``q2·s2 + mean`` (fp32, a multiply then an add) along the last dimension."""
    nb, ng = q2.shape[-1], s2m.shape[-1] - 1
    lead = q2.shape[:-1]
    wide = torch.zeros(*lead, ng * scale_block, dtype=torch.float32, device=q2.device)
    wide[..., :nb] = q2
    wide = wide.view(*lead, ng, scale_block).mul_(s2m[..., :ng, None]).view(*lead, ng * scale_block)[..., :nb]
    return wide.add_(s2m[..., ng:])


def _nf4_values(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, block: int) -> torch.Tensor:
    """NF4 codes (uint8, two per byte, ``[..., nb·block/2]``) times their block's scale (``[..., nb]``),
    in fp32, rounded once to ``dtype``: ``[..., nb·block]``."""
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=codes.device)
    idx = torch.stack([codes >> 4, codes & 15], dim=-1).long()
    vals = code[idx].view(*scale.shape, block)
    return vals.mul_(scale[..., None]).view(*codes.shape[:-1], -1).to(dtype)


def dequantize_nf4(codes: torch.Tensor, q2: torch.Tensor, s2m: torch.Tensor, n: int, dtype: torch.dtype,
                   block: int = QUANT_BLOCK, scale_block: int = NF4_SCALE_BLOCK,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """The inverse of :func:`quantize_nf4` along the last dimension (one row per rank at a gather):
    ``NF4[index]·(q2·s2 + mean)`` in fp32, rounded once to ``dtype``, the first ``n`` elements of
    each row (written into ``out`` if given). On the CPU the rows are dequantized a chunk of blocks
    at a time, so the temporaries stay small; on a GPU one Triton kernel does them (:func:`_triton_kernels`)."""
    lead = codes.shape[:-1]
    scale = _nf4_scales(q2, s2m, scale_block)
    nb = scale.shape[-1]
    if block == QUANT_BLOCK and _use_triton(codes.device):
        return _dequant_gpu("nf4", codes, scale, n, dtype, out)
    if out is None:
        out = torch.empty(*lead, n, dtype=dtype, device=codes.device)
    step = max(1, _DEQ_CHUNK // block)
    for b0 in range(0, nb, step):
        b1 = min(nb, b0 + step)
        vals = _nf4_values(codes[..., b0 * block // 2:b1 * block // 2], scale[..., b0:b1], dtype, block)
        e0, e1 = b0 * block, min(n, b1 * block)
        out[..., e0:e1].copy_(vals[..., :e1 - e0])
    return out


class _Scheme:
    """How one quantized partition is stored: its sections (name, dtype, element count), in the
    order the packed unit buffer holds them (4-byte sections first, 1-byte ones last, so every
    offset stays aligned), how to make them and how to turn gathered rows of them back into values."""

    name = ""

    def sections(self, n: int) -> list[tuple[str, torch.dtype, int]]:
        raise NotImplementedError

    def quantize(self, x: torch.Tensor, sums: list | None = None) -> dict[str, torch.Tensor]:
        """The sections of ``x`` read flat, on x's device; ``sums`` as for :func:`quantize_blocks`."""
        raise NotImplementedError

    def dequantize(self, parts: dict, n: int, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def nbytes(self, n: int) -> int:
        return sum(c * torch.empty(0, dtype=d).element_size() for _, d, c in self.sections(n))


class _Int8(_Scheme):
    name = "int8"

    def sections(self, n):
        return [("scales", torch.float32, -(-n // QUANT_BLOCK)), ("values", torch.int8, n)]

    def quantize(self, x, sums=None):
        q, sc = quantize_blocks(x, sums=sums)
        return {"scales": sc, "values": q}

    def dequantize(self, parts, n, dtype, out=None):
        return dequantize_blocks(parts["values"], parts["scales"], dtype, out=out)


class _NF4(_Scheme):
    name = "nf4"

    def sections(self, n):
        nb = -(-n // QUANT_BLOCK)
        return [("scales2", torch.float32, -(-nb // NF4_SCALE_BLOCK) + 1), ("scales", torch.int8, nb),
                ("codes", torch.uint8, nb * QUANT_BLOCK // 2)]

    def quantize(self, x, sums=None):
        codes, q2, s2m = quantize_nf4(x, sums=sums)
        return {"scales2": s2m, "scales": q2, "codes": codes}

    def dequantize(self, parts, n, dtype, out=None):
        return dequantize_nf4(parts["codes"], parts["scales"], parts["scales2"], n, dtype, out=out)


SCHEMES = {"int8": _Int8(), "nf4": _NF4()}
QUANT_FORMATS = {  # how the load summary and the docs describe each scheme
    "int8": f"int8, one fp32 scale per block of {QUANT_BLOCK} elements (absmax/127)",
    "nf4": (f"NF4, one int8 scale per block of {QUANT_BLOCK} elements, double-quantized with one fp32 scale per "
            f"{NF4_SCALE_BLOCK} scales and one fp32 offset"),
}


def quantized_bytes(part_numel: int, scheme: str = "int8") -> int:
    """Bytes a rank stores for one quantized partition of ``part_numel`` elements: int8: the values
    and one fp32 scale per block; nf4: half a byte per element (whole blocks), one int8 scale per
    block, one fp32 scale per 256 blocks and one fp32 offset."""
    return SCHEMES[scheme].nbytes(part_numel)


def quantize_dequantize(x: torch.Tensor, scheme: str = "int8", dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x`` read flat, quantized as one partition and dequantized to ``dtype`` (default x's)."""
    s = SCHEMES[scheme]
    return s.dequantize(s.quantize(x), x.numel(), dtype or x.dtype).view(x.shape)


def reference_dequantized(full: torch.Tensor, world: int, dtype: torch.dtype | None = None,
                          scheme: str = "int8") -> torch.Tensor:
    """What a quantized base's weight is after its gather at ``world`` ranks, from the whole
    unquantized tensor: ZeRO-3's padded partitions (``ceil(numel/world)`` elements each, zeros after
    the end), each quantized on its own (blocks from the partition's start), dequantized, joined.
    The block boundaries follow the partitions, so the values depend on the world size."""
    dtype = dtype or full.dtype
    n = full.numel()
    part = -(-n // world)
    flat = torch.zeros(part * world, dtype=full.dtype)
    flat[:n] = full.detach().reshape(-1).cpu()
    out = [quantize_dequantize(flat[r * part:(r + 1) * part], scheme, dtype) for r in range(world)]
    return torch.cat(out)[:n].view(full.shape)


def _linear_weights(layer: nn.Module) -> list:
    """The 2-D weight of every ``nn.Linear`` inside one decoder layer: what ``model.quantize`` stores
    quantized (:func:`quantizable_weights`)."""
    return [sub.weight for sub in layer.modules()
            if type(sub) is nn.Linear and len(getattr(sub.weight, "ds_shape", sub.weight.shape)) == 2]


def quantizable_weights(model: nn.Module) -> dict:
    """The weights ``model.quantize`` stores quantized, by id: the 2-D weight of every ``nn.Linear``
    inside a decoder layer (LoRA's adapters are not there yet: they are injected after the base is
    built). Embeddings, norms, biases and the LM head stay in the compute dtype: norms and biases
    are small (1-D, a fraction of a percent of the bytes, usually persistent) and scale whole
    activations; the embedding and the LM head (often one tied matrix) are the root unit, gathered
    once per step rather than once per layer, and the head's error goes straight into every logit.
    Returns {id(param): dotted name}."""
    classes = tuple(decoder_layer_classes(model))
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    return {id(w): names.get(id(w), "?") for m in model.modules() if classes and isinstance(m, classes)
            for w in _linear_weights(m)}


@torch.no_grad()
def quantize_layer(layer: nn.Module, scheme: str, device: torch.device) -> None:
    """``model.quantize`` while the base is built (``build_streamed``'s ``after_layer``): each of
    the layer's :func:`quantizable_weights` has its freshly filled partition quantized on ``device``
    (a chunk at a time, :func:`quantize_blocks` / :func:`quantize_nf4`) and the unquantized
    partition freed. The sections wait on the parameter (``bt_quant``; ``bt_part`` its element
    count, ``bt_sums`` its error sums) until :class:`LayerGatherer` packs the layer."""
    for p in _linear_weights(layer):
        if hasattr(p, "bt_quant"):
            continue
        x = p.ds_tensor.data.reshape(-1).to(device)  # one copy over, in the model's dtype
        sums = [0.0, 0.0]
        p.bt_quant = SCHEMES[scheme].quantize(x, sums=sums)
        p.bt_sums, p.bt_part = tuple(sums), x.numel()
        p.ds_tensor.data = torch.empty(0, dtype=p.ds_tensor.dtype, device=device)
        del x


# -- bigtrain's own fetch hooks: one decoder layer at a time, the next one prefetched --------------
class LayerGatherer:
    """Gathers the partitioned frozen base one decoder layer at a time, with the next layer's
    all-gather in flight while this one computes, and releases each layer as soon as its forward
    (or, in training, its backward) is done. It replaces DeepSpeed's fetch hooks
    (``DeepSpeedZeRoOffload``) at world size > 1 and reads the same partitions (``ds_tensor``).

    Why not DeepSpeed's own hooks: on two H200s they made a GPT-3 2.7B step 1.6x slower than one GPU
    (26k against 35k tokens/s per GPU, where FSDP2 keeps 0.94 of its 1-GPU speed). DeepSpeed's
    coordinator walks a recorded trace in Python for every parameter at every module, waits on each
    parameter's all-gather separately, and blocks the host on CUDA events to bound its queue, so the
    CPU cannot run ahead of the GPU. Here a layer is one flat all-gather into one buffer, the order
    is the model's own (layer i+1 follows layer i in forward, i-1 follows i in backward), and the host
    never waits for the GPU.

    Units: each decoder layer is one unit (its parameters' partitions copied once into one flat
    local buffer, which ``ds_tensor`` then views, so the loader, the merge and DeepSpeed's
    ``GatheredParameters`` keep working); everything outside the layers (embeddings, final norm, LM
    head) is the root unit, gathered at first use and kept until the step's backward is done
    (``release_all``), since the tied embedding is needed again by the head and the head is called
    once more by the loss after the model's forward. Parameters of at most ``persistence_threshold``
    elements stay whole on every rank (DeepSpeed's ``ds_persist``), as under DeepSpeed's hooks. The
    root is released by ``release_all`` only (the engine calls it after each backward and after
    eval): the loss calls the head inside an autograd function, where grad mode is off, so "no
    grad" cannot tell eval from training there.

    Hooks on each layer: before its forward, wait for its gather (issue it if no prefetch did) and
    start the next layer's; after its forward, release it, except the last layer in training (its
    backward comes next). In training, an identity autograd function on the layer's output gathers
    it again when the gradient arrives (and prefetches the layer before it), one on its input
    releases it when its input gradient is computed, that is, when its backward is done. During an
    activation-checkpointing recomputation (inside backward) the hooks neither release nor wrap.

    With ``quantize`` (``model.quantize``: "int8" or "nf4", ``SCHEMES``) the weights of
    :func:`quantizable_weights` are quantized here, once, from their filled partitions (blocks of
    ``QUANT_BLOCK`` elements from the start of each rank's partition: :func:`quantize_blocks`,
    :func:`quantize_nf4`). Such a weight is never persistent, whatever its size (its stored form is
    the quantized partition). Each layer unit's local buffer is then bytes: the fp32 scales, the
    unquantized partitions (biases, norms) in their dtype, the 1-byte sections (int8 values, or nf4's
    int8 scales and 4-bit codes); one all-gather of it per unit, and the gathered rows are
    dequantized into the unit's buffer in the compute dtype (on the side stream on GPU). A quantized
    parameter's ``ds_tensor`` is left empty (its stored form is ``bt_sections``, views of the unit
    buffer), so nothing reads the quantized bytes as weights; whole-parameter gathers are refused by
    ``Engine.gather``. At world size 1 the gatherer runs too (to dequantize layer by layer) with no
    collective, and the persistent and root parameters are aliased to their partitions as
    ``single_rank_plain`` does (no copy of the embeddings or head per step)."""

    def __init__(self, model: nn.Module, group, device: torch.device, persistence_threshold: int,
                 quantize: str | None = None):
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        self._available, self._not_available = ZeroParamStatus.AVAILABLE, ZeroParamStatus.NOT_AVAILABLE
        self.group, self.device = group, device
        self.world = dist.get_world_size(group=group)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        classes = tuple(decoder_layer_classes(model))
        self.layers = [m for m in model.modules() if classes and isinstance(m, classes)]
        in_layers = {id(p) for m in self.layers for p in m.parameters()}
        self.quantize = quantize
        self.quant = quantizable_weights(model) if quantize else {}  # id -> name
        done = {id(p) for p in model.parameters() if hasattr(p, "bt_quant")}
        missing = [n for i, n in self.quant.items() if i not in done]
        if missing:  # quantize_layer runs as the base is built (Engine.build_base)
            raise RuntimeError(f"model.quantize: {missing[0]} was not quantized when the base was built")
        persistent, root = [], []
        for p in _unique_params(model):
            if p.ds_numel <= persistence_threshold and id(p) not in self.quant:
                persistent.append(p)
            elif id(p) not in in_layers:
                root.append(p)
        if self.quant and self.world == 1:
            # one rank: the unquantized root (embeddings, final norm, head) is aliased to its
            # partition, as single_rank_plain would, instead of copied at every step
            persistent, root = persistent + root, []
        for p in persistent:  # whole on every rank for good, like DeepSpeed's persistent parameters
            self._gather_now([p])
            p.ds_persist = True
        persist = {id(p) for p in persistent}
        self.units = [[p for p in _unique_params(m) if id(p) not in persist] for m in self.layers]
        self.root = root
        self._sums: dict[int, tuple[float, float]] = {}  # id -> (sum x², sum (x - deq)²) over this partition
        self._layout: dict[int, list] = {}  # unit index -> its packed layout (quantized units only)
        self.quant_errors: dict[str, float] = {}  # name -> relative Frobenius error (quantized)
        self.summary: str | None = None
        if self.quant:
            self._flat = []
            for i, u in enumerate(self.units):  # each unit's sections freed as it is packed
                self._flat.append(self._pack_unit(i, u))
                _return_freed_host_memory()
            self._flat.append(self._flatten_partitions(root))
            self._quant_report(model)
        else:
            self._flat = [self._flatten_partitions(u) for u in self.units + [root]]
        self._pending: dict[int, tuple] = {}  # unit index -> (event, buffer) of an issued gather
        self._gathered: set[int] = set()
        # one CUDA event per release, recorded on the compute stream after the unit's last use
        self._released: collections.deque = collections.deque()
        self._handles = []
        for i, m in enumerate(self.layers):
            self._handles.append(m.register_forward_pre_hook(self._pre_forward(i), with_kwargs=True))
            self._handles.append(m.register_forward_hook(self._post_forward(i)))
        in_root = {id(p) for p in root}
        root_mods = [m for m in model.modules() if any(id(p) in in_root for p in m.parameters(recurse=False))]
        self._embedding = model.get_input_embeddings()  # where a forward pass starts
        for m in root_mods:
            self._handles.append(m.register_forward_pre_hook(self._root_pre_forward))

    # -- flat partitions and the all-gather --------------------------------------------------------
    @staticmethod
    @torch.no_grad()
    def _flatten_partitions(unit: list) -> torch.Tensor | None:
        """One buffer holding this rank's partitions of ``unit``, back to back; each ``ds_tensor``
        becomes a view of it (values unchanged), so one all-gather serves the whole unit."""
        if not unit:
            return None
        flat = torch.cat([p.ds_tensor.data.reshape(-1) for p in unit])
        off = 0
        for p in unit:
            n = p.ds_tensor.numel()
            p.ds_tensor.data = flat[off:off + n]
            off += n
        return flat

    @torch.no_grad()
    def _pack_unit(self, i: int, unit: list) -> torch.Tensor | None:
        """Pack the unit into one uint8 buffer (its weights were quantized by :func:`quantize_layer`): the
        quantized partitions' 4-byte sections (fp32 scales), the unquantized partitions (each
        ``ds_tensor`` becomes a view), then the 1-byte sections (int8 values; nf4's int8 scales and
        codes). Every offset stays aligned to its element size."""
        if not unit:
            return None
        quant = [p for p in unit if id(p) in self.quant]
        if not quant:
            return self._flatten_partitions(unit)
        plain = [p for p in unit if id(p) not in self.quant]
        scheme = SCHEMES[self.quantize]
        parts = {}
        for p in quant:  # quantized as the base was built (quantize_layer)
            parts[id(p)] = p.bt_quant
            self._sums[id(p)] = p.bt_sums
            del p.bt_quant, p.bt_sums
        wide = [(p, s) for p in quant for s in scheme.sections(p.bt_part) if s[1].itemsize == 4]
        narrow = [(p, s) for p in quant for s in scheme.sections(p.bt_part) if s[1].itemsize == 1]
        total = (sum(4 * c for _, (_, _, c) in wide) + sum(c for _, (_, _, c) in narrow)
                 + sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in plain))
        buf = torch.empty(total, dtype=torch.uint8, device=self.device)
        layout, off = {id(p): {} for p in unit}, 0
        for p, (name, dt, c) in wide:
            buf[off:off + 4 * c].view(dt).copy_(parts[id(p)][name])
            layout[id(p)][name] = (off, 4 * c, dt)
            off += 4 * c
        for p in plain:
            t = p.ds_tensor
            nb = t.numel() * t.element_size()
            view = buf[off:off + nb].view(t.dtype)
            view.copy_(t.data.reshape(-1))
            p.ds_tensor.data = view
            layout[id(p)]["plain"] = (off, nb, t.dtype)
            off += nb
        for p, (name, dt, c) in narrow:
            buf[off:off + c].view(dt).copy_(parts[id(p)][name])
            layout[id(p)][name] = (off, c, dt)
            off += c
        for p in quant:  # its stored form is the sections; nothing reads the bytes as weights
            p.bt_sections = {k: buf[a:a + nb].view(dt) for k, (a, nb, dt) in layout[id(p)].items()}
        self._layout[i] = [(p, layout[id(p)]) for p in unit]
        return buf

    @torch.no_grad()
    def _quant_report(self, model: nn.Module) -> None:
        """Relative Frobenius error ``||W - deq(W)|| / ||W||`` of each quantized weight, summed over
        the ranks' partitions (one all-reduce), and the one-line summary printed at load."""
        ids = [i for i in self.quant if i in self._sums]
        sums = torch.tensor([v for i in ids for v in self._sums[i]], dtype=torch.float64).view(-1, 2)
        if self.world > 1:  # on the gatherer's device: NCCL reduces CUDA tensors only
            sums = sums.to(self.device)
            dist.all_reduce(sums, group=self.group)
            sums = sums.cpu()
        for i, (ref, err) in zip(ids, sums.tolist()):
            self.quant_errors[self.quant[i]] = math.sqrt(err / ref) if ref > 0 else 0.0
        self._sums.clear()
        errs = sorted(self.quant_errors.items(), key=lambda kv: kv[1])
        packed = sum(b.numel() for i, b in enumerate(self._flat[:len(self.units)]) if b is not None)
        plain_part = sum(-(-p.ds_numel // self.world) * p.element_size() for u in self.units for p in u)
        if errs:
            worst = errs[-1]
            self.summary = (
                f"model.quantize={self.quantize}: {len(errs)} linear weights of the decoder layers stored as "
                f"{QUANT_FORMATS[self.quantize]}, blocks from each rank's partition start; embeddings, norms, "
                f"biases and the LM head in {str(self.units[0][0].dtype).replace('torch.', '')}; relative "
                f"Frobenius error min {errs[0][1]:.3e} / median {errs[len(errs) // 2][1]:.3e} / max {worst[1]:.3e} "
                f"({worst[0]}); decoder-layer partitions on this rank, all-gathered as stored: {packed:,} bytes "
                f"(unquantized: {plain_part:,}, {packed / max(plain_part, 1):.3f}x)")

    def _part(self, p) -> int:
        """Elements of this rank's partition of ``p`` (quantized: as it was before quantizing)."""
        return p.bt_part if hasattr(p, "bt_sections") else p.ds_tensor.numel()

    def _index(self, i: int) -> list:
        return self.units[i] if i < len(self.units) else self.root

    def _issue(self, i: int) -> None:
        """Start gathering unit ``i`` (on the side stream on GPU): all partitions in one
        all-gather, then each parameter's rows copied out whole into one buffer."""
        if i in self._pending or i in self._gathered or not (0 <= i <= len(self.units)):
            return
        local, unit = self._flat[i], self._index(i)
        if local is None:
            self._gathered.add(i)
            return
        # Bound the host's lead: before allocating this unit's buffers, wait until the GPU is done
        # with every released unit but the latest. The host otherwise runs layers ahead of the GPU,
        # and a released buffer the GPU still reads cannot be reused (the caching allocator holds
        # it until its stream passes), so each gather took fresh memory until the allocator hit the
        # GPU's capacity, then freed its cache and synchronised (measured on 2 H200s, GPT-3 175B
        # width with 58 layers: 112.8 GiB allocated, 138.2 GiB reserved, 11 cudaMalloc retries per
        # step, MFU 0.34 against FSDP2's 0.46). Waiting for the one before the latest keeps the host
        # up to two layers ahead, so the GPU never idles for it, and at most four layers' buffers
        # exist: the one computing, the next, the one before (still in use) and this new one.
        while len(self._released) > 1:
            self._released.popleft().synchronize()
        if self.stream is not None:
            # the partitions were written on the compute stream (the flattening at start-up, the
            # loader, a merge through GatheredParameters): the gather must not read them earlier.
            # This waits for the work queued so far (up to the layer before the one computing), so
            # the next layer's gather still overlaps this one's compute.
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        ctx = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        with ctx, torch.no_grad():
            if i in self._layout:
                whole = self._gather_packed(i, local)
                event = torch.cuda.Event() if self.stream is not None else None
                if event is not None:
                    event.record(self.stream)
                self._pending[i] = (event, whole)
                return
            out = torch.empty(self.world * local.numel(), dtype=local.dtype, device=local.device)
            dist.all_gather_into_tensor(out, local, group=self.group)
            rows = out.view(self.world, local.numel())  # rank r's partitions in row r
            whole = torch.empty(sum(self.world * p.ds_tensor.numel() for p in unit),
                                dtype=local.dtype, device=local.device)
            src = dst = 0
            for p in unit:
                n = p.ds_tensor.numel()
                whole[dst:dst + self.world * n].view(self.world, n).copy_(rows[:, src:src + n])
                src, dst = src + n, dst + self.world * n
            del out, rows
            event = torch.cuda.Event() if self.stream is not None else None
            if event is not None:
                event.record(self.stream)
        self._pending[i] = (event, whole)

    def _gather_packed(self, i: int, local: torch.Tensor) -> torch.Tensor:
        """All-gather a packed (quantized) unit's bytes, then each parameter whole in the compute
        dtype into one buffer, laid out as the unpacked path lays it (rank r's partition in row r)."""
        layout = self._layout[i]
        if self.world > 1:
            out = torch.empty(self.world * local.numel(), dtype=torch.uint8, device=local.device)
            dist.all_gather_into_tensor(out, local, group=self.group)
        else:
            out = local  # nothing to gather: dequantize this rank's own bytes
        rows = out.view(self.world, local.numel())
        dtype = layout[0][0].dtype
        scheme = SCHEMES[self.quantize]
        whole = torch.empty(sum(self.world * self._part(p) for p, _ in layout), dtype=dtype, device=local.device)
        dst = 0
        for p, where in layout:
            n = self._part(p)
            dest = whole[dst:dst + self.world * n].view(self.world, n)
            if "plain" in where:
                a, nb, _ = where["plain"]
                dest.view(torch.uint8).copy_(rows[:, a:a + nb])
            else:  # each section's rows, in its dtype (the 4-byte ones copied out to be aligned)
                parts = {k: (rows[:, a:a + nb].contiguous() if dt.itemsize > 1 else rows[:, a:a + nb]).view(dt)
                         for k, (a, nb, dt) in where.items()}
                scheme.dequantize(parts, n, dtype, out=dest)
            dst += self.world * n
        return whole

    def _wait(self, i: int) -> None:
        """Make unit ``i`` usable on the current stream: its parameters view the gathered buffer."""
        if i in self._gathered:
            return
        self._issue(i)
        if i in self._gathered:  # a unit with nothing to gather (all of it persistent)
            return
        event, whole = self._pending.pop(i)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
            whole.record_stream(torch.cuda.current_stream(self.device))  # freed only after its last use
        off = 0
        for p in self._index(i):
            p.data = whole[off:off + p.ds_numel].view(p.ds_shape)
            p.ds_status = self._available
            off += self.world * self._part(p)
        self._gathered.add(i)

    def _release(self, i: int) -> None:
        if i not in self._gathered:
            return
        for p in self._index(i):
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
            p.ds_status = self._not_available
        self._gathered.discard(i)
        if self.stream is not None:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self._released.append(event)

    @torch.no_grad()
    def _gather_now(self, params: list) -> None:
        for p in params:
            if self.quant and self.world == 1:  # the partition is the whole tensor: alias it, one copy
                p.data = p.ds_tensor.data.view(-1).narrow(0, 0, p.ds_numel).view(p.ds_shape)
                p.ds_status = self._available
                continue
            out = torch.empty(self.world * p.ds_tensor.numel(), dtype=p.ds_tensor.dtype, device=p.ds_tensor.device)
            dist.all_gather_into_tensor(out, p.ds_tensor.data.reshape(-1), group=self.group)
            p.data = out[:p.ds_numel].view(p.ds_shape)
            p.ds_status = self._available

    # -- hooks ---------------------------------------------------------------------------------------
    def _pre_forward(self, i: int):
        def hook(module, args, kwargs):
            self._wait(i)
            if _in_backward():  # an activation-checkpointing recomputation: nothing to prefetch
                return None
            if i + 1 < len(self.layers):
                self._issue(i + 1)
            else:
                self._issue(len(self.units))  # the root (the final norm, the head) comes next
            if not torch.is_grad_enabled():
                return None
            # released when the gradient w.r.t. the layer's input is computed: its backward is done
            if args and torch.is_tensor(args[0]) and args[0].requires_grad:
                return (_OnBackward.apply(args[0], lambda: self._release(i)), *args[1:]), kwargs
            if torch.is_tensor(kwargs.get("hidden_states")) and kwargs["hidden_states"].requires_grad:
                kwargs = {**kwargs, "hidden_states": _OnBackward.apply(kwargs["hidden_states"],
                                                                       lambda: self._release(i))}
                return args, kwargs
            return None
        return hook

    def _post_forward(self, i: int):
        def hook(module, args, output):
            if _in_backward():  # an activation-checkpointing recomputation: backward needs the layer
                return None
            training = torch.is_grad_enabled()
            if not (training and i == len(self.layers) - 1):  # the last layer's backward comes next
                self._release(i)
            if not training:
                return None
            out = output[0] if isinstance(output, tuple) else output
            if not (torch.is_tensor(out) and out.requires_grad):
                return None
            out = _OnBackward.apply(out, lambda: self.before_backward(i))
            return (out, *output[1:]) if isinstance(output, tuple) else out
        return hook

    def _root_pre_forward(self, module, args):
        self._wait(len(self.units))
        if module is self._embedding and not _in_backward():
            self._issue(0)  # a forward pass starts with the embeddings: the first layer is next

    def before_backward(self, i: int) -> None:
        self._wait(i)
        if i > 0:
            self._issue(i - 1)

    def release_all(self) -> None:
        """End of a step (after backward, or after eval): every unit back to its partitions, and no
        prefetched gather left pending."""
        for i in list(self._pending):
            self._wait(i)
        for i in list(self._gathered):
            self._release(i)
        self._released.clear()  # nothing to wait for: the next step's first gathers follow this one's work

    # the interface of DeepSpeedZeRoOffload the engine uses
    def release_backward_leftovers(self) -> None:
        self.release_all()

    def destroy(self) -> None:
        self.release_all()
        for h in self._handles:
            h.remove()
        self._handles.clear()


class _OnBackward(torch.autograd.Function):
    """Identity in forward; in backward, calls ``fn()`` when the gradient reaches this point (on a
    layer's output: its backward is about to start; on its input: its backward is done)."""

    @staticmethod
    def forward(ctx, x, fn):
        ctx.fn = fn
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.fn()
        return grad, None


def _in_backward() -> bool:
    """True inside a backward pass (where activation checkpointing re-runs forwards)."""
    return torch._C._current_graph_task_id() != -1


def _unique_params(module: nn.Module) -> list:
    seen, out = set(), []
    for p in module.parameters():
        if id(p) not in seen and hasattr(p, "ds_tensor"):
            seen.add(id(p))
            out.append(p)
    return out


# -- full fine-tuning, for `bigtrain measure` ---------------------------------------------------------
def full_ft_ds_config(stage: int, base_dtype: torch.dtype, micro_batch_size: int, grad_accum: int,
                      world_size: int, lr: float, betas, weight_decay: float, max_grad_norm: float,
                      persistence_threshold: int) -> dict:
    """The DeepSpeed config of full fine-tuning as its users run it: ZeRO ``stage`` with DeepSpeed's
    own defaults (buckets, prefetch, sub-groups), 16-bit mixed precision (fp32 master weights and
    Adam states inside DeepSpeed's optimizer), and DeepSpeed's AdamW from the config. ``torch_adam``:
    DeepSpeed wraps torch's AdamW instead of JIT-building its FusedAdam (a CUDA extension build per
    node, minutes, and none on CPU); the states are the same fp32 m and v either way."""
    ds = {"train_micro_batch_size_per_gpu": micro_batch_size,
          "gradient_accumulation_steps": grad_accum,
          "train_batch_size": micro_batch_size * grad_accum * world_size,
          "bf16": {"enabled": base_dtype == torch.bfloat16},
          "fp16": {"enabled": base_dtype == torch.float16},
          "zero_optimization": {"stage": stage},
          "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": list(betas),
                                                    "weight_decay": weight_decay, "torch_adam": True}},
          "steps_per_print": 1 << 30, "wall_clock_breakdown": False}
    if stage == 3:
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = persistence_threshold
    if max_grad_norm > 0:
        ds["gradient_clipping"] = max_grad_norm
    return ds


def build_full_ft(hf_config, torch_dtype: torch.dtype, attn_implementation: str, ds: dict,
                  path: str | None, rank: int, vocab: int, gradient_checkpointing: bool):
    """Full fine-tuning of the same causal LM: built as the LoRA base is (stage 3: under
    ``zero.Init``, from ``path`` partition by partition or random), every parameter trainable, then
    ``deepspeed.initialize`` with ``ds`` (:func:`full_ft_ds_config`). Rows of a padded vocabulary
    from ``vocab`` on are zeros, as in a LoRA run. Returns (DeepSpeed engine, its ZeRO optimizer,
    the HfDeepSpeedConfig to keep referenced)."""
    import deepspeed
    import transformers as tf

    from . import vocab as V
    from .loader import load_partitions

    stage = ds["zero_optimization"]["stage"]
    padded = int(hf_config.vocab_size)
    hf_ds = None
    if stage == 3:
        model, hf_ds = build_partitioned(hf_config, torch_dtype, attn_implementation, ds)
        rows = V.vocab_parameters(model, padded) if padded != vocab else {}
        if path is not None:
            load_partitions(model, path, rank, short_rows=set(rows))
        else:
            for p in rows.values():
                zero_from_row(p, vocab)
    else:
        if path is not None:
            model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype,
                                                            attn_implementation=attn_implementation)
            if padded != vocab:
                model.resize_token_embeddings(padded, mean_resizing=False)
        else:
            model = tf.AutoModelForCausalLM.from_config(hf_config, dtype=torch_dtype,
                                                        attn_implementation=attn_implementation)
        with torch.no_grad():
            for p in V.vocab_parameters(model, padded).values():
                p[vocab:] = 0
    model.requires_grad_(True)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()),
                                                   config=ds)
    return engine, optimizer, hf_ds


def full_ft_states(engine, optimizer) -> dict:
    """This rank's model-state bytes of a full fine-tuning DeepSpeed engine, from the live tensors:
    16-bit weights (stage 3: partitions plus whole persistent tensors; else the whole parameters),
    16-bit gradients (stage 3: the flat gradient partitions; stages 1-2: the gradient tensors and
    partitions the optimizer holds between backward and step), fp32 master weights, and the wrapped
    optimizer's state (Adam's m, v and step). Call after a step (stage 3) or after backward (1-2)."""
    model = engine.module
    tb = lambda t: t.numel() * t.element_size()  # noqa: E731
    master = getattr(optimizer, "fp32_partitioned_groups_flat", None)  # stage 3
    if master is not None:
        weights = local_param_bytes(model)
        grads = tb(optimizer.grad_partitions_flat_buffer)
    else:  # stages 1-2 (DeepSpeedZeroOptimizer) or bf16 stage 1 (BF16_Optimizer)
        master = (getattr(optimizer, "single_partition_of_fp32_groups", None)
                  or getattr(optimizer, "fp32_groups_flat_partition", None) or [])
        weights = sum(tb(p) for p in model.parameters())
        seen, grads = set(), 0
        for p in model.parameters():
            if p.grad is not None:
                grads += tb(p.grad)
        for name in ("averaged_gradients", "fp32_groups_gradients_flat"):
            holder = getattr(optimizer, name, None)
            items = holder.values() if isinstance(holder, dict) else (holder or [])
            for g in items:
                for t in (g if isinstance(g, (list, tuple)) else [g]):
                    if torch.is_tensor(t) and id(t) not in seen:
                        seen.add(id(t))
                        grads += tb(t)
    inner = getattr(optimizer, "optimizer", optimizer)
    adam = sum(tb(v) for st in inner.state.values() for v in st.values() if torch.is_tensor(v))
    return {"weights": weights, "gradients": grads, "master_weights": sum(tb(t) for t in master),
            "adam_states": adam}
