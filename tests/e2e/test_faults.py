"""Faults with 2 ranks under the real launcher: what the user keeps."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import ROOT, _env, final_adapters, losses, run, run_all, tiny_overrides, train_cmd

pytestmark = pytest.mark.slow
BUILTIN = ROOT / "bigtrain" / "assets" / "tiny-opt"


def test_nan_on_one_rank_is_skipped_by_all(tmp_path):
    out = tmp_path / "nan"
    p = run(train_cmd(2, tiny_overrides(out, BUILTIN, 5, 2)), env={"BIGTRAIN_FAULT_NAN": "3:1"})
    assert "step 3: non-finite loss/gradient, skipped (1/10 allowed)" in p.stdout
    log = [json.loads(l) for l in (out / "train_log.jsonl").read_text().splitlines()]
    assert any(r.get("bad_steps") == 1 for r in log)
    assert sorted(losses(out)) == [1, 2, 3, 4, 5]  # the skipped step is retried on the next batch
    assert all(torch.isfinite(t).all() for t in final_adapters(out).values())
    rk = json.loads((out / "ranks.json").read_text())
    assert rk[0]["adapter_sha256"] == rk[1]["adapter_sha256"]


def test_too_many_bad_steps_stop_every_rank(tmp_path):
    out = tmp_path / "nan2"
    p = run(train_cmd(2, tiny_overrides(out, BUILTIN, 6, 2, **{"train.max_bad_steps": 1})),
            env={"BIGTRAIN_FAULT_NAN": "2:0,3:0"}, check=False, timeout=300)
    assert p.returncode != 0
    # one line per rank, no traceback (a FloatingPointError traceback before)
    lines = [ln for ln in p.stderr.splitlines() if "training diverged" in ln]
    assert len(lines) == 2 and "FloatingPointError" not in p.stderr, p.stderr[-3000:]  # (torchrun's own traceback follows)
    assert lines[0].endswith("bigtrain: error: training diverged: more than train.max_bad_steps=1 non-finite steps, "
                             "the last at step 3; no checkpoint saved; lower train.lr (or raise train.max_grad_norm's "
                             "clipping) and rerun"), lines[0]


def run_ranks_apart(overrides, world=2, timeout=180, per_rank=None, env=None, preexec_fn=None):
    """Start ``world`` bigtrain processes the way `srun` does (SLURM_PROCID / SLURM_NTASKS, one
    shared MASTER_PORT), but with nothing that kills the others when one fails, so each rank's own
    decision shows. Returns [(returncode, stdout + stderr)] by rank. A rank that started a process
    group while another did not would block until the timeout: the time bound catches a hang."""
    from helpers import free_port

    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-m", "bigtrain", "train", *overrides,
                               *(per_rank[r] if per_rank else [])], cwd=ROOT,
                              env=_env({"SLURM_PROCID": str(r), "SLURM_NTASKS": str(world),
                                        "SLURM_LOCALID": str(r), "MASTER_ADDR": "127.0.0.1",
                                        "MASTER_PORT": port, **(env or {})}),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              preexec_fn=preexec_fn)
             for r in range(world)]
    out = []
    for pr in procs:
        try:
            text, _ = pr.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"a rank hung for {timeout}s")
        out.append((pr.returncode, text))
    return out


def test_bad_config_fails_every_rank_before_the_process_group(tmp_path):
    msg = "config error: lora.alpha must be > 0, got 0.0"
    args = tiny_overrides(tmp_path / "x", BUILTIN, 2, 2, **{"lora.alpha": 0})
    # each rank on its own (as srun starts them): every one refuses, by itself, with the same line
    t0 = time.time()
    for rc, text in run_ranks_apart(args):
        assert rc == 2 and msg in text, text[-3000:]
        assert "rank 0/2 on host" not in text and "rank 1/2 on host" not in text  # no process group
    assert time.time() - t0 < 120
    # under torchrun: the job fails (torchrun stops the other rank when the first one exits, so
    # how many ranks got to print the line first is a race: at least one)
    p = run(train_cmd(2, args), check=False, timeout=300)
    assert p.returncode != 0 and msg in p.stderr


def test_bad_data_line_same_decision_on_all_ranks(tmp_path):
    data = tmp_path / "d.jsonl"
    lines = [json.dumps({"prompt": f"p{i}", "completion": f" c{i}"}) for i in range(40)]
    lines[17] = '{"prompt": "x", "completion": '
    data.write_text("\n".join(lines) + "\n")
    for rc, text in run_ranks_apart(tiny_overrides(tmp_path / "e", BUILTIN, 2, 2, **{"data.train": data})):
        assert rc != 0 and f"{data}:18" in text, text[-3000:]
    out = tmp_path / "s"
    p, skipped = run_all([train_cmd(2, tiny_overrides(tmp_path / "e2", BUILTIN, 2, 2, **{"data.train": data})),
                          train_cmd(2, tiny_overrides(out, BUILTIN, 2, 2, **{"data.train": data,
                                                                               "data.on_bad_line": "skip"}))],
                         timeout=300, check=[False, True])  # independent: side by side
    assert p.returncode != 0 and f"{data}:18" in p.stderr
    p = skipped
    assert "39 examples, 1 skipped" in p.stdout


def test_ranks_reading_different_data_all_refuse(tmp_path):
    """Node-local copies of the data that differ (one node has a stale file): the global sample
    order would silently mix two datasets. Every rank compares, every rank refuses."""
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    lines = [json.dumps({"prompt": f"p{i}", "completion": f" c{i}"}) for i in range(40)]
    a.write_text("\n".join(lines) + "\n")
    b.write_text("\n".join(lines[:39]) + "\n")   # one example short
    results = run_ranks_apart(tiny_overrides(tmp_path / "o", BUILTIN, 2, 2),
                              per_rank=[[f"data.train={a}"], [f"data.train={b}"]])
    for rc, text in results:
        assert rc == 1 and "the ranks read different data" in text, text[-3000:]
        assert "rank 0: examples 40" in text and "rank 1: examples 39" in text
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_kill_one_rank_tears_down_and_relaunch_resumes(tmp_path):
    # long enough that the kill lands mid-run on any machine; wait for the first checkpoint (not a
    # given step's: with checkpoint.keep=2 a step's directory lives only a few steps, and once
    # missed the test waited for it until its deadline)
    out = tmp_path / "k"
    steps = 150
    args = tiny_overrides(out, BUILTIN, steps, 2, **{"checkpoint.every": 3, "zero.timeout_s": 60})
    log = tmp_path / "first.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(train_cmd(2, args), cwd=ROOT, env=_env(), stdout=f,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not latest.exists():
        time.sleep(0.1)
    if not latest.exists() or proc.poll() is not None:
        state = f"exited {proc.returncode}" if proc.poll() is not None else "still running after 300 s"
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"no checkpoint while the job ran: it {state}\n{log.read_text()[-6000:]}")
    # kill -9 one training rank (a child of torchrun running bigtrain)
    kids = subprocess.run(["pgrep", "-f", f"train.output_dir={out}"], capture_output=True, text=True).stdout.split()
    workers = [int(k) for k in kids if int(k) != proc.pid]
    assert workers
    t_kill = time.time()
    os.kill(workers[-1], signal.SIGKILL)
    proc.wait(timeout=180)
    torn_down = time.time() - t_kill
    assert proc.returncode != 0
    assert torn_down < 120, f"teardown took {torn_down:.0f}s"
    saved = int((out / "checkpoints" / "latest").read_text().strip().split("-")[1])
    p = run(train_cmd(2, args))
    assert 3 <= saved < steps and f"at step {saved}" in p.stdout
    assert max(losses(out)) == steps
    print(f"teardown {torn_down:.1f}s after kill -9; resumed from step {saved}")


@pytest.mark.parametrize("point", ["save:after_weights", "save:before_latest"])
def test_crash_during_save_under_launcher(tmp_path, point):
    """Rank 0 dies (as kill -9 would) inside the save of step 4; the relaunch resumes from step 2's
    checkpoint (or step 4's, which is complete when only `latest` had not moved)."""
    out = tmp_path / "c"
    args = tiny_overrides(out, BUILTIN, 6, 2, **{"checkpoint.every": 2})
    crash = run(train_cmd(2, args + ["checkpoint.keep=3"]), env={"BIGTRAIN_CRASH_AT_STEP": "4",
                                                               "BIGTRAIN_CRASH_AT": point}, check=False)
    assert crash.returncode != 0
    p = run(train_cmd(2, args + ["checkpoint.keep=3"]))
    expect = 4 if point == "save:before_latest" else 2
    assert f"at step {expect} " in p.stdout, p.stdout[-2000:]
    if point == "save:after_weights":
        assert "removed .tmp-step-00000004" in p.stdout  # the partial save is cleaned up
    assert max(losses(out)) == 6


def test_soak_random_kills_end_equal_to_uninterrupted(tmp_path):
    """2 ranks, repeated kill -9 of the whole job at random moments (mid-step or mid-save), each
    time relaunched: the final adapters equal those of an uninterrupted run, bit for bit."""
    import random

    # long enough for the kills to land before the job ends: with 14 steps only 2 of the 3 required
    # landed once the per-layer gatherer made CPU steps faster
    steps = 40
    ref = tmp_path / "ref"
    run(train_cmd(2, tiny_overrides(ref, BUILTIN, steps, 2)))
    out = tmp_path / "soak"
    args = tiny_overrides(out, BUILTIN, steps, 2, **{"checkpoint.every": 1})
    rng = random.Random(7)
    kills = 0
    for cycle in range(12):
        proc = subprocess.Popen(train_cmd(2, args), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        # wait until training is under way (a checkpoint newer than at launch), then a random delay
        start = set(p.name for p in (out / "checkpoints").glob("step-*")) if (out / "checkpoints").exists() else set()
        deadline = time.time() + 240
        while proc.poll() is None and time.time() < deadline:
            now = set(p.name for p in (out / "checkpoints").glob("step-*")) if (out / "checkpoints").exists() else set()
            if now - start:
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is None and kills < 5:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait(timeout=240)
        if proc.returncode == 0 and (out / "ranks.json").exists():
            break
    assert kills >= 3, f"only {kills} kills landed"
    assert (out / "ranks.json").exists(), "the soak never finished"
    A, B = final_adapters(ref), final_adapters(out)
    assert all(torch.equal(A[k], B[k]) for k in A), "resumed adapters differ from the uninterrupted run"
    print(f"soak: {kills} kills, {cycle + 1} launches")


def test_world_size_the_config_cannot_use(tmp_path):
    """hpZ partition size 8 cannot divide 2 ranks: both ranks say so before any process group."""
    p = run(train_cmd(2, tiny_overrides(tmp_path / "w", BUILTIN, 2, 2,
                                        **{"zero.ds_config": "ds_configs/zero3_hpz.json"})),
            check=False, timeout=300)
    assert p.returncode != 0
    assert p.stderr.count("zero_hpz_partition_size=8 (in ds_configs/zero3_hpz.json) does not divide "
                          "the world size 2") == 2
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 3,\n  "overlap_comm": tru}}')
    p = run(train_cmd(1, tiny_overrides(tmp_path / "b", BUILTIN, 2, 2, **{"zero.ds_config": bad})),
            check=False)
    assert p.returncode == 2 and f"{bad} is not valid JSON (line 2)" in p.stderr


