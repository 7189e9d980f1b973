"""Several LoRA adapters over one shared frozen base, switched by name (LoRA paper §4.2: one base
in memory, a small adapter per task, and switching tasks is swapping the adapter weights).

An :class:`AdapterBank` attaches ONE :class:`~bigtrain.lora.LoRAModel` to the base (its forward
hooks, once) and keeps every loaded adapter's A and B beside it, on the same device.
``use(name)`` copies that adapter's tensors into the live adapters: the switch moves exactly the
adapter's bytes (67 KB for the demo's r=8 on q,v; 37.7 MB for GPT-3 175B at r=4 on q,v in bf16)
and touches no base weight, and the forward that follows is the training forward itself (the same
hooks, unmerged). ``use(None)`` disables the live adapters: the base model exactly.

Because the switch is a copy into one set of live tensors, every adapter of a bank has the same
shapes: the same rank, the same adapted modules (targets) and the same dtype, trained over the same
base. Any other pair is refused when it is loaded, in one line naming both adapters. The scale
(alpha, rsLoRA) may differ: it is set with the switch.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

import torch
from torch import nn

from .checkpoint import LATER_BASE_KEYS, read_checkpoint, read_json
from .engine.core import DTYPES
from .inject import inject_lora
from .lora import AdapterSpec, LoRAModel


@dataclass(frozen=True)
class Switch:
    """One ``use``: which adapter, how many bytes were copied into the live adapters, how long it took."""

    name: str | None
    bytes: int
    seconds: float


@dataclass
class _Stored:
    spec: AdapterSpec
    tensors: dict[str, torch.Tensor]  # "<module>.lora_A" / "<module>.lora_B", on the bank's device
    source: str  # where it came from, for messages
    base: dict  # the checkpoint's base.json (its base model's fingerprint), {} if it has none

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class AdapterBank:
    def __init__(self, model: nn.Module, device: torch.device | str | None = None):
        self.model = model
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self._adapters: dict[str, _Stored] = {}
        self.live: LoRAModel | None = None  # attached with the first adapter
        self.active: str | None = None
        self.switches: list[Switch] = []

    # -- building -------------------------------------------------------------------------------
    def add(self, name: str, spec: AdapterSpec, tensors: dict[str, torch.Tensor], source: str = "",
            base: dict | None = None) -> None:
        """Register adapter ``name`` (its spec and A/B tensors); refused if its shapes or its base
        differ from the bank's first adapter."""
        if name in self._adapters:
            raise ValueError(f"adapter {name!r} is already in the bank")
        new = _Stored(spec, {}, source or name, dict(base or {}))
        if self._adapters:
            first_name, first = next(iter(self._adapters.items()))
            _check_pair(first_name, first.source, first.spec, first.base, name, new.source, spec, new.base)
        dtype = DTYPES[spec.dtype]
        if self.live is None:
            self.live = inject_lora(self.model, list(spec.modules), spec.r, spec.alpha, 0.0, spec.rslora,
                                    dtype, self.device)
            if self.live.names() != list(spec.modules):
                self.live.remove_hooks()
                self.live = None
                raise ValueError(f"{new.source}: its modules do not match this model's")
            self.live.eval()
            self.live.enabled = False
        want = self.live.adapter_state_dict()
        missing, unexpected = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
        if missing or unexpected:
            raise ValueError(f"{new.source}: adapter tensors do not match its modules (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
        for k, t in tensors.items():
            if tuple(t.shape) != tuple(want[k].shape):
                raise ValueError(f"{new.source}: {k} has shape {tuple(t.shape)}, the model needs {tuple(want[k].shape)}")
            new.tensors[k] = t.detach().to(self.device, dtype, copy=True)
        self._adapters[name] = new

    def load(self, name: str, checkpoint: str | os.PathLike) -> None:
        """Add a bigtrain checkpoint (verified against its manifest) under ``name``."""
        c = read_checkpoint(checkpoint)
        base = read_json(c.path / "base.json") if (c.path / "base.json").is_file() else {}
        self.add(name, c.spec, c.tensors, str(c.path), base)

    @classmethod
    def from_checkpoints(cls, model: nn.Module, checkpoints: dict[str, str | os.PathLike],
                         device: torch.device | str | None = None) -> "AdapterBank":
        bank = cls(model, device)
        for name, path in checkpoints.items():
            bank.load(name, path)
        return bank

    def remove(self, name: str) -> None:
        self._get(name)
        if self.active == name:
            self.use(None)
        del self._adapters[name]

    def close(self) -> None:
        """Detach the live adapters' hooks: the model is the bare base again."""
        if self.live is not None:
            self.live.remove_hooks()
            self.live = None
        self.active = None

    # -- switching ------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._adapters)

    def spec(self, name: str) -> AdapterSpec:
        return self._get(name).spec

    def nbytes(self, name: str) -> int:
        """Bytes of adapter ``name``'s A and B: what a switch to it copies."""
        return self._get(name).nbytes

    def _get(self, name: str) -> _Stored:
        if name not in self._adapters:
            raise KeyError(f"no adapter named {name!r}; the bank holds {self.names()}")
        return self._adapters[name]

    @torch.no_grad()
    def use(self, name: str | None) -> Switch:
        """Make adapter ``name`` the live one (its A and B copied in, its scale set); ``None``: the
        bare base (the live adapters disabled, nothing copied). Returns what the switch cost."""
        stored = self._get(name) if name is not None else None
        t0 = time.perf_counter()
        copied = 0
        if stored is not None and self.active != name:
            for module, ad in self.live.named_adapters():
                ad.lora_A.copy_(stored.tensors[f"{module}.lora_A"])
                ad.lora_B.copy_(stored.tensors[f"{module}.lora_B"])
                ad.scale = stored.spec.scale
            copied = stored.nbytes
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        if self.live is not None:
            self.live.enabled = stored is not None
        sw = Switch(name, copied, time.perf_counter() - t0)
        self.active = name
        self.switches.append(sw)
        return sw

    @contextlib.contextmanager
    def using(self, name: str | None):
        prev = self.active
        self.use(name)
        try:
            yield self.model
        finally:
            self.use(prev)


def check_compatible(adapters: list[tuple[str, object, AdapterSpec, dict]]) -> None:
    """(name, source, spec, base.json) of adapters meant for one bank: each must pair with the first
    (what :meth:`AdapterBank.add` checks), checked here from their files before any model is built."""
    for name, source, spec, base in adapters[1:]:
        _check_pair(*adapters[0], name, source, spec, base)


def _base_diffs(a: dict, b: dict) -> list[str]:
    """The keys in which two base.json differ (a key only newer checkpoints write is not compared)."""
    return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
            and not (k in LATER_BASE_KEYS and (k not in a or k not in b))]


