"""The engine of one run: process group, frozen base and adapter collectives, behind one object.

``Engine`` is a thin facade, so the training loop, checkpointing and export talk to one object
whatever the ZeRO stage. It delegates to:

* ``bigtrain/dist.py``: the process group and the flat collectives on replicated tensors;
* this package's modules, everything that touches DeepSpeed: ``ds_config.py`` (the DeepSpeed
  config), ``build.py`` (the base built layer by layer under ZeRO-3), ``gather.py`` (gathered layer
  by layer during a step, by bigtrain's ``LayerGatherer`` or ``DeepSpeedZeRoOffload``'s hooks, and
  whole parameters); ``bigtrain/quantize.py`` for a quantized base;
* ``bigtrain/loader.py``: reading a local safetensors checkpoint straight into ZeRO-3 partitions.

The frozen base is partitioned by ZeRO-3 (no rank ever holds the whole model; a local checkpoint
is read partition by partition). The adapters are never handed to DeepSpeed: they are ordinary
tensors, identical on every rank, broadcast once from rank 0, their gradients summed with one flat
all-reduce per optimizer step, then stepped by a local torch AdamW. ``zero.stage=0`` keeps the
whole base on every rank with plain PyTorch (no DeepSpeed import): the reference the ZeRO-3 path is
tested against. Both run the same training loop.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch
import transformers as tf
from torch import nn

from .. import dist as D
from .. import frozen_linear
from .. import vocab as V
from ..config import DTYPE_BYTES, ZeroConfig
from ..loader import PartitionLoader
from ..quantize import quantize_layer
from . import build as B
from . import ds_config as C
from . import gather as G

DTYPES = {name: getattr(torch, name) for name in DTYPE_BYTES}  # config.DTYPE_BYTES's names


class Engine:
    """Process group, frozen base and adapter collectives for one run."""

    def __init__(self, zero: ZeroConfig, device: str = "auto", micro_batch_size: int = 1,
                 grad_accum: int = 1):
        self.zero = zero
        self.stage = zero.stage
        self.micro_batch_size = micro_batch_size
        self.grad_accum = grad_accum
        self._ds_hf_config = None  # HfDeepSpeedConfig must stay referenced while models are built
        self._offload = None
        self._single_rank_plain = False  # world size 1: partitions aliased, no ZeRO-3 hooks
        self.quantize: str | None = None  # model.quantize of the base built
        self.quantize_summary: str | None = None
        self.ds_config: dict | None = None
        self.ds_config_notes: list[str] = []
        self.layout = None  # layout.Layout: which ranks partition the base (zero.shard_group); None: all
        self._base_group = None  # this rank's partition group; None: the world
        if self.stage == 3:
            C.check_deepspeed_version()
        self.info = D.init_distributed(device, zero.backend, zero.timeout_s, self.stage)

    def close(self) -> None:
        """Tear down in order: no rank leaves while another still has a collective in flight
        (destroying a gloo group under pending work aborts the process)."""
        D.quiesce(self.info)
        if self._offload is not None:
            self._offload.destroy()
            self._offload = None
        ended = D.destroy_process_group()
        if ended is not None:
            D.unlink_deepspeed_shm(*ended)

    # -- which ranks partition the base -----------------------------------------------------------
    def use_layout(self, layout) -> None:
        """Partition the base over ``layout``'s groups (a :class:`bigtrain.layout.Layout`), before
        :meth:`build_base`: one process group per partition group, this rank's kept for ``zero.Init``."""
        self.layout = layout
        if not layout.is_world:
            self._base_group = D.new_groups(layout.groups, self.info.rank, self.zero.timeout_s)

    @property
    def base_shards(self) -> int:
        """Ranks the base is partitioned over (the world size unless zero.shard_group says less)."""
        if self.stage != 3:
            return 1
        return self.layout.size if self.layout is not None else self.info.world_size

    # -- DeepSpeed config ------------------------------------------------------------------------
    def build_ds_config(self, base_dtype: torch.dtype, layer_numel: int | None = None) -> dict:
        """Defaults (fetch sizes from one decoder layer of ``layer_numel`` elements) <- the user's
        JSON (zero.ds_config) <- the keys bigtrain owns."""
        self.ds_config, self.ds_config_notes = C.build_ds_config(
            self.zero, base_dtype, self.micro_batch_size, self.grad_accum, self.info.world_size, layer_numel)
        return self.ds_config

    # -- the frozen base -------------------------------------------------------------------------
    def build_base(self, hf_config=None, path: str | None = None, dtype: str = "float32",
                   attn_implementation: str = "sdpa", vocab: int | None = None,
                   quantize: str | None = None) -> nn.Module:
        """The causal LM, frozen, on this rank's device: whole (stage 0) or partitioned (stage 3).
        From ``hf_config`` (random init) or from a local checkpoint directory ``path`` (whose config
        is read here unless the caller already passes it). ``vocab``: the model's own vocabulary when
        ``hf_config`` is a padded copy (:mod:`bigtrain.vocab`): rows from ``vocab`` on are zeros.
        ``quantize`` (model.quantize, stage 3 only): the decoder layers' linear weights are stored
        quantized (int8 or nf4) once the partitions are filled (``gather.LayerGatherer``); ``quantize_summary`` then
        holds the line that reports their error."""
        torch_dtype = DTYPES[dtype]
        if hf_config is None:
            hf_config = tf.AutoConfig.from_pretrained(path)
        padded = int(hf_config.vocab_size)
        vocab = vocab or padded
        if self.stage == 0:
            if path is not None:
                model = tf.AutoModelForCausalLM.from_pretrained(
                    path, dtype=torch_dtype, attn_implementation=attn_implementation)
                if padded != vocab:
                    model.resize_token_embeddings(padded, mean_resizing=False)
            else:
                model = tf.AutoModelForCausalLM.from_config(
                    hf_config, dtype=torch_dtype, attn_implementation=attn_implementation)
            with torch.no_grad():
                for p in V.vocab_parameters(model, padded).values():
                    p[vocab:] = 0
            model.to(self.info.device)
        else:
            ds = self.build_ds_config(torch_dtype, C.largest_layer_numel(hf_config))
            # one decoder layer at a time: built (random) or read from ``path``, partitioned, and
            # with ``quantize`` quantized before the next layer exists (build.build_streamed)
            after = (lambda layer: quantize_layer(layer, quantize, self.info.device)) if quantize else None

            def open_loader(skeleton):  # the checkpoint's slices, read a layer at a time
                rows = V.vocab_parameters(skeleton, padded) if padded != vocab else {}
                return PartitionLoader(skeleton, path, self.info.rank, short_rows=set(rows))

            model, self._ds_hf_config = B.build_streamed(
                hf_config, torch_dtype, attn_implementation, ds, self.info.device,
                loader=open_loader if path is not None else None, after_layer=after, group=self._base_group)
            if path is None and padded != vocab:
                for p in V.vocab_parameters(model, padded).values():
                    B.zero_from_row(p, vocab)
            self._offload, self._single_rank_plain = G.install_offload(
                model, ds, self.zero, self.info, self.ds_config_notes, quantize)
            self.quantize = quantize
            self.quantize_summary = getattr(self._offload, "summary", None) if quantize else None
        model.requires_grad_(False)
        frozen_linear.install(model)  # no gathered weight kept alive by autograd until backward
        model.eval()  # no dropout in the frozen base; LoRA dropout is the adapters' own
        return model

    @property
    def persistence_threshold(self) -> int:
        """The effective stage3_param_persistence_threshold (a user DeepSpeed config may set it)."""
        if self.ds_config is not None:
            return int(self.ds_config["zero_optimization"].get("stage3_param_persistence_threshold",
                                                               self.zero.persistence_threshold))
        return self.zero.persistence_threshold

    @property
    def hpz_size(self) -> int:
        """zero_hpz_partition_size of the DeepSpeed config in use (1: no hierarchical partitioning)."""
        if self.stage != 3 or self.ds_config is None:
            return 1
        return int(self.ds_config["zero_optimization"].get("zero_hpz_partition_size", 1) or 1)

    def after_backward(self) -> None:
        """Return every ZeRO-3 parameter gathered for this step to its partition."""
        G.release_backward_leftovers(self._offload)

    # -- gathering (merge, export, tests) --------------------------------------------------------
    def gather(self, params, modify: bool = False):
        """Context in which ``params`` are whole on every rank; with ``modify``, changes made on
        rank 0 are written back to the partitions. A no-op at stage 0."""
        if self.quantize is not None:
            raise RuntimeError(f"model.quantize={self.quantize}: the base's linear weights are quantized partitions "
                               f"that whole-parameter gathers (merge, export) cannot read; merge offline with "
                               f"bigtrain merge CKPT OUT (into the unquantized base, read from disk) or "
                               f"bigtrain merge --into-quantized CKPT OUT (into the base as trained)")
        if self.stage == 0 or self._single_rank_plain:  # whole tensors already (aliased partitions)
            return contextlib.nullcontext()
        return G.gather(params, modify)

    def full_tensor(self, p: torch.Tensor) -> torch.Tensor:
        """A CPU copy of the whole parameter."""
        with self.gather(p):
            return p.detach().to("cpu", copy=True)

    # -- per-rank storage ------------------------------------------------------------------------
    local_param_bytes = staticmethod(B.local_param_bytes)

    # -- collectives on replicated tensors -------------------------------------------------------
    @property
    def distributed(self) -> bool:
        return self.info.distributed

    def broadcast_(self, tensors: Iterable[torch.Tensor], src: int = 0) -> None:
        """Make ``tensors`` identical on every rank (rank ``src``'s values), flattened into one call."""
        D.broadcast_(self.info, tensors, src)

    def all_reduce_sum_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Sum ``tensors`` over ranks in place with one flat all-reduce (fp32)."""
        D.all_reduce_sum_(self.info, tensors)

    def all_reduce_scalars(self, values: list[float], op: str = "sum") -> list[float]:
        return D.all_reduce_scalars(self.info, values, op)

    def all_gather_objects(self, obj) -> list:
        return D.all_gather_objects(self.info, obj)

    def replica_digests(self, tensors: Iterable[torch.Tensor]) -> list[str]:
        """sha256 of the bytes of ``tensors`` on every rank (rank order): equal digests prove the
        replicated adapters (or their optimizer state) are bit-identical across ranks."""
        return D.replica_digests(self.info, tensors)

    def barrier(self) -> None:
        D.barrier(self.info)
