"""Worker for tests/e2e/test_quantize_dist.py (run under torchrun): a model.quantize=int8 and an nf4 base, each built
two ways (the built-in tiny-opt checkpoint, fp32, default persistence threshold; a random tiny-llama
preset, bf16, threshold 0), then for each: every parameter as the layer gatherer hands it to the
forward, against the unquantized tensor (unquantized parameters: equal; quantized ones: equal to
``reference_dequantized`` of the unquantized tensor at this world size), a few LoRA steps, and this
rank's measured base bytes. Written to ``<out>/rank<R>.json``."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from bigtrain.config import ZeroConfig, resolve_model_path  # noqa: E402
from bigtrain.dist import exit_after_teardown  # noqa: E402
from bigtrain.engine.core import Engine  # noqa: E402
from bigtrain.inject import inject_lora  # noqa: E402
from bigtrain.memory import measure_states  # noqa: E402
from bigtrain.presets import hf_config_for  # noqa: E402
from bigtrain.quantize import reference_dequantized  # noqa: E402

out_dir = sys.argv[1]
CASES = {  # name: (path, preset, dtype, persistence threshold, model.quantize)
    "checkpoint": (resolve_model_path("builtin:tiny-opt"), None, "float32", 100000, "int8"),
    "preset": (None, "tiny-llama", "bfloat16", 0, "int8"),
    "checkpoint-nf4": (resolve_model_path("builtin:tiny-opt"), None, "float32", 100000, "nf4"),
    "preset-nf4": (None, "tiny-llama", "bfloat16", 0, "nf4"),
}
result, engines = {}, []


def drop(eng):
    eng._ds_hf_config = None  # the next case's meta-device shape build must not run under zero.Init
    if eng._offload is not None:
        eng._offload.destroy()
        eng._offload = None


for case, (path, preset, dtype, th, scheme) in CASES.items():
    hf = hf_config_for(preset, vocab_size=512) if preset else None
    if path:
        full = load_file(os.path.join(path, "model.safetensors"))
        full = {k: v for k, v in full.items()}
    else:  # the unquantized random base, from the same seed
        eng0 = Engine(ZeroConfig(stage=3, persistence_threshold=th), device="cpu")
        torch.manual_seed(0)
        m0 = eng0.build_base(hf, dtype=dtype)
        full = {n: eng0.full_tensor(p) for n, p in m0.named_parameters()}
        drop(eng0)
        engines.append(eng0)
    eng = Engine(ZeroConfig(stage=3, persistence_threshold=th), device="cpu")
    world = eng.info.world_size
    torch.manual_seed(0)
    model = eng.build_base(hf, path, dtype, quantize=scheme)
    g = eng._offload
    quantized = set(g.quant_errors)

    def want(name, p):
        key = name if name in full else name.split(".", 1)[1]
        t = full[key].to(p.dtype)
        return reference_dequantized(t, world, scheme=scheme) if name in quantized else t

    names = {id(p): n for n, p in model.named_parameters()}
    exact, differ, checked = [], [], 0
    for i in range(len(g.units) + 1):  # every layer unit, then the root, as the forward gathers them
        g._wait(i)
        for p in g._index(i):
            checked += 1
            (exact if torch.equal(p.data, want(names[id(p)], p)) else differ).append(names[id(p)])
        g._release(i)
    # the check is not vacuous: quantization did change every quantized weight
    unchanged = [n for n, p in model.named_parameters() if n in quantized and torch.equal(
        want(n, p), full[n if n in full else n.split(".", 1)[1]].to(p.dtype))]
    persistent = [n for n, p in model.named_parameters() if getattr(p, "ds_persist", False)]
    for n in persistent:
        p = dict(model.named_parameters())[n]
        checked += 1
        (exact if torch.equal(p.data, want(n, p)) else differ).append(n)
    try:
        eng.gather(next(model.parameters()))
        refused = None
    except RuntimeError as e:
        refused = str(e)

    lora = inject_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    eng.broadcast_(lora.parameters())
    opt = torch.optim.AdamW(lora.parameters(), lr=1e-2)
    x = torch.randint(3, 500, (2, 32), generator=torch.Generator().manual_seed(1 + eng.info.rank))
    losses = []
    for step in range(6):
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        eng.after_backward()
        eng.all_reduce_sum_([p.grad for p in lora.parameters()])
        opt.step()
        losses.append(eng.all_reduce_scalars([out.loss.item()])[0] / world)
    result[case] = {"world": world, "quantized": sorted(quantized), "exact": exact, "differ": differ, "unchanged": unchanged,
                    "checked": checked, "n_params": len(names), "refused": refused, "losses": losses,
                    "measured": measure_states(model, lora, opt), "errors": g.quant_errors,
                    "summary": g.summary,
                    "lora_b_norm": sum(float(p.norm()) for n, p in lora.named_parameters() if n.endswith("lora_B"))}
    lora.remove_hooks()
    drop(eng)
    engines.append(eng)

with open(os.path.join(out_dir, f"rank{engines[0].info.rank}.json"), "w") as f:
    json.dump(result, f)
engines[-1].close()
exit_after_teardown(0)
