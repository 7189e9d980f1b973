"""End-to-end training through the CLI on the built-in task, and exact resume."""
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import final_adapters, losses, ranks, run, tiny_overrides, train_cmd

pytestmark = pytest.mark.slow
BUILTIN = Path(__file__).resolve().parents[1] / "bigtrain" / "assets" / "tiny-opt"


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_builtin_task_loss_falls_and_base_untouched(tmp_path):
    """The demo's model and data, shortened to 120 steps: held-out eval loss falls from the base
    model's own 1.92 (adapters zero at step 0) to below 1.3 (the 300-step demo reaches 1.05)."""
    base_hash = _sha(BUILTIN / "model.safetensors")
    out = tmp_path / "run"
    p = run(train_cmd(1, [f"train.output_dir={out}", "train.max_steps=120", "train.eval_every=60",
                          "logging.progress_bar=false", "train.log_every=20", "checkpoint.every=60"]))
    log = [json.loads(l) for l in (out / "train_log.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in log if "eval_loss" in r]
    train_losses = [r["loss"] for r in log if "loss" in r]
    print("train losses", train_losses, "eval", evals)
    assert evals[0] == pytest.approx(1.9156, abs=2e-3)  # step 0: exactly the base model
    assert evals[-1] < 1.3 and evals[-1] < evals[0] - 0.5, evals
    assert train_losses[-1] < train_losses[0] - 0.5
    assert _sha(BUILTIN / "model.safetensors") == base_hash  # the frozen base on disk is untouched
    assert "adapter written to" in p.stdout
    ad = final_adapters(out)
    # adapter-only checkpoint: r*(d_in+d_out) per q/v projection of 4 layers, fp32
    assert sum(t.numel() for t in ad.values()) == 4 * 2 * 8 * (128 + 128)
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert ckpts == ["step-00000060", "step-00000120"]
    size = (out / "checkpoints" / "step-00000120" / "adapter_model.safetensors").stat().st_size
    assert size < 4 * 16384 + 4096  # 16,384 fp32 elements plus a small header


def test_resume_is_exact(tmp_path, tiny_models):
    """2k steps straight == k steps, stop, resume to 2k: identical losses, bit-identical adapters."""
    model = BUILTIN
    k = 4
    common = dict(**{"lora.dropout": 0.1, "data.eval": "builtin:e2e-eval", "train.eval_every": 3})
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(train_cmd(1, tiny_overrides(straight, model, 2 * k, 2, **common)))
    p1 = run(train_cmd(1, tiny_overrides(resumed, model, 2 * k, 2, **common, **{"train.stop_at_step": k})))
    assert "stopped early" in p1.stdout and (resumed / "preempted").read_text().strip() == str(k)
    p2 = run(train_cmd(1, tiny_overrides(resumed, model, 2 * k, 2, **common)))
    assert f"resumed from {resumed / 'checkpoints' / f'step-{k:08d}'} at step {k}" in p2.stdout
    assert not (resumed / "preempted").exists()
    a, b = losses(straight), losses(resumed)
    assert a == b and len(a) == 2 * k  # exact equality, with LoRA dropout on (RNG restored)
    A, B = final_adapters(straight), final_adapters(resumed)
    assert all(torch.equal(A[n], B[n]) for n in A)


def test_resume_across_world_sizes(tmp_path):
    """2 ranks for k steps, then 1 process to 2k (micro-batch doubled to keep the global batch):
    the loss curve continues as the straight 2-rank run's, to float rounding."""
    k = 3
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(train_cmd(2, tiny_overrides(straight, BUILTIN, 2 * k, 2)))
    run(train_cmd(2, tiny_overrides(resumed, BUILTIN, 2 * k, 2, **{"train.stop_at_step": k})))
    p = run(train_cmd(1, tiny_overrides(resumed, BUILTIN, 2 * k, 4)))
    assert "saved with 2 ranks, now 1" in p.stdout
    a, b = losses(straight), losses(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 2 * k + 1))
    for s in a:
        assert a[s] == pytest.approx(b[s], rel=1e-5)
    # and the positions line up: 2k global batches of 4 consumed, none twice
    state = json.loads((resumed / "checkpoints" / f"step-{2 * k:08d}" / "trainer_state.json").read_text())
    assert state["position"] == 2 * k * 4


def test_config_error_before_any_work(tmp_path):
    p = run(train_cmd(1, [f"train.output_dir={tmp_path}/x", "lora.r=0"]), check=False)
    assert p.returncode == 2
    assert "config error: lora.r must be a positive integer, got 0" in p.stderr
    assert not (tmp_path / "x").exists()
    p = run(train_cmd(1, [f"train.output_dir={tmp_path}/x", "lora.targets=[nope]"]), check=False)
    assert p.returncode != 0 and "'nope' matched no linear layer" in p.stderr


def test_time_based_checkpoints_agree_across_ranks(tmp_path):
    """checkpoint.every_minutes: rank 0's clock decides, the decision travels in the step's
    all-reduce, so both ranks save together (a save is collective: a lone rank would hang)."""
    out = tmp_path / "t"
    # 0.0001 min = 6 ms: due at every step; step-based saves off; keep them all
    p = run(train_cmd(2, tiny_overrides(out, BUILTIN, 4, 2, **{
        "checkpoint.every": 0, "checkpoint.every_minutes": 0.0001, "checkpoint.keep": 10})), timeout=300)
    saved = sorted(d.name for d in (out / "checkpoints").glob("step-*"))
    assert saved == [f"step-{s:08d}" for s in (1, 2, 3, 4)], saved
    assert p.stdout.count("[bigtrain] checkpoint ") == 4
    # off by default: only the final save
    out2 = tmp_path / "t2"
    run(train_cmd(1, tiny_overrides(out2, BUILTIN, 3, 2, **{"checkpoint.keep": 10})))
    assert sorted(d.name for d in (out2 / "checkpoints").glob("step-*")) == ["step-00000003"]
