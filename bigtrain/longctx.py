"""Memory along the sequence: the MLP in tiles, and checkpointed layer inputs in host memory.

At long context the activations, not the weights, fill the GPU. With every decoder layer recomputed
in backward (bigtrain.recompute) three things still grow with the sequence length s:

* the layer inputs that activation checkpointing keeps, ``s·b·h`` elements per layer (4 GiB per
  layer at s = 512k for Llama-2-7B's h = 4096, in bf16);
* one layer's working set while it is recomputed and differentiated, of which the MLP's ffn-wide
  intermediates are the largest part (gate, up, their product: ``3·s·b·ffn`` elements, ~2.7x the
  rest of the layer for a SwiGLU MLP at ffn = 2.7h);
* the logits: bigtrain's loss already projects the hidden states through the head in chunks
  (bigtrain/losses.py), so at most one chunk of logits exists.

This module holds the two mechanisms for the first two; bigtrain.recompute decides, from the
estimate, whether a run needs them (``model.tiled_mlp``, ``model.offload_activations``):

* :func:`install_tiled_mlp`: each decoder layer's MLP computes its output ``tile`` tokens at a
  time, through DeepSpeed's ``TiledMLP`` (deepspeed.runtime.sequence_parallel.ulysses_sp, from
  Arctic Long Sequence Training). It keeps only the MLP's input for backward and recomputes each
  tile's forward there, so the ffn-wide intermediates exist for one tile at a time. The MLP is a
  token-wise map, so the tiled output is the untiled one; the adapters' gradients are summed over
  tiles (equal within rounding: tests/unit/test_longctx.py). DeepSpeed's function fits bigtrain's
  engine as it is: the layer is gathered whole by bigtrain's gatherer (or is one fetch unit for
  DeepSpeed's hooks, zero.leaf_blocks), so the per-tile calls make no collectives, and the adapters
  are plain tensors outside DeepSpeed, whose gradients accumulate over the tiles by autograd.
* :class:`CheckpointOffload`: the inputs of the first ``layers`` checkpointed layers are copied to
  pinned host memory on a side stream as the forward passes them (the copy overlaps the next
  layers' compute, and the GPU copy is freed when it is done) and copied back when backward
  recomputes that layer. It is DeepSpeed's ``CheckpointHiddenStatesOffload``
  (runtime.activation_checkpointing.offload_activations: saved-tensor hooks on transformers'
  non-reentrant checkpointing, a pinned buffer pool reused across steps) with two changes: only the
  first ``layers`` inputs are offloaded (the earliest layers are needed last in backward, and host
  memory, not the GPU, is then the limit), and it also runs on CPU, where DeepSpeed's class does
  nothing, so the CPU tests exercise the same marking, packing and restoring (a plain copy there).
  A copy changes no value: the adapters are equal bit for bit with and without it.

DeepSpeed is imported where used: its import takes seconds and writes to stdout, and a run that
needs neither mechanism never pays it here.
"""

from __future__ import annotations

import math
import types

import torch
from torch import nn

from .presets import decoder_layer_classes

_MLP_NAMES = ("mlp", "feed_forward", "ffn")


def layer_mlps(model: nn.Module) -> list[nn.Module]:
    """Each decoder layer's MLP module (``mlp``, ``feed_forward`` or ``ffn``), where it is a dense,
    token-wise map: a mixture of experts (a router, ``experts``) is left alone, as is an
    architecture without an MLP module (OPT's fc1/fc2 sit in the layer itself)."""
    classes = tuple(decoder_layer_classes(model))
    out = []
    for layer in (m for m in model.modules() if classes and isinstance(m, classes)):
        mlp = next((getattr(layer, n) for n in _MLP_NAMES if isinstance(getattr(layer, n, None), nn.Module)), None)
        if mlp is None or any("expert" in n or n in ("gate", "router") for n, _ in mlp.named_children()):
            continue
        out.append(mlp)
    return out


