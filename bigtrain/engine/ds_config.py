"""DeepSpeed's version and private APIs, and the DeepSpeed config of a run.

* ``check_deepspeed_version``: the private or undocumented DeepSpeed APIs the engine relies on
  (``PRIVATE_APIS``, ``PARAM_ATTRS``) are there, with one warning line when the installed DeepSpeed
  is another minor version than the one this code was written against; ``check_param_attrs`` after
  ``zero.Init``;
* the config: defaults (fetch sizes from the model's largest decoder layer), then the user's
  ``zero.ds_config`` JSON, then the keys bigtrain owns (``build_ds_config``), and the checks on it
  made before any process group starts (``check_world``).
"""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path

import torch
from torch import nn

from ..config import ConfigError, ZeroConfig
from ..dist import detect_world, wants_cuda
from ..presets import decoder_layer_classes, meta_model

# Deferred imports: deepspeed is imported where used, so that stage-0 runs and the CPU-only tools
# never pay DeepSpeed's import time (its op builders).

# The DeepSpeed release this package was written and tested against (pyproject.toml pins it).
DEEPSPEED_VERSION = "0.19.8"

# (module, attribute path) of the private or undocumented DeepSpeed APIs used by this package (and,
# for build_shm_op, by dist.no_shm_comm_build, which starts DeepSpeed's comm layer).
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
# Attributes zero.Init puts on every partitioned parameter, read or written by this package and by
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
    if zero.stage == 3 and hpz > 1 and zero.shard_group not in ("auto", "world", world):
        raise ConfigError(f"zero.shard_group={zero.shard_group} cannot be combined with hpZ "
                          f"(zero_hpz_partition_size={hpz} in {zero.ds_config}): both keep the base's "
                          f"all-gathers within a group of ranks; use one (zero.shard_group=node holds base / "
                          f"GPUs per node, hpZ base / world + base / {hpz})")
    if zero.stage == 3 and hpz > 1 and world % hpz:
        raise ConfigError(f"zero.ds_config: zero_hpz_partition_size={hpz} (in {zero.ds_config}) does not "
                          f"divide the world size {world}; set it to the GPUs per node")



def largest_layer_numel(hf_config) -> int | None:
    """Elements of the model's largest decoder layer, from its shapes alone (a meta-device build)."""
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
