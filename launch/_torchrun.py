"""torchrun as launch/torchrun.sh runs it: torch.distributed.run's own entry point (what the
`torchrun` command calls), ending in one line instead of a traceback when a stop signal ends it.

torchrun starts every worker in its own session, so Ctrl-C in a terminal (SIGINT) or `kill <pid>`
(SIGTERM) reaches torchrun alone. torchrun passes the signal on to its workers and waits for them
(TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds, which launch/torchrun.sh sets to 1800 unless given: a
step plus its save must fit; torch's own default is 30, then SIGKILL): bigtrain saves at the next
step boundary and exits 0. Then torchrun raises its SignalException, which the `torchrun` command
prints as a traceback; here it is one line and exit 128+signal.

A second signal: torch's handler raises again, which cuts its wait short and sends the workers
SIGTERM (not the second Ctrl-C they need to stop at once), then waits again. Here the second and
later signals go to the workers as they are, while torchrun keeps waiting: a second Ctrl-C stops
the ranks at once, as it does without a launcher. The one substitution is that handler
(torch.distributed.elastic.multiprocessing.api._terminate_process_handler, which torch installs
when it starts the workers); nothing else in torch is changed.
"""

import sys

if __name__ == "__main__":
    import psutil
    from _stop import send, stopped  # launch/ is sys.path[0] when this file is run
    from torch.distributed.elastic.multiprocessing import api
    from torch.distributed.run import main

    torch_handler = api._terminate_process_handler
    received: list[int] = []

    def handler(signum, frame):
        if not received:
            received.append(signum)
            torch_handler(signum, frame)  # raises SignalException: torchrun passes it on and waits
        send(psutil.Process().children(), signum)

    api._terminate_process_handler = handler
    sys.argv[0] = "torchrun"
    try:
        main()
    except api.SignalException as e:
        stopped("torchrun", e.sigval)