def _check_pair(a: str, src_a, sa: AdapterSpec, base_a: dict, b: str, src_b, sb: AdapterSpec, base_b: dict) -> None:
    """Adapters ``a`` and ``b`` can share one bank: same rank, modules, dtype and base."""
    diffs = []
    if sa.r != sb.r:
        diffs.append(f"rank {sa.r} vs {sb.r}")
    if list(sa.modules) != list(sb.modules):
        diffs.append(f"targets {sa.targets} ({len(sa.modules)} modules) vs {sb.targets} ({len(sb.modules)} modules)")
    if sa.dtype != sb.dtype:
        diffs.append(f"dtype {sa.dtype} vs {sb.dtype}")
    if sa.base_model != sb.base_model:
        diffs.append(f"base {sa.base_model} vs {sb.base_model}")
    elif base_a and base_b and (keys := _base_diffs(base_a, base_b)):
        diffs.append(f"base {sa.base_model} with different weights ({', '.join(keys)} differ in base.json)")
    if diffs:
        raise ValueError(f"adapters {a!r} ({src_a}) and {b!r} ({src_b}) cannot share one base: "
                         f"{'; '.join(diffs)}; a switch copies one adapter's tensors over another's, so "
                         f"every adapter must have the same rank and targets and be trained on the same base")
