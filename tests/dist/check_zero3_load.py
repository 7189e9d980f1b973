"""Run under torchrun: load a saved checkpoint into ZeRO-3 partitions, check the partition sizes,
gather every parameter back and compare with the file, train a few steps, compare again."""
import json
import sys

import torch
from safetensors.torch import load_file

from bigtrain.config import ZeroConfig
from bigtrain.dist import exit_after_teardown
from bigtrain.engine.core import Engine
from bigtrain.loader import checkpoint_files
from bigtrain.inject import inject_lora
from bigtrain.losses import token_loss_sum

model_dir, out = sys.argv[1], sys.argv[2]
eng = Engine(ZeroConfig(stage=3, persistence_threshold=0), device="cpu")
rank, world = eng.info.rank, eng.info.world_size
import transformers as tf

model = eng.build_base(tf.AutoConfig.from_pretrained(model_dir), model_dir)
files = checkpoint_files(model_dir)
saved = {}
for f in set(files.values()):
    saved.update(load_file(str(f)))
local = eng.local_param_bytes(model)
expected = sum(-(-p.ds_numel // world) * p.ds_tensor.element_size() for p in model.parameters())


def compare():
    bad = []
    for name, p in model.named_parameters():
        full = eng.full_tensor(p)
        key = name if name in saved else name.split(".", 1)[1]
        if not torch.equal(full, saved[key].to(full.dtype)):
            bad.append(name)
    return bad


before = compare()
lora = inject_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
eng.broadcast_(lora.parameters())
opt = torch.optim.AdamW(lora.parameters(), lr=1e-2)
torch.manual_seed(rank)
for _ in range(3):
    x = torch.randint(3, 200, (2, 16))
    ls, n = token_loss_sum(model, x, torch.ones_like(x), x)
    (ls / n).backward()
    eng.after_backward()
    eng.all_reduce_sum_([p.grad for p in lora.parameters()])
    opt.step()
    opt.zero_grad()
after = compare()
moved = any(p.abs().sum() > 0 for n, p in lora.named_parameters() if "lora_B" in n)
res = {"rank": rank, "world": world, "local_bytes": local, "expected_local_bytes": expected,
       "total_bytes": sum(p.ds_numel * p.ds_tensor.element_size() for p in model.parameters()),
       "mismatch_before": before, "mismatch_after": after, "adapters_moved": bool(moved),
       "n_params": len(list(model.parameters()))}
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump(res, f)
eng.close()
exit_after_teardown(0)  # as bigtrain train ends
