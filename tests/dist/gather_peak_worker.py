"""Worker for tests/e2e/test_gather_peak.py, run under torchrun: how much gathered base storage is alive
at once during real ZeRO-3 LoRA steps (forward, the loss, backward, eval), under the gatherer named by
argv[5] (zero.gather: layers or deepspeed).

Every time a decoder layer starts or ends its forward, and every time a gradient reaches a layer's
output in backward, it records a weak reference to the storage behind each base parameter that is
gathered at that moment, and sums the bytes of all recorded storages still alive. A released layer
whose gathered storage something still holds (autograd's saved tensors, a reuse rule, a hook) keeps
counting; a storage that was truly freed stops. Writes ``<out>/rank<R>.json``."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
from torch.multiprocessing.reductions import StorageWeakRef  # noqa: E402

from bigtrain.config import ZeroConfig  # noqa: E402
from bigtrain.dist import exit_after_teardown  # noqa: E402
from bigtrain.engine.core import Engine  # noqa: E402
from bigtrain.presets import decoder_layer_classes  # noqa: E402
from bigtrain.inject import inject_lora  # noqa: E402
from bigtrain.losses import token_loss_sum  # noqa: E402
from bigtrain.presets import hf_config_for  # noqa: E402

out_dir, preset, vocab, layers, gather = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
engine = Engine(ZeroConfig(stage=3, persistence_threshold=0, gather=gather))
torch.manual_seed(0)
hf = hf_config_for(preset, vocab_size=vocab)
hf.num_hidden_layers = layers
model = engine.build_base(hf)
lora = inject_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
engine.broadcast_(lora.parameters())
opt = torch.optim.AdamW(lora.parameters(), lr=1e-3)

live: dict[int, tuple[StorageWeakRef, int]] = {}  # storage address -> (weak ref, bytes)
peaks = {"forward": 0, "backward": 0, "eval": 0}
phase = ["forward"]
names: dict[int, set] = {}
at_peak: dict[str, list] = {}
pname = {p: n for n, p in model.named_parameters()}


def sample(*_):
    for p in model.parameters():
        if p.data.numel() and p.data.data_ptr() != p.ds_tensor.data_ptr():  # gathered, not the partition
            s = p.data.untyped_storage()
            live.setdefault(s.data_ptr(), (StorageWeakRef(s), s.nbytes()))
            names.setdefault(s.data_ptr(), set()).add(pname[p])
    for _, buf in getattr(engine._offload, "_pending", {}).values():  # a prefetched layer in flight
        s = buf.untyped_storage()
        live.setdefault(s.data_ptr(), (StorageWeakRef(s), s.nbytes()))
        names.setdefault(s.data_ptr(), {"prefetched"})
    for key in [k for k, (ref, _) in live.items() if ref.expired()]:
        del live[key]
        names.pop(key, None)
    alive = sum(n for _, n in live.values())
    if alive > peaks[phase[0]]:
        peaks[phase[0]] = alive
        at_peak[phase[0]] = sorted({".".join(n.split(".")[2:4]) if ".layers." in n else n for k in live for n in names.get(k, ())})


def on_output(module, args, output):
    sample()
    out = output[0] if isinstance(output, tuple) else output
    if out.requires_grad:
        out.register_hook(lambda g: sample())  # a gradient reaches this layer: its backward starts


classes = tuple(decoder_layer_classes(model))
blocks = [m for m in model.modules() if isinstance(m, classes)]
for m in blocks:  # registered after ZeRO-3's own hooks: they see the layer gathered / released
    m.register_forward_pre_hook(sample)
    m.register_forward_hook(on_output)
layer_bytes = sum(p.ds_numel * p.element_size() for p in blocks[0].parameters())
base_bytes = sum(p.ds_numel * p.element_size() for p in model.parameters())

g = torch.Generator().manual_seed(1)
x = torch.randint(0, vocab, (2, 32), generator=g)
mask = torch.ones_like(x)
for step in range(3):  # from step 2 on DeepSpeed prefetches along the recorded trace
    phase[0] = "forward"
    loss, n = token_loss_sum(model, x, mask, x)
    sample()
    phase[0] = "backward"
    (loss / n).backward()
    engine.after_backward()
    sample()
    engine.all_reduce_sum_([p.grad for p in lora.parameters()])
    opt.step()
    opt.zero_grad(set_to_none=True)
phase[0] = "eval"
with torch.no_grad():
    token_loss_sum(model, x, mask, x)
sample()

result = {"peaks": peaks, "layer_bytes": layer_bytes, "base_bytes": base_bytes, "layers": len(blocks),
          "world_size": engine.info.world_size, "at_peak": at_peak}
with open(os.path.join(out_dir, f"rank{engine.info.rank}.json"), "w") as f:
    json.dump(result, f)
engine.close()
exit_after_teardown(0)
