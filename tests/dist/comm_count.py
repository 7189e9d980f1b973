"""Run a bigtrain command (``comm_count.py OUT train k=v ...``) and count every collective this rank
takes part in: per (collective, ranks of its group) the calls and the bytes that arrive at this rank
(an all-gather's whole output, an all-reduce's or a broadcast's tensor). Written to
``OUT/comm<RANK>.json`` before the process leaves.

torch.distributed's functions are wrapped before bigtrain or DeepSpeed is imported, so DeepSpeed's
comm layer (which binds ``all_gather_into_tensor`` when it starts) calls the wrappers too: what is
counted is what the run really sends, over gloo, on the launcher's real ranks."""
import atexit
import collections
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch.distributed as dist  # noqa: E402

OUT = sys.argv.pop(1)
COUNTS: dict = collections.defaultdict(lambda: [0, 0])


def _ranks(group):
    if group is None or group is dist.GroupMember.WORLD:
        return tuple(range(dist.get_world_size()))
    return tuple(dist.get_process_group_ranks(group))


def _wrap(name, tensor_arg):
    real = getattr(dist, name)

    def wrapper(*args, **kwargs):
        t = kwargs.get(tensor_arg[0]) if tensor_arg[0] in kwargs else args[tensor_arg[1]]
        nbytes = sum(x.numel() * x.element_size() for x in (t if isinstance(t, (list, tuple)) else [t]))
        c = COUNTS[(name, _ranks(kwargs.get("group")))]
        c[0] += 1
        c[1] += nbytes
        return real(*args, **kwargs)

    setattr(dist, name, wrapper)


for _name, _arg in (("all_gather_into_tensor", ("output_tensor", 0)), ("all_reduce", ("tensor", 0)),
                    ("broadcast", ("tensor", 0)), ("all_gather", ("tensor_list", 0)),
                    ("reduce_scatter_tensor", ("output", 0))):
    _wrap(_name, _arg)


def dump():
    rank = os.environ.get("RANK", "0")
    rows = [{"op": op, "ranks": list(ranks), "calls": c, "bytes": b} for (op, ranks), (c, b) in COUNTS.items()]
    with open(os.path.join(OUT, f"comm{rank}.json"), "w") as f:
        json.dump(rows, f)


atexit.register(dump)

import bigtrain.dist as D  # noqa: E402

_leave = D.exit_after_teardown


def _exit(code=0):
    dump()
    _leave(code)


D.exit_after_teardown = _exit

from bigtrain.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
