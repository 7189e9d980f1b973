"""Test-only fault injection: the one seam where the tests make a run fail on purpose.

Driven by environment variables that normal runs never set (then every check is a no-op):

* ``BIGTRAIN_FAULT_NAN="STEP:RANK[,STEP:RANK]"``: poison that rank's loss the first time optimizer
  step STEP is attempted (a skipped step is retried on the next batch, which is then clean);
  see :func:`nan_due`.
* ``BIGTRAIN_CRASH_AT=<point>`` (and ``BIGTRAIN_CRASH_AT_STEP=<step>``, if set): die at that point
  of a checkpoint save as abruptly as kill -9 would (exit status 137); see :func:`crash_point`.
* ``BIGTRAIN_FAULT_MEM_CAP_RANKS="R[,R]"``: ``bigtrain measure --mem-cap-gib`` caps only these
  ranks, so that one rank runs out of memory while the others wait in a collective; see
  :func:`mem_cap_applies`.
* ``BIGTRAIN_FAULT_HANG="STEP:RANK"``: ``bigtrain measure``'s full fine-tuning child of that rank
  stops at the start of step STEP and never returns, as a rank stuck in a collective whose peer
  died (NCCL) would; see :func:`hang_due`.
* ``BIGTRAIN_FAULT_ENOSPC=<path suffix>``: a checkpoint save's write of a file whose path ends
  with it (``optimizer.safetensors``, ``.tmp-step-00000004/optimizer.safetensors``) fails with
  ENOSPC ("No space left on device"), as on a full disk; see :func:`disk_full`.

tests/test_faults.py, tests/test_checkpoint.py and tests/e2e/test_measure.py set them; nothing else
should.
"""

from __future__ import annotations

import errno
import os
import time

_FIRED: set[str] = set()  # STEP:RANK keys of BIGTRAIN_FAULT_NAN already injected in this process


def nan_due(step: int, rank: int) -> bool:
    """True once per process for each STEP:RANK listed in BIGTRAIN_FAULT_NAN: the caller poisons
    the loss of optimizer step ``step`` on ``rank``."""
    key = f"{step}:{rank}"
    if key in os.environ.get("BIGTRAIN_FAULT_NAN", "").split(",") and key not in _FIRED:
        _FIRED.add(key)
        return True
    return False


def crash_point(point: str, step: int | None = None) -> None:
    """With BIGTRAIN_CRASH_AT=<point> (and BIGTRAIN_CRASH_AT_STEP=<step>, if set), exit here at
    once, with no clean-up, as kill -9 would leave things."""
    if os.environ.get("BIGTRAIN_CRASH_AT") == point and \
            os.environ.get("BIGTRAIN_CRASH_AT_STEP", str(step)) == str(step):
        os._exit(137)


def disk_full(path) -> None:
    """With BIGTRAIN_FAULT_ENOSPC=<path suffix>: raise the OSError a full disk gives for a write of
    ``path`` when it ends with that suffix."""
    suffix = os.environ.get("BIGTRAIN_FAULT_ENOSPC")
    if suffix and str(path).endswith(suffix):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def mem_cap_applies(rank: int) -> bool:
    """False for a rank that BIGTRAIN_FAULT_MEM_CAP_RANKS (when set) does not list: the memory cap
    of ``bigtrain measure`` then leaves it alone."""
    ranks = os.environ.get("BIGTRAIN_FAULT_MEM_CAP_RANKS", "")
    return not ranks or str(rank) in ranks.split(",")


def hang_due(step: int, rank: int) -> None:
    """With BIGTRAIN_FAULT_HANG="STEP:RANK" listing this step and rank: never return."""
    if f"{step}:{rank}" in os.environ.get("BIGTRAIN_FAULT_HANG", "").split(","):
        while True:
            time.sleep(3600)
