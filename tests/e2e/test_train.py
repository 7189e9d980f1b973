"""End-to-end training through the CLI on the built-in task, and exact resume."""
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import final_adapters, losses, ranks, run, run_all, tiny_overrides, train_cmd

pytestmark = pytest.mark.slow
BUILTIN = Path(__file__).resolve().parents[2] / "bigtrain" / "assets" / "tiny-opt"


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
    _, p1 = run_all([train_cmd(1, tiny_overrides(straight, model, 2 * k, 2, **common)),
                     train_cmd(1, tiny_overrides(resumed, model, 2 * k, 2, **common, **{"train.stop_at_step": k}))])
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
    run_all([train_cmd(2, tiny_overrides(straight, BUILTIN, 2 * k, 2)),
             train_cmd(2, tiny_overrides(resumed, BUILTIN, 2 * k, 2, **{"train.stop_at_step": k}))])
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
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes('{"prompt": "café:", "completion": " crème"}\n'.encode("latin-1"))
    missing = ("data.train", "data.eval", "model.tokenizer")
    # the refusals are independent of each other (none may create x): run side by side
    r0, nope, head, wide, latin, *absent = run_all(
        [train_cmd(1, [f"train.output_dir={tmp_path}/x", arg]) for arg in (
            "lora.r=0", "lora.targets=[nope]", "lora.targets=[q_proj,lm_head]", "lora.r=100000", f"data.train={bad}",
            *(f"{key}={tmp_path}/missing" for key in missing))], check=False)
    p = r0
    assert p.returncode == 2
    assert "config error: lora.r must be a positive integer, got 0" in p.stderr
    assert not (tmp_path / "x").exists()
    p = nope
    assert p.returncode != 0 and "'nope' matched no linear layer" in p.stderr
    # the LM head: refused in one line before any process group (it used to fail at step 1)
    p = head
    assert p.returncode == 2 and "config error: lora.targets: 'lm_head' is the output head" in p.stderr
    assert "on host" not in p.stdout and not (tmp_path / "x").exists()
    # lora.r above the adapted layers' width (128): it trained, slowly, without a word
    p = wide
    assert p.returncode == 2 and ("config error: lora.r=100000 is more than the width of the adapted layer "
                                  "model.decoder.layers.0.self_attn.v_proj (128 -> 128)") in p.stderr, p.stderr[-1000:]
    assert "on host" not in p.stdout and not (tmp_path / "x").exists()
    # data that is not UTF-8: named file:line before any process group (it used to train on U+FFFD)
    p = latin
    assert p.returncode == 1 and f"error: {bad}:1: not valid UTF-8 (byte 0xe9" in p.stderr
    assert "on host" not in p.stdout and not (tmp_path / "x").exists()
    # a file or folder a key names that does not exist: a config error like the others (exit 2, the
    # key named); it was exit 1 without the key for data.train, data.eval and model.tokenizer
    for key, p in zip(missing, absent, strict=True):
        assert p.returncode == 2 and f"bigtrain: config error: {key}: " in p.stderr, (key, p.stderr[-1000:])
        assert str(tmp_path / "missing") in p.stderr and not (tmp_path / "x").exists()


