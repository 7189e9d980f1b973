"""Find the modules LoRA adapts in a ``transformers`` model, freeze the base, attach adapters."""

from __future__ import annotations

import torch
from torch import nn

from .lora import LoRAModel, is_conv1d
from .presets import count_parameters

ALL_LINEAR = "all-linear"


def is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or is_conv1d(m)


def output_layer_names(model: nn.Module) -> set[str]:
    """The LM head (never adapted: all-linear skips it, as in PEFT, and naming it in lora.targets is
    an error; it is tied to the embeddings in many models and maps to the vocabulary, not between
    hidden states)."""
    names = set()
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get else None
    for name, m in model.named_modules():
        if m is head or name.split(".")[-1] in ("lm_head", "embed_out"):
            names.add(name)
    return names


def select_targets(linear_names: list[str], targets: list[str], heads: set[str],
                   model_name: str = "the model", note: str = "") -> list[str]:
    """The one matching rule, on names alone (training and the estimator both use it): a linear
    layer is a target when its dotted name equals a target or ends with ``.<target>``;
    ``all-linear`` picks every linear layer but the output ``heads``. A target that matches nothing
    is an error that lists the linear-layer names the model does have (the heads not among them).
    A target that matches an output head is an error too: the head is not adaptable (it is tied to
    the embeddings in many models, and the loss projects through the head's own weight in chunks,
    :mod:`bigtrain.losses`, so a head adapter would never be applied). ``note`` ends the unmatched
    error (:func:`fused_expert_note`). The model's own order."""
    if targets == [ALL_LINEAR]:
        found = {n for n in linear_names if n not in heads}
    else:
        if ALL_LINEAR in targets:
            raise ValueError(f"lora.targets: {ALL_LINEAR!r} cannot be combined with other names")
        found, unmatched = set(), []
        for t in targets:
            hits = {n for n in linear_names if n == t or n.endswith("." + t)}
            if not hits:
                unmatched.append(t)
            if hits & heads:
                raise ValueError(f"lora.targets: {t!r} is the output head ({', '.join(sorted(hits & heads))}) "
                                 f"of {model_name}, which LoRA cannot adapt: it is tied to the embeddings "
                                 f"in many models and the loss projects through the head in chunks, "
                                 f"bypassing any adapter on it")
            found |= hits
        if unmatched:
            avail = sorted({n.split(".")[-1] for n in linear_names if n not in heads})
            raise ValueError(f"lora.targets: {', '.join(map(repr, unmatched))} matched no linear layer of "
                             f"{model_name}; its linear layers are named: {', '.join(avail)}{note}")
    return [n for n in linear_names if n in found]


def fused_expert_note(model: nn.Module) -> str:
    """For a mixture-of-experts model whose experts are fused 3-D parameters (transformers 5.x:
    ``mlp.experts.gate_up_proj``, all experts in one tensor, not ``nn.Linear`` layers): the clause
    saying so, for the unmatched-target error; else ""."""
    fused = sorted({".".join(n.split(".")[-2:]) for n, p in model.named_parameters()
                    if len(getattr(p, "ds_shape", p.shape)) >= 3})
    if not fused:
        return ""
    return (f" (the experts' weights {', '.join(fused)} are 3-D parameters holding every expert, not "
            f"linear layers, and cannot be adapted)")


def find_targets(model: nn.Module, targets: list[str]) -> dict[str, nn.Module]:
    """The modules of ``model`` that LoRA adapts for ``targets`` (:func:`select_targets`)."""
    linear = {n: m for n, m in model.named_modules() if is_linear(m)}
    names = select_targets(list(linear), targets, output_layer_names(model), type(model).__name__,
                           fused_expert_note(model))
    return {n: linear[n] for n in names}


def inject_lora(model: nn.Module, targets: list[str], r: int, alpha: float, dropout: float = 0.0,
                rslora: bool = False, dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None) -> LoRAModel:
    """Freeze every base parameter and attach adapters to the targets. The adapters live in the
    returned :class:`LoRAModel`, not in ``model``."""
    model.requires_grad_(False)
    return LoRAModel(find_targets(model, targets), r, alpha, dropout, rslora, dtype, device)


def parameter_report(model: nn.Module, lora: LoRAModel) -> dict:
    """Trainable (adapter) and total parameter counts; the base counted from ZeRO-3's full shapes
    when partitioned, tied weights once."""
    base = count_parameters(model)
    trainable = lora.num_parameters()
    return {"trainable": trainable, "base": base, "total": base + trainable,
            "trainable_pct": 100.0 * trainable / (base + trainable)}
