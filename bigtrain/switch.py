"""Several LoRA adapters over one shared frozen base, switched by name (LoRA paper §4.2: one base
in memory, a small adapter per task, swapped at no cost).

Each adapter is its own :class:`~bigtrain.lora.LoRAModel` with its own forward hooks on the base;
:class:`AdapterBank` keeps exactly one of them enabled (``LoRAModel.enabled``), so the others' hooks
return the base output untouched. ``use(None)`` disables them all: the base model exactly.
"""

from __future__ import annotations

import contextlib
import os

from torch import nn

from .checkpoint import read_checkpoint
from .engine import DTYPES
from .inject import inject_lora
from .lora import LoRAModel


class AdapterBank:
    def __init__(self, model: nn.Module):
        self.model = model
        self._adapters: dict[str, LoRAModel] = {}
        self.active: str | None = None

    # -- building -------------------------------------------------------------------------------
    def add(self, name: str, lora: LoRAModel) -> LoRAModel:
        """Register an already-attached LoRAModel (its hooks must be on ``self.model``)."""
        if name in self._adapters:
            raise ValueError(f"adapter {name!r} is already in the bank")
        if lora.merged:
            raise ValueError(f"adapter {name!r} is merged into the base; a bank needs unmerged adapters")
        lora.eval()
        lora.enabled = False
        self._adapters[name] = lora
        return lora

    def load(self, name: str, checkpoint: str | os.PathLike) -> LoRAModel:
        """Attach a bigtrain checkpoint (verified against its manifest) under ``name``."""
        c = read_checkpoint(checkpoint)
        p, spec = c.path, c.spec
        device = next(self.model.parameters()).device
        lora = inject_lora(self.model, list(spec.modules), spec.r, spec.alpha, spec.dropout, spec.rslora,
                           DTYPES[spec.dtype], device)
        if lora.names() != list(spec.modules):
            lora.remove_hooks()
            raise ValueError(f"{p}: its modules do not match this model's")
        try:
            lora.load_adapter_state_dict(c.tensors)
        except (KeyError, ValueError) as e:
            lora.remove_hooks()
            raise ValueError(f"{p}: {e}") from None
        return self.add(name, lora)

    @classmethod
    def from_checkpoints(cls, model: nn.Module, checkpoints: dict[str, str | os.PathLike]) -> "AdapterBank":
        bank = cls(model)
        for name, path in checkpoints.items():
            bank.load(name, path)
        return bank

    def remove(self, name: str) -> None:
        lora = self._get(name)
        lora.remove_hooks()
        del self._adapters[name]
        if self.active == name:
            self.active = None

    # -- switching ------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._adapters)

    def __getitem__(self, name: str) -> LoRAModel:
        return self._get(name)

    def _get(self, name: str) -> LoRAModel:
        if name not in self._adapters:
            raise KeyError(f"no adapter named {name!r}; the bank holds {self.names()}")
        return self._adapters[name]

    def use(self, name: str | None) -> None:
        """Enable adapter ``name`` only; ``None``: the bare base model."""
        if name is not None:
            self._get(name)
        for n, lora in self._adapters.items():
            lora.enabled = n == name
        self.active = name

    @contextlib.contextmanager
    def using(self, name: str | None):
        prev = self.active
        self.use(name)
        try:
            yield self.model
        finally:
            self.use(prev)
