"""model.quantize=int8 and nf4 under the real launchers: at 1 and 2 ranks (torchrun, gloo) every parameter the
layer gatherer hands to the forward equals the unquantized checkpoint's tensor (norms, biases,
embeddings, head) or the per-partition reference quantizer's dequantized tensor (the decoder layers'
linear weights), from a ``model.path`` checkpoint and from a random preset; LoRA learns on it; each
rank's base bytes (quantized sections + unquantized parts) equal the prediction. And the demo, trained
as the demo with model.quantize=int8 and nf4, ends within 2% and 5% of the unquantized demo's eval loss."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bigtrain.config import resolve_model_path
from bigtrain.memory import predict_states
from bigtrain.presets import hf_config_for
from helpers import _env, torchrun_workers, train_cmd

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "dist" / "quant_worker.py"
WORLDS = (1, 2)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return torchrun_workers(WORKER, WORLDS, tmp_path_factory, prefix="q")


EXPECT = {  # case: (linear weights quantized, parameters, prediction arguments)
    "checkpoint": (24, 68, (resolve_model_path("builtin:tiny-opt"), "float32", 100000)),
    "preset": (14, 21, (hf_config_for("tiny-llama", vocab_size=512), "bfloat16", 0)),
    "checkpoint-nf4": (24, 68, (resolve_model_path("builtin:tiny-opt"), "float32", 100000)),
    "preset-nf4": (14, 21, (hf_config_for("tiny-llama", vocab_size=512), "bfloat16", 0)),
}
ERRORS = {"int8": (0.003, 0.01), "nf4": (0.08, 0.11)}  # relative Frobenius error bounds of each weight


def _scheme(case):
    return "nf4" if case.endswith("nf4") else "int8"


@pytest.mark.parametrize("n", WORLDS)
@pytest.mark.parametrize("case", list(EXPECT))
def test_gathered_weights_are_the_reference_quantizer_exactly(results, n, case):
    n_quant, n_params, _ = EXPECT[case]
    for rank, r in enumerate(results[n]):
        r = r[case]
        assert r["world"] == n
        assert len(r["quantized"]) == n_quant
        assert all(".layers." in q and q.endswith("proj.weight") or q.endswith(("fc1.weight", "fc2.weight"))
                   for q in r["quantized"]), r["quantized"]
        assert r["checked"] == n_params == r["n_params"]  # every parameter seen once
        assert r["differ"] == [], f"rank {rank}: {r['differ']}"
        assert r["unchanged"] == []  # quantizing changed every quantized weight: the check bites
        assert r["refused"].startswith(f"model.quantize={_scheme(case)}: the base's linear weights are quantized "
                                       f"partitions")
        errs = r["errors"]
        lo, hi = ERRORS[_scheme(case)]
        assert sorted(errs) == r["quantized"] and all(lo < e < hi for e in errs.values()), errs
        print(case, n, rank, r["summary"])


@pytest.mark.parametrize("n", WORLDS)
@pytest.mark.parametrize("case", list(EXPECT))
def test_lora_learns_and_base_bytes_equal_the_prediction(results, n, case):
    source, dtype, th = EXPECT[case][2]
    pred = predict_states(source, ["q_proj", "v_proj"], r=4, world_size=n, base_dtype=dtype,
                          persistence_threshold=th, quantize=_scheme(case))
    unquantized = predict_states(source, ["q_proj", "v_proj"], r=4, world_size=n, base_dtype=dtype,
                                 persistence_threshold=th)["frozen_weights"]
    for rank, r in enumerate(results[n]):
        r = r[case]
        assert r["measured"] == pred, f"rank {rank} of {n}"
        assert r["measured"]["frozen_weights"] < unquantized
        losses = r["losses"]
        assert losses[-1] < losses[0] - 0.05, losses
        assert r["lora_b_norm"] > 0  # B starts at zero
        print(case, n, rank, "frozen bytes", pred["frozen_weights"], "unquantized", unquantized, "losses", losses)
    # the error figures are the same on every rank (one all-reduce) and the losses agree
    assert len({json.dumps(r[case]["errors"], sort_keys=True) for r in results[n]}) == 1
    assert len({tuple(r[case]["losses"]) for r in results[n]}) == 1


def _evals(stdout: str) -> list[float]:
    return [float(x) for x in re.findall(r"eval loss (\d+\.\d+)", stdout)]


def test_demo_with_quantized_bases_within_2_and_5_percent(quantized_demos):
    """The demo (builtin tiny-opt, 300 steps, 1 process), unquantized, with model.quantize=int8 and
    with nf4, side by side: the int8 run's eval losses are within 2% of the unquantized run's and
    the nf4 run's within 5% (the issue's bounds; measured: 0.02% and 0.3% at the end), each error
    line is printed at load, and predicted and measured model states agree. (The three runs are
    tests/conftest.py's quantized_demos, which test_export's quantized merge reads too.)"""
    out = {name: so for name, (_, so) in quantized_demos.items()}
    plain = _evals(out["plain"])
    print("unquantized", plain, "int8", _evals(out["int8"]), "nf4", _evals(out["nf4"]))
    assert plain == pytest.approx([1.9156, 1.1202, 1.0602, 1.0494], abs=2e-4)  # the demo's figures
    for scheme, bound, want in (("int8", 0.02, [1.9152, 1.1200, 1.0599, 1.0492]),
                                ("nf4", 0.05, [1.9146, 1.1219, 1.0637, 1.0516])):
        q = _evals(out[scheme])
        assert q == pytest.approx(want, abs=2e-4), (scheme, q)  # the README's figures
        assert len(q) == 4 and all(abs(a - b) / b < bound for a, b in zip(q, plain)), (q, plain)
        assert q != plain  # a quantized base is another base
        line = next(l for l in out[scheme].splitlines() if f"model.quantize={scheme}:" in l)
        assert re.search(r"24 linear weights .* relative Frobenius error min \S+ / median \S+ / max \S+ \(model\.", line)
        states = next(l for l in out[scheme].splitlines() if "predicted vs measured" in l)
        pairs = re.findall(r"(\d[\d,]*\d)/(\d[\d,]*\d)", states)
        assert len(pairs) == 4 and all(a == b for a, b in pairs), states
    assert "model.quantize" not in out["plain"]


def test_int8_base_with_activation_checkpointing_is_exact_at_2_ranks(tmp_path):
    """bigtrain train on 2 ranks, model.quantize=int8, with and without activation checkpointing
    (the gatherer re-gathers and dequantizes each layer for the recomputation): the same losses, bit
    for bit. tiny-opt's partitions at 2 ranks start on 64-element block boundaries, so the 2-rank
    int8 base equals the 1-process one and the step-0 eval is the int8 demo's 1.9152."""
    procs = {}
    for ck in ("false", "true"):
        cmd = train_cmd(2, [f"train.output_dir={tmp_path / ck}", "logging.progress_bar=false", "train.max_steps=6",
                            "train.log_every=1", "train.eval_every=0", "train.sample_prompts=0", "train.device=cpu",
                            "train.micro_batch_size=4", "model.quantize=int8", f"model.gradient_checkpointing={ck}"])
        procs[ck] = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
    logs = {}
    for ck, p in procs.items():
        so, se = p.communicate(timeout=400)
        assert p.returncode == 0, f"{ck}:\n{so[-3000:]}\n{se[-3000:]}"
        logs[ck] = [json.loads(l)["loss"] for l in (tmp_path / ck / "train_log.jsonl").read_text().splitlines()
                    if "loss" in json.loads(l)]
        assert _evals(so)[0] == 1.9152, so
        states = next(l for l in so.splitlines() if "predicted vs measured" in l)
        pairs = re.findall(r"(\d[\d,]*\d)/(\d[\d,]*\d)", states)
        assert len(pairs) == 4 and all(a == b for a, b in pairs), states
    print("losses", logs)
    assert len(logs["false"]) == 6 and logs["false"] == logs["true"]


