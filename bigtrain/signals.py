"""Stop signals: SIGTERM (a scheduler's preemption), SIGUSR1 (Slurm's warning before the time
limit) and SIGINT (Ctrl-C) are requests to save and stop, not crashes (:class:`Preemption`)."""

from __future__ import annotations

import os
import signal


class PreemptedBeforeStep(Exception):
    """SIGTERM, SIGUSR1 or SIGINT before the run's first optimizer step: nothing new exists to save."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.step = 0  # the step a rerun resumes from (set by run.build_run)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


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
            os.write(2, b"[bigtrain] second Ctrl-C: stopped at once, nothing more saved; the last checkpoint "
                        b"is intact: rerun the same command to resume from it\n")
            os._exit(128 + signal.SIGINT)
        first = not self.signum
        self.signum = signum
        if not self.armed:
            raise PreemptedBeforeStep(signum)
        if signum == signal.SIGINT and first:
            os.write(2, b"[bigtrain] Ctrl-C: saving at the end of this step, then stopping "
                        b"(Ctrl-C again to stop at once)\n")
