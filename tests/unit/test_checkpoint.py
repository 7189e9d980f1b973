"""Checkpoints: adapter-only, atomic, verified, with fallback; no pickle anywhere."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from bigtrain import checkpoint as ckpt
from bigtrain.config import ZeroConfig
from bigtrain.engine import Engine
from bigtrain.lora import LoRAModel


def _setup(r=2, seed=0):
    torch.manual_seed(seed)
    targets = {f"layers.{i}.q_proj": nn.Linear(16, 16) for i in range(2)}
    lora = LoRAModel(targets, r=r, alpha=4)
    for p in lora.parameters():
        nn.init.normal_(p)
    opt = torch.optim.AdamW(lora.parameters(), lr=1e-3)
    sum(p.sum() for p in lora.parameters()).backward()
    opt.step()
    return lora, opt


def _save(root, step, lora, opt, keep=2, fp=None):
    eng = Engine(ZeroConfig(stage=0), device="cpu")
    return ckpt.save_checkpoint(root, step, eng, lora, opt, {"step": step, "position": step * 8},
                                {"r": 2}, fp or {"config_sha256": "abc"}, "x: 1\n", keep)


def test_roundtrip_exact(tmp_path):
    lora, opt = _setup()
    path = _save(tmp_path, 5, lora, opt)
    assert (tmp_path / "latest").read_text().strip() == "step-00000005"
    assert ckpt.verify(path)["step"] == 5
    lora2, opt2 = _setup(seed=1)
    state = ckpt.load_checkpoint(path, lora2, opt2, rank=0)
    assert state["step"] == 5 and state["position"] == 40
    for a, b in zip(lora.parameters(), lora2.parameters()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    for i in s1["state"]:
        for k in s1["state"][i]:
            assert torch.equal(s1["state"][i][k], s2["state"][i][k])
    assert s1["param_groups"] == s2["param_groups"]
    # only safetensors / JSON / YAML: nothing that would need unpickling
    suffixes = {p.suffix for p in path.rglob("*") if p.is_file()}
    assert suffixes <= {".safetensors", ".json", ".yaml"}


def test_keep_last_k(tmp_path):
    lora, opt = _setup()
    for s in (1, 2, 3, 4):
        _save(tmp_path, s, lora, opt, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000004", "step-00000003"]


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "empty", "no_manifest", "delete_file"])
def test_corrupt_newest_falls_back(tmp_path, damage):
    lora, opt = _setup()
    _save(tmp_path, 1, lora, opt)
    new = _save(tmp_path, 2, lora, opt)
    f = new / ckpt.ADAPTER_FILE
    data = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(data[: len(data) // 2])
    elif damage == "bitflip":
        b = bytearray(data)
        b[-3] ^= 0x10
        f.write_bytes(bytes(b))
    elif damage == "empty":
        f.write_bytes(b"")
    elif damage == "no_manifest":
        (new / ckpt.MANIFEST).unlink()
    else:
        (new / "optimizer.safetensors").unlink()
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.verify(new)
    assert str(new) in str(e.value)
    msgs = []
    assert ckpt.find_resumable(tmp_path, msgs.append) == tmp_path / "step-00000001"
    assert "skipping checkpoint step-00000002" in msgs[0]


def test_wrong_shapes_and_missing_keys_are_named(tmp_path):
    lora, opt = _setup(r=2)
    path = _save(tmp_path, 1, lora, opt)
    other, opt3 = _setup(r=3)
    with pytest.raises(ckpt.CheckpointError, match=r"layers.0.q_proj.lora_A: shape \(2, 16\) in the checkpoint"):
        ckpt.load_checkpoint(path, other, opt3, 0)
    few = LoRAModel({"layers.0.q_proj": nn.Linear(16, 16)}, r=2, alpha=4)
    with pytest.raises(ckpt.CheckpointError, match="unexpected"):
        ckpt.load_adapters(path, few)


def test_base_mismatch_refused_unless_forced(tmp_path):
    lora, opt = _setup()
    path = _save(tmp_path, 1, lora, opt, fp={"config_sha256": "aaa"})
    with pytest.raises(ckpt.CheckpointError, match="different base model.*force_base_mismatch"):
        ckpt.check_base(path, {"config_sha256": "bbb"}, force=False)
    with pytest.warns(UserWarning, match="forced"):
        ckpt.check_base(path, {"config_sha256": "bbb"}, force=True)


CRASH = """
import sys, torch
sys.path.insert(0, {root!r})
from tests.unit.test_checkpoint import _setup, _save
lora, opt = _setup()
_save({dir!r}, 2, lora, opt)
"""


@pytest.mark.parametrize("point", ["save:start", "save:after_weights", "save:before_manifest", "save:before_latest"])
def test_kill_during_save_keeps_last_good(tmp_path, point):
    lora, opt = _setup()
    _save(tmp_path, 1, lora, opt)
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, BIGTRAIN_CRASH_AT=point)
    p = subprocess.run([sys.executable, "-c", CRASH.format(root=root, dir=str(tmp_path))], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 137, p.stderr[-2000:]
    good = ckpt.find_resumable(tmp_path, lambda m: None)
    if point == "save:before_latest":
        # renamed into place and complete, only the pointer is stale: the newer one is good
        assert good == tmp_path / "step-00000002"
        assert (tmp_path / "latest").read_text().strip() == "step-00000001"
    else:
        assert good == tmp_path / "step-00000001"
        assert ckpt.clean_partial(tmp_path) == ["step-00000002".join([".tmp-", ""])]
    lora2, opt2 = _setup(seed=3)
    assert ckpt.load_checkpoint(good, lora2, opt2, 0)["step"] in (1, 2)


def test_175b_adapter_checkpoint_is_37_7_mb(tmp_path):
    """The paper's "35 MB": r=4 on W_q, W_v of GPT-3 175B, stored in bf16, written for real."""
    from safetensors.torch import save_file

    from bigtrain.inject import find_targets
    from bigtrain.presets import hf_config_for, meta_model

    targets = find_targets(meta_model(hf_config_for("gpt3-175b")), ["q_proj", "v_proj"])
    lora = LoRAModel(targets, r=4, alpha=16, dtype=torch.bfloat16)
    n = lora.num_parameters()
    assert n == 18_874_368
    f = tmp_path / "adapter_model.safetensors"
    save_file({k: v.contiguous() for k, v in lora.adapter_state_dict().items()}, str(f))
    size = f.stat().st_size
    assert 2 * n <= size < 2 * n + 64 * 1024  # data + a JSON header of 384 entries
    print(f"175B r=4 q,v adapter: {n:,} params, {size / 1e6:.2f} MB in bf16")
    assert round(size / 1e6, 1) == 37.8 or round(2 * n / 1e6, 1) == 37.7
