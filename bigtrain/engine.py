"""The only module that touches DeepSpeed: a ZeRO-3-partitioned frozen base, replicated adapters.

Design (REFERENCE §4):

* The frozen base is built under ``deepspeed.zero.Init`` (through ``HfDeepSpeedConfig``, which makes
  ``transformers`` initialise weights on the full tensors before partitioning them), so no rank ever
  holds the whole model. A local checkpoint is then read *partition by partition*: each rank reads
  from the safetensors files only the byte range of each tensor that it owns.
* ``DeepSpeedZeRoOffload`` alone (not ``deepspeed.initialize``) installs ZeRO-3's fetch/release hooks
  on the base. It needs no optimizer: backward is a plain ``loss.backward()``. Frozen parameters get no
  gradient, no fp32 master and no Adam state.
* The adapters are never handed to DeepSpeed. They are ordinary tensors, identical on every rank:
  broadcast once from rank 0, their gradients summed with one flat all-reduce per optimizer step,
  then stepped by a local torch AdamW. ZeRO-3 would otherwise partition them and their Adam state and
  re-gather them after every step (it has no per-module opt-out, DeepSpeed #7271).
* ``zero.stage=0`` keeps the whole base on every rank with plain PyTorch (no DeepSpeed import): the
  reference the ZeRO-3 path is tested against. Both run the same training loop.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from . import frozen_linear
from .config import ConfigError, ZeroConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Keys of the DeepSpeed config that bigtrain owns and fills in (a user file's values are replaced,
# and the replacement is reported).
OWNED_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
              "bf16", "fp16", "zero_optimization.stage")


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(*names: str, default: int) -> int:
    for n in names:
        if os.environ.get(n, "") != "":
            return int(os.environ[n])
    return default


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def detect_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun / deepspeed launcher variables, else Slurm's
    (one task per process started by ``srun``), else a single process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                _env_int("LOCAL_RANK", default=0))
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        return (int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"]),
                _env_int("SLURM_LOCALID", default=0))
    return 0, 1, 0


def read_user_ds_config(zero: ZeroConfig) -> dict:
    """The user's DeepSpeed JSON (``zero.ds_config``), or {}; errors name the file and line."""
    if not zero.ds_config:
        return {}
    try:
        user = json.loads(Path(zero.ds_config).read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"zero.ds_config: {zero.ds_config} is not valid JSON "
                          f"(line {e.lineno}): {e.msg}") from None
    zo = user.get("zero_optimization", {})
    if zo.get("stage", 3) != 3:
        raise ConfigError(f"zero.ds_config: {zero.ds_config} sets zero_optimization.stage="
                          f"{zo.get('stage')}; bigtrain partitions the frozen base with stage 3")
    return user


