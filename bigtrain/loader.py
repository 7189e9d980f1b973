"""Reading a local safetensors checkpoint straight into ZeRO-3 partitions.

This module owns finding the tensors of a local Hugging Face checkpoint (a single
``model.safetensors`` or shards listed in ``model.safetensors.index.json``), matching parameter
names to checkpoint keys (with or without the LM-head wrapper's prefix), and filling each rank's
partition of each parameter from the files: a rank reads only the rows of each tensor that cover
the slice it owns, so no rank ever holds the whole model. ``bigtrain merge`` uses the first two
to stream a base from disk.

It reads the attributes DeepSpeed's ``zero.Init`` puts on partitioned parameters (``ds_tensor``,
``ds_shape``, ``ds_numel``, ``ds_process_group``; with hpZ ``ds_secondary_tensor`` and
``ds_zero_param_process_group``), which ``zero3.check_param_attrs`` checks, but imports no
DeepSpeed and nothing of bigtrain's config.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Collection

import torch
import torch.distributed as dist
from torch import nn


def open_safetensors(f: Path):
    """``safe_open(f)``; a file that is truncated, garbled or missing raises a one-line error that
    names it and what to do (safetensors' own error names no file)."""
    from safetensors import safe_open

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


@torch.no_grad()
def load_partitions(model: nn.Module, path: str | os.PathLike, rank: int,
                    short_rows: Collection[str] = ()) -> int:
    """Fill each ZeRO-3 parameter's local partition from the checkpoint at ``path``, reading only
    the rows of each tensor that cover this rank's slice of the flattened tensor. Returns the number
    of elements read. Tied parameters appear once in ``named_parameters`` and are loaded once.
    Parameters named in ``short_rows`` (a padded vocabulary) may have fewer rows in the checkpoint:
    those fill the first rows, and the rest are zeros."""
    files = checkpoint_files(path)
    handles: dict[Path, object] = {}
    read = 0
    with contextlib.ExitStack() as stack:
        for name, p in model.named_parameters():
            key = resolve_key(name, files)
            if key is None:
                raise KeyError(f"{path}: parameter {name!r} is not in the checkpoint")
            f = files[key]
            if f not in handles:
                handles[f] = stack.enter_context(open_safetensors(f))
            sl = handles[f].get_slice(key)
            shape = tuple(sl.get_shape())
            want = tuple(p.ds_shape)
            numel = p.ds_numel
            if name in short_rows and shape[1:] == want[1:] and shape[0] <= want[0]:
                numel = math.prod(shape)  # rows past the checkpoint's are zero-filled
            elif shape != want:
                raise ValueError(f"{f.name}: tensor {key!r} has shape {shape}, the model expects {want}")
            prank = dist.get_rank(group=p.ds_process_group) if dist.is_initialized() else rank
            read += _fill_slice(p.ds_tensor, sl, shape, numel, prank)
            # hpZ: the secondary partition (this rank's slice within its node's group) was cut by
            # zero.Init from the *initial* weights; DeepSpeed gathers from it, so it must hold the
            # checkpoint too (else every forward would see random weights). Same read, other slice.
            sec = getattr(p, "ds_secondary_tensor", None)
            if sec is not None:
                srank = dist.get_rank(group=p.ds_zero_param_process_group)
                read += _fill_slice(sec, sl, shape, numel, srank)
    return read


def _fill_slice(dst: torch.Tensor, sl, shape: tuple, numel: int, index: int) -> int:
    """Copy elements [index·n, (index+1)·n) of the flattened checkpoint tensor (``sl``, a lazy
    safetensors slice) into ``dst`` (n elements; zero padding past the tensor's end), reading only
    the rows that cover them. Returns the number of elements read."""
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
