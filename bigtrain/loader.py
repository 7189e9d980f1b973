"""Reading a local safetensors checkpoint straight into ZeRO-3 partitions.

This module owns finding the tensors of a local Hugging Face checkpoint (a single
``model.safetensors`` or shards listed in ``model.safetensors.index.json``), matching parameter
names to checkpoint keys (with or without the LM-head wrapper's prefix), and filling each rank's
partition of each parameter from the files: a rank reads only the rows of each tensor that cover
the slice it owns, so no rank ever holds the whole model. ``bigtrain merge`` uses the first two
to stream a base from disk.

Checkpoint keys are matched to parameters the way ``from_pretrained`` matches them: through
``transformers``' own conversion mapping for the model (``get_model_conversion_mapping``: the
``WeightRenaming`` and ``WeightConverter`` entries it applies when it loads), not a table of
bigtrain's. Mixture-of-experts models need it: a hub Mixtral stores each expert's ``w1``/``w3``/``w2``
under ``block_sparse_moe.experts.N``, which ``transformers`` (5.x) renames to ``mlp`` and fuses into
one 3-D ``mlp.experts.gate_up_proj`` / ``down_proj`` per layer (Qwen2-MoE, Qwen3-MoE and the other
models mapped to ``qwen2_moe`` likewise). A renamed key is read slice-wise like any other. A fused
parameter is not: the converter's operations (stack the experts, concatenate gate and up) are
``transformers``' and do not work on slices, so the loader builds that one parameter whole on the
host, from its source tensors alone, cuts this rank's slice and frees it before the next. The host
peak this adds is about three times the largest fused parameter in the checkpoint's dtype (the
per-expert tensors, the file pages mapped while reading them, and the stacked result; measured
3.1x by ``tests/unit/test_loader.py``): for Mixtral-8x7B one layer's ``gate_up_proj`` is
8 × 28,672 × 4,096 = 0.94e9 elements, 1.88 GB in bf16, so ≈ 5.8 GB per rank while that layer loads
(every rank on a host builds it at once). A checkpoint already in the fused layout (keys equal to
the parameter names, as ``merge_at_end`` writes) is read slice-wise with no conversion.

It reads the attributes DeepSpeed's ``zero.Init`` puts on partitioned parameters (``ds_tensor``,
``ds_shape``, ``ds_numel``, ``ds_process_group``; with hpZ ``ds_secondary_tensor`` and
``ds_zero_param_process_group``), which ``engine.ds_config.check_param_attrs`` checks, but imports no
DeepSpeed and nothing of bigtrain's config.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
from pathlib import Path
from typing import Collection

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn

# Deferred imports: transformers' conversion mapping and core_model_loading exist from transformers 5
# on (4.x matches the checkpoints' keys as they are) and are needed only when a name is not a key.


def open_safetensors(f: Path):
    """``safe_open(f)``; a file that is truncated, garbled or missing raises a one-line error that
    names it and what to do (safetensors' own error names no file)."""
    if not f.is_file():
        raise FileNotFoundError(f"{f}: missing (named by {f.parent / 'model.safetensors.index.json'}); "
                                "copy the whole checkpoint again")
    try:
        return safe_open(str(f), "pt")
    except Exception as e:  # safetensors raises its own error types for truncated/garbled files
        raise ValueError(f"{f}: cannot be read as safetensors ({e}): the file is truncated or not "
                         "safetensors; copy it again, or re-save the model with save_pretrained") from None


def checkpoint_files(path: str | os.PathLike, check: bool = False) -> dict[str, Path]:
    """tensor name -> safetensors file of a local HF checkpoint (single file or sharded with an
    index). Errors name the directory and what is missing. ``check``: also open every file's header
    (cheap: no tensor is read), so a truncated or garbled file is named before any work."""
    d = Path(path)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e})") from None
        files = {k: d / f for k, f in weight_map.items()}
        if check:
            for f in sorted(set(files.values())):
                with open_safetensors(f):
                    pass
        return files
    single = d / "model.safetensors"
    if single.is_file():
        with open_safetensors(single) as f:
            return {k: single for k in f.keys()}
    raise FileNotFoundError(f"{d}: no model.safetensors or model.safetensors.index.json "
                            "(bigtrain loads safetensors checkpoints only; convert .bin with save_pretrained)")


def resolve_key(name: str, available: dict) -> str | None:
    """The checkpoint key that holds parameter ``name``, or None."""
    if name in available:
        return name
    # A base-model checkpoint (no LM head wrapper) or a wrapper around one: try one prefix off/on.
    head, _, rest = name.partition(".")
    if rest in available:
        return rest
    for prefix in ("model.", "transformer."):
        if prefix + name in available:
            return prefix + name
    return None


