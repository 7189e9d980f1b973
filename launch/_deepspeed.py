"""The `deepspeed` launcher as launch/deepspeed.sh runs it on one node: DeepSpeed's own runner (what
the `deepspeed` command calls), with stop signals handled the way bigtrain's ranks expect.

The plain command, on Ctrl-C: the terminal's SIGINT reaches the runner, DeepSpeed's launch.py and
every worker. The runner dies in a KeyboardInterrupt traceback; launch.py sends SIGTERM to each
worker's process tree and SIGKILLs whatever is still alive 30 s later, so a step plus its save that
takes longer than that is lost; each worker gets two signals.

Here launch.py and the workers run in a session of their own, so a stop signal (Ctrl-C, or `kill`
of this process) reaches this process alone. It passes the signal to each worker once: the ranks
save at the next step boundary however long that takes and exit 0, launch.py and the runner end as
after a finished run, and this ends in one line with exit 128+signal. A second Ctrl-C is passed on
too: the ranks stop at once (the last checkpoint stays loadable). Nothing in DeepSpeed is changed;
the one substitution is the session the runner starts launch.py in.
"""

import signal
import subprocess
import sys

import psutil  # a dependency of DeepSpeed's launcher
from _stop import send, stopped  # launch/ is sys.path[0] when this file is run

_received: list[int] = []


class _OwnSession(subprocess.Popen):
    """``subprocess.Popen`` that starts its child in a new session: the runner's child is launch.py."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("start_new_session", True)
        super().__init__(*args, **kwargs)


def _forward(signum, frame):
    """Pass a stop signal to the workers (launch.py's children). Before they exist, to launch.py,
    whose own handler ends it and anything it started."""
    _received.append(signum)
    launchers = psutil.Process().children()
    workers = [w for p in launchers for w in p.children()]
    send(workers or launchers, signum)


if __name__ == "__main__":
    from deepspeed.launcher import runner

    subprocess.Popen = _OwnSession
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, _forward)
    sys.argv[0] = "deepspeed"
    try:
        runner.main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    if _received:
        stopped("deepspeed", _received[0])
    sys.exit(code)
