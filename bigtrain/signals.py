"""Stop signals: SIGTERM (a scheduler's preemption), SIGUSR1 (Slurm's warning before the time
limit) and SIGINT (Ctrl-C) are requests to save and stop, not crashes (:class:`Preemption`)."""

from __future__ import annotations

import os
import signal

from .checkpoint import CheckpointError
from .dist import detect_world


class PreemptedBeforeStep(Exception):
    """SIGTERM, SIGUSR1 or SIGINT before the run's first optimizer step: nothing new exists to save."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.step = 0  # the step a rerun resumes from (set by run.build_run)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def interactive_srun_note() -> str | None:
    """The line a run started straight by an interactive ``srun`` (inside ``salloc``, not a batch
    job, not through slurm/'s scripts, which export BIGTRAIN_SLURM_SCRIPT) says at its start: srun
    answers a double Ctrl-C with SIGINT and at once SIGKILL to every task, which no process can save
    through (srun's first Ctrl-C only prints the tasks' state)."""
    if not os.environ.get("SLURM_STEP_ID") or os.environ.get("ENVIRONMENT") == "BATCH" \
            or os.environ.get("BIGTRAIN_SLURM_SCRIPT"):
        return None
    step = f"{os.environ.get('SLURM_JOB_ID', 'JOBID')}.{os.environ['SLURM_STEP_ID']}"
    return (f"started by an interactive srun: srun answers Ctrl-C twice with SIGKILL, which saves nothing; "
            f"to save and stop, run scancel --signal=USR1 {step} (or start through slurm/train_srun.sbatch "
            f"under salloc, where Ctrl-C saves)")


class Preemption:
    """SIGTERM, SIGUSR1 or SIGINT (Ctrl-C). Once the loop runs (``arm``), the signal is remembered
    and the loop saves and stops at the next step boundary. Before that (start-up, the step-0 eval)
    nothing new exists to save, so the run ends at once (``PreemptedBeforeStep``): a start-up that
    takes minutes at scale, or hangs, must not outlive the scheduler's grace period. A second
    Ctrl-C while the first one's save is pending stops the process at once, with one line: nothing
    is written after it, and the last checkpoint (saved atomically) stays loadable."""

    def __init__(self, pending: list[int] | None = None):
        self.signum = pending[-1] if pending else 0  # caught by the CLI before torch was imported
        self.armed = False
        # every rank gets the signal; one says so: global rank 0
        self.rank = detect_world()[0]
        for s in STOP_SIGNALS:
            signal.signal(s, self._handler)

    def check(self) -> None:
        """Raise for a signal that came before the loop (the CLI's, caught while importing)."""
        if self.signum and not self.armed:
            raise PreemptedBeforeStep(self.signum)

    def arm(self) -> None:
        self.armed = True

    def _handler(self, signum, frame):
        if signum == signal.SIGINT and self.armed and self.signum:
            # a second interrupt: out at once (os.write: no buffered I/O inside a signal handler)
            if self.rank == 0:
                os.write(2, b"[bigtrain] second Ctrl-C: stopped at once, nothing more saved; the last "
                            b"checkpoint is intact: rerun the same command to resume from it\n")
            os._exit(128 + signal.SIGINT)
        first = not self.signum
        self.signum = signum
        if not self.armed:
            raise PreemptedBeforeStep(signum)
        if signum == signal.SIGINT and first and self.rank == 0:
            os.write(2, b"[bigtrain] Ctrl-C: saving at the end of this step, then stopping "
                        b"(Ctrl-C again to stop at once)\n")

    def peer_stopped_at_once(self, error: BaseException) -> bool:
        """Whether ``error`` is what a rank sees when a peer stopped at once (os._exit) under it:
        a communication error (gloo's "Connection reset by peer", a RuntimeError) while this rank's
        Ctrl-C save was pending. A launcher passes the second Ctrl-C to the ranks one after another,
        and a rank blocked in a collective meets the peer's exit before its own second signal runs.
        Not a checkpoint error (a failed save is reported as one)."""
        return (self.armed and self.signum == signal.SIGINT and isinstance(error, RuntimeError)
                and not isinstance(error, CheckpointError))

    def stop_with_peer(self) -> None:
        """Out at once, in one line, as the second Ctrl-C does."""
        os.write(2, f"[bigtrain] rank {self.rank}: stopped at once: another rank took a second Ctrl-C while this "
                    f"one was saving; nothing more saved, the last checkpoint is intact\n".encode())
        os._exit(128 + signal.SIGINT)