def _mlp_fn(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return type(module).forward(module, x)  # the module's own computation; its submodules' hooks fire


def _tiled_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    tokens = math.prod(x.shape[:-1])
    tiles = -(-tokens // self._bt_tile)
    if tiles <= 1:
        return _mlp_fn(self, x)
    if not torch.is_grad_enabled():  # eval: the tiles one after the other, nothing kept
        flat = x.reshape(-1, x.shape[-1])
        return torch.cat([_mlp_fn(self, t) for t in flat.split(self._bt_tile)]).view(*x.shape[:-1], -1)
    return TiledMLP.apply(_mlp_fn, self, x, tiles, [])  # no DeepSpeed-managed gradients here


def install_tiled_mlp(model: nn.Module, tile: int) -> int:
    """Compute every dense decoder-layer MLP of ``model`` ``tile`` tokens at a time (an instance-level
    ``forward``; the module's hooks fire as before). Returns the number of MLPs tiled."""
    n = 0
    for mlp in layer_mlps(model):
        mlp._bt_tile = int(tile)
        if "forward" not in mlp.__dict__:
            mlp.forward = types.MethodType(_tiled_forward, mlp)
        n += 1
    return n


class CheckpointOffload:
    """A context for one micro-batch's forward *and* backward: the inputs of the first ``layers``
    checkpointed decoder layers live in host memory between the two (pinned, on a side stream, on a
    GPU). ``layers`` = 0: a no-op. The buffer pool is kept from one micro-batch to the next.
    ``stats``: what the last context offloaded (tensors and bytes)."""

    def __init__(self, layers: int, device: torch.device):
        self.layers = int(layers)
        self._inner = _make_offload(self.layers, device) if self.layers > 0 else None

    @property
    def stats(self):
        return self._inner.stats if self._inner is not None else None

    def __enter__(self):
        if self._inner is not None:
            self._inner.__enter__()
        return self

    def __exit__(self, *exc):
        if self._inner is not None:
            return self._inner.__exit__(*exc)
        return False


def _make_offload(layers: int, device: torch.device):
    from deepspeed.runtime.activation_checkpointing.offload_activations import (CheckpointHiddenStatesOffload,
                                                                                _OffloadedTensorRef)

    class _FirstLayers(CheckpointHiddenStatesOffload):
        """DeepSpeed's offload of marked checkpoint inputs, marking only the first ``layers`` of a
        forward, and allowed on a CPU device (DeepSpeed skips every tensor there)."""

        def __init__(self):
            gpu = device.type == "cuda"
            # keep_last_count=0: every marked input goes (only the first layers are marked, so the
            # last one marked is not the last layer); max_fwd_stash_count=0: the GPU copy is freed
            # as soon as its copy to the host is done (record_stream), none kept "in case"
            super().__init__(use_pin_memory=gpu, use_streams=gpu, min_offload_bytes=0,
                             max_fwd_stash_count=0, keep_last_count=0)
            self._marks = 0

        def mark(self, tensor):
            if self._marks < layers:
                self._marks += 1
                super().mark(tensor)

        def reset(self):
            super().reset()
            self._marks = 0

        def _should_skip(self, tensor):
            return (isinstance(tensor, nn.Parameter) or tensor.numel() == 0
                    or (tensor.numel() > 1 and 0 in tensor.stride()))

        def _unpack_tensor(self, maybe_ref):
            # DeepSpeed caches every restored input until the context exits (cache=True, for a
            # retain_graph backward that unpacks twice), so by the time backward recomputes the first
            # layer every offloaded input is back on the GPU at once and the peak is as if none had
            # left (measured: an H100 at 64k tokens, all 32 inputs offloaded, peaked 2.5 GiB below the
            # plain run instead of 16). Checkpointing unpacks a layer's inputs once per backward: the
            # restored copy is the recompute's own and is freed with it.
            if isinstance(maybe_ref, _OffloadedTensorRef):
                return self._restore_tensor(maybe_ref.tensor_id, cache=False)
            return maybe_ref

    return _FirstLayers()
