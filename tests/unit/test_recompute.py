"""model.gradient_checkpointing: which layers are recomputed (bigtrain.recompute), and what the
estimator says they store (bigtrain.memory).

* Checkpointing the first N layers is the same arithmetic as checkpointing every layer or none:
  losses and adapter gradients are equal bit for bit, and exactly the first N layers run twice.
* auto's choice is the smallest N whose estimate fits the budget, corrected once from a measured peak.
* The estimator's per-layer activation bytes (eager and compiled, LLaMA's shape) against what autograd
  really keeps: every tensor the layer saves for backward, counted once per storage, on CPU.
"""
import shutil

import pytest
import torch

from bigtrain import recompute
from bigtrain.memory import GiB, Setup, checkpointed_activation_bytes, estimate, model_shape
from helpers import lora_loss_and_grads as _loss_and_grads
from helpers import layer_saved_bytes
from helpers import tiny_lora_model as _model

BACKEND = "inductor" if shutil.which("g++") or shutil.which("c++") else "aot_eager"


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-opt"])
def test_first_n_layers_checkpointed_equal_all_and_none(arch):
    model, lora = _model(arch, dropout=0.1)  # a base with dropout rates: the engine's eval mode keeps them off
    layers = recompute.checkpointable_layers(model)
    assert len(layers) == 4
    calls = [0] * len(layers)
    for i, m in enumerate(layers):  # inside the layer: transformers checkpoints forward, hooks stay outside
        m.self_attn.register_forward_hook(lambda mod, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1))
    ref = None
    for n in (4, 0, 1, 3, 2):
        assert recompute.apply(model, n) == 4
        assert [m.gradient_checkpointing for m in layers] == [i < n for i in range(4)]
        assert not any(m.training for layer in layers for m in layer.children())  # base dropout stays off
        calls[:] = [0] * 4
        loss, grads = _loss_and_grads(model, lora, ids)
        # a checkpointed layer runs its forward again in backward; the others once
        assert calls == [2 if i < n else 1 for i in range(4)], (n, calls)
        if ref is None:
            ref = loss, grads
            continue
        assert torch.equal(loss, ref[0]), n
        assert grads.keys() == ref[1].keys()
        for k in grads:
            assert torch.equal(grads[k], ref[1][k]), (n, k)


def test_fixed_settings_and_refusal():
    assert recompute.fixed_layers(True, 32) == 32
    assert recompute.fixed_layers(False, 32) == 0
    assert recompute.fixed_layers(12, 32) == 12
    assert recompute.fixed_layers("auto", 32) is None
    with pytest.raises(ValueError, match=r"model.gradient_checkpointing=33: the model has 32 decoder layers"):
        recompute.fixed_layers(33, 32)
    plan = recompute.choose(12, 32, None, None)
    assert (plan.checkpointed, plan.auto) == (12, False)
    cpu = recompute.choose("auto", 32, None, None)
    assert (cpu.checkpointed, cpu.auto) == (0, True) and "CPU" in cpu.why


