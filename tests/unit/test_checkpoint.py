"""Checkpoints: adapter-only, atomic, verified, with fallback; no pickle anywhere."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from bigtrain import checkpoint as ckpt
from bigtrain.config import ConfigError, ZeroConfig
from bigtrain.engine.core import Engine
from bigtrain.lora import AdapterSpec, LoRAModel


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


# -- CheckpointManager: the save rules, on a real engine at world size 1 -------------------------
def _manager(root, lora, opt, fp=None, spec=None, **rules):
    spec = spec or AdapterSpec(r=2, alpha=4, targets=["q_proj"], modules=lora.names(), base_model="preset:x")
    return ckpt.CheckpointManager(root, Engine(ZeroConfig(stage=0), device="cpu"), lora, opt,
                                  adapter_config=spec.to_json(), base_fingerprint=fp or {"config_sha256": "abc"},
                                  config_yaml="x: 1\n", log=lambda m: None, **rules)


def _steps_on_disk(root) -> list[int]:
    return sorted(ckpt.step_of(p) for p in ckpt.list_checkpoints(root))


def _state(step):
    return {"step": step, "position": step * 8}


def test_manager_saves_every_n_steps_and_the_last_step(tmp_path):
    lora, opt = _setup()
    m = _manager(tmp_path, lora, opt, keep=10, every=3, last_step=7)
    saved = [s for s in range(1, 8) if m.maybe_save(s, _state(s)) is not None]
    assert saved == [3, 6, 7]
    assert _steps_on_disk(tmp_path) == [3, 6, 7]
    assert (tmp_path / "latest").read_text().strip() == "step-00000007"
    assert m.last == m.latest() == tmp_path / "step-00000007"
    state = json.loads((m.last / "trainer_state.json").read_text())
    assert state["step"] == 7 and state["position"] == 56 and state["world_size"] == 1
    assert ckpt.verify(m.last)["step"] == 7


def test_manager_force_and_due_save_off_schedule(tmp_path):
    lora, opt = _setup()
    m = _manager(tmp_path, lora, opt, keep=10, every=0, last_step=100)
    assert m.maybe_save(1, _state(1)) is None
    assert m.maybe_save(2, _state(2), force=True) == tmp_path / "step-00000002"  # a stop request
    assert m.maybe_save(3, _state(3)) is None
    assert m.maybe_save(4, _state(4), due=True) == tmp_path / "step-00000004"  # rank 0's clock
    assert _steps_on_disk(tmp_path) == [2, 4]
    assert m.last == tmp_path / "step-00000004"


def test_manager_keeps_the_newest_good_k_and_removes_partial_saves(tmp_path):
    lora, opt = _setup()
    m = _manager(tmp_path, lora, opt, keep=2, every=1)
    for s in (1, 2, 3):
        m.maybe_save(s, _state(s))
    assert _steps_on_disk(tmp_path) == [2, 3]
    (tmp_path / "step-00000003" / ckpt.MANIFEST).unlink()  # incomplete: does not count towards keep
    (tmp_path / ".tmp-step-00000009" / "rng").mkdir(parents=True)  # a save that died
    m.maybe_save(4, _state(4))
    assert _steps_on_disk(tmp_path) == [2, 4]
    assert not (tmp_path / ".tmp-step-00000009").exists()
    m.maybe_save(5, _state(5))
    assert _steps_on_disk(tmp_path) == [4, 5]


def test_manager_time_due_on_rank0_clock_restarts_at_each_save(tmp_path):
    lora, opt = _setup()
    off = _manager(tmp_path / "off", lora, opt, keep=2)
    time.sleep(0.01)
    assert not off.time_due()  # every_minutes=0: never
    m = _manager(tmp_path, lora, opt, keep=10, every_minutes=0.001)  # 60 ms
    m.restart_clock()
    assert not m.time_due()
    time.sleep(0.1)
    assert m.time_due()
    assert m.maybe_save(1, _state(1), due=m.time_due()) == tmp_path / "step-00000001"
    assert not m.time_due()  # the save restarted the clock
    assert m.maybe_save(2, _state(2), due=m.time_due()) is None
    assert _steps_on_disk(tmp_path) == [1]


def test_manager_never_saves_non_finite_adapters(tmp_path):
    lora, opt = _setup()
    with torch.no_grad():
        next(iter(lora.parameters()))[0, 0] = float("nan")
    m = _manager(tmp_path, lora, opt, keep=2, every=1)
    with pytest.raises(AssertionError, match="non-finite"):
        m.maybe_save(1, _state(1))
    assert _steps_on_disk(tmp_path) == [] and m.last is None


def test_manager_resume_auto_never_explicit_and_base_check(tmp_path):
    lora, opt = _setup()
    assert _manager(tmp_path, lora, opt, keep=2).resume("auto").path is None  # nothing there yet
    _manager(tmp_path, lora, opt, keep=2, every=2).maybe_save(2, _state(2))
    lora2, opt2 = _setup(seed=1)
    r = _manager(tmp_path, lora2, opt2, keep=2).resume("auto")
    assert r.path == tmp_path / "step-00000002" and r.state["position"] == 16 and r.world_size == 1
    assert all(torch.equal(a, b) for a, b in zip(lora.parameters(), lora2.parameters()))
    assert _manager(tmp_path, lora2, opt2, keep=2).resume(str(tmp_path)).path == tmp_path / "step-00000002"
    with pytest.raises(ConfigError, match="checkpoint.resume=never, but"):
        _manager(tmp_path, lora2, opt2, keep=2).resume("never")
    with pytest.raises(ConfigError, match="checkpoint.resume=.*nope"):
        ckpt.check_resume(str(tmp_path / "nope"), tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="different base model"):
        _manager(tmp_path, lora2, opt2, fp={"config_sha256": "zzz"}, keep=2).resume("auto")


@pytest.mark.parametrize("change,msg", [
    ({"alpha": 8.0}, "lora.alpha changed on resume: checkpoint 4.0, now 8.0 (the adapters' scale would jump "
                     "from 2 to 4); resume with lora.alpha=4.0, or start a fresh run in another train.output_dir"),
    ({"rslora": True}, "lora.rslora changed on resume: checkpoint false, now true (the adapters' scale would jump "
                       "from 2 to 2.82843); resume with lora.rslora=false, or start a fresh run in another "
                       "train.output_dir"),
    ({"r": 4}, "lora.r changed on resume: checkpoint 2, now 4; resume with lora.r=2"),
    ({"targets": ["k_proj"], "modules": ["layers.0.k_proj"]},
     "lora.targets changed on resume: the checkpoint adapts 2 modules (['q_proj']), now 1 (['k_proj'])"),
    # the same targets over a shallower base: the base is named, not lora.targets (which did not change)
    ({"modules": ["layers.0.q_proj"], "base_model": "preset:y"},
     "the base changed on resume: lora.targets ['q_proj'] match 2 modules in the checkpoint's base (preset:x) "
     "but 1 in this one (preset:y), e.g. layers.1.q_proj is missing; resume on the checkpoint's base"),
])
def test_manager_resume_refuses_changed_adapter_hparams(tmp_path, change, msg):
    """A changed alpha or rslora used to resume silently: the scale jumped and the new
    adapter_config.json claimed it for adapters trained at the old one. Refused like a changed r."""
    lora, opt = _setup()
    base = AdapterSpec(r=2, alpha=4.0, targets=["q_proj"], modules=lora.names(), base_model="preset:x")
    _manager(tmp_path, lora, opt, spec=base, keep=2).maybe_save(2, _state(2), force=True)
    spec = AdapterSpec(**{**base.to_json(), **change})
    lora2, opt2 = _setup(seed=1)
    with pytest.raises(ConfigError) as e:
        _manager(tmp_path, lora2, opt2, spec=spec, keep=2).resume("auto")
    assert str(e.value).startswith(f"{tmp_path / 'step-00000002'}: {msg}") and "\n" not in str(e.value)
    assert not any(torch.equal(a, b) for a, b in zip(lora.parameters(), lora2.parameters()))  # nothing loaded


def test_manager_resume_with_changed_dropout_says_so(tmp_path):
    lora, opt = _setup()
    base = AdapterSpec(r=2, alpha=4.0, dropout=0.1, targets=["q_proj"], modules=lora.names(), base_model="x")
    _manager(tmp_path, lora, opt, spec=base, keep=2).maybe_save(2, _state(2), force=True)
    lora2, opt2 = _setup(seed=1)
    said = []
    m = _manager(tmp_path, lora2, opt2, spec=AdapterSpec(**{**base.to_json(), "dropout": 0.0}), keep=2)
    m.log = said.append
    assert m.resume("auto").path == tmp_path / "step-00000002"
    assert said == ["[bigtrain] lora.dropout changed on resume: 0.1 -> 0.0 (the config's value is used)"]
    said.clear()
    m = _manager(tmp_path, lora2, opt2, spec=base, keep=2)
    m.log = said.append
    m.resume("auto")
    assert said == []  # unchanged: nothing said


def test_read_checkpoint_gives_spec_and_tensors(tmp_path):
    lora, opt = _setup()
    _manager(tmp_path, lora, opt, keep=2).maybe_save(3, _state(3), force=True)
    c = ckpt.read_checkpoint(tmp_path)  # the checkpoints dir resolves through `latest`
    assert c.path == tmp_path / "step-00000003"
    assert c.spec.r == 2 and c.spec.modules == lora.names() and c.spec.scale == 2.0
    assert set(c.tensors) == set(lora.adapter_state_dict())


CRASH = """
import sys, torch
sys.path.insert(0, {root!r})
from tests.unit.test_checkpoint import _setup, _save
lora, opt = _setup()
_save({dir!r}, 2, lora, opt)
"""


CRASH_POINTS = ["save:start", "save:after_weights", "save:before_manifest", "save:before_latest"]


@pytest.fixture(scope="module")
def crashed_saves(tmp_path_factory) -> dict:
    """{crash point: (a checkpoints folder that held step 1 when a process died at that point of
    step 2's save, that process's exit code, its stderr)}. The four processes (each ~4 s of imports
    on one core) run at once, each on its own folder."""
    root = str(Path(__file__).resolve().parents[2])
    procs = {}
    for point in CRASH_POINTS:
        d = tmp_path_factory.mktemp("crash-" + point.replace(":", "-"))
        lora, opt = _setup()
        _save(d, 1, lora, opt)
        env = dict(os.environ, BIGTRAIN_CRASH_AT=point)
        procs[point] = d, subprocess.Popen([sys.executable, "-c", CRASH.format(root=root, dir=str(d))], env=env,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = {}
    for point, (d, p) in procs.items():
        _, err = p.communicate(timeout=120)
        out[point] = d, p.returncode, err
    return out


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_kill_during_save_keeps_last_good(crashed_saves, point):
    tmp_path, returncode, stderr = crashed_saves[point]
    assert returncode == 137, stderr[-2000:]
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


@pytest.mark.parametrize("fail,first", [
    ("optimizer.safetensors", "checkpoint of step 4 not saved: writing {tmp}/optimizer.safetensors failed"),
    ("rank00000.json", "checkpoint of step 4 not saved: writing {tmp}/rng/rank00000.json failed"),
    ("latest.tmp", "checkpoint of step 4 written, but then writing {root}/latest.tmp failed"),
])
def test_save_on_a_full_disk_says_what_and_where_to_resume(tmp_path, monkeypatch, fail, first):
    """A write of a save failing with ENOSPC (bigtrain.faults): one CheckpointSaveError line naming
    the file, what to do and the step to resume from; what was saved before stays byte for byte,
    and the partial directory is gone. When only moving `latest` failed, step 4 is complete and is
    what a resume takes."""
    lora, opt = _setup()
    _save(tmp_path, 2, lora, opt)
    before = {p: p.read_bytes() for p in (tmp_path / "step-00000002").rglob("*") if p.is_file()}
    monkeypatch.setenv("BIGTRAIN_FAULT_ENOSPC", fail)
    with pytest.raises(ckpt.CheckpointSaveError) as e:
        _save(tmp_path, 4, lora, opt)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(first.format(tmp=tmp_path / ".tmp-step-00000004", root=tmp_path))
    assert (": No space left on device (errno ENOSPC); free space on the filesystem of "
            f"{tmp_path}, then rerun the same command to resume from step ") in msg
    assert {p: p.read_bytes() for p in (tmp_path / "step-00000002").rglob("*") if p.is_file()} == before
    assert (tmp_path / "latest").read_text().strip() == "step-00000002"
    assert sorted(p.name for p in tmp_path.iterdir()) == (
        ["latest", "step-00000002", "step-00000004"] if fail == "latest.tmp" else ["latest", "step-00000002"])
    want = 4 if fail == "latest.tmp" else 2
    assert f"resume from step {want} " in msg and ckpt.step_of(ckpt.find_resumable(tmp_path)) == want


def test_save_failing_with_nothing_saved_before_says_start_again(tmp_path, monkeypatch):
    lora, opt = _setup()
    monkeypatch.setenv("BIGTRAIN_FAULT_ENOSPC", "adapter_model.safetensors")
    with pytest.raises(ckpt.CheckpointSaveError, match=r"then rerun the same command to start again "
                                                        r"\(no checkpoint was saved yet\)"):
        _save(tmp_path, 2, lora, opt)
    assert list(tmp_path.iterdir()) == []


def test_base_keys_an_older_checkpoint_lacks_are_not_compared(tmp_path):
    """base.json gained weights_sampled_sha256 and tokenizer_sha256: a checkpoint written before them
    still resumes (and a key it does record is still compared)."""
    import json

    from bigtrain.checkpoint import CheckpointError, check_base

    old = {"config_sha256": "c", "source": "path", "weights": {"model.safetensors": 10}}
    (tmp_path / "base.json").write_text(json.dumps(old))
    now = {**old, "weights_sampled_sha256": "w", "tokenizer_sha256": "t"}
    check_base(tmp_path, now, force=False)
    with pytest.raises(CheckpointError, match=r"a different base model \(weights differ"):
        check_base(tmp_path, {**now, "weights": {"model.safetensors": 11}}, force=False)
    (tmp_path / "base.json").write_text(json.dumps(now))
    with pytest.raises(CheckpointError, match=r"was trained on a different tokenizer \(model.tokenizer\)"):
        check_base(tmp_path, {**now, "tokenizer_sha256": "t2"}, force=False)


@pytest.mark.parametrize("content", [b"\xff\xfe\x00garbage", b"", b"../../etc\n"], ids=["binary", "empty", "path"])
def test_unreadable_latest_is_named_and_the_listing_used(tmp_path, content, capsys):
    """checkpoints/latest holding bytes that are not a checkpoint name (a torn write, a disk error):
    a resume, and generate/eval/export given the run, name the file in one line and use the newest
    complete checkpoint; before, a UnicodeDecodeError traceback (or a path outside the run)."""
    lora, opt = _setup()
    _save(tmp_path, 1, lora, opt)
    _save(tmp_path, 2, lora, opt)
    (tmp_path / ckpt.LATEST).write_bytes(content)
    msgs = []
    assert ckpt.find_resumable(tmp_path, msgs.append) == tmp_path / "step-00000002"
    assert len(msgs) == 1 and str(tmp_path / ckpt.LATEST) in msgs[0] and "not a checkpoint name" in msgs[0]
    capsys.readouterr()
    assert ckpt.resolve_checkpoint(tmp_path) == tmp_path / "step-00000002"  # what generate/eval/export read
    assert str(tmp_path / ckpt.LATEST) in capsys.readouterr().err
