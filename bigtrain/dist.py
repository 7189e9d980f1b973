"""The process group of a run, and the collectives bigtrain runs on replicated tensors.

This module owns:

* finding out who this process is (rank, world size, local rank) from the launcher's environment
  (torchrun, the deepspeed launcher, Slurm's ``srun``), and picking its device;
* starting the process group (through DeepSpeed's ``init_distributed`` at ZeRO stage 3, without
  its shared-memory op's build, ``no_shm_comm_build``; through ``torch.distributed`` otherwise) and
  destroying it (``unlink_deepspeed_shm``: the shared-memory buffers DeepSpeed's comm layer leaves);
* the collectives on tensors that are identical on every rank (the LoRA adapters, their gradients,
  loss and token counts): each is a single flat call, and each is a no-op at world size 1;
* leaving a process that ran a process group without the interpreter's finalisation.

Nothing here knows about ZeRO-3 partitions (``bigtrain/engine/``, which imports this module) or
checkpoints (``loader.py``). DeepSpeed is not imported at module level: importing it is slow, and
stage 0 runs never need it.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import importlib
import logging
import os
import socket
import sys
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as dist

from .config import ConfigError


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


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


def node_key() -> tuple[str, str]:
    """What tells this process's node from the others: the host name, and the launcher's node index
    (Slurm's node name, torchrun's GROUP_RANK, the deepspeed launcher's CROSS_RANK), which also tells
    apart nodes emulated on one host."""
    index = next((os.environ[n] for n in ("SLURMD_NODENAME", "GROUP_RANK", "CROSS_RANK", "SLURM_NODEID")
                  if os.environ.get(n, "") != ""), "")
    return socket.gethostname(), index


def new_groups(groups: Iterable[Iterable[int]], rank: int, timeout_s: int):
    """Make a process group for each of ``groups`` (every rank makes every group, in the same order,
    as torch.distributed requires) and return the one holding ``rank``."""
    mine = None
    for g in groups:
        g = list(g)
        pg = dist.new_group(ranks=g, timeout=datetime.timedelta(seconds=timeout_s))
        if rank in g:
            mine = pg
    return mine


def wants_cuda(device: str) -> bool:
    """train.device: 'cuda', or 'auto' with a GPU visible (the engine then fails clearly if
    'cuda' was asked for and none is)."""
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


# -- the process group --------------------------------------------------------------------------
def init_distributed(device_pref: str, backend: str, timeout_s: float, stage: int) -> DistInfo:
    """Pick this rank's device and, for several ranks or ZeRO stage 3 (which needs a process group
    even alone), start the process group unless one is already running (it is then reused)."""
    rank, world, local_rank = detect_world()
    if wants_cuda(device_pref):
        if not torch.cuda.is_available():
            raise ConfigError("train.device: 'cuda' requested but no CUDA device is visible")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if world > 1 or stage == 3:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            if world > 1:
                raise ConfigError("MASTER_PORT is not set: start multi-process runs with torchrun, "
                                  "the deepspeed launcher or the scripts in slurm/")
            os.environ["MASTER_PORT"] = str(_free_port())
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank))
        timeout = datetime.timedelta(seconds=timeout_s)
        if not dist.is_initialized():
            if stage == 3:
                # Imported here, not at module level: DeepSpeed takes seconds to import and only
                # ZeRO-3 runs use it. Its init_distributed (rather than torch's) also sets up
                # DeepSpeed's own comm layer, which zero.Init and DeepSpeedZeRoOffload go through.
                import deepspeed

                with no_shm_comm_build():  # a stale build lock would hang every later start
                    deepspeed.init_distributed(dist_backend=backend, timeout=timeout,
                                               rank=rank, world_size=world, verbose=False)
            else:
                dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                        timeout=timeout)
    return DistInfo(rank, world, local_rank, device)


@contextlib.contextmanager
def no_shm_comm_build():
    """Start DeepSpeed's comm layer without its shared-memory all-reduce op.

    ``deepspeed.init_distributed`` JIT-builds (or loads) the ``deepspeed_shm_comm`` C++ op on CPU at
    every start, under a file lock in torch's extensions cache (``~/.cache/torch_extensions``, or
    ``$TORCH_EXTENSIONS_DIR``). A process killed while it holds the lock (6-10 ms normally, 30-40 s
    when the op is rebuilt) leaves the lock file behind, and every later start by that user then
    waits on it forever, silently. bigtrain never uses the op: it serves DeepSpeed's inference
    all-reduce, while training's collectives (bigtrain's and ZeRO-3's) go through torch.distributed.
    So the build is skipped, and no lock is ever taken."""
    # by module path: ``import deepspeed.comm.torch as m`` binds deepspeed.comm's attribute ``torch``,
    # which is torch itself
    ds_comm = importlib.import_module("deepspeed.comm.torch")
    build = ds_comm.build_shm_op
    ds_comm.build_shm_op = lambda: None
    try:
        yield
    finally:
        ds_comm.build_shm_op = build


def quiesce(info: DistInfo) -> None:
    """Before tear-down: no rank leaves while another still has a collective in flight
    (destroying a gloo group under pending work aborts the process)."""
    if dist.is_initialized() and info.distributed:
        dist.barrier()


def destroy_process_group() -> tuple[int, int] | None:
    """Destroy the process group if one is running; return the (rank, world size) it had."""
    if not dist.is_initialized():
        return None
    rank, world = dist.get_rank(), dist.get_world_size()
    dist.destroy_process_group()
    return rank, world


def unlink_deepspeed_shm(rank: int, world: int, addr: str | None = None, port: str | int | None = None) -> None:
    """Remove this rank's DeepSpeed shared-memory all-reduce buffer, which DeepSpeed never does.

    On CPU, when every rank is on one host and the launcher sets LOCAL_SIZE (the ``deepspeed``
    launcher does), DeepSpeed's comm backend creates a 66 MiB POSIX shared-memory segment per rank
    (``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``) and never unlinks it:
    each such run leaked 132 MiB of RAM on tmpfs until reboot. Peers have it mapped, not open by
    name, so unlinking after the process group is gone is safe. A run killed before this point
    still leaves its segments behind (nothing in-process can help that), unless another process
    unlinks them by the run's rendezvous ``addr`` and ``port``, as ``bigtrain measure`` does after
    each mode's child, however it ended."""
    if os.environ.get("LOCAL_SIZE") != str(world):
        return
    addr = os.environ.get("MASTER_ADDR", "") if addr is None else addr
    port = os.environ.get("MASTER_PORT", "") if port is None else port
    name = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"
    with contextlib.suppress(OSError):
        os.unlink(name)


