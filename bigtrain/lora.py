"""LoRA (Hu et al. 2021, arXiv:2106.09685): a frozen W0 plus a trainable low-rank update.

    h = W0·x + s·B·A·x,   A (r × d_in), B (d_out × r),   s = α/r  (α/√r with rsLoRA)

The adapters live *beside* the base model, not inside it: :class:`LoRAModel` owns every A and B and
adds ``s·B·A·x`` to a target module's output through a forward hook. The base model's own parameter
list therefore holds only frozen weights, which is what lets the engine hand the whole base to
ZeRO-3 for partitioning while the adapters stay ordinary, replicated tensors (ZeRO-3 has no
per-module opt-out, DeepSpeed #7271, and would otherwise shard the adapters and their Adam state too).

Nothing here knows about DeepSpeed; :meth:`LoRAModel.merge` takes a ``gather`` context factory so
that a caller whose base weights are partitioned can materialise one weight at a time.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn


def lora_scale(alpha: float, r: int, rslora: bool = False) -> float:
    """s in h = W0·x + s·B·A·x: α/r (the paper), or α/√r (rsLoRA, Kalajdzievski 2023)."""
    return alpha / (math.sqrt(r) if rslora else r)


@dataclass(frozen=True)
class AdapterSpec:
    """What a checkpoint's ``adapter_config.json`` says, and all that is needed to rebuild its
    adapters: the one schema that training writes and export, merge and the adapter bank read."""

    r: int
    alpha: float
    dropout: float = 0.0
    rslora: bool = False
    targets: list = field(default_factory=list)  # as configured (lora.targets)
    modules: list = field(default_factory=list)  # the dotted module names they matched
    base_model: str = ""
    dtype: str = "float32"  # the adapters' own dtype

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.r, self.rslora)

    def to_json(self) -> dict:
        return asdict(self)  # key order as written since the first checkpoints

    @classmethod
    def from_json(cls, d: dict) -> "AdapterSpec":
        """From a saved adapter_config (keys missing in older ones take their defaults)."""
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


class LoRAAdapter(nn.Module):
    """The update ΔW = s·B·A of one frozen linear map W0 (d_out × d_in)."""

    def __init__(self, d_in: int, d_out: int, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be > 0, got {r}")
        self.d_in, self.d_out, self.r = d_in, d_out, r
        self.scale = lora_scale(alpha, r, rslora)
        self.lora_A = nn.Parameter(torch.empty(r, d_in, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(d_out, r, dtype=dtype, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # A: Kaiming-uniform with a=√5, as in the reference implementation (microsoft/LoRA loralib)
        # and PEFT: it is nn.Linear's own default init for fan-in d_in, so A·x starts at the scale
        # of an ordinary layer's output (the paper's text says Gaussian; either works, this one
        # matches the code users compare against). B = 0 so ΔW = B·A = 0: the adapted model equals
        # the base exactly at step 0.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (..., d_in) -> (..., d_out); the r-dim intermediate is the only extra activation.
        # Under autocast the matmuls cast A and B themselves: casting x here would make autograd save
        # a converted copy of x per adapter (q and v each; 2 x s·b·d per layer) where it can save
        # the one x they share. Without autocast x must match the adapter's dtype.
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.dtype)
        x = self.dropout(x)
        return (x @ self.lora_A.t()) @ self.lora_B.t() * self.scale

    def delta_weight(self) -> torch.Tensor:
        """s·B·A, shape (d_out, d_in), in the adapter dtype."""
        return (self.lora_B @ self.lora_A) * self.scale

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, r={self.r}, scale={self.scale:g}"


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D: a linear map with its weight stored transposed, (d_in × d_out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an nn.Linear or Conv1D, from attributes, so it also works when the weight
    itself is an empty ZeRO-3 partition or lives on the meta device."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        return module.nx if hasattr(module, "nx") else module.weight.shape[0], module.nf
    raise TypeError(f"LoRA supports nn.Linear and GPT-2 Conv1D, not {type(module).__name__}")


class LoRAModel(nn.Module):
    """Every adapter of one base model, keyed by the target module's dotted name.

    Holds no reference to the base's parameters as submodules: ``self.parameters()`` is exactly the
    trainable adapter set, and ``base.parameters()`` exactly the frozen set.
    """

    def __init__(self, targets: dict[str, nn.Module], r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        self.adapters = nn.ModuleDict()
        self._targets: dict[str, nn.Module] = dict(targets)  # plain dict: not registered
        self._hooks = []
        self.merged = False
        self.enabled = True
        for name, mod in targets.items():
            d_in, d_out = linear_shape(mod)
            self.adapters[_key(name)] = LoRAAdapter(d_in, d_out, r, alpha, dropout, rslora, dtype, device)
            self._hooks.append(mod.register_forward_hook(self._make_hook(name)))

    # -- forward ---------------------------------------------------------------------------------
    def _make_hook(self, name: str):
        key = _key(name)

        def hook(module, inputs, output):
            if self.merged or not self.enabled:
                return output
            delta = self.adapters[key](inputs[0])
            return output + delta.to(output.dtype)

        return hook

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    # -- introspection ---------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._targets)

    def named_adapters(self) -> Iterator[tuple[str, LoRAAdapter]]:
        for name in self._targets:
            yield name, self.adapters[_key(name)]

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """``{"<module>.lora_A": A, "<module>.lora_B": B}`` with the base's dotted module names."""
        out = {}
        for name, ad in self.named_adapters():
            out[f"{name}.lora_A"] = ad.lora_A.detach()
            out[f"{name}.lora_B"] = ad.lora_B.detach()
        return out

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy tensors in; missing, unexpected or mis-shaped keys are errors that name the key."""
        want = {k: v for k, v in self.adapter_state_dict().items()}
        missing = sorted(set(want) - set(state))
        unexpected = sorted(set(state) - set(want))
        if missing or unexpected:
            raise KeyError(f"adapter state does not match the model: missing {missing[:5]}"
                           f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                           f"{'...' if len(unexpected) > 5 else ''}")
        for name, ad in self.named_adapters():
            for part in ("lora_A", "lora_B"):
                src, dst = state[f"{name}.{part}"], getattr(ad, part)
                if tuple(src.shape) != tuple(dst.shape):
                    raise ValueError(f"{name}.{part}: shape {tuple(src.shape)} in the checkpoint, "
                                     f"{tuple(dst.shape)} in the model")
                with torch.no_grad():
                    dst.copy_(src)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- merge / unmerge -------------------------------------------------------------------------
    def merge(self, gather: Callable[[nn.Parameter], contextlib.AbstractContextManager] | None = None) -> None:
        """W0 += s·B·A in every target (in W0's dtype); the hooks then add nothing. Explicit only:
        nothing else (train(), eval(), saving) merges or unmerges."""
        if self.merged:
            raise RuntimeError("adapters are already merged")
        self._apply_delta(+1.0, gather)
        self.merged = True

    def unmerge(self, gather: Callable[[nn.Parameter], contextlib.AbstractContextManager] | None = None) -> None:
        """W0 -= s·B·A: restores W0 (exactly when W0 is fp32 and the delta is representable;
        in bf16 to rounding of the add and subtract)."""
        if not self.merged:
            raise RuntimeError("adapters are not merged")
        self._apply_delta(-1.0, gather)
        self.merged = False

    @torch.no_grad()
    def _apply_delta(self, sign: float, gather) -> None:
        gather = gather or (lambda p: contextlib.nullcontext())
        for name, ad in self.named_adapters():
            mod = self._targets[name]
            with gather(mod.weight):
                delta = ad.delta_weight().to(mod.weight.device)
                if is_conv1d(mod):
                    delta = delta.t()
                mod.weight.add_(sign * delta.to(mod.weight.dtype))


def _key(name: str) -> str:
    # nn.ModuleDict keys may not contain '.'
    return name.replace(".", "/")