def test_eval_of_an_int8_run_scores_the_int8_base(tmp_path):
    """bigtrain eval (and generate) rebuild the base from the run's config.yaml: an int8 run is
    scored over the int8 base it was trained on, so eval gives the figures the run logged (an
    unquantized base would give 1.9156 at step 0, not the int8 base's 1.9152)."""
    out = tmp_path / "run"
    p = subprocess.run(train_cmd(1, [f"train.output_dir={out}", "train.max_steps=20", "train.eval_every=10",
                                     "logging.progress_bar=false", "checkpoint.every=0",
                                     "train.sample_prompts=0", "model.quantize=int8"]),
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    log = [json.loads(l) for l in (out / "train_log.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval_loss"] for r in log if "eval_loss" in r}
    p = subprocess.run([sys.executable, "-m", "bigtrain", "eval", str(out), "--data", "builtin:e2e-eval", "--json"],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    res = {r["adapter"]: r["loss"] for r in json.loads(p.stdout.strip().splitlines()[-1])["results"]}
    print(res, evals)
    assert res["base"] == evals[0] and round(evals[0], 4) == 1.9152
    assert res[next(k for k in res if k != "base")] == evals[20]
    assert "model.quantize=int8" in p.stdout + p.stderr


def test_resume_across_a_changed_quantize_is_refused(tmp_path):
    """model.quantize is part of the base's fingerprint: adapters trained over the int8 base do not
    silently continue over the unquantized one (checkpoint.force_base_mismatch=true still can)."""
    out = tmp_path / "run"
    common = [f"train.output_dir={out}", "logging.progress_bar=false", "train.sample_prompts=0", "data.eval=null",
              "checkpoint.every=2", "train.micro_batch_size=2", "data.max_length=32"]
    p = subprocess.run(train_cmd(1, [*common, "train.max_steps=2", "model.quantize=int8"]), cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((out / "checkpoints" / "step-00000002" / "base.json").read_text())["quantize"] == "int8"
    p = subprocess.run(train_cmd(1, [*common, "train.max_steps=4"]), cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=400)
    assert p.returncode != 0
    err = (p.stdout + p.stderr).strip().splitlines()
    assert any("was trained on a different base model (quantize differ: checkpoint ['int8'] vs now [None])" in l
               for l in err), err[-5:]