def _wants_cuda(device: str) -> bool:
    """train.device: 'cuda', or 'auto' with a GPU visible (the engine then fails clearly if
    'cuda' was asked for and none is)."""
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def check_world(zero: ZeroConfig, device: str = "auto") -> None:
    """Refuse, before any process group starts, a world size or device the configuration cannot use."""
    _, world, _ = detect_world()
    zo = read_user_ds_config(zero).get("zero_optimization", {})
    if zero.stage == 3 and zo.get("zero_quantized_nontrainable_weights") and not _wants_cuda(device):
        raise ConfigError(f"zero.ds_config: zero_quantized_nontrainable_weights (in {zero.ds_config}) "
                          f"needs GPUs: DeepSpeed's quantizer has no CPU kernel; use ds_configs/zero3.json "
                          f"on CPU")
    hpz = zo.get("zero_hpz_partition_size", 1)
    if zero.stage == 3 and hpz > 1 and world % hpz:
        raise ConfigError(f"zero.ds_config: zero_hpz_partition_size={hpz} (in {zero.ds_config}) does not "
                          f"divide the world size {world}; set it to the GPUs per node")


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
        self.ds_config: dict | None = None
        self.ds_config_notes: list[str] = []
        self.info = self._init_distributed(device)

    # -- process group ---------------------------------------------------------------------------
    def _init_distributed(self, device_pref: str) -> DistInfo:
        rank, world, local_rank = detect_world()
        if _wants_cuda(device_pref):
            if not torch.cuda.is_available():
                raise ConfigError("train.device: 'cuda' requested but no CUDA device is visible")
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
        backend = self.zero.backend
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        if world > 1 or self.stage == 3:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            if "MASTER_PORT" not in os.environ:
                if world > 1:
                    raise ConfigError("MASTER_PORT is not set: start multi-process runs with torchrun, "
                                      "the deepspeed launcher or the scripts in slurm/")
                os.environ["MASTER_PORT"] = str(_free_port())
            os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank))
            timeout = datetime.timedelta(seconds=self.zero.timeout_s)
            if not dist.is_initialized():
                if self.stage == 3:
                    import deepspeed

                    deepspeed.init_distributed(dist_backend=backend, timeout=timeout,
                                               rank=rank, world_size=world, verbose=False)
                else:
                    dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                            timeout=timeout)
        return DistInfo(rank, world, local_rank, device)

    def close(self) -> None:
        """Tear down in order: no rank leaves while another still has a collective in flight
        (destroying a gloo group under pending work aborts the process)."""
        if dist.is_initialized() and self.distributed:
            dist.barrier()
        if self._offload is not None:
            self._offload.destroy()
            self._offload = None
        if dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
            dist.destroy_process_group()
            _unlink_deepspeed_shm(rank, world)

    # -- DeepSpeed config ------------------------------------------------------------------------
    def build_ds_config(self, base_dtype: torch.dtype, layer_numel: int | None = None) -> dict:
        """Defaults (fetch sizes from the model's largest decoder layer, ``layer_numel`` elements) <-
        the user's JSON (zero.ds_config) <- the keys bigtrain owns."""
        # memory_efficient_linear=False: otherwise zero.Init replaces torch.nn.functional.linear,
        # process-wide and for good, with DeepSpeed's LinearFunctionForZeroStage3, which saves every
        # linear layer's input for backward even when the weight is frozen (measured on an H200:
        # +7.6 GiB at GPT-3 2.7B, micro-batch 4, no checkpointing). torch's own linear saves only
        # what the input gradient needs, and computes the same values.
        ds: dict = {"zero_optimization": {"stage": 3,
                                          "stage3_param_persistence_threshold": self.zero.persistence_threshold,
                                          "memory_efficient_linear": False,
                                          **fetch_sizes(layer_numel)}}
        notes = []
        if self.zero.ds_config:
            user = read_user_ds_config(self.zero)
            zo = user.get("zero_optimization", {})
            ds.update({k: v for k, v in user.items() if k != "zero_optimization"})
            ds["zero_optimization"].update(zo)
            t = zo.get("stage3_param_persistence_threshold")
            if t is not None and t != self.zero.persistence_threshold:
                notes.append(f"stage3_param_persistence_threshold: {t!r} from {self.zero.ds_config} is "
                             f"used; zero.persistence_threshold={self.zero.persistence_threshold} is not")
            if "optimizer" in user or "scheduler" in user:
                notes.append("optimizer/scheduler in the DeepSpeed config are ignored: the adapters "
                             "are stepped by bigtrain's AdamW (train.lr, train.schedule)")
        owned = {"train_micro_batch_size_per_gpu": self.micro_batch_size,
                 "gradient_accumulation_steps": self.grad_accum,
                 "train_batch_size": self.micro_batch_size * self.grad_accum * self.info.world_size,
                 "bf16": {"enabled": base_dtype == torch.bfloat16},
                 "fp16": {"enabled": base_dtype == torch.float16}}
        for k, v in owned.items():
            if k in ds and ds[k] != v:
                notes.append(f"{k}: {ds[k]!r} in {self.zero.ds_config} replaced by {v!r} (from bigtrain's config)")
            ds[k] = v
        ds["zero_optimization"]["stage"] = 3
        self.ds_config, self.ds_config_notes = ds, notes
        return ds

    # -- the frozen base -------------------------------------------------------------------------
    def build_base(self, hf_config=None, path: str | None = None, dtype: str = "float32",
                   attn_implementation: str = "sdpa") -> nn.Module:
        """The causal LM, frozen, on this rank's device: whole (stage 0) or partitioned (stage 3).
        From ``hf_config`` (random init) or from a local checkpoint directory ``path`` (whose config
        is read here unless the caller already passes it)."""
        import transformers as tf

        torch_dtype = DTYPES[dtype]
        if hf_config is None:
            hf_config = tf.AutoConfig.from_pretrained(path)
        if self.stage == 0:
            if path is not None:
                model = tf.AutoModelForCausalLM.from_pretrained(
                    path, dtype=torch_dtype, attn_implementation=attn_implementation)
            else:
                model = tf.AutoModelForCausalLM.from_config(
                    hf_config, dtype=torch_dtype, attn_implementation=attn_implementation)
            model.to(self.info.device)
        else:
            from transformers.integrations import HfDeepSpeedConfig

            ds = self.build_ds_config(torch_dtype, largest_layer_numel(hf_config))
            self._ds_hf_config = HfDeepSpeedConfig(ds)  # before from_config: zero.Init + proper init
            model = tf.AutoModelForCausalLM.from_config(
                hf_config, dtype=torch_dtype, attn_implementation=attn_implementation)
            if path is not None:
                load_partitions(model, path, self.info.rank)
            self._install_offload(model, ds)
        model.requires_grad_(False)
        frozen_linear.install(model)  # no gathered weight kept alive by autograd until backward
        model.eval()  # no dropout in the frozen base; LoRA dropout is the adapters' own
        return model

    def _install_offload(self, model: nn.Module, ds: dict) -> None:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
        from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload
        from deepspeed.utils import groups

        zc = DeepSpeedZeroConfig(**ds["zero_optimization"])
        if self.zero.single_rank_plain and self.info.world_size == 1 and zc.zero_hpz_partition_size <= 1:
            # One rank: every partition is a whole tensor, there is nothing to gather. Alias them and
            # run the module with no ZeRO-3 hooks at all (same values, same memory: one copy).
            params = {id(p): p for p in model.parameters()}
            if self._alias_unsharded(model, persistent_only=False) == len(params):
                self._single_rank_plain = True
                self.ds_config_notes.append("world size 1: ZeRO-3 partitions are whole tensors; "
                                            "running the base without ZeRO-3 hooks (zero.single_rank_plain)")
                return
        if self.zero.leaf_blocks:
            from deepspeed.utils import set_z3_leaf_modules

            classes = decoder_layer_classes(model)
            if classes:
                set_z3_leaf_modules(model, classes)
        param_group = None
        if zc.zero_hpz_partition_size > 1:
            # zero.Init (run by transformers under HfDeepSpeedConfig) has usually created the hpZ
            # group already; creating it twice is an assertion error inside DeepSpeed
            if groups._get_zero_param_intra_parallel_group() is None:
                groups._create_zero_param_parallel_group(zc.zero_hpz_partition_size)
            param_group = groups._get_zero_param_intra_parallel_group()
        self._offload = DeepSpeedZeRoOffload(
            model, timers=None, ds_config=ds, overlap_comm=zc.overlap_comm,
            prefetch_bucket_size=zc.prefetch_bucket_size, max_reuse_distance=zc.max_reuse_distance,
            max_live_parameters=zc.max_live_parameters,
            param_persistence_threshold=zc.param_persistence_threshold,
            model_persistence_threshold=zc.model_persistence_threshold,
            offload_param_config=zc.offload_param, zero_param_parallel_group=param_group,
            zero_quantized_weights=zc.zero_quantized_weights,
            zero_quantized_nontrainable_weights=zc.zero_quantized_nontrainable_weights,
            zero_module_granularity_threshold=zc.module_granularity_threshold)
        self._alias_unsharded(model, persistent_only=True)

    def _alias_unsharded(self, model: nn.Module, persistent_only: bool) -> int:
        """Where a parameter's partition group has one rank (world size 1), its partition *is* the
        whole tensor: point ``param.data`` at the partition and mark it available, so it is never
        gathered (no copy, no hook work) and holds no second full copy. Values are unchanged; a later
        ``GatheredParameters`` or partition still works (it only drops the view). Offloaded or
        quantized partitions are left alone. With ``persistent_only`` only parameters DeepSpeed keeps
        gathered anyway (ds_persist). Returns the number of parameters aliased."""
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        n = 0
        for p in model.parameters():
            t = getattr(p, "ds_tensor", None)
            if t is None or (persistent_only and not getattr(p, "ds_persist", False)):
                continue
            group = getattr(p, "ds_process_group", None)
            if (dist.get_world_size(group=group) if dist.is_initialized() else 1) != 1:
                continue
            if t.numel() < p.ds_numel or t.dtype != p.dtype or t.device.type != self.info.device.type:
                continue
            p.data = t.data.view(-1).narrow(0, 0, p.ds_numel).view(p.ds_shape)
            p.ds_status = ZeroParamStatus.AVAILABLE
            n += 1
        return n

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
        if self._offload is not None:
            self._offload.release_backward_leftovers()

    # -- gathering (merge, export, tests) --------------------------------------------------------
    def gather(self, params, modify: bool = False):
        """Context in which ``params`` are whole on every rank; with ``modify``, changes made on
        rank 0 are written back to the partitions. A no-op at stage 0."""
        if self.stage == 0 or self._single_rank_plain:  # whole tensors already (aliased partitions)
            return contextlib.nullcontext()
        import deepspeed

        params = [params] if isinstance(params, torch.Tensor) else list(params)
        return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)

    def full_tensor(self, p: torch.Tensor) -> torch.Tensor:
        """A CPU copy of the whole parameter."""
        with self.gather(p):
            return p.detach().to("cpu", copy=True)

    # -- per-rank storage ------------------------------------------------------------------------
    @staticmethod
    def local_param_bytes(model: nn.Module) -> int:
        """Bytes of base-parameter storage held by this rank (the partition under ZeRO-3; the whole
        tensor too while a parameter is gathered, as persistent ones stay)."""
        total, seen = 0, set()
        for p in model.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if hasattr(p, "ds_tensor"):  # the partition, plus the whole tensor while gathered/persistent
                whole = p.data.numel() if p.data.data_ptr() != p.ds_tensor.data_ptr() else 0  # aliased: one copy
                total += (p.ds_tensor.numel() + whole) * p.ds_tensor.element_size()
                sec = getattr(p, "ds_secondary_tensor", None)  # hpZ: the partition within the node
                if sec is not None:
                    total += sec.numel() * sec.element_size()
            else:
                total += p.numel() * p.element_size()
        return total

    # -- collectives on replicated tensors -------------------------------------------------------
    @property
    def distributed(self) -> bool:
        return self.info.world_size > 1

    def broadcast_(self, tensors: Iterable[torch.Tensor], src: int = 0) -> None:
        """Make ``tensors`` identical on every rank (rank ``src``'s values), flattened into one call."""
        if not self.distributed:
            return
        tensors = list(tensors)
        flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
        dist.broadcast(flat, src)
        self._unflatten_into(flat, tensors)

    def all_reduce_sum_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Sum ``tensors`` over ranks in place with one flat all-reduce (fp32)."""
        if not self.distributed:
            return
        tensors = list(tensors)
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        self._unflatten_into(flat, tensors)

    @staticmethod
    def _unflatten_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
        off = 0
        with torch.no_grad():
            for t in tensors:
                n = t.numel()
                t.copy_(flat[off:off + n].view_as(t))
                off += n

    def all_reduce_scalars(self, values: list[float], op: str = "sum") -> list[float]:
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                               "min": dist.ReduceOp.MIN}[op])
        return t.tolist()

    def all_gather_objects(self, obj) -> list:
        if not self.distributed:
            return [obj]
        out = [None] * self.info.world_size
        dist.all_gather_object(out, obj)
        return out

    def replica_digests(self, tensors: Iterable[torch.Tensor]) -> list[str]:
        """sha256 of the bytes of ``tensors`` on every rank (rank order): equal digests prove the
        replicated adapters (or their optimizer state) are bit-identical across ranks."""
        import hashlib

        h = hashlib.sha256()
        for t in tensors:
            h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return self.all_gather_objects(h.hexdigest())

    def _comm_device(self) -> torch.device:
        return self.info.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def largest_layer_numel(hf_config) -> int | None:
    """Elements of the model's largest decoder layer, from its shapes alone (a meta-device build)."""
    from .presets import meta_model

    meta = meta_model(hf_config)
    classes = tuple(decoder_layer_classes(meta))
    sizes = [sum(p.numel() for p in m.parameters()) for m in meta.modules() if classes and isinstance(m, classes)]
    return max(sizes) if sizes else None


