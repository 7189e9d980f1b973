"""Worker for tests/unit/test_memory_quantize.py (plain ``python``: one gloo rank; or under torchrun):
the layer gatherer's buffers with a quantized base, as it really allocates them, for the estimator's
buffer model (``memory.quantized_gather_bytes``) to be checked against.

A random bf16 tiny-llama (threshold 100000: norms persistent; threshold 0: norms in the unit) is built
into partitions with model.quantize=int8 and nf4 through ``Engine.build_base``. For each decoder-layer
unit: the packed bytes this rank all-gathers (its local buffer), the dequantized unit buffer the gather
hands to the forward (``whole``), and, from torch's CPU profiler, the largest number of bytes the gather
allocated beyond ``whole`` at any moment (the all-gather output and the dequantization temporaries).
Also whether the root (embeddings, final norm, head) is aliased to its partitions (one copy, nothing
gathered). Written to ``<out>/rank<R>.json``."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bigtrain.config import ZeroConfig  # noqa: E402
from bigtrain.dist import exit_after_teardown  # noqa: E402
from bigtrain.engine.core import Engine  # noqa: E402
from bigtrain.presets import hf_config_for  # noqa: E402


def live_peak(prof) -> int:
    """The most bytes live at once during the profiled region, counting only what it allocated: op
    allocations (their own ``self_cpu_memory_usage``) and frees (``[memory]`` events), in time order."""
    ev = sorted(((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()
                 if e.self_cpu_memory_usage != 0 and (e.name == "[memory]" or e.self_cpu_memory_usage > 0)),
                key=lambda t: t[0])
    live = peak = 0
    for _, b in ev:
        live += b
        peak = max(peak, live)
    return peak


out_dir = sys.argv[1]
hf = hf_config_for("tiny-llama", vocab_size=512)
result, engines = {}, []
for scheme in ("int8", "nf4"):
    for th in (100000, 0):
        eng = Engine(ZeroConfig(stage=3, persistence_threshold=th), device="cpu")
        torch.manual_seed(0)
        model = eng.build_base(hf, None, "bfloat16", quantize=scheme)
        g = eng._offload
        units = []
        for i in range(len(g.units)):
            local = g._flat[i]
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                g._issue(i)
            _, whole = g._pending[i]
            units.append({"packed": local.numel() * local.element_size(),
                          "whole": whole.numel() * whole.element_size(),
                          "peak_during_gather": live_peak(prof)})
            g._wait(i)
            g._release(i)
        root = [p for p in model.parameters() if not any(p is q for u in g.units for q in u)]
        result[f"{scheme}/{th}"] = {
            "world": eng.info.world_size, "units": units, "root_unit": g._flat[-1] is not None,
            "root_aliased": all(p.data.data_ptr() == p.ds_tensor.data_ptr() for p in root),
            "n_root": len(root)}
        eng._ds_hf_config = None  # the next build's meta-device shape must not run under zero.Init
        g.destroy()
        eng._offload = None
        engines.append(eng)

with open(os.path.join(out_dir, f"rank{engines[0].info.rank}.json"), "w") as f:
    json.dump(result, f)
engines[-1].close()
exit_after_teardown(0)
