"""Which decoder layers are recomputed in backward (``model.gradient_checkpointing``).

A checkpointed layer keeps only its input (act·s·b·h bytes) and runs its forward again in backward:
about a third more compute for that layer, and most of its activation memory back. ``true`` and
``false`` mean every layer and none; ``N`` the first N; ``auto`` (the default) as few as fit:

* before the first step, the smallest N whose estimated per-GPU peak (``bigtrain.memory``, with the
  run's micro-batch, sequence, adapters, dtype, quantization and compiled layers) is within the GPU's
  memory less ``train.memory_headroom``; on CPU none (nothing is sized);
* after the first step, once, from the measured peak: the estimate's activation part is scaled by
  measured/estimated and N chosen again (so an estimate that is off by 20% costs no OOM and leaves
  no memory idle).

The *first* N layers are the ones checkpointed: their recomputation comes last in backward, after
every later layer's stored activations are freed, so the peak is N inputs and L-N whole layers at
the end of forward, never N inputs, L-N layers and a recomputed one (see
``memory.checkpointed_activation_bytes``). Which layers are recomputed changes nothing numerically:
a recomputed forward is the same arithmetic (tests/unit/test_recompute.py checks the adapters are
equal bit for bit against checkpointing every layer).

At long context (bigtrain.longctx) two more choices join this one, made by :func:`choose_memory`
in this order, each only when the previous ones leave the estimate above the budget: the MLP in
tiles (``model.tiled_mlp``), then the inputs of the first checkpointed layers in host memory
(``model.offload_activations``: the fewest that fit, within the host's budget). A run that fits
without them runs as before.

transformers marks each decoder layer with a ``gradient_checkpointing`` flag
(``GradientCheckpointingLayer``); ``gradient_checkpointing_enable`` sets every one, and bigtrain then
clears the flags of the layers past the first N.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer


@dataclass
class Plan:
    """The layers to checkpoint and why (one line for the run's log)."""

    layers: int  # decoder layers of the model
    checkpointed: int  # the first ``checkpointed`` of them are recomputed in backward
    auto: bool  # chosen by model.gradient_checkpointing=auto (and so corrected after step 1)
    why: str
    tiled: int = 0  # the MLP computed this many tokens at a time (model.tiled_mlp); 0: untiled
    offloaded: int = 0  # the first this many checkpointed layers' inputs in host memory
    long_why: str = ""  # why tiled / offloaded, when either is on
    offload_auto: bool = False  # offloaded chosen by model.offload_activations=auto (corrected after step 1)


def fixed_layers(setting, layers: int) -> int | None:
    """The number of checkpointed layers a setting names, or None for ``auto``. A number above the
    model's depth is refused naming both."""
    if setting is True:
        return layers
    if setting is False:
        return 0
    if setting == "auto":
        return None
    if setting > layers:
        raise ValueError(f"model.gradient_checkpointing={setting}: the model has {layers} decoder layers; "
                         f"use at most {layers} (or true for every layer)")
    return int(setting)


def choose(setting, layers: int, peak: Callable[[int], int] | None, budget: int | None) -> Plan:
    """The plan for ``setting`` (``model.gradient_checkpointing``). ``peak(n)`` is the estimated
    per-GPU peak with the first n layers checkpointed and ``budget`` the bytes it must stay within;
    both None where nothing is sized (CPU)."""
    fixed = fixed_layers(setting, layers)
    if fixed is not None:
        return Plan(layers, fixed, False, f"model.gradient_checkpointing={str(setting).lower()}")
    if peak is None or budget is None:
        return Plan(layers, 0, True, "auto: none on CPU, where no GPU memory is sized")
    most = auto_limit(layers, peak)
    n = smallest_fit(most, peak, budget)
    if n is None:
        return Plan(layers, most, True, f"{_least_why(most, layers)}, and the estimate "
                                        f"({peak(most) / 2**30:.1f} GiB) is still above the "
                                        f"{budget / 2**30:.1f} GiB budget")
    if n == 0:
        why = f"auto: none needed (estimate {peak(0) / 2**30:.1f} GiB within the {budget / 2**30:.1f} GiB budget)"
    else:
        why = (f"auto: the fewest that fit (estimate {peak(n) / 2**30:.1f} GiB within the "
               f"{budget / 2**30:.1f} GiB budget; {peak(n - 1) / 2**30:.1f} GiB with one fewer)")
    return Plan(layers, n, True, why)


def auto_limit(layers: int, peak: Callable[[int], int] | None = None) -> int:
    """The most layers auto recomputes: the count of L-1 and L that the estimate ``peak`` says holds
    less (L-1 without one). Recomputing the last layer too holds one more layer input while it is
    recomputed; keeping it whole holds it through the final norm's backward, whose fp32 temporaries
    (24 bytes per token per unit of hidden size) exceed a layer's backward transient (memory.py), so
    for Llama-2-7B every layer recomputed holds least. ``true`` recomputes every layer regardless."""
    if layers <= 1:
        return layers
    if peak is not None and peak(layers) <= peak(layers - 1):
        return layers
    return layers - 1


def _least_why(n: int, layers: int) -> str:
    return "auto: every layer, the least memory" if n == layers else "auto: all but the last, the least memory"


def smallest_fit(layers: int, peak: Callable[[int], int], budget: int) -> int | None:
    """The smallest n in 0..layers with ``peak(n) <= budget`` (peak is non-increasing in n), or None."""
    if peak(layers) > budget:
        return None
    lo, hi = -1, layers  # peak(hi) fits; peak(lo) does not (lo = -1: a sentinel)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if peak(mid) <= budget:
            hi = mid
        else:
            lo = mid
    return hi


def fixed_tile(setting, hidden: int) -> int | None:
    """Tokens per MLP tile that ``model.tiled_mlp`` names (0: untiled), or None for ``auto``."""
    if setting is True:
        return hidden
    if setting is False:
        return 0
    if setting == "auto":
        return None
    return int(setting)


def fixed_offload(setting, checkpointed: int) -> int | None:
    """Checkpointed layers whose inputs ``model.offload_activations`` sends to the host, or None for
    ``auto``; at most the checkpointed layers."""
    if setting is True:
        return checkpointed
    if setting is False:
        return 0
    if setting == "auto":
        return None
    return min(int(setting), checkpointed)


def choose_memory(setting, tile_setting, offload_setting, layers: int, hidden: int,
                  peak: Callable[[int, int, int], int] | None, budget: int | None,
                  host: Callable[[int], int] | None = None, host_budget: int | None = None) -> Plan:
    """The plan for ``model.gradient_checkpointing`` (``setting``), ``model.tiled_mlp`` and
    ``model.offload_activations``. ``peak(n, tile, offloaded)``: the estimated per-GPU peak with the
    first n layers recomputed, the MLP in tiles of ``tile`` tokens (0: untiled) and the inputs of
    the first ``offloaded`` in host memory; ``host(offloaded)``: the host bytes per rank they take,
    against ``host_budget`` (None: unbounded). ``peak``/``budget`` None where nothing is sized (CPU):
    the fixed settings are taken, auto is off. Tiling is tried only when the untiled run does not
    fit, offloading only when the tiled one does not."""
    tile = fixed_tile(tile_setting, hidden)
    if peak is None or budget is None:
        plan = choose(setting, layers, None, None)
        off = fixed_offload(offload_setting, plan.checkpointed) or 0
        plan = replace(plan, tiled=tile or 0, offloaded=off, long_why="as set" if tile or off else "")
        if offload_setting not in ("auto", False) and not plan.checkpointed:
            plan = replace(plan, why=plan.why + f"; model.offload_activations={str(offload_setting).lower()} "
                                                "offloads checkpointed layers' inputs: none are checkpointed")
        return plan
    tiles = [tile] if tile is not None else [0, hidden]
    for t in tiles:
        def at(n, t=t):
            return peak(n, t, fixed_offload(offload_setting, n) or 0)
        plan = choose(setting, layers, at, budget)
        n = plan.checkpointed
        off = fixed_offload(offload_setting, n)
        if at(n) <= budget or off is not None and t == tiles[-1]:  # fits, or set values are kept
            why = "as set" if off or tile else (
                f"auto: the untiled estimate {peak(n, 0, 0) / 2**30:.1f} GiB is above the {budget / 2**30:.1f} GiB "
                f"budget, tiled {at(n) / 2**30:.1f} GiB" if t else "")
            return replace(plan, tiled=t, offloaded=off or 0, long_why=why, offload_auto=off is None)
    # tiled, as many layers recomputed as allowed, still above the budget: the fewest inputs offloaded
    fits_host = (lambda o: True) if host is None or host_budget is None else (lambda o: host(o) <= host_budget)
    o = smallest_fit(n, lambda k: peak(n, t, k), budget)  # the peak falls with k, the host's use grows
    if o is None or not fits_host(o):
        most = _most_the_host_holds(n, fits_host)
        why = (f"auto: the most the host holds ({most}), and the estimate ({peak(n, t, most) / 2**30:.1f} GiB) is "
               f"still above the {budget / 2**30:.1f} GiB budget")
        o = most
    else:
        why = (f"auto: the fewest that fit (estimate {peak(n, t, o) / 2**30:.1f} GiB within the "
               f"{budget / 2**30:.1f} GiB budget"
               + (f", {host(o) / 2**30:.1f} GiB of host memory within {host_budget / 2**30:.1f}" if host and
                  host_budget is not None else "") + ")")
    if plan.auto and n == auto_limit(layers, lambda k: peak(k, t, 0)):
        plan = replace(plan, why=_least_why(n, layers))
    return replace(plan, tiled=t, offloaded=o, long_why=why, offload_auto=True)


def _most_the_host_holds(n: int, fits_host: Callable[[int], bool]) -> int:
    """The most of ``n`` offloaded inputs the host holds (``fits_host`` grows false with the count)."""
    return max((k for k in range(n + 1) if fits_host(k)), default=0)


def corrected(plan: Plan, measured: int, estimated: int, activations: int,
              act_at: Callable[[int], int], budget: int, act_off: Callable[[int], int] | None = None,
              host_ok: Callable[[int], bool] | None = None) -> Plan | None:
    """After the first step: ``measured`` peak against ``estimated`` (of which ``activations`` are the
    activation and loss bytes) for ``plan``. The activation part is scaled by the ratio the
    measurement implies and the smallest fitting n chosen again; a new Plan if n changes, else None.
    ``act_at(n)`` is the estimated activation part with n layers checkpointed. A plan that offloads
    by auto (every layer but the last recomputed) re-chooses instead the fewest offloaded inputs,
    ``act_off(o)`` being the activation part with o of them in host memory and ``host_ok(o)`` whether
    the host holds them."""
    if activations <= 0:
        return None
    scale = max(0.0, (measured - (estimated - activations)) / activations)
    fixed_part = estimated - activations
    if plan.offloaded or plan.tiled:
        if not (plan.offload_auto and act_off is not None):
            return None  # tiling and fixed offload are kept as they are
        n = plan.checkpointed
        ok = host_ok or (lambda o: True)
        o = smallest_fit(n, lambda k: int(fixed_part + scale * act_off(k)), budget)
        if o is None or not ok(o):
            o = _most_the_host_holds(n, ok)
        if o == plan.offloaded:
            return None
        return replace(plan, offloaded=o, long_why=_corrected_why(
            measured, estimated, scale, int(fixed_part + scale * act_off(o)), budget))
    if not plan.auto:
        return None

    def scaled(n: int) -> int:
        return int(fixed_part + scale * act_at(n))

    most = auto_limit(plan.layers, scaled)
    n = smallest_fit(most, scaled, budget)
    if n is None:
        n = most
    if n == plan.checkpointed:
        return None
    return replace(plan, checkpointed=n, why=_corrected_why(measured, estimated, scale, scaled(n), budget))


def _corrected_why(measured: int, estimated: int, scale: float, now: int, budget: int) -> str:
    return (f"auto, corrected from step 1's measured peak ({measured / 2**30:.1f} GiB with the CUDA context "
            f"allowance, against an estimate of "
            f"{estimated / 2**30:.1f}: activations x{scale:.2f}): now {now / 2**30:.1f} GiB within the "
            f"{budget / 2**30:.1f} GiB budget")


def checkpointable_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers that carry transformers' per-layer ``gradient_checkpointing`` flag, in order."""
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def apply(model: nn.Module, n: int) -> int:
    """Checkpoint the first ``n`` decoder layers of a transformers model and no others; returns the
    number of layers that carry the flag. transformers recomputes a layer only when the layer is in
    training mode: the checkpointed layers alone are put in it, not their submodules, so the frozen
    base stays in eval mode (no dropout) as the engine left it."""
    layers = checkpointable_layers(model)
    if n > 0 and not getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if n > 0 and not layers:
        model.train()  # a model without per-layer flags: gradient_checkpointing_enable covered every layer
        return 0
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = layer.training = i < n
        if layer.training:
            # a layer that applies dropout itself by its own mode (OPT: F.dropout(p=self.dropout,
            # training=self.training)) would now drop: the frozen base has none, so its rate is 0
            for name, value in list(vars(layer).items()):
                if "drop" in name and isinstance(value, float):
                    setattr(layer, name, 0.0)
    return len(layers)


def describe(plan: Plan) -> str:
    line = (f"activation checkpointing: {plan.checkpointed} of {plan.layers} decoder layers recomputed in "
            f"backward ({plan.why})")
    if plan.tiled or plan.offloaded:
        parts = ([f"MLP in tiles of {plan.tiled:,} tokens"] if plan.tiled else []) + (
            [f"the inputs of the first {plan.offloaded} in host memory"] if plan.offloaded else [])
        line += f"; {' and '.join(parts)}" + (f" ({plan.long_why})" if plan.long_why else "")
    return line
