"""torchrun as launch/torchrun.sh runs it: torch.distributed.run's own entry point (what the
`torchrun` command calls), ending in one line instead of a traceback when a stop signal ends it.

torchrun starts every worker in its own session, so Ctrl-C in a terminal (SIGINT) or `kill <pid>`
(SIGTERM) reaches torchrun alone. torchrun passes the signal on to its workers and waits for them
(--shutdown-timeout, default 30 s, then SIGKILL): bigtrain saves at the next step boundary and
exits 0. Then torchrun raises its SignalException, which the `torchrun` command prints as a
traceback; here it is one line and exit 128+signal. Nothing in torch is changed.
"""

import sys

if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main

    sys.argv[0] = "torchrun"
    try:
        main()
    except SignalException as e:
        print(f"torchrun: stopped by {e.sigval.name}: it passed the signal to its workers and waited for "
              f"them (bigtrain saves at the next step boundary; rerun the same command to resume)",
              file=sys.stderr, flush=True)
        sys.exit(128 + int(e.sigval))
