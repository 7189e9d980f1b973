"""Frozen linear layers that keep no gathered weight alive between forward and backward.

Under ZeRO-3 a layer's weights are all-gathered just before it runs and released right after: the
parameter's ``.data`` is pointed back at an empty tensor, and the gathered buffer is freed once nothing
else refers to it. torch's own ``nn.Linear`` defeats that. ``F.linear`` on a 3-D input is ``matmul(x,
weight.t())``, and autograd saves the *transposed view* ``weight.t()`` for the input gradient. That view
is a tensor of its own that holds the gathered storage, and swapping the parameter's ``.data`` does not
touch it. So every frozen linear of every layer stays gathered from its forward until its backward:
at N GPUs without activation checkpointing the peak holds the whole base, not 1/N of it. On two H200s
at GPT-3 6.7B this was the 1-GPU peak plus the rank's own shard (35.0 GiB against FSDP2's 20.4).

:class:`FrozenLinearFn` computes the same ``F.linear`` but keeps a reference to the *parameter
itself*, so when ZeRO-3 releases the parameter nothing else holds the storage, and when ZeRO-3
gathers the layer again for its backward (its pre-backward hook) the reference sees the regathered
weight. It saves no input either: a frozen weight needs no weight gradient, so the input gradient
``grad_out @ W`` is all there is to compute.

The reference is a ``ctx`` attribute, not ``save_for_backward``: a saved tensor inside an
activation-checkpointed layer is one the recomputation must produce again, so the recomputation
could not stop early. With the weight kept outside autograd's saved tensors, the recomputation of a
decoder layer stops after the last operation whose saved tensors the backward needs, and skips the
final projection (the MLP's down projection, which saves nothing): at Llama-2-70B's shape that is one
8192 × 28672 × 8192 product per layer per step, about 5 ms on an H200 (bench/profile_step.py).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


class FrozenLinearFn(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` with a frozen ``weight``/``bias``; keeps only ``weight`` (the
    parameter, by reference, outside the saved tensors), returns the gradient for ``x`` alone."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.weight = weight  # not save_for_backward: see the module docstring (checkpoint early stop)
        ctx.x_dtype = x.dtype
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        weight = ctx.weight
        if not ctx.needs_input_grad[0]:
            return None, None, None
        # autocast's casts are not recorded in a custom Function: under bf16 autocast with an fp32
        # base the forward ran in bf16, so the gradient is computed in grad_out's dtype as well
        grad_x = grad_out.matmul(weight.to(grad_out.dtype))  # (..., d_out) @ (d_out, d_in)
        return grad_x.to(ctx.x_dtype), None, None


def _frozen_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad):
        return F.linear(x, self.weight, self.bias)  # unfrozen since install: the ordinary path
    return FrozenLinearFn.apply(x, self.weight, self.bias)


def install(model: nn.Module) -> int:
    """Route every frozen ``nn.Linear`` of ``model`` (the LM head too) through :class:`FrozenLinearFn`,
    by setting an instance-level ``forward``: module hooks (ZeRO-3's, LoRA's) fire as before. Returns
    the number of layers changed. GPT-2's Conv1D needs nothing: its ``addmm`` saves the weight
    parameter itself, not a view of it."""
    n = 0
    for m in model.modules():
        if type(m) is nn.Linear and "forward" not in m.__dict__ and not m.weight.requires_grad:
            m.forward = types.MethodType(_frozen_forward, m)
            n += 1
    return n
