"""What launch/_torchrun.py and launch/_deepspeed.py share: passing a stop signal on to processes,
and the one line a launcher ends with when a stop signal ended it."""

import signal
import sys

import psutil  # a dependency of DeepSpeed's launcher


def send(processes, signum: int) -> None:
    """``signum`` to each of ``processes`` (psutil.Process) still alive."""
    for p in processes:
        try:
            p.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


def stopped(launcher: str, signum: int) -> None:
    """The launcher's last line after a stop signal, and its exit: 128+signal."""
    sig = signal.Signals(signum)
    print(f"{launcher}: stopped by {sig.name}: it passed the signal to its workers and waited for them "
          f"(bigtrain saves at the next step boundary; rerun the same command to resume)",
          file=sys.stderr, flush=True)
    sys.exit(128 + sig)