def _llama_peak(layers=80, compiled=True, world=1, seq=8192, mb=1):
    shape = model_shape("llama2-70b")

    def peak(n):
        st = Setup(world_size=world, micro_batch=mb, seq_len=seq, checkpoint_layers=n, checkpointing=n > 0,
                   lora_r=16, lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"), compiled=compiled)
        return estimate(shape, st)["lora"]["per_gpu_total"]
    return shape, peak


def test_auto_chooses_the_fewest_layers_that_fit():
    shape, peak = _llama_peak(world=2)
    L = shape.layers
    values = [peak(n) for n in range(L + 1)]
    assert all(a >= b for a, b in zip(values[:L], values[1:L + 1]))  # more recomputed, never more memory:
    # the last layer too, since keeping it whole holds it through the final norm's backward (24 bytes
    # per token per h), more than the one input its recomputation adds (2) and a layer's backward (18)
    assert values[L] < values[L - 1] and recompute.auto_limit(L, peak) == L
    budget = int(0.9 * 139 * GiB)
    plan = recompute.choose("auto", L, peak, budget)
    brute = next(n for n in range(L + 1) if values[n] <= budget)
    assert plan.checkpointed == brute and 0 < brute < L, (brute, values[0] / GiB, values[-1] / GiB)
    assert values[brute] <= budget < values[brute - 1]
    assert f"{values[brute] / GiB:.1f} GiB" in plan.why and plan.auto
    # nothing needed: none; nothing enough: every layer, said
    assert recompute.choose("auto", L, peak, values[0]).checkpointed == 0
    worst = recompute.choose("auto", L, peak, values[L] - 1)
    assert worst.checkpointed == L and "every layer, the least memory" in worst.why and "still above" in worst.why


def test_correction_from_the_measured_peak():
    shape, peak = _llama_peak(world=2)
    L, budget = shape.layers, int(0.9 * 139 * GiB)

    def act_at(n):
        st = Setup(world_size=2, micro_batch=1, seq_len=8192, checkpoint_layers=n, checkpointing=n > 0, lora_r=16,
                   lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"), compiled=True)
        c = estimate(shape, st)["lora"]["per_gpu"]
        return c["activations"] + c["logits_loss"]

    plan = recompute.choose("auto", L, peak, budget)
    est, acts = peak(plan.checkpointed), act_at(plan.checkpointed)
    # measured as estimated: no change
    assert recompute.corrected(plan, est, est, acts, act_at, budget) is None
    # activations 20% above the estimate: more layers recomputed, and the scaled estimate fits
    more = recompute.corrected(plan, int(est + 0.2 * acts), est, acts, act_at, budget)
    assert more is not None and more.checkpointed > plan.checkpointed
    assert est - acts + 1.2 * act_at(more.checkpointed) <= budget
    assert est - acts + 1.2 * act_at(more.checkpointed - 1) > budget
    assert "corrected from step 1's measured peak" in more.why and "x1.20" in more.why
    # 20% below: fewer
    fewer = recompute.corrected(plan, int(est - 0.2 * acts), est, acts, act_at, budget)
    assert fewer is not None and fewer.checkpointed < plan.checkpointed
    # a fixed setting is never corrected
    fixed = recompute.choose(10, L, peak, budget)
    assert recompute.corrected(fixed, 2 * est, est, acts, act_at, budget) is None


def test_partial_checkpointing_bytes():
    # L=10 layers: inputs 1 each, whole layers 30 each
    assert checkpointed_activation_bytes(10, 0, 1, 30) == 300
    assert checkpointed_activation_bytes(10, 10, 1, 30) == 10 + 30  # every input + the one recomputed
    assert checkpointed_activation_bytes(10, 4, 1, 30) == 4 + 6 * 30
    assert checkpointed_activation_bytes(10, 9, 1, 30) == 9 + 30
    shape = model_shape("llama2-7b")
    kw = dict(world_size=1, micro_batch=2, seq_len=4096, lora_r=16, lora_targets=("q_proj", "v_proj"))
    lora = lambda **k: estimate(shape, Setup(**kw, **k))["lora"]["per_gpu_total"]  # noqa: E731
    assert lora(checkpointing=True) == lora(checkpoint_layers=32)
    assert lora(checkpointing=False) == lora(checkpoint_layers=0, checkpointing=False)
    assert lora(checkpointing=False) > lora(checkpoint_layers=16) > lora(checkpointing=True)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("targets", [("q_proj", "k_proj", "v_proj", "o_proj"),
                                     ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")],
                         ids=["qkvo", "all-linear"])
def test_layer_activation_bytes_match_autograd(compiled, targets):
    """LLaMA's layer shape (ffn = 2.6875 h, gated MLP, RMSNorm), bf16 storage under bf16 autocast,
    r=16: the estimator's bytes per layer within 5% of what autograd saves (the saved tensors are the
    same on GPUs: this formula put a Llama-2-7B run's peak within 4% of an H200's measurement)."""
    from bigtrain.compile import compile_layers
    from bigtrain.memory import _act_bytes_per_layer

    h, ffn, s, b, r = 512, 1376, 256, 2, 16
    model, lora = _model("tiny-llama", layers=2, hidden=h, ffn=ffn, dtype=torch.bfloat16, targets=targets, r=r)
    if compiled:
        torch._dynamo.reset()
        compile_layers(model, backend=BACKEND)
    counted = layer_saved_bytes(model, s, b)
    shape = model_shape(model)
    predicted = _act_bytes_per_layer(shape, s, b, 2, shape.lora_shapes(list(targets)), r, compiled)
    print(f"{'compiled' if compiled else 'eager'} {len(targets)} adapters: counted {counted / (s * b * h):.2f}, "
          f"predicted {predicted / (s * b * h):.2f} bytes per token per h")
    assert predicted == pytest.approx(counted, rel=0.05)
