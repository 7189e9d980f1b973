"""`bigtrain measure` under the real torchrun, 2 gloo ranks, a tiny OPT saved with save_pretrained and
loaded through the real path (bf16 base).

* Model-state bytes counted on the live tensors equal the estimator's, exactly, per rank: LoRA (frozen
  ZeRO-3 partitions, adapters, their gradients and AdamW state) and full fine-tuning under DeepSpeed
  ZeRO-3 (16-bit weight partitions, gradient partitions, fp32 master, Adam m, v and step) and ZeRO-2;
  the modes
  see the same data and objective (their step-1 losses agree); the table, measure.json, the PNG and
  the W&B run are written.
* A memory cap that only rank 1 has makes full fine-tuning run out of memory at step 1 there, while
  rank 0's child is stuck (a fault that never returns, as a rank waiting on a dead peer under NCCL
  would): the run reports "out of memory at step 1", stops rank 0's child, and LoRA, run next, still
  completes with exact model states.
"""

import glob
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import ROOT, free_port, losses, run
from wandb_reader import read_run

pytestmark = pytest.mark.slow


def measure_cmd(out, model, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(free_port()), "-m", "bigtrain", "measure", f"model.path={model}", "model.dtype=bfloat16",
            "train.device=cpu", "train.micro_batch_size=2", "data.max_length=64", "--steps", "3",
            "--out", str(out), *extra]


def _predicted(model):
    from bigtrain.config import load_config
    from bigtrain.measure_report import _shape
    from bigtrain.memory import predict_full_states, predict_states

    cfg = load_config(None, [f"model.path={model}", "model.dtype=bfloat16"])
    shape = _shape(cfg)  # the run's model: vocabulary padded to a multiple of 64
    lora = predict_states(shape, ["q_proj", "v_proj"], 8, 2, "bfloat16", 100000)
    full = predict_full_states(shape, 2, 3, "bfloat16", 100000)
    return shape, lora, full


def test_measure_lora_and_full_zero3_exact(tmp_path, tiny_models):
    model, out = tiny_models["tiny-opt"], tmp_path / "m"
    p = run(measure_cmd(out, model, "logging.wandb=true", "logging.wandb_mode=offline",
                        "--modes", "lora,full-zero3,full-zero2"))
    shape, lora_pred, full_pred = _predicted(model)
    rep = json.loads((out / "measure.json").read_text())
    assert rep["world_size"] == 2 and rep["device"] == "cpu"
    lora, full = rep["modes"]["lora"], rep["modes"]["full-zero3"]
    assert lora["status"] == full["status"] == "ok"
    for r in lora["ranks"]:
        assert r["states"] == lora_pred, r["rank"]
    flat = sum(math.ceil(n / 2) for n in shape.param_numels)  # DeepSpeed's per-parameter padded partitions
    whole = sum(n for n in shape.param_numels if n <= 100000)  # persistent: also kept whole on each rank
    assert whole < shape.total_params  # the embedding (131,072 elements) is not
    assert full_pred == {"weights": 2 * (flat + whole),
                         "gradients": 2 * flat, "master_weights": 4 * flat, "adam_states": 8 * flat + 4}
    for r in full["ranks"]:
        assert r["states_detail"] == full_pred, r["rank"]
    # ZeRO-2: whole 16-bit weights, flat ceil(P/N) shares of gradients, master and Adam states
    zero2 = rep["modes"]["full-zero2"]
    assert zero2["status"] == "ok"
    half = math.ceil(shape.total_params / 2)
    for r in zero2["ranks"]:
        assert r["states_detail"] == {"weights": 2 * shape.total_params, "gradients": 2 * half,
                                      "master_weights": 4 * half, "adam_states": 8 * half + 4}, r["rank"]
        assert r["states_detail"] == r["predicted_states_detail"]
    assert zero2["states_total"] == zero2["predicted"]["states_total"]
    # the report's estimate (bigtrain estimate's categories) is the same figure
    assert lora["states_total"] == lora["predicted"]["states_total"] == sum(lora_pred.values())
    assert full["states_total"] == full["predicted"]["states_total"] == sum(full_pred.values())
    ratio = rep["ratios"]["full-zero3/lora"]
    assert ratio["measured_states"] == ratio["predicted_states"] == sum(full_pred.values()) / sum(lora_pred.values())
    # the same data and objective: before any update both modes score the same base on the same batch
    lora_step1 = losses(out / "lora" / "run")[1]
    assert full["ranks"][0]["losses"][0] == pytest.approx(lora_step1, rel=1e-4)
    assert all(r["tokens_per_s_per_gpu"] > 0 for r in (lora["ranks"][0], full["ranks"][0]))
    assert "full-zero3/lora: model states measured" in p.stdout and "+0.0%" in p.stdout
    assert (out / "measure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # bench/measure_table.py (the README table from measure.json files): one row per mode, the states
    md = run([sys.executable, "bench/measure_table.py", str(out / "measure.json")]).stdout
    gib = lambda b: f"{b / 2**30:.1f}"  # noqa: E731
    assert f"| full-zero3 | – | {gib(full['predicted']['peak_bytes'])} |" in md
    assert f"| {gib(full['states_total'])} ({gib(sum(full_pred.values()))}) |" in md
    (run_dir,) = glob.glob(f"{out}/wandb/offline-run-*")
    history, summary, _ = read_run(run_dir)
    table = next(h for h in history if "measure/modes/_type" in h)
    assert table["measure/modes/_type"] == "table-file" and table["measure/modes/nrows"] == 3
    chart = next(h for h in history if "measure/chart/_type" in h)
    assert chart["measure/chart/_type"] == "image-file" and chart["measure/chart/format"] == "png"
    assert summary["measure/full-zero3/lora/measured_states"] == pytest.approx(ratio["measured_states"])


def test_measure_oom_on_one_rank_is_reported_and_the_next_mode_runs(tmp_path, tiny_models):
    model, out = tiny_models["tiny-opt"], tmp_path / "m"
    _, lora_pred, full_pred = _predicted(model)
    # the cap sits between LoRA's model states and full fine-tuning's after its first step
    cap = (sum(lora_pred.values()) + sum(full_pred.values())) / 2
    assert sum(lora_pred.values()) < cap < sum(full_pred.values())
    p = run(measure_cmd(out, model, "--modes", "full-zero3,lora", "--mem-cap-gib", str(cap / 2**30)),
            env={"BIGTRAIN_FAULT_MEM_CAP_RANKS": "1", "BIGTRAIN_FAULT_HANG": "2:0"})
    rep = json.loads((out / "measure.json").read_text())
    full, lora = rep["modes"]["full-zero3"], rep["modes"]["lora"]
    assert full["status"] == "out of memory at step 1" and full["oom_step"] == 1
    r0, r1 = full["ranks"]
    assert r1["status"] == "oom" and r1["step"] == 1 and "exceed the memory cap" in r1["error"]
    assert r0["status"] == "stopped: another rank's child failed"
    assert "full-zero3: out of memory at step 1" in p.stdout
    # beside it, the estimate's answer for the fewest GPUs of that size (here none: at a 6 MB "GPU"
    # DeepSpeed's 1 GB reduce bucket alone does not fit, whatever the count)
    assert full["predicted"]["fewest_gpus"] is None
    assert "full-zero3   " in p.stdout and "out of memory at step 1; the estimate: no GPU count fits" in p.stdout
    assert lora["status"] == "ok"
    for r in lora["ranks"]:
        assert r["states"] == lora_pred


def _children(pid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d))
    return out