def _file_size_limit(limit):
    """preexec_fn: writes past ``limit`` bytes fail with EFBIG (RLIMIT_FSIZE; inherited by torchrun's
    workers), as a full disk fails a write, without root or a mount: the real OS error through
    the real writes (safetensors' and Python's). SIGXFSZ is ignored, as Python itself does."""
    import resource

    def pre():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre


def _snapshot(ckpts):
    """Every file under checkpoints/ (bytes), to show that a failed save touched nothing."""
    return {str(p.relative_to(ckpts)): p.read_bytes() for p in sorted(ckpts.rglob("*")) if p.is_file()}


def _save_sizes(step_dir):
    rng = max(p.stat().st_size for p in (step_dir / "rng").iterdir())
    adapter = (step_dir / "adapter_model.safetensors").stat().st_size
    opt = (step_dir / "optimizer.safetensors").stat().st_size
    assert rng < adapter < opt, (rng, adapter, opt)  # so a limit can fail one file and not the ones before
    return rng, adapter, opt


def _error_lines(text):
    return [line for line in text.splitlines() if line.startswith("bigtrain: error")]


def test_disk_full_during_save_one_rank(tmp_path):
    """#16 item 8: a save whose adapter file cannot be written (a real write failure: the file-size
    limit, EFBIG) ended in safetensors' SafetensorError traceback. Now: one line naming the file,
    the OS error, what to do and the step a rerun resumes from; exit 3; the checkpoint before it
    untouched and still `latest`; the partial directory removed; the rerun then ends with adapters
    equal, bit for bit, to an uninterrupted run's."""
    ref, out = tmp_path / "ref", tmp_path / "o"
    args = tiny_overrides(out, BUILTIN, 4, 2, **{"checkpoint.every": 2})
    run_all([train_cmd(1, tiny_overrides(ref, BUILTIN, 4, 2, **{"checkpoint.every": 2})),
             train_cmd(1, args + ["train.stop_at_step=2"])])  # independent: side by side
    ckpts = out / "checkpoints"
    rng, adapter, _ = _save_sizes(ckpts / "step-00000002")
    before = _snapshot(ckpts)
    p = run(train_cmd(1, args), check=False, preexec_fn=_file_size_limit((rng + adapter) // 2))
    assert p.returncode == 3, p.stderr[-3000:]
    assert "Traceback" not in p.stderr and "SafetensorError" not in p.stderr
    assert _error_lines(p.stderr) == [
        f"bigtrain: error: checkpoint of step 4 not saved: writing {ckpts}/.tmp-step-00000004/"
        f"adapter_model.safetensors failed: File too large (errno EFBIG); raise the file-size limit "
        f"(ulimit -f) or put train.output_dir on a filesystem that takes larger files, then rerun the same "
        f"command to resume from step 2 (nothing saved before was touched; .tmp-step-00000004 was removed)"]
    assert _snapshot(ckpts) == before  # step 2 byte for byte, `latest` still naming it, no .tmp- left
    assert not (out / "preempted").exists()
    p = run(train_cmd(1, args))
    assert f"resumed from {ckpts / 'step-00000002'} at step 2" in p.stdout
    A, B = final_adapters(ref), final_adapters(out)
    assert all(torch.equal(A[k], B[k]) for k in A)


def test_disk_full_during_save_two_ranks(tmp_path):
    """The same at world size 2: rank 0 alone writes the adapters and optimizer state while rank 1
    waits in the save's barrier; on a rank-0 failure rank 1 stayed there until rank 0's exit broke
    the connection (gloo's 'Connection closed by peer' traceback, exit 1 on both ranks). Now every
    rank learns of it and leaves with the same line and exit 3. Ranks
    started apart (as srun does, nothing else ends them) with a real write failure of the
    optimizer-state file (file-size limit); then under torchrun, ENOSPC on that file
    (bigtrain.faults: a full disk, which the sandbox cannot make without root)."""
    out = tmp_path / "o"
    args = tiny_overrides(out, BUILTIN, 4, 2, **{"checkpoint.every": 2})
    run(train_cmd(2, args + ["train.stop_at_step=2"]))
    ckpts = out / "checkpoints"
    _, adapter, opt = _save_sizes(ckpts / "step-00000002")
    before = _snapshot(ckpts)
    t0 = time.time()
    results = run_ranks_apart(args, preexec_fn=_file_size_limit((adapter + opt) // 2))
    line = (f"bigtrain: error: checkpoint of step 4 not saved: writing {ckpts}/.tmp-step-00000004/"
            f"optimizer.safetensors failed: File too large (errno EFBIG); raise the file-size limit "
            f"(ulimit -f) or put train.output_dir on a filesystem that takes larger files, then rerun the "
            f"same command to resume from step 2 (nothing saved before was touched; .tmp-step-00000004 "
            f"was removed)")
    for rc, text in results:
        assert rc == 3 and _error_lines(text) == [line], text[-3000:]
        assert "Traceback" not in text
    assert time.time() - t0 < 120
    assert _snapshot(ckpts) == before
    p = run(train_cmd(2, args), check=False,
            env={"BIGTRAIN_FAULT_ENOSPC": ".tmp-step-00000004/optimizer.safetensors"})
    assert p.returncode == 1  # torchrun's own (it ends with its ChildFailedError report), not the ranks'
    assert p.stderr.count(f"bigtrain: error: checkpoint of step 4 not saved: writing {ckpts}/.tmp-step-00000004/"
                          f"optimizer.safetensors failed: No space left on device (errno ENOSPC); free space "
                          f"on the filesystem of {ckpts}, then rerun the same command to resume from step 2 "
                          f"(nothing saved before was touched; .tmp-step-00000004 was removed)") == 2, p.stderr[-3000:]
    assert "exitcode  : 3" in p.stderr  # torchrun's report of the ranks' status
    assert _snapshot(ckpts) == before
    p = run(train_cmd(2, args))
    assert f"resumed from {ckpts / 'step-00000002'} at step 2" in p.stdout and max(losses(out)) == 4