def fetch_sizes(layer_numel: int | None) -> dict:
    """ZeRO-3's fetch and release sizes, in elements, from the size of one decoder layer (whole
    layers are the fetch unit, ``zero.leaf_blocks``). DeepSpeed's fixed defaults fit no model:
    * ``stage3_prefetch_bucket_size`` (default 5e7) is below one layer of GPT-3 2.7B (79M) or 6.7B
      (201M), so the next layer was never fetched ahead. One layer: the next layer's all-gather runs
      while this one computes.
    * ``stage3_max_reuse_distance`` (default 1e9): a parameter used again within that many elements
      is not released. Counted in elements of the modules ahead, 1e9 kept the last ~5 layers of 6.7B
      (~12 of 2.7B, all of a small model) gathered from forward into backward. One layer keeps only
      the layer where forward turns into backward.
    * ``stage3_max_live_parameters`` (default 1e9) caps what prefetch may hold; at GPT-3 175B one
      layer is 1.8e9 elements, so prefetch would stop working. Three layers: the one computing, the
      one arriving, and the one being released.
    A user's zero.ds_config overrides any of these."""
    if not layer_numel:
        return {}
    return {"stage3_prefetch_bucket_size": layer_numel, "stage3_max_reuse_distance": layer_numel,
            "stage3_max_live_parameters": 3 * layer_numel}


