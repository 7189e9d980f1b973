"""Per-decoder-layer ``torch.compile`` (``model.compile=true``).

What is compiled is each decoder layer's own ``forward``, set as an *instance attribute*
(``layer.forward = torch.compile(layer.forward)``), not ``layer.compile()``:

* ``nn.Module.compile()`` compiles ``_call_impl``, i.e. the module's call *with its own hooks*. Under
  ZeRO-3 the decoder layer is the fetch unit (``zero.leaf_blocks``) and carries DeepSpeed's
  fetch/release hooks; those are ``torch.compiler.disable``'d Python (all-gathers, a parameter
  coordinator, ``param.data`` swaps): inside dynamo they would be graph breaks at best.
* ``Module._call_impl`` calls ``self.forward``, so an instance-level compiled ``forward`` runs
  *between* the layer's pre- and post-forward hooks: DeepSpeed gathers the layer's weights, the
  compiled code runs on whole tensors, DeepSpeed releases them. The layer's submodules (q_proj, ...)
  are called from inside ``forward``, so their forward hooks, the LoRA adapters, are traced into the
  compiled graph with them (and so would be an instance-level ``forward`` of a submodule calling a
  ``torch.autograd.Function``: dynamo traces those).
* transformers' activation checkpointing wraps the layer's ``__call__`` (``GradientCheckpointingLayer``),
  hence the hooks and the compiled ``forward``: the recomputation is one more call of both.

Each layer's hooks are different closures, so dynamo guards them and compiles one graph per layer
(per grad mode: train and eval); identical graphs hit inductor's cache after the first. The
recompile limit is raised to fit them, else the layers past the limit would silently run eager.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import nn

from .presets import decoder_layer_classes

# Deferred imports: torch._dynamo (its counters) and torch's Triton probe load the compiler stack,
# seconds of start-up that only compiled runs (and model.compile=auto on CUDA) need.

# Graphs per layer kept before a layer falls back to eager for a new variant: training and no-grad
# (eval) forwards, times the input shapes (with unpacked data, one per length bucket: pad_multiple).
_GRAPHS_PER_LAYER = 24
# Unpacked data under model.compile is padded to a multiple of max_length / LENGTH_BUCKETS (at least
# 64 tokens), so at most this many sequence lengths (each one compiled graph) occur.
LENGTH_BUCKETS = 8


def resolve(setting, device_type: str, stage: int, leaf_blocks: bool) -> tuple[bool, str]:
    """``model.compile`` for this run: (on, the reason said at start-up). ``auto`` is on for CUDA
    training unless something it needs is missing; ``true``/``false`` are taken as given (config
    validation refuses ``true`` where it cannot work)."""
    if setting is True:
        return True, "model.compile=true"
    if setting is False:
        return False, "model.compile=false"
    if device_type != "cuda":
        return False, "model.compile auto: off on CPU (compiling takes longer than it saves at CPU speed)"
    if stage == 3 and not leaf_blocks:
        return False, ("model.compile auto: off, zero.leaf_blocks=false puts ZeRO-3's fetch hooks inside "
                       "the decoder layers (set zero.leaf_blocks=true to compile them)")
    from torch.utils._triton import has_triton

    if not has_triton():
        return False, "model.compile auto: off, Triton is not installed (inductor needs it on GPUs)"
    return True, "model.compile auto: on (CUDA)"


def pad_multiple(compiled: bool, packed: bool, max_length: int) -> int:
    """The multiple unpacked batches are padded to: 1 (the longest row) in eager runs and for packed
    data (fixed shapes already), else max_length / LENGTH_BUCKETS rounded up to 64, so that a
    compiled run meets a few sequence lengths (one graph each), not one per padded length."""
    if not compiled or packed:
        return 1
    per_bucket = -(-max_length // LENGTH_BUCKETS)
    return max(64, -(-per_bucket // 64) * 64)


def use_shared_cache() -> str:
    """Where inductor keeps compiled kernels and graphs: ``TORCHINDUCTOR_CACHE_DIR`` if set, else
    ``~/.cache/bigtrain/inductor`` (set here), not torch's default under /tmp, which is node-local on
    clusters: a requeued or rerun job on another node, sharing the home directory, compiles nothing
    it compiled before. Returns the directory."""
    d = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not d:
        d = str(Path.home() / ".cache" / "bigtrain" / "inductor")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = d
    return d


def cache_use() -> tuple[int, int]:
    """(inductor graphs served by its cache, inductor graphs compiled) in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["fxgraph_cache_hit"]), int(counters["inductor"]["fxgraph_cache_miss"])


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process (one per layer variant; a rise in steady state is
    a recompilation)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@contextlib.contextmanager
def eager_layers(model: nn.Module):
    """Run the decoder layers eager inside the block (generation: every new length would compile
    again): their compiled ``forward`` instance attributes are set aside and put back after."""
    held = {}
    for m in model.modules():
        f = m.__dict__.get("forward")
        if getattr(f, "_bigtrain_compiled", False):
            held[m] = f
            del m.forward
    try:
        yield len(held)
    finally:
        for m, f in held.items():
            m.forward = f


def compile_layers(model: nn.Module, backend: str = "inductor") -> int:
    """``torch.compile(dynamic=False)`` the ``forward`` of every decoder layer of ``model`` (found by
    :func:`bigtrain.presets.decoder_layer_classes`). Call it after the LoRA hooks are attached.
    Returns the number of layers compiled (0 if the model declares no decoder-layer class)."""
    classes = tuple(decoder_layer_classes(model))
    layers = [m for m in model.modules() if classes and isinstance(m, classes)]
    for layer in layers:
        # DeepSpeed registers its ZeRO-3 hooks on every module down to a leaf module (ds_id marks
        # them). Hooks below the layer would run inside the compiled forward: refuse.
        inner = [n for n, m in layer.named_modules() if n and hasattr(m, "ds_id")]
        if inner:
            raise ValueError(f"model.compile: {type(layer).__name__} has ZeRO-3 hooks on its submodules "
                             f"({inner[0]}, ...); they cannot run inside a compiled layer. "
                             f"Use zero.leaf_blocks=true (whole layers as fetch units)")
    if not layers:
        return 0
    cfg = torch._dynamo.config
    need = _GRAPHS_PER_LAYER * len(layers)
    cfg.recompile_limit = max(cfg.recompile_limit, need)
    cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 2 * need)
    n = 0
    for layer in layers:
        if getattr(layer.__dict__.get("forward"), "_bigtrain_compiled", False):
            continue  # already compiled: do not wrap twice
        compiled = torch.compile(layer.forward, backend=backend, dynamic=False)
        compiled._bigtrain_compiled = True
        layer.forward = compiled  # an instance attribute: _call_impl runs the hooks around it
        n += 1
    return n