# -- collectives on replicated tensors ----------------------------------------------------------
def broadcast_(info: DistInfo, tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Make ``tensors`` identical on every rank (rank ``src``'s values), flattened into one call."""
    if not info.distributed:
        return
    tensors = list(tensors)
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    dist.broadcast(flat, src)
    _unflatten_into(flat, tensors)


def all_reduce_sum_(info: DistInfo, tensors: Iterable[torch.Tensor]) -> None:
    """Sum ``tensors`` over ranks in place with one flat all-reduce (fp32)."""
    if not info.distributed:
        return
    tensors = list(tensors)
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    _unflatten_into(flat, tensors)


def _unflatten_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    off = 0
    with torch.no_grad():
        for t in tensors:
            n = t.numel()
            t.copy_(flat[off:off + n].view_as(t))
            off += n


def all_reduce_scalars(info: DistInfo, values: list[float], op: str = "sum") -> list[float]:
    if not info.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device(info))
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                           "min": dist.ReduceOp.MIN}[op])
    return t.tolist()


def all_gather_objects(info: DistInfo, obj) -> list:
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def replica_digests(info: DistInfo, tensors: Iterable[torch.Tensor]) -> list[str]:
    """sha256 of the bytes of ``tensors`` on every rank (rank order): equal digests prove the
    replicated adapters (or their optimizer state) are bit-identical across ranks."""

    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return all_gather_objects(info, h.hexdigest())


def _comm_device(info: DistInfo) -> torch.device:
    return info.device if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def exit_after_teardown(code: int = 0) -> None:
    """End a process that ran a process group, skipping the interpreter's finalisation.

    After ``Engine.close()`` the process group is destroyed, but its C++ objects can outlive it:
    every ZeRO-3 parameter keeps a reference to its group (``ds_process_group``), and a
    ``transformers`` model is freed only by the garbage collector, i.e. during finalisation. Gloo's
    worker threads then get torn down while the interpreter is half gone, which rarely but really
    aborts the process (SIGABRT, "terminate called without an active exception"; seen twice in
    this project's CI under load; pytorch/pytorch#179291 describes the mechanism). Every output
    is already closed and fsynced by then, so flush what is left and leave with ``os._exit``."""

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()
    os._exit(code)
