"""Worker for tests/e2e/test_memory_dist.py (run under torchrun): one LoRA training step on a tiny preset
with the frozen base under ZeRO-3, then this rank's measured model-state bytes, for each persistence
threshold given, written to ``<out>/rank<R>.json``."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from bigtrain.config import ZeroConfig  # noqa: E402
from bigtrain.engine.core import Engine  # noqa: E402
from bigtrain.inject import inject_lora  # noqa: E402
from bigtrain.memory import measure_states  # noqa: E402
from bigtrain.presets import hf_config_for  # noqa: E402

out_dir, thresholds = sys.argv[1], [int(t) for t in sys.argv[2].split(",")]
result = {}
engines = []
for th in thresholds:
    eng = Engine(ZeroConfig(stage=3, persistence_threshold=th))  # reuses the process group
    torch.manual_seed(0)
    model = eng.build_base(hf_config_for("tiny-opt", vocab_size=512))
    lora = inject_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    eng.broadcast_(lora.parameters())
    opt = torch.optim.AdamW(lora.parameters(), lr=1e-3)
    x = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1))
    for step in range(2):  # step 1 records DeepSpeed's trace; persistent params stay whole from step 2
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        eng.after_backward()
        eng.all_reduce_sum_([p.grad for p in lora.parameters()])
        opt.step()
    result[str(th)] = {"measured": measure_states(model, lora, opt), "world_size": eng.info.world_size,
                       "loss": out.loss.item()}
    lora.remove_hooks()
    engines.append(eng)
    if eng._offload is not None:  # None at world size 1: no ZeRO-3 hooks there (zero.single_rank_plain)
        eng._offload.destroy()
        eng._offload = None
rank = engines[0].info.rank
with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
    json.dump(result, f)
engines[-1].close()
from bigtrain.dist import exit_after_teardown  # noqa: E402

exit_after_teardown(0)  # as bigtrain train ends