def decoder_layer_classes(model: nn.Module) -> list[type]:
    """The transformer-block classes of a ``transformers`` model (its ``_no_split_modules``)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    seen: dict[str, type] = {}
    for m in model.modules():
        if type(m).__name__ in names:
            seen[type(m).__name__] = type(m)
    return list(seen.values())


def _unlink_deepspeed_shm(rank: int, world: int) -> None:
    """Remove this rank's DeepSpeed shared-memory all-reduce buffer, which DeepSpeed never does.

    On CPU, when every rank is on one host and the launcher sets LOCAL_SIZE (the ``deepspeed``
    launcher does), DeepSpeed's comm backend creates a 66 MiB POSIX shared-memory segment per rank
    (``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``) and never unlinks it:
    each such run leaked 132 MiB of RAM on tmpfs until reboot. Peers have it mapped, not open by
    name, so unlinking after the process group is gone is safe. A run killed before this point
    still leaves its segments behind (nothing in-process can help that)."""
    if os.environ.get("LOCAL_SIZE") != str(world):
        return
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    with contextlib.suppress(OSError):
        os.unlink(name)


def exit_after_teardown(code: int = 0) -> None:
    """End a process that ran a process group, skipping the interpreter's finalisation.

    After ``Engine.close()`` the process group is destroyed, but its C++ objects can outlive it:
    every ZeRO-3 parameter keeps a reference to its group (``ds_process_group``), and a
    ``transformers`` model is freed only by the garbage collector, i.e. during finalisation. Gloo's
    worker threads then get torn down while the interpreter is half gone, which rarely but really
    aborts the process (SIGABRT, "terminate called without an active exception"; seen twice in
    this project's CI under load; pytorch/pytorch#179291 describes the mechanism). Every output
    is already closed and fsynced by then, so flush what is left and leave with ``os._exit``."""
    import logging
    import sys

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()
    os._exit(code)


# ---------------------------------------------------------------------------------------------
# Reading a checkpoint straight into ZeRO-3 partitions.


def checkpoint_files(path: str | os.PathLike) -> dict[str, Path]:
    """tensor name -> safetensors file of a local HF checkpoint (single file or sharded with an
    index). Errors name the directory and what is missing."""
    d = Path(path)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e})") from None
        return {k: d / f for k, f in weight_map.items()}
    single = d / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), "pt") as f:
            return {k: single for k in f.keys()}
    raise FileNotFoundError(f"{d}: no model.safetensors or model.safetensors.index.json "
                            "(bigtrain loads safetensors checkpoints only; convert .bin with save_pretrained)")


def _resolve_key(name: str, available: dict) -> str | None:
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
def load_partitions(model: nn.Module, path: str | os.PathLike, rank: int) -> int:
    """Fill each ZeRO-3 parameter's local partition from the checkpoint at ``path``, reading only
    the rows of each tensor that cover this rank's slice of the flattened tensor. Returns the number
    of elements read. Tied parameters appear once in ``named_parameters`` and are loaded once."""
    from safetensors import safe_open

    files = checkpoint_files(path)
    handles: dict[Path, object] = {}
    read = 0
    with contextlib.ExitStack() as stack:
        for name, p in model.named_parameters():
            key = _resolve_key(name, files)
            if key is None:
                raise KeyError(f"{path}: parameter {name!r} is not in the checkpoint")
            f = files[key]
            if f not in handles:
                handles[f] = stack.enter_context(safe_open(str(f), "pt"))
            sl = handles[f].get_slice(key)
            shape = tuple(sl.get_shape())
            want = tuple(p.ds_shape)
            if shape != want:
                raise ValueError(f"{f.name}: tensor {key!r} has shape {shape}, the model expects {want}")
            prank = dist.get_rank(group=p.ds_process_group) if dist.is_initialized() else rank
            read += _fill_slice(p.ds_tensor, sl, shape, p.ds_numel, prank)
            # hpZ: the secondary partition (this rank's slice within its node's group) was cut by
            # zero.Init from the *initial* weights; DeepSpeed gathers from it, so it must hold the
            # checkpoint too (else every forward would see random weights). Same read, other slice.
            sec = getattr(p, "ds_secondary_tensor", None)
            if sec is not None:
                srank = dist.get_rank(group=p.ds_zero_param_process_group)
                read += _fill_slice(sec, sl, shape, p.ds_numel, srank)
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
