"""One run per output folder, and no worker outliving its launcher (bigtrain/runlock.py), as users
meet them: a second `bigtrain train` into a live run's folder, a run killed with kill -9, and a
torchrun killed with kill -9 under its workers."""
import os
import signal
import subprocess
import sys
import time

from helpers import free_port, read_until, run, start, tiny_overrides, train_cmd

SLOW = {"model.preset": "gpt3-small", "model.num_layers": 4, "data.max_length": 256,
        "train.sample_prompts": 0}  # a CPU step of ~0.5 s: the run is alive while the test acts


def test_a_second_run_into_a_live_runs_folder_is_refused_naming_it(tmp_path):
    """It used to resume from the live run's newest checkpoint, write step directories beside it and
    die on a save. A run killed with kill -9 leaves no stale lock: the next one starts and resumes."""
    out = tmp_path / "run"
    args = tiny_overrides(out, "null", 200, 4, **{**SLOW, "checkpoint.every": 2})
    first = start(train_cmd(1, args))
    try:
        read_until(first, "[bigtrain] step 3/")
        p = run(train_cmd(1, args), check=False)
        assert p.returncode == 2, p.stderr[-2000:]
        line = [ln for ln in p.stderr.splitlines() if "in use by another run" in ln]
        assert len(line) == 1 and f"config error: train.output_dir={out} is in use by another run (pid {first.pid} " in line[0]
        assert "wait for it to end or stop it, or choose another train.output_dir" in line[0]
        assert "[bigtrain] output directory" not in p.stdout  # refused before it wrote anything there
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait()
    saved = sorted(d.name for d in (out / "checkpoints").glob("step-*"))
    p = run(train_cmd(1, tiny_overrides(out, "null", int(saved[-1].split("-")[1]) + 1, 4,
                                        **{**SLOW, "checkpoint.every": 2})))
    assert f"resumed from {out / 'checkpoints' / saved[-1]}" in p.stdout


def test_workers_do_not_outlive_a_killed_torchrun(tmp_path):
    """torchrun starts its workers in a session of their own: a kill -9 of torchrun used to leave them
    training and writing checkpoints. Now they get SIGTERM when it dies: they save and stop."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(free_port()),
           "-m", "bigtrain", "train", *tiny_overrides(out, "null", 500, 4, **SLOW)]
    launcher = start(cmd)
    read_until(launcher, "[bigtrain] step 2/")
    launcher.send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    rest = launcher.stdout.read()  # the worker holds the pipe open until it exits
    assert time.monotonic() - t0 < 60, rest[-2000:]
    assert "stopped early (SIGTERM): saved step" in rest, rest[-2000:]
    left = subprocess.run(["pgrep", "-f", f"train.output_dir={out}"], capture_output=True, text=True).stdout.split()
    assert [pid for pid in left if int(pid) != os.getpid()] == []
