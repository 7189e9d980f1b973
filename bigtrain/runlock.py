"""One run per output folder, and no worker outliving its launcher.

``RunLock`` is an exclusive ``flock`` on ``<train.output_dir>/.bigtrain.lock``, taken by rank 0 before
the run writes anything there and held until the process ends. The kernel drops it when the
process dies, however it dies (kill -9 included), so a lock is never stale; the file itself only
records who holds it (pid, host, start time, command) for the message a second run prints. On NFS
(v4, or v3 with lockd) flock is carried by the server's byte-range locks.

Before, a second ``bigtrain train`` into a live run's folder resumed from that run's newest
checkpoint, wrote step directories beside it and died on a save; two started 2 s apart interleaved
``train_log.jsonl``.

``die_with_parent``: torchrun starts its workers in a session of their own (``setsid``), so a
``kill -9`` of torchrun left them training and writing checkpoints. Under a launcher each rank asks
the kernel for SIGTERM when its parent dies (``prctl(PR_SET_PDEATHSIG)``): the run then saves at the
next step boundary and stops, as on a preemption.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

LOCK_NAME = ".bigtrain.lock"
_PR_SET_PDEATHSIG = 1


class RunLocked(Exception):
    """Another live process holds the output folder's lock; the message names it."""


class RunLock:
    """The exclusive lock of one output folder (module doc). ``acquire`` raises :class:`RunLocked`
    naming the holder when another process has it."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self, key: str = "train.output_dir") -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunLocked(f"{key}={self.path.parent} is in use by another run ({holder}): wait for it to "
                            f"end or stop it, or choose another {key}") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                 "command": " ".join(sys.argv)[:160]}).encode())
        os.fsync(fd)
        self._fd = fd  # held (open) until the process ends: the kernel drops the flock then


def _read_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        d = json.loads(os.read(fd, 4096).decode() or "{}")
        return f"pid {d['pid']} on host {d['host']}, started {d['started']}: {d['command']}"
    except (OSError, ValueError, KeyError):
        return "its lock file names no process"


def die_with_parent() -> bool:
    """Under a launcher (LOCAL_RANK set: torchrun, the deepspeed launcher, srun through bigtrain's
    scripts), SIGTERM this process when its parent dies (Linux ``PR_SET_PDEATHSIG``). Returns
    whether it was set. If the parent is already gone (re-parented), SIGTERM at once."""
    if "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() == 1:  # the launcher died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)
    return True
