"""W&B (offline, read back from its run file) and TensorBoard logging of a real run; no secrets."""
import glob
from pathlib import Path

import pytest

from helpers import ROOT, run, tiny_overrides, train_cmd
from wandb_reader import read_run

pytestmark = pytest.mark.slow
BUILTIN = ROOT / "bigtrain" / "assets" / "tiny-opt"
SECRET = "sk-bigtrain-test-0123456789abcdef"


def test_wandb_offline_and_tensorboard(tmp_path):
    out = tmp_path / "run"
    run(train_cmd(1, tiny_overrides(out, BUILTIN, 4, 2, **{
        "logging.wandb": "true", "logging.wandb_mode": "offline", "logging.wandb_run_name": "../../ci-run",
        "logging.wandb_tags": "[ci,tiny]", "logging.tensorboard": "true", "checkpoint.every": 1,
        "checkpoint.merge_at_end": "true"})),
        env={"WANDB_API_KEY": SECRET})
    (run_dir,) = glob.glob(f"{out}/wandb/offline-run-*")
    history, summary, config = read_run(run_dir)
    steps = [h for h in history if "loss" in h]
    assert [h["_step"] for h in steps] == [1, 2, 3, 4]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
        assert all(isinstance(h[key], (int, float)) for h in steps), key
    assert summary["step"] == 4 and summary["trainable_params"] == 16384
    # memory: predicted against measured, at start (weights) and at the end (all model states)
    for k in ("frozen_weights", "trainable_weights"):
        assert summary[f"memory/{k}_start_measured"] == summary[f"memory/{k}_measured"] \
            == summary[f"memory/{k}_predicted"] > 0, k
    for k in ("gradients", "optimizer_state"):
        assert summary[f"memory/{k}_start_measured"] == 0
        assert summary[f"memory/{k}_measured"] == summary[f"memory/{k}_predicted"] > 0, k
    assert config["lora"]["r"] == 8
    assert glob.glob(f"{out}/tensorboard/events.out.tfevents.*")
    # every file the run wrote is under train.output_dir (a run name that looks like a path too)
    outside = [f for f in tmp_path.rglob("*") if f.is_file() and out not in f.parents]
    assert not outside, outside
    assert (out / "merged" / "config.json").is_file()
    # the API key is in the environment only: never in anything the run wrote
    for f in Path(out).rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f


def test_a_one_step_run_counts_its_adam_state(tmp_path):
    """AdamW's moments appear at the optimizer's first step: a run of one step measures them after it
    (it reported 0 bytes before), equal to the prediction."""
    import json

    out = tmp_path / "run"
    run(train_cmd(1, tiny_overrides(out, BUILTIN, 1, 2)))
    summary = {}
    for line in (out / "train_log.jsonl").read_text().splitlines():
        summary.update(json.loads(line).get("summary", {}))
    assert summary["memory/optimizer_state_measured"] == summary["memory/optimizer_state_predicted"] > 0