def test_terminating_a_rank_ends_its_child(tmp_path):
    """Each mode's child runs in its own session (so that killing it takes what it started): a TERM
    to the rank (a launcher tearing down, Slurm's scancel) must end the child too, not orphan it
    with its GPU. The child here is stuck at step 1 (fault), as a hung mode would be."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "BIGTRAIN_FAULT_HANG": "1:0"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    p = subprocess.Popen([sys.executable, "-m", "bigtrain", "measure", "model.path=null", "model.preset=tiny-opt",
                          "model.dtype=bfloat16", "train.device=cpu", "data.max_length=64", "--steps", "2",
                          "--modes", "full-zero3", "--out", str(tmp_path / "m")], env=env, cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (kids := _children(p.pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert kids, "no child started"
        (child,) = kids
        time.sleep(3)
        assert p.poll() is None and os.path.exists(f"/proc/{child}")  # stuck, as set up
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 30
        while os.path.exists(f"/proc/{child}") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not os.path.exists(f"/proc/{child}"), "the child outlived its rank"
    finally:
        if p.poll() is None:
            p.kill()


def test_measure_runs_on_the_demo_as_it_comes(tmp_path):
    """The first command a newcomer tries after the demo: `bigtrain measure` with no config on the
    built-in tiny OPT (a float32 base). Both modes are measured on a bf16 base, said in one line, and
    the report compares them: LoRA's model states are far below full fine-tuning's, both measured
    equal to the estimator's count (it was refused: "full fine-tuning runs DeepSpeed's 16-bit ...")."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    p = subprocess.run([sys.executable, "-m", "bigtrain", "measure", "--steps", "2",
                        f"train.output_dir={tmp_path}/demo"], env=env, cwd=tmp_path, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "model.dtype=float32 -> bfloat16 for every mode" in p.stdout, p.stdout
    rep = json.loads((tmp_path / "demo" / "measure" / "measure.json").read_text())
    rows = rep["modes"]
    assert set(rows) == {"lora", "full-zero3"} and all(m["status"] == "ok" for m in rows.values()), rows
    for mode, m in rows.items():
        assert m["states"] == m["predicted"]["states"], (mode, m["states"], m["predicted"]["states"])
    assert rows["full-zero3"]["states_total"] > 3 * rows["lora"]["states_total"], rows
