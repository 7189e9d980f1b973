"""The single-node launchers in launch/ start `bigtrain train` with 2 CPU (gloo) processes.

Each launcher runs a few steps of the tiny model under ZeRO-3 and must exit 0 with both ranks
reporting in and a complete adapter checkpoint under checkpoints/latest.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS = 4
# model.path=null: a randomly initialised tiny OPT from its preset; no eval set (speed)
TRAIN_ARGS = ["model.path=null", "model.preset=tiny-opt", "data.eval=null", "zero.stage=3",
              "train.device=cpu", f"train.max_steps={STEPS}",
              "train.micro_batch_size=2", "train.log_every=1", "train.warmup_steps=1",
              "train.eval_every=1000", "checkpoint.every=2", "logging.progress_bar=false"]
TIMEOUT_S = 300

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["MASTER_PORT"] = str(_free_port())
    env.setdefault("WANDB_MODE", "offline")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_ID"):
        env.pop(k, None)   # a test run inside a Slurm job or another launcher must not leak them
    env.pop("NPROC", None)
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _shm_buffers() -> set[str]:
    return {f.name for f in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*")}


def assert_finished_run(out: Path, log: str, world: int, steps: int) -> None:
    """Both ranks started, the latest checkpoint is the final step and holds the adapter."""
    ranks = {int(r) for r, w in re.findall(r"rank (\d+)/(\d+) on host", log) if int(w) == world}
    assert ranks == set(range(world)), f"ranks seen: {ranks}\n{log[-4000:]}"
    latest = out / "checkpoints" / "latest"
    assert latest.is_file(), f"no {latest}\n{log[-4000:]}"
    ckpt = out / "checkpoints" / latest.read_text().strip()
    assert (ckpt / "adapter_model.safetensors").is_file(), sorted(p.name for p in ckpt.iterdir())
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == steps
    assert (out / "config.yaml").is_file()


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed", "accelerate"])
def test_launcher_runs_two_cpu_ranks(launcher, tmp_path):
    tool = {"torchrun": "torchrun", "deepspeed": "deepspeed", "accelerate": "accelerate"}[launcher]
    if shutil.which(tool) is None:
        pytest.skip(f"`{tool}` is not on PATH")
    out = tmp_path / "out"
    cmd = ["bash", str(ROOT / "launch" / f"{launcher}.sh"), "--nproc", "2",
           *TRAIN_ARGS, f"train.output_dir={out}"]
    env = _env()
    shm_before = _shm_buffers()
    try:
        p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{launcher} did not finish in {TIMEOUT_S}s:\n{(e.stdout or b'')[-4000:]!r}"
                    f"\n{(e.stderr or b'')[-4000:]!r}")
    log = p.stdout + p.stderr
    assert p.returncode == 0, f"{launcher} exited {p.returncode}:\n{log[-6000:]}"
    assert_finished_run(out, log, world=2, steps=STEPS)
    # DeepSpeed's CPU shared-memory all-reduce buffers (made under the deepspeed launcher, which
    # sets LOCAL_SIZE: 66 MiB per rank) are removed at the end of the run, not left in RAM
    left = _shm_buffers() - shm_before
    assert not left, f"shared memory left behind: {sorted(left)}"



def test_measure_under_the_deepspeed_launcher(tmp_path):
    """`BT_COMMAND=measure launch/deepspeed.sh`: no agent store here (unlike torchrun), so rank 0's
    parent hosts the store the parents agree through; each mode's children get their own port. Both
    modes complete on the 2 ranks with model states equal to the estimate, and no DeepSpeed
    shared-memory buffer of any child is left behind."""
    if shutil.which("deepspeed") is None:
        pytest.skip("`deepspeed` is not on PATH")
    out = tmp_path / "m"
    cmd = ["bash", str(ROOT / "launch" / "deepspeed.sh"), "--nproc", "2", "--steps", "2", "--out", str(out),
           "model.path=null", "model.preset=tiny-opt", "model.dtype=bfloat16", "train.device=cpu",
           "train.micro_batch_size=2", "data.max_length=64", f"train.output_dir={tmp_path / 'run'}"]
    env = {**_env(), "BT_COMMAND": "measure"}
    shm_before = _shm_buffers()
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    log = p.stdout + p.stderr
    assert p.returncode == 0, f"exited {p.returncode}:\n{log[-6000:]}"
    rep = json.loads((out / "measure.json").read_text())
    assert rep["world_size"] == 2
    for mode in ("lora", "full-zero3"):
        m = rep["modes"][mode]
        assert m["status"] == "ok" and len(m["ranks"]) == 2, mode
        assert m["states_total"] == m["predicted"]["states_total"] > 0, mode
    assert "full-zero3/lora: model states measured" in log
    left = _shm_buffers() - shm_before
    assert not left, f"shared memory left behind: {sorted(left)}"


STOP_CASES = [("torchrun", "ctrl-c"), ("torchrun", "kill-launcher"), ("torchrun", "ctrl-c-twice"),
              ("deepspeed", "ctrl-c"), ("deepspeed", "ctrl-c-twice")]


@pytest.mark.parametrize("launcher,how", STOP_CASES, ids=[f"{a}-{b}" for a, b in STOP_CASES])
def test_stop_signal_under_a_launcher_saves_in_one_line(launcher, how, tmp_path):
    """Issue 27: launch/torchrun.sh and launch/deepspeed.sh stopped by Ctrl-C (SIGINT to the
    terminal's process group) or by `kill <launcher>` (SIGTERM). The launcher passes the signal to
    each worker once (torchrun starts them in sessions of their own; launch/_deepspeed.py starts
    DeepSpeed's launch.py in one) and waits: the ranks save at the next step boundary and the launcher
    ends in one line, exit 128+signal. Before: torchrun's SignalException traceback; under the
    deepspeed launcher the runner's KeyboardInterrupt traceback, a "saving" line per rank, the save
    reported as SIGTERM (launch.py's), and a SIGKILL 30 s after Ctrl-C whatever the ranks were doing.
    A second Ctrl-C stops the ranks at once (it used to leave torchrun's workers running on alone):
    exit 130 and the last checkpoint before it, loadable."""
    if shutil.which(launcher) is None:
        pytest.skip(f"`{launcher}` is not on PATH")
    out = tmp_path / "out"
    twice = how == "ctrl-c-twice"
    args = [a for a in TRAIN_ARGS if not a.startswith(("train.max_steps", "checkpoint.every"))]
    # twice: steps of ~5 s (200 micro-batches each), so that the second Ctrl-C lands inside one
    args += ["train.max_steps=2000", f"checkpoint.every={1 if twice else 1000}", f"train.output_dir={out}"]
    if twice:
        args.append("train.grad_accum=200")
    cmd = ["bash", str(ROOT / "launch" / f"{launcher}.sh"), "--nproc", "2", *args]
    env = _env()
    env.pop("TORCHRUN", None)
    env.pop("DEEPSPEED", None)
    p = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)   # its own process group, as in a terminal
    log_file = out / "train_log.jsonl"
    sig = signal.SIGTERM if how == "kill-launcher" else signal.SIGINT
    try:
        deadline = time.monotonic() + TIMEOUT_S
        # twice: once step 1 is saved, the last good checkpoint the second Ctrl-C must leave
        ready = (lambda: (out / "checkpoints" / "latest").is_file()) if twice else \
            (lambda: log_file.is_file() and len(log_file.read_text().splitlines()) >= 3)
        while not ready():
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()
            time.sleep(0.2)
        if how == "kill-launcher":
            os.kill(p.pid, sig)     # the launcher (torchrun.sh exec's it)
        else:
            os.killpg(p.pid, sig)   # what the terminal does on Ctrl-C
        if twice:
            stderr_head = ""
            while "Ctrl-C: saving" not in stderr_head:
                line = p.stderr.readline()
                assert line, stderr_head[-3000:]
                stderr_head += line
            os.killpg(p.pid, sig)
        stdout, stderr = p.communicate(timeout=120)
        if twice:
            stderr = stderr_head + stderr
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    log = stdout + stderr
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-6000:]
    assert p.returncode == 128 + sig, (p.returncode, log[-4000:])
    assert [ln for ln in stderr.splitlines() if ln.startswith(f"{launcher}: ")] == [
        f"{launcher}: stopped by {sig.name}: it passed the signal to its workers and waited for them (bigtrain "
        "saves at the next step boundary; rerun the same command to resume)"], stderr[-3000:]
    if sig == signal.SIGINT:  # said once, by rank 0, not once per rank
        assert log.count("Ctrl-C: saving at the end of this step") == 1, log[-4000:]
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    from bigtrain.checkpoint import read_checkpoint

    read_checkpoint(latest)   # loadable, verified
    if twice:
        assert log.count("second Ctrl-C: stopped at once") == 1, log[-4000:]
        assert "stopped early" not in log and not (out / "preempted").exists()
        assert json.loads((latest / "trainer_state.json").read_text())["step"] >= 1
    else:
        saved = int((out / "preempted").read_text())
        assert 3 <= saved < 2000
        assert f"stopped early ({sig.name}): saved step {saved}" in log, log[-4000:]
        assert json.loads((latest / "trainer_state.json").read_text())["step"] == saved
    # nothing outlives the launcher
    left = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
    assert not left, left
