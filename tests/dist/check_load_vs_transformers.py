"""Run under torchrun: load a checkpoint (mixture-of-experts or not) into ZeRO-3 partitions through bigtrain,
and compare with transformers' from_pretrained of the same checkpoint: every parameter gathered
back, the logits of one batch, then the base again after a few LoRA steps (on q_proj, v_proj, or
the comma-separated targets of the third argument)."""
import json
import sys

import torch

from bigtrain.config import ZeroConfig
from bigtrain.dist import exit_after_teardown
from bigtrain.engine.core import Engine
from bigtrain.inject import inject_lora
from bigtrain.losses import token_loss_sum

model_dir, out = sys.argv[1], sys.argv[2]
targets = sys.argv[3].split(",") if len(sys.argv) > 3 else ["q_proj", "v_proj"]
eng = Engine(ZeroConfig(stage=3, persistence_threshold=0), device="cpu")
rank, world = eng.info.rank, eng.info.world_size
import transformers as tf

ref = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
want = dict(ref.named_parameters())
model = eng.build_base(tf.AutoConfig.from_pretrained(model_dir), model_dir)
ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(0))


def compare():
    bad = []
    for name, p in model.named_parameters():
        if not torch.equal(eng.full_tensor(p), want[name].detach()):
            bad.append(name)
    return bad


with torch.no_grad():
    ours = model(ids).logits
    theirs = ref(ids).logits
eng.after_backward()  # as after an eval: every gathered unit back to its partitions
before = compare()
lora = inject_lora(model, targets, r=4, alpha=8)
eng.broadcast_(lora.parameters())
opt = torch.optim.AdamW(lora.parameters(), lr=1e-2)
torch.manual_seed(rank)
for _ in range(2):
    x = torch.randint(3, 200, (2, 16))
    ls, n = token_loss_sum(model, x, torch.ones_like(x), x)
    (ls / n).backward()
    eng.after_backward()
    eng.all_reduce_sum_([p.grad for p in lora.parameters()])
    opt.step()
    opt.zero_grad()
after = compare()
moved = any(p.abs().sum() > 0 for n, p in lora.named_parameters() if "lora_B" in n)
res = {"rank": rank, "world": world, "n_params": len(want),
       "names_match": sorted(n for n, _ in model.named_parameters()) == sorted(want),
       "fused": sorted(n for n, p in model.named_parameters() if p.ds_shape and len(p.ds_shape) == 3),
       "logits_equal": bool(torch.equal(ours, theirs)), "logits_max_diff": (ours - theirs).abs().max().item(),
       "mismatch_before": before, "mismatch_after": after, "adapters_moved": bool(moved),
       "local_bytes": eng.local_param_bytes(model),
       "expected_local_bytes": sum(-(-p.ds_numel // world) * p.ds_tensor.element_size() for p in model.parameters())}
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump(res, f)
eng.close()
exit_after_teardown(0)
