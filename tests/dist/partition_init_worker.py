"""Worker for tests/e2e/test_partition_init.py (run under torchrun): build a random preset base
straight into ZeRO-3 partitions (``model.path=null``) and report, for this rank, the bytes it holds,
its peak resident memory while building, and statistics of its partitions (the initialisation).
Writes ``<out>/rank<R>.json``."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from bigtrain.config import ZeroConfig  # noqa: E402
from bigtrain.engine.core import Engine  # noqa: E402
from bigtrain.presets import hf_config_for  # noqa: E402


def status_kib(key: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident) of this process, KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


out_dir, preset, layers, dtype = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
eng = Engine(ZeroConfig(stage=3))
hf_config = hf_config_for(preset, num_layers=layers)
rss_before = status_kib("VmRSS") * 1024
hwm_before = status_kib("VmHWM") * 1024
model = eng.build_base(hf_config, dtype=dtype)
hwm_after = status_kib("VmHWM") * 1024

stats = {}
for name, p in model.named_parameters():
    part = p.ds_tensor.detach().float()[: max(0, min(p.ds_tensor.numel(), p.ds_numel - eng.info.rank * p.ds_tensor.numel()))]
    kind = name.split(".")[-2]  # q_proj, embed_tokens, input_layernorm, ...
    s = stats.setdefault(kind, {"n": 0, "sum": 0.0, "sq": 0.0})
    s["n"] += part.numel()
    s["sum"] += part.sum().item()
    s["sq"] += (part * part).sum().item()
result = {"rank": eng.info.rank, "world_size": eng.info.world_size,
          "local_param_bytes": eng.local_param_bytes(model),
          "rss_before": rss_before, "hwm_before": hwm_before, "hwm_after": hwm_after,
          "stats": {k: {"n": v["n"], "mean": v["sum"] / v["n"],
                        "std": max(0.0, v["sq"] / v["n"] - (v["sum"] / v["n"]) ** 2) ** 0.5}
                    for k, v in stats.items() if v["n"]}}
with open(os.path.join(out_dir, f"rank{eng.info.rank}.json"), "w") as f:
    json.dump(result, f)
eng.close()
from bigtrain.dist import exit_after_teardown  # noqa: E402

exit_after_teardown(0)  # as bigtrain train ends
