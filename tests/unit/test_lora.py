"""The LoRA layer against a dense reference: h = W0 x + s B A x, merge/unmerge, init."""
import math

import pytest
import torch
from torch import nn

from bigtrain.lora import LoRAAdapter, LoRAModel


def _model_with(layer):
    m = nn.Sequential(layer)
    m.requires_grad_(False)
    return m


@pytest.mark.parametrize("rslora", [False, True])
def test_forward_equals_dense_reference(rslora):
    torch.manual_seed(0)
    base = nn.Linear(32, 48)
    m = _model_with(base)
    lora = LoRAModel({"0": base}, r=4, alpha=8, rslora=rslora)
    ad = lora.adapters["0"]
    nn.init.normal_(ad.lora_B)  # make the update non-zero
    x = torch.randn(5, 7, 32)
    scale = 8 / (math.sqrt(4) if rslora else 4)
    assert ad.scale == scale
    ref = x @ base.weight.T + base.bias + scale * (x @ ad.lora_A.T @ ad.lora_B.T)
    torch.testing.assert_close(m(x), ref, rtol=0, atol=1e-5)


def test_zero_init_step0_equals_base():
    torch.manual_seed(0)
    base = nn.Linear(16, 16)
    x = torch.randn(3, 16)
    before = base(x)
    lora = LoRAModel({"0": base}, r=8, alpha=16)
    assert torch.count_nonzero(lora.adapters["0"].lora_B) == 0
    assert torch.count_nonzero(lora.adapters["0"].lora_A) > 0
    assert torch.equal(base(x), before)  # exactly: B = 0 so the update is exactly zero


def test_kaiming_uniform_bound():
    torch.manual_seed(0)
    ad = LoRAAdapter(1000, 10, r=64, alpha=1)
    bound = 1 / math.sqrt(1000)  # kaiming_uniform(a=sqrt(5)) == nn.Linear's default: U(-1/sqrt(fan_in), ..)
    assert ad.lora_A.abs().max() <= bound
    assert ad.lora_A.abs().max() > 0.95 * bound


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 0.0), (torch.bfloat16, None)])
def test_merge_then_unmerge_restores(dtype, atol):
    torch.manual_seed(0)
    base = nn.Linear(64, 32).to(dtype)
    w0 = base.weight.detach().clone()
    lora = LoRAModel({"0": base}, r=4, alpha=8)
    nn.init.normal_(lora.adapters["0"].lora_B, std=0.01)
    x = torch.randn(4, 64, dtype=dtype)
    unmerged = base(x).float()
    lora.merge()
    merged = base(x).float()
    torch.testing.assert_close(merged, unmerged, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5,
                               atol=2e-2 if dtype == torch.bfloat16 else 1e-5)
    # merge adds the delta rounded to W0's dtype, in W0's dtype: exactly that, bit for bit
    expected = w0 + lora.adapters["0"].delta_weight().to(dtype)
    assert torch.equal(base.weight, expected)
    lora.unmerge()
    if atol == 0.0:
        # fp32: W0 + d - d is W0 up to one rounding of each add; check it is within 1 ulp-scale
        torch.testing.assert_close(base.weight, w0, rtol=0, atol=1e-6)
    else:
        torch.testing.assert_close(base.weight.float(), w0.float(), rtol=0, atol=1e-2)
    with pytest.raises(RuntimeError, match="not merged"):
        lora.unmerge()


def test_conv1d_transposed_weight():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(nf=24, nx=16)  # weight (16, 24): x @ W + b
    nn.init.normal_(conv.weight)
    lora = LoRAModel({"c": conv}, r=2, alpha=4)
    ad = lora.adapters["c"]
    nn.init.normal_(ad.lora_B)
    x = torch.randn(3, 16)
    ref = x @ conv.weight + conv.bias + ad.scale * (x @ ad.lora_A.T @ ad.lora_B.T)
    torch.testing.assert_close(conv(x), ref, rtol=0, atol=1e-5)
    lora.merge()
    torch.testing.assert_close(conv(x), ref, rtol=0, atol=1e-5)


def test_train_eval_do_not_merge_and_dropout_only_on_adapter():
    torch.manual_seed(0)
    base = nn.Linear(8, 8)
    lora = LoRAModel({"0": base}, r=2, alpha=2, dropout=0.5)
    w0 = base.weight.detach().clone()
    lora.train(); lora.eval(); lora.train()
    assert torch.equal(base.weight, w0) and not lora.merged
    # B = 0: even with dropout active the output equals the base exactly
    x = torch.randn(4, 8)
    assert torch.equal(base(x), x @ base.weight.T + base.bias)


def test_adapter_state_roundtrip_and_errors():
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    la = LoRAModel({"x.q": a}, r=2, alpha=2)
    nn.init.normal_(la.adapters["x/q"].lora_B)
    lb = LoRAModel({"x.q": b}, r=2, alpha=2)
    lb.load_adapter_state_dict(la.adapter_state_dict())
    assert torch.equal(lb.adapters["x/q"].lora_B, la.adapters["x/q"].lora_B)
    with pytest.raises(KeyError, match="missing"):
        lb.load_adapter_state_dict({})
    bad = {k: torch.zeros(3, 3) for k in la.adapter_state_dict()}
    with pytest.raises(ValueError, match="x.q.lora_A: shape"):
        lb.load_adapter_state_dict(bad)


def test_adapter_spec_is_the_checkpoint_schema():
    """adapter_config.json: the keys and order written since the first checkpoints; older files
    without dropout/rslora/dtype read with the defaults; one scale formula (α/r, rsLoRA α/√r)."""
    from bigtrain.lora import AdapterSpec, LoRAAdapter

    spec = AdapterSpec(r=8, alpha=16, dropout=0.1, rslora=False, targets=["q_proj"],
                       modules=["model.layers.0.q_proj"], base_model="builtin:tiny-opt", dtype="float32")
    d = spec.to_json()
    assert list(d) == ["r", "alpha", "dropout", "rslora", "targets", "modules", "base_model", "dtype"]
    assert AdapterSpec.from_json(d) == spec and spec.scale == 2.0
    old = {"r": 4, "alpha": 8, "modules": ["m"], "base_model": "x", "targets": ["m"]}
    assert AdapterSpec.from_json(old) == AdapterSpec(r=4, alpha=8, targets=["m"], modules=["m"], base_model="x")
    assert AdapterSpec(r=16, alpha=8, rslora=True).scale == 2.0
    assert LoRAAdapter(4, 4, 16, 8, rslora=True).scale == AdapterSpec(r=16, alpha=8, rslora=True).scale