def transformers_conversions(model: nn.Module) -> tuple[list, list]:
    """(renamings, converters): ``transformers``' conversion mapping for ``model``, the list
    ``from_pretrained`` applies (``get_model_conversion_mapping``: the model type's entries, any
    sub-model's, and the legacy renamings), split as ``from_pretrained`` splits it. Empty where this
    ``transformers`` has no such mapping (4.x, whose modules match the hub checkpoints' keys)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:
        return [], []
    if not hasattr(model, "base_model_prefix"):  # not a transformers model: nothing to convert
        return [], []
    mapping = get_model_conversion_mapping(model) or []
    return ([m for m in mapping if isinstance(m, WeightRenaming)],
            [m for m in mapping if isinstance(m, WeightConverter)])


class KeyPlan:
    """Where each parameter of a model comes from in a checkpoint's files, matched as
    ``from_pretrained`` matches them. ``keys``: parameter name -> the one checkpoint key that holds
    it (the name itself, a wrapper prefix off/on, or a ``transformers`` renaming); ``converted``:
    the first parameter name a ``transformers`` ``WeightConverter`` produces -> that converter, its
    source keys collected (not read) in ``from_pretrained``'s order, so that ``convert`` builds the
    parameter (and any others the same converter produces) exactly as ``from_pretrained`` does."""

    def __init__(self, keys: dict[str, str], converted: dict[str, object]):
        self.keys, self.converted = keys, converted

    @property
    def converted_sources(self) -> dict[str, list[str]]:
        """first target parameter -> the checkpoint keys its converter reads."""
        return {n: sorted(set().union(*c.layer_targets.values())) for n, c in self.converted.items()}


def plan_keys(model: nn.Module, files: dict, read=None) -> KeyPlan:
    """Match ``model``'s parameters to the keys of ``files`` (:func:`checkpoint_files`): a name that
    is a key is read as is; if any is not, each checkpoint key is renamed as ``from_pretrained``
    renames it (``transformers.core_model_loading.rename_source_key`` with the model's
    :func:`transformers_conversions`, which also adds or strips the wrapper prefix), keys a converter
    claims are collected into it, and a name still unmatched falls back to :func:`resolve_key`.
    ``read(key)`` (a callable giving the whole tensor) is what a converter calls when it converts;
    without it the plan only names keys."""
    names = [n for n, _ in model.named_parameters()]
    keys = {n: n for n in names if n in files}
    missing = [n for n in names if n not in keys]
    converted: dict[str, object] = {}
    if not missing:
        return KeyPlan(keys, converted)
    renamings, converters = transformers_conversions(model)
    if renamings or converters:
        from transformers.core_model_loading import dot_natural_key, rename_source_key

        wanted = dict.fromkeys(names, True)  # rename_source_key reads .get(name) is not None
        prefix = getattr(model, "base_model_prefix", None)
        by_pattern = {pat: c for c in converters for pat in c.source_patterns}
        for key in sorted(files, key=dot_natural_key):
            new, pattern = rename_source_key(key, renamings, converters, prefix, wanted)
            if new not in wanted and key in wanted:  # as from_pretrained: a name already right
                new, pattern = rename_source_key(key, [], [], prefix, wanted)
            if new not in wanted or new in keys:
                continue
            if pattern is None:
                keys[new] = key
            else:
                conv = converted.setdefault(new, copy.deepcopy(by_pattern[pattern]))
                conv.add_tensor(new, key, pattern, (lambda k=key: read(k)) if read else None)
    for n in missing:
        if n not in keys and n not in converted:
            k = resolve_key(n, files)
            if k is not None:
                keys[n] = k
    return KeyPlan(keys, converted)


class PartitionLoader:
    """Fills ZeRO-3 partitions from the checkpoint at ``path``, one group of parameters at a time
    (``fill``), so that a base built layer by layer (``engine.build.build_streamed``) reads each layer's
    slices right after the layer is partitioned and before the next exists. Reads only the rows of
    each tensor that cover this rank's slice of the flattened tensor. Parameters named in
    ``short_rows`` (a padded vocabulary) may have fewer rows in the checkpoint: those fill the first
    rows, and the rest are zeros. A parameter that ``transformers`` builds from several checkpoint
    tensors (an MoE layer's fused experts) is built whole on the host by ``transformers``' own
    converter, one at a time, and this rank's slice cut from it (module doc). The key plan is made
    once, from the model's parameter names (the parameters themselves may still be on the meta
    device). A context manager; the files are mapped while a group is read, and unmapped after it."""

    def __init__(self, model: nn.Module, path: str | os.PathLike, rank: int, short_rows: Collection[str] = ()):
        self.model, self.path, self.rank, self.short_rows = model, path, rank, set(short_rows)
        self.files = checkpoint_files(path)
        self._stack = contextlib.ExitStack()
        self._handles: dict[Path, object] = {}
        self.read = 0  # elements read so far
        self.plan = plan_keys(model, self.files, read=self._whole)
        self._done: set[str] = set()

    def __enter__(self) -> "PartitionLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def _handle(self, key: str):
        f = self.files[key]
        if f not in self._handles:
            self._handles[f] = self._stack.enter_context(open_safetensors(f))
        return self._handles[f]

    def _whole(self, key: str) -> torch.Tensor:
        t = self._handle(key).get_tensor(key)
        self.read += t.numel()
        return t

    @torch.no_grad()
    def fill(self, names: Collection[str]) -> None:
        """Fill the partitions of the parameters called ``names`` (tied parameters once, under the
        name ``named_parameters`` gives them). A converter whose first target is among ``names``
        fills every parameter it builds."""
        names = [n for n in names if n not in self._done]
        if not names:
            return
        params = dict(self.model.named_parameters())
        for first in [n for n in names if n in self.plan.converted]:
            conv = self.plan.converted[first]
            built = conv.convert(first, model=self.model, config=getattr(self.model, "config", None))
            for name in sorted(built):
                t = built.pop(name)
                t = t[0] if isinstance(t, list) else t
                if name in params and name not in self._done:
                    src = f"{self.path}: {', '.join(self.plan.converted_sources[first][:2])}, ... (converted by transformers)"
                    _fill_param(params[name], name, t, tuple(t.shape), src, self.rank, self.short_rows)
                    self._done.add(name)
                del t  # nothing of this parameter is held while the next one is built
        for name in names:
            if name in self._done:
                continue
            key = self.plan.keys.get(name)
            if key is None:
                raise KeyError(f"{self.path}: parameter {name!r} is not in the checkpoint")
            sl = self._handle(key).get_slice(key)
            self.read += _fill_param(params[name], name, sl, tuple(sl.get_shape()),
                                     f"{self.files[key].name}: tensor {key!r}", self.rank, self.short_rows)
            self._done.add(name)
        # unmap the files: the pages just read stay in the page cache but leave this process's
        # resident memory (a 13.5 GB Llama-2-7B read with its files mapped throughout peaked at
        # 14.2 GiB RSS on an H200 host; the next group maps what it reads again)
        self.close()


def load_partitions(model: nn.Module, path: str | os.PathLike, rank: int,
                    short_rows: Collection[str] = ()) -> int:
    """Fill every ZeRO-3 parameter's local partition from the checkpoint at ``path`` at once
    (:class:`PartitionLoader`). Returns the number of elements read."""
    with PartitionLoader(model, path, rank, short_rows) as loader:
        loader.fill([n for n, _ in model.named_parameters()])
        return loader.read


def _fill_param(p, name: str, src, shape: tuple, where: str, rank: int, short_rows: Collection[str]) -> int:
    """Fill ``p``'s partition (and its hpZ secondary partition) from ``src``: a lazy safetensors
    slice or a whole tensor of ``shape``. Returns the number of elements read."""
    want = tuple(p.ds_shape)
    numel = p.ds_numel
    if name in short_rows and shape[1:] == want[1:] and shape[0] <= want[0]:
        numel = math.prod(shape)  # rows past the checkpoint's are zero-filled
    elif shape != want:
        raise ValueError(f"{where} has shape {shape}, the model expects {want}")
    prank = dist.get_rank(group=p.ds_process_group) if dist.is_initialized() else rank
    read = _fill_slice(p.ds_tensor, src, shape, numel, prank)
    # hpZ: the secondary partition (this rank's slice within its node's group) was cut by
    # zero.Init from the *initial* weights; DeepSpeed gathers from it, so it must hold the
    # checkpoint too (else every forward would see random weights). Same read, other slice.
    sec = getattr(p, "ds_secondary_tensor", None)
    if sec is not None:
        srank = dist.get_rank(group=p.ds_zero_param_process_group)
        read += _fill_slice(sec, src, shape, numel, srank)
    return read


def _fill_slice(dst: torch.Tensor, sl, shape: tuple, numel: int, index: int) -> int:
    """Copy elements [index·n, (index+1)·n) of the flattened checkpoint tensor (``sl``, a lazy
    safetensors slice, or a whole tensor) into ``dst`` (n elements; zero padding past the tensor's
    end), reading only the rows that cover them. Returns the number of elements read."""
    n = dst.numel()
    start, end = n * index, min(n * (index + 1), numel)
    local = dst.data.view(-1)
    local.zero_()  # padding past the end of the tensor
    if start >= numel:
        return 0
    row = 1
    for d in shape[1:]:
        row *= d
    r0, r1 = start // row, -(-end // row)
    chunk = sl[r0:r1].reshape(-1)[start - r0 * row:end - r0 * row]
    local[:end - start].copy_(chunk.to(local.dtype))
    return chunk.numel()