def test_a_run_the_host_cannot_hold_stops_before_the_build(tmp_path):
    """train.check_memory: GPT-3 175B on the CPU needs its whole base in host memory; the run says so
    in one line, with both figures and what to change, before the base is built (it used to start
    building and be killed by the kernel without a word)."""
    out = tmp_path / "x"
    p = run(train_cmd(1, [f"train.output_dir={out}", "model.path=null", "model.preset=gpt3-175b",
                          "train.device=cpu", "data.max_length=64"]), check=False, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    err = [ln for ln in p.stderr.splitlines() if "check_memory" in ln]
    assert len(err) == 1, p.stderr[-2000:]
    assert ("config error: train.check_memory: this run does not fit on rank 0: the estimate is " in err[0]
            and "GiB of host memory per rank and host " in err[0] and "available per rank" in err[0]
            and "model.quantize=nf4" in err[0] and "train.check_memory=false" in err[0]), err[0]
    need = float(err[0].split("the estimate is ")[1].split(" GiB")[0])
    assert need > 300  # the bf16 base alone is 325 GiB
    assert "base built" not in p.stdout and "memory check" not in p.stdout


def test_a_model_folder_without_a_tokenizer_is_refused_unless_builtin_is_named(tmp_path):
    """It used to train silently with the built-in 1,024-token tokenizer (a GPT-2 folder: loss 10.87)."""
    import transformers as tf

    from bigtrain.presets import hf_config_for

    bare = tmp_path / "no-tok"
    tf.AutoModelForCausalLM.from_config(hf_config_for("tiny-opt", vocab_size=1024)).save_pretrained(bare)
    out = tmp_path / "x"
    # the refusal and the run with model.tokenizer=builtin (into its own folder, so that the refusal's
    # "nothing created" still holds) are independent: side by side
    p, named = run_all([train_cmd(1, tiny_overrides(out, bare, 1, 2)),
                        train_cmd(1, tiny_overrides(tmp_path / "named", bare, 1, 2, **{"model.tokenizer": "builtin"}))],
                       check=[False, True])
    assert p.returncode == 2, p.stderr[-2000:]
    assert (f"config error: model.path={bare} holds no tokenizer (no tokenizer.json or tokenizer_config.json): "
            f"set model.tokenizer=DIR to the model's own tokenizer, or model.tokenizer=builtin") in p.stderr
    assert "on host" not in p.stdout and not out.exists()
    p = named
    assert "done: 1 steps" in p.stdout


def test_stop_at_step_not_after_the_resume_step_is_refused(tmp_path):
    """It was passed by and ignored: one run trained on to step 2000."""
    out = tmp_path / "s"
    run(train_cmd(1, tiny_overrides(out, BUILTIN, 4, 2, **{"checkpoint.every": 4})))
    p = run(train_cmd(1, tiny_overrides(out, BUILTIN, 8, 2, **{"train.stop_at_step": 3})), check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    assert (f"config error: train.stop_at_step=3 is not after step 4, which this run resumes from "
            f"({out / 'checkpoints' / 'step-00000004'})") in p.stderr
    assert "on host" not in p.stdout


def test_a_resume_must_continue_the_same_job_or_say_what_changed(tmp_path, tiny_models):
    """Each of these resumed silently: another tokenizer (loss 1.90 -> 4.29), a base with other weights
    under the same file names and sizes, other training data (it continued at sample 32 of the new
    file). Each is now refused before the base is built, in one line; other data is taken with
    checkpoint.new_data=true, from its first sample, and said."""
    import shutil

    from safetensors.torch import save_file  # (load_file: imported at the top)

    from bigtrain.data import load_tokenizer

    model = tiny_models["tiny-opt"]
    out = tmp_path / "run"
    run(train_cmd(1, tiny_overrides(out, model, 4, 2, **{"checkpoint.every": 4})))
    again = lambda **kw: run(train_cmd(1, tiny_overrides(out, kw.pop("model", model), 8, 2, **kw)), check=False)

    tok = load_tokenizer(None)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # another tokenizer, same vocab
    tok.save_pretrained(tmp_path / "tok2")
    other = tmp_path / "other-weights"
    shutil.copytree(model, other)
    w = load_file(str(other / "model.safetensors"))
    name = next(k for k in sorted(w) if "q_proj.weight" in k)
    w[name] = w[name] * 1.01  # one weight changed: the same names, shapes and file size
    save_file(w, str(other / "model.safetensors"), metadata={"format": "pt"})
    assert (other / "model.safetensors").stat().st_size == (model / "model.safetensors").stat().st_size
    # the three refusals come before any work (no lock, nothing written): run side by side
    tok_p, weights_p, data_p = run_all([
        train_cmd(1, tiny_overrides(out, model, 8, 2, **{"model.tokenizer": tmp_path / "tok2"})),
        train_cmd(1, tiny_overrides(out, other, 8, 2)),
        train_cmd(1, tiny_overrides(out, model, 8, 2, **{"data.train": "builtin:e2e-chat"}))], check=False)
    p = tok_p
    assert p.returncode == 1 and "was trained on a different tokenizer (model.tokenizer) (tokenizer_sha256 differ" in p.stderr
    assert "on host" not in p.stdout

    p = weights_p
    assert p.returncode == 1 and "was trained on a different base model (weights_sampled_sha256 differ" in p.stderr
    assert "checkpoint.force_base_mismatch=true" in p.stderr

    p = data_p
    assert p.returncode == 2 and ("the training rows differ from the ones this run was trained on" in p.stderr
                                  and "would continue at sample 8 of other data" in p.stderr)
    p = again(**{"data.train": "builtin:e2e-chat", "checkpoint.new_data": "true"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert "the new rows are read from their first sample (a new epoch plan), not from sample 8" in p.stdout
    assert "at step 4 (sample 0," in p.stdout


def test_time_based_checkpoints_agree_across_ranks(tmp_path):
    """checkpoint.every_minutes: rank 0's clock decides, the decision travels in the step's
    all-reduce, so both ranks save together (a save is collective: a lone rank would hang)."""
    out = tmp_path / "t"
    # 0.0001 min = 6 ms: due at every step; step-based saves off; keep them all
    out2 = tmp_path / "t2"  # and one run with the default (off), beside it
    p, _ = run_all([train_cmd(2, tiny_overrides(out, BUILTIN, 4, 2, **{
        "checkpoint.every": 0, "checkpoint.every_minutes": 0.0001, "checkpoint.keep": 10})),
        train_cmd(1, tiny_overrides(out2, BUILTIN, 3, 2, **{"checkpoint.keep": 10}))], timeout=300)
    saved = sorted(d.name for d in (out / "checkpoints").glob("step-*"))
    assert saved == [f"step-{s:08d}" for s in (1, 2, 3, 4)], saved
    assert p.stdout.count("[bigtrain] checkpoint ") == 4
    # off by default: only the final save
    assert sorted(d.name for d in (out2 / "checkpoints").glob("step-*")) == ["step-00000003"]


def test_resume_choices_checked_before_any_work(tmp_path):
    """checkpoint.resume: `never` into a directory holding another run's checkpoints is refused
    (pruning and a later auto-resume would mix the runs); an explicit path that does not exist or
    does not verify is refused naming the key; a run directory means its latest checkpoint. All
    before any process group (no 'rank 0/1 on host' line)."""
    a = tmp_path / "a"
    run(train_cmd(1, tiny_overrides(a, BUILTIN, 4, 2, **{"checkpoint.every": 2})))
    # the three runs below only read a (the two refusals write nothing): side by side
    never, nope, into_c = run_all([
        train_cmd(1, tiny_overrides(a, BUILTIN, 4, 2, **{"checkpoint.resume": "never"})),
        train_cmd(1, tiny_overrides(tmp_path / "b", BUILTIN, 4, 2, **{"checkpoint.resume": tmp_path / "nope"})),
        train_cmd(1, tiny_overrides(tmp_path / "c", BUILTIN, 6, 2, **{"checkpoint.resume": a}))],
        check=[False, False, True])
    p = never
    assert p.returncode == 2 and "checkpoint.resume=never, but" in p.stderr and "step-00000004" in p.stderr
    assert "on host" not in p.stdout
    assert sorted(d.name for d in (a / "checkpoints").glob("step-*")) == ["step-00000002", "step-00000004"]
    p = nope
    assert p.returncode == 2 and f"checkpoint.resume={tmp_path / 'nope'}: " in p.stderr and "on host" not in p.stdout
    # a run directory resumes from its latest checkpoint, into another output_dir
    p = into_c
    assert f"resumed from {a / 'checkpoints' / 'step-00000004'} at step 4" in p.stdout
    assert sorted(losses(tmp_path / "c")) == [5, 6]


def test_changed_lr_on_resume_is_used_and_said(tmp_path):
    """The checkpoint's optimizer/scheduler state carries the old lr and weight decay; a resume
    with new values in the config uses the new ones (config.yaml records them) and says so."""
    from bigtrain.config import load_config
    from bigtrain.run import lr_lambda

    out = tmp_path / "r"
    run(train_cmd(1, tiny_overrides(out, BUILTIN, 4, 2)))
    args = tiny_overrides(out, BUILTIN, 6, 2, **{"train.lr": 0.5, "train.weight_decay": 0.1})
    p = run(train_cmd(1, args))
    assert "train.lr changed on resume: 0.005 -> 0.5" in p.stdout
    assert "train.weight_decay changed on resume: 0.0 -> 0.1" in p.stdout
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    lr = {r["step"]: r["lr"] for r in log if "lr" in r}
    cfg = load_config(None, args)
    # logged after the scheduler's step (as the HF Trainer does): lr * lambda(step)
    assert lr[4] == pytest.approx(0.005 * lr_lambda(load_config(None, tiny_overrides(out, BUILTIN, 4, 2)), 4))
    assert lr[5] == pytest.approx(0.5 * lr_lambda(cfg, 5), rel=1e-12)
    assert lr[6] == pytest.approx(0.5 * lr_lambda(cfg, 6), rel=1e-12)


def test_changed_adapter_hparams_on_resume(tmp_path):
    """lora.alpha / lora.rslora changed on resume used to pass silently (the scale jumped, and the
    new adapter_config.json claimed the new alpha for adapters trained at the old one): refused in
    one line naming the key and both values. A changed lora.dropout is used, and said. The refusal
    comes before the process group and the base exist (no 'rank 0/1 on host' line: for a 70B job
    it used to come after the load), for an automatic and an explicit checkpoint.resume."""
    out = tmp_path / "r"
    run(train_cmd(1, tiny_overrides(out, BUILTIN, 4, 2)))
    # four refusals, each before any work (nothing written): side by side
    alpha, rslora, rank, targets = run_all([
        train_cmd(1, tiny_overrides(out, BUILTIN, 6, 2, **{"lora.alpha": 32})),
        train_cmd(1, tiny_overrides(out, BUILTIN, 6, 2, **{"lora.rslora": "true"})),
        train_cmd(1, tiny_overrides(out, BUILTIN, 6, 2, **{"lora.r": 4})),
        train_cmd(1, tiny_overrides(tmp_path / "other", BUILTIN, 6, 2, **{
            "lora.targets": "[q_proj]", "checkpoint.resume": out}))], check=False)
    p = alpha
    assert p.returncode == 2, p.stderr[-2000:]
    assert (f"config error: {out / 'checkpoints' / 'step-00000004'}: lora.alpha changed on resume: "
            f"checkpoint 16.0, now 32.0") in p.stderr
    assert "on host" not in p.stdout and "output directory" not in p.stdout, p.stdout[-2000:]
    p = rslora
    assert p.returncode == 2 and "lora.rslora changed on resume: checkpoint false, now true" in p.stderr
    assert "on host" not in p.stdout
    p = rank
    assert p.returncode == 2 and "lora.r changed on resume: checkpoint 8, now 4; resume with lora.r=8" in p.stderr
    assert "on host" not in p.stdout
    p = targets
    assert p.returncode == 2 and ("lora.targets changed on resume: the checkpoint adapts 8 modules "
                                  "(['q_proj', 'v_proj']), now 4 (['q_proj'])") in p.stderr
    assert "on host" not in p.stdout and not (tmp_path / "other").exists()
    assert sorted(losses(out)) == [1, 2, 3, 4]  # nothing trained by the refused runs
    p = run(train_cmd(1, tiny_overrides(out, BUILTIN, 6, 2, **{"lora.dropout": 0.1})))
    assert "lora.dropout changed on resume: 0.0 -> 0.1 (the config's value is used)" in p.stdout
    cfg = json.loads((out / "checkpoints" / "step-00000006" / "adapter_config.json").read_text())
    assert cfg["dropout"] == 0.1 and cfg["alpha"] == 16.0


def test_eval_loss_does_not_depend_on_micro_batch_or_ranks(tmp_path):
    """Eval scores the first train.eval_examples examples once each, split over the ranks with
    masked fillers: the same figure at micro-batch 8, 3 and on 2 ranks (float rounding apart).
    eval_every=0: eval only at step 0 and at the end."""
    ev = {}
    runs = (("m8", 1, 8), ("m3", 1, 3), ("r2m3", 2, 3))
    run_all([train_cmd(world, tiny_overrides(tmp_path / name, BUILTIN, 2, micro, **{
        "data.eval": "builtin:e2e-eval", "train.eval_every": 0, "train.eval_examples": 20}))
        for name, world, micro in runs])  # independent: side by side
    for name, world, micro in runs:
        out = tmp_path / name
        log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        ev[name] = {r["step"]: r["eval_loss"] for r in log if "eval_loss" in r}
    assert sorted(ev["m8"]) == [0, 2]
    for name in ("m3", "r2m3"):
        assert ev[name][0] == pytest.approx(ev["m8"][0], rel=1e-5), ev


def test_input_the_model_cannot_take_and_stop_at_last_step(tmp_path):
    # data.max_length beyond the position table: refused before any work, naming both numbers
    out = tmp_path / "s"
    p, done = run_all([train_cmd(1, tiny_overrides(tmp_path / "x", BUILTIN, 2, 2, **{"data.max_length": 1024})),
                       train_cmd(1, tiny_overrides(out, BUILTIN, 3, 2, **{"train.stop_at_step": 3}))],
                      check=[False, True])  # independent: side by side
    assert p.returncode == 2 and "data.max_length=1024 exceeds the model's 256 positions" in p.stderr
    assert not (tmp_path / "x").exists()
    # train.stop_at_step == max_steps: the run simply ends; no `preempted` marker (no requeue)
    p = done
    assert "stopped early" not in p.stdout and "done: 3 steps" in p.stdout
    assert not (out / "preempted").exists()


def test_signal_during_startup_stops_at_once_marked_preempted(tmp_path):
    """SIGUSR1/SIGTERM while the model loads (minutes at scale, or a start-up that hangs) ends the
    run at once, before any step: nothing new exists to save. It exits 0 with `preempted` holding
    the step it will resume from (0 here), so the Slurm scripts requeue the job."""
    import signal
    import subprocess
    import time

    from helpers import ROOT, _env

    out = tmp_path / "sig"
    cmd = train_cmd(1, tiny_overrides(out, BUILTIN, 50, 2, **{"data.eval": "builtin:e2e-eval",
                                                               "train.eval_examples": 400}))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines = []
    for line in proc.stdout:  # the process group is up: the model build and step-0 eval follow
        lines.append(line)
        if " on host " in line:
            proc.send_signal(signal.SIGUSR1)
            break
    t0 = time.monotonic()
    rest, _ = proc.communicate(timeout=300)
    waited = time.monotonic() - t0
    text = "".join(lines) + rest
    assert proc.returncode == 0, text[-3000:]
    # sent right after the process group came up: no model evaluated, no step, no checkpoint (it
    # used to run on to step 1 and save it there; before that, the signal killed the run, rc -10)
    assert "SIGUSR1 before the first step: stopped, nothing new to save; rerun the same command to start again" in text
    assert "step 0 (adapters are zero" not in text and "saved step" not in text
    assert (out / "preempted").read_text().strip() == "0"
    assert not list((out / "checkpoints").glob("step-*")) if (out / "checkpoints").exists() else True
    assert waited < 30, f"took {waited:.0f} s to stop"


def _interrupt(out, second: bool):
    """`bigtrain train` on a model whose CPU step takes ~0.5 s, Ctrl-C'd (SIGINT) after step 3; with
    ``second``, once more as soon as it says it will save. Returns (exit code, all output)."""
    import signal

    from helpers import read_until, start

    proc = start(train_cmd(1, tiny_overrides(out, "null", 50, 4, **{
        "model.preset": "gpt3-small", "model.num_layers": 4, "data.max_length": 256, "checkpoint.every": 2,
        "train.sample_prompts": 0})))
    text = read_until(proc, "[bigtrain] step 3/")
    proc.send_signal(signal.SIGINT)
    if second:
        text += read_until(proc, "Ctrl-C: saving")
        proc.send_signal(signal.SIGINT)
    text += proc.stdout.read()
    return proc.wait(timeout=120), text


def test_ctrl_c_saves_at_the_step_boundary_and_the_rerun_resumes(tmp_path):
    """Ctrl-C is a request, not a crash: the step in flight finishes, is saved, and the run says how
    to resume (it used to end in a ~115-line KeyboardInterrupt traceback, exit -2, nothing saved)."""
    out = tmp_path / "int"
    rc, text = _interrupt(out, second=False)
    assert rc == 0, text[-3000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    assert "[bigtrain] Ctrl-C: saving at the end of this step, then stopping (Ctrl-C again to stop at once)" in text
    saved = int(text.split("stopped early (SIGINT): saved step ")[1].split(";")[0])
    assert saved >= 3 and (out / "checkpoints" / f"step-{saved:08d}").is_dir()
    assert "rerun the same command to resume" in text
    p = run(train_cmd(1, tiny_overrides(out, "null", saved + 1, 4, **{
        "model.preset": "gpt3-small", "model.num_layers": 4, "data.max_length": 256, "checkpoint.every": 2,
        "train.sample_prompts": 0})))
    assert f"at step {saved} " in p.stdout, p.stdout[-2000:]


def test_second_ctrl_c_stops_at_once_and_leaves_the_last_checkpoint(tmp_path):
    out = tmp_path / "int2"
    rc, text = _interrupt(out, second=True)
    assert rc == 130, text[-3000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    assert text.count("second Ctrl-C") == 1 and "[bigtrain] second Ctrl-C: stopped at once" in text
    from bigtrain.checkpoint import read_checkpoint

    last = (out / "checkpoints" / "latest").read_text().strip()
    read_checkpoint(out / "checkpoints" / last)  # loadable, verified
    step = int(last.split("-")[1])
    p = run(train_cmd(1, tiny_overrides(out, "null", step + 1, 4, **{
        "model.preset": "gpt3-small", "model.num_layers": 4, "data.max_length": 256, "checkpoint.every": 2,
        "train.sample_prompts": 0})))
    assert f"at step {step} " in p.stdout, p.stdout[-2000:]


SIGNAL_WHILE_IMPORTING = """
import os, signal, sys
import bigtrain.cli as cli
import bigtrain.commands.train as train_command
real = train_command.load_config
def load_config(*a, **k):  # runs after `bigtrain train` set its catcher, before torch is imported
    assert "torch" not in sys.modules
    os.kill(os.getpid(), signal.SIGUSR1)
    return real(*a, **k)
train_command.load_config = load_config
sys.exit(cli.main(["train", *sys.argv[1:]]))
"""


def test_signal_while_importing_stops_at_once_marked_preempted(tmp_path):
    """The same for a signal that arrives while `bigtrain train` is still importing torch."""
    import sys

    out = tmp_path / "imp"
    p = run([sys.executable, "-c", SIGNAL_WHILE_IMPORTING, *tiny_overrides(out, BUILTIN, 50, 2)])
    assert "SIGUSR1 before the first step: stopped" in p.stderr, p.stdout[-2000:] + p.stderr[-2000:]
    assert (out / "preempted").read_text().strip() == "0"
    assert not (out / "train_log.jsonl").exists() or "loss" not in (out / "train_log.jsonl").read_text()


def test_stale_extension_build_lock_does_not_hang_the_start(tmp_path):
    """A lock file left in torch's extensions cache by a process killed while DeepSpeed built its
    shared-memory comm op made every later start wait forever. bigtrain no longer builds that op
    (it never uses it), so a stale lock is never touched: the run starts and finishes."""
    ext = tmp_path / "torch_extensions"
    (ext / "deepspeed_shm_comm").mkdir(parents=True)
    (ext / "deepspeed_shm_comm" / "lock").touch()
    out = tmp_path / "lock"
    p = run(train_cmd(1, tiny_overrides(out, BUILTIN, 1, 2)), timeout=240, env={"TORCH_EXTENSIONS_DIR": str(ext)})
    assert "done: 1 steps" in p.stdout, p.stdout[-2000:]
    assert "shm_comm" not in p.stdout + p.stderr  # not built, not loaded
    assert [f.name for f in (ext / "deepspeed_shm_comm").iterdir()] == ["lock"]


def test_bad_output_dir_and_unreadable_weights_are_one_line_before_any_work(tmp_path):
    """train.output_dir that is a file (or under one), and a model.safetensors that is truncated or
    not safetensors at all: one config-error line naming the file and what to do, exit 2, before any
    process group (no 'on host' line), nothing created or touched."""
    afile = tmp_path / "afile"
    afile.write_text("mine")
    whole = (BUILTIN / "model.safetensors").read_bytes()
    models = []
    for i, broken in enumerate((whole[:len(whole) - 100], b"\x00" * 64)):  # truncated; garbage
        model = tmp_path / f"model{i}"
        model.mkdir()
        for f in BUILTIN.iterdir():
            (model / f.name).write_bytes(f.read_bytes())
        (model / "model.safetensors").write_bytes(broken)
        models.append(model)
    bad_outs = ((afile, "is a file, not a directory"), (afile / "sub", f"{afile} is a file"))
    # four refusals, each with its own inputs (a model folder per broken file), none writing
    # anything: side by side
    ps = run_all([train_cmd(1, tiny_overrides(out, BUILTIN, 2, 2)) for out, _ in bad_outs]
                 + [train_cmd(1, tiny_overrides(tmp_path / "o", m, 2, 2)) for m in models], check=False)
    out_ps, weight_ps = ps[:len(bad_outs)], ps[len(bad_outs):]
    for (out, said), p in zip(bad_outs, out_ps, strict=True):
        assert p.returncode == 2, p.stderr[-3000:]
        assert p.stderr.strip().splitlines()[-1].startswith("bigtrain: config error: train.output_dir: ")
        assert said in p.stderr and "Traceback" not in p.stderr and "on host" not in p.stdout
    assert afile.read_text() == "mine"
    for model, p in zip(models, weight_ps, strict=True):
        weights = model / "model.safetensors"
        assert p.returncode == 2, p.stderr[-3000:]
        last = p.stderr.strip().splitlines()[-1]
        assert last.startswith(f"bigtrain: config error: model.path: {weights}: cannot be read as safetensors")
        assert "truncated" in last and "Traceback" not in p.stderr and "on host" not in p.stdout
        assert not (tmp_path / "o").exists()


def test_read_only_output_dir_is_refused_naming_it(tmp_path, monkeypatch):
    """A train.output_dir (or the existing directory it would be created in) this process cannot
    write to is refused before any work, naming both. os.access is patched: the tests may run as
    root, for whom a chmod'ed directory is writable."""
    import os

    from bigtrain.config import ConfigError
    from bigtrain.preflight import check_output_dir as _check_output_dir

    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == ro else real(p, mode))
    with pytest.raises(ConfigError, match=f"train.output_dir: .*{ro / 'run'}.* is not writable: {ro} is not writable"):
        _check_output_dir(ro / "run", str(ro / "run"))
    with pytest.raises(ConfigError, match="is not writable \\(read-only"):
        _check_output_dir(ro, str(ro))
    assert list(ro.iterdir()) == []
    _check_output_dir(tmp_path / "fine" / "deeper", "fine/deeper")  # creatable: no error, nothing made
    assert not (tmp_path / "fine").exists()

def test_relative_paths_are_resolved(tmp_path):
    """A relative model.path is stored absolute in adapter_config.json (export and merge then work
    from any directory); `..` in train.output_dir is resolved by name (no stray directory) and the
    real output directory is printed."""
    import shutil
    import subprocess
    import sys

    from helpers import ROOT, _env

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copytree(BUILTIN, work / "model")

    def bigtrain(cwd, *argv):
        p = subprocess.run([sys.executable, "-m", "bigtrain", *argv], cwd=cwd, env=_env({"PYTHONPATH": str(ROOT)}),
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        return p

    p = bigtrain(work, "train", *tiny_overrides("stray/../run", "model", 2, 2))
    out = work / "run"
    assert not (work / "stray").exists() and (out / "checkpoints" / "latest").is_file()
    assert f"[bigtrain] output directory {out}\n" in p.stdout
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    assert json.loads((latest / "adapter_config.json").read_text())["base_model"] == str(work / "model")
    bigtrain(elsewhere, "merge", str(out), "merged")
    assert (elsewhere / "merged" / "config.json").is_file()


def test_progress_is_plain_lines_when_output_is_not_a_terminal(tmp_path):
    """Output to a pipe (a Slurm log): no carriage return anywhere (no bar, no datasets bars), one
    `[bigtrain] step N/max` line per logged step, with loss, tokens/s, elapsed and ETA, and later
    lines on their own lines. logging.progress_bar=true still forces the bar. Read as bytes: text
    mode would turn each \\r into a newline."""
    import re
    import subprocess

    from helpers import ROOT, _env

    from concurrent.futures import ThreadPoolExecutor

    def train(out, steps, **extra):
        p = subprocess.run(train_cmd(1, tiny_overrides(out, BUILTIN, steps, 2, **extra)), cwd=ROOT, env=_env(),
                           capture_output=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        return p.stdout.decode(), p.stderr.decode()

    with ThreadPoolExecutor(2) as pool:  # the two runs are independent: side by side
        piped = pool.submit(train, tmp_path / "a", 5, **{"train.log_every": 2, "logging.progress_bar": "null",
                                                          "data.eval": "builtin:e2e", "train.eval_every": 4})
        forced = pool.submit(train, tmp_path / "b", 3, **{"logging.progress_bar": "true"})
        (out, err), (out_b, err_b) = piped.result(), forced.result()
    assert "\r" not in out + err
    lines = re.findall(r"^\[bigtrain\] step (\d+)/5: loss \d+\.\d{4}, [\d,]+ tokens/s, elapsed \d+:\d\d:\d\d, "
                       r"ETA \d+:\d\d:\d\d$", out, re.M)
    assert lines == ["2", "4", "5"], out          # log steps 2, 4 and the last
    assert re.search(r"^\[bigtrain\] step 4: eval loss \d", out, re.M)
    assert "\n\n[bigtrain] step" not in out       # no blank line left for a bar that is not there
    out, err = out_b, err_b
    assert "\r" in err and "train: 100%" in err
    assert "[bigtrain] step 3/3:" not in out


@pytest.fixture(scope="module")
def no_sdpa_models(tmp_path_factory):
    """A tiny Bloom and a tiny Gemma2 (architectures transformers runs with eager attention only),
    saved with save_pretrained with the built-in tokenizer's vocabulary."""
    import transformers as tf

    from bigtrain.data import load_tokenizer

    tok = load_tokenizer(None)
    v = len(tok)
    root = tmp_path_factory.mktemp("no-sdpa")
    out = {}
    for name, cfg in (("bloom", tf.BloomConfig(vocab_size=v, hidden_size=64, n_layer=2, n_head=4)),
                      ("gemma2", tf.Gemma2Config(vocab_size=v, hidden_size=64, intermediate_size=128,
                                                 num_hidden_layers=2, num_attention_heads=4,
                                                 num_key_value_heads=2, head_dim=16,
                                                 max_position_embeddings=256))):
        torch.manual_seed(0)
        tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.mark.parametrize("name,targets", [("bloom", "[query_key_value]"), ("gemma2", "[q_proj,v_proj]")])
def test_architecture_without_sdpa_trains_with_eager(tmp_path, no_sdpa_models, name, targets):
    """Bloom and Gemma2 have no sdpa attention in transformers: with bigtrain's default they failed
    after start-up with transformers' wording. model.attn_implementation=null (the default) asks the
    model class before the base is built and picks eager, saying so: the same losses, bit for bit,
    as model.attn_implementation=eager. An explicit sdpa is refused in one line naming the key,
    before any process group or output directory exists."""
    model = no_sdpa_models[name]
    auto, eager, bad = tmp_path / "auto", tmp_path / "eager", tmp_path / "sdpa"
    # the three runs are independent: side by side
    p, _, refused = run_all([
        train_cmd(1, tiny_overrides(auto, model, 2, 2, **{"lora.targets": targets})),
        train_cmd(1, tiny_overrides(eager, model, 2, 2, **{"lora.targets": targets,
                                                           "model.attn_implementation": "eager"})),
        train_cmd(1, tiny_overrides(bad, model, 2, 2, **{"lora.targets": targets,
                                                         "model.attn_implementation": "sdpa"}))],
        check=[True, True, False])
    cls = {"bloom": "BloomForCausalLM", "gemma2": "Gemma2ForCausalLM"}[name]
    assert (f"[bigtrain] attention: eager ({cls} does not support sdpa in transformers "
            f"{__import__('transformers').__version__}; model.attn_implementation=null picked eager)") in p.stdout
    assert "attn_implementation: eager" in (auto / "config.yaml").read_text()
    assert sorted(losses(auto)) == [1, 2] and losses(auto) == losses(eager)
    A, B = final_adapters(auto), final_adapters(eager)
    assert all(torch.equal(A[k], B[k]) for k in A)
    p = refused
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr[-2000:]
    assert p.stderr.startswith(f"bigtrain: config error: model.attn_implementation=sdpa: transformers ")
    assert f"{cls} does not support an attention implementation through" in p.stderr
    assert "set model.attn_implementation=eager" in p.stderr
    assert "on host" not in p.stdout and not bad.exists()


def test_checkpointing_some_layers_trains_exactly_as_every_layer(tmp_path, tiny_models):
    """model.gradient_checkpointing=N recomputes the first N layers: a run with 2 of 4 equals one with
    every layer and one with none, losses and adapters bit for bit; each run says what it recomputes."""
    model, steps = tiny_models["tiny-opt"], 3
    outs = {}
    settings = (("true", "4 of 4"), ("2", "2 of 4"), ("false", "0 of 4"), ("auto", "0 of 4"))
    # the four runs and the refused one below are independent: side by side
    *ps, deep = run_all([train_cmd(1, tiny_overrides(tmp_path / setting, model, steps, 2, **{
        "model.gradient_checkpointing": setting})) for setting, _ in settings]
        + [train_cmd(1, tiny_overrides(tmp_path / "deep", model, steps, 2, **{"model.gradient_checkpointing": 5}))],
        check=[True] * len(settings) + [False])
    for (setting, said), p in zip(settings, ps, strict=True):
        out = tmp_path / setting
        assert f"activation checkpointing: {said} decoder layers recomputed in backward" in p.stdout, p.stdout
        outs[setting] = losses(out), final_adapters(out)
    ref_l, ref_a = outs["true"]
    for setting, (l, a) in outs.items():
        assert l == ref_l, setting
        assert all(torch.equal(a[k], ref_a[k]) for k in ref_a), setting
    p = deep
    assert p.returncode != 0
    assert "model.gradient_checkpointing=5: the model has 4 decoder layers; use at most 4" in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "deep").exists()  # refused before any work
