"""bigtrain generate and bigtrain eval through the CLI, on two short runs of the demo (one base, two
adapters): eval equals the runs' own logged eval, switching gives each adapter's own output, the
demo's printed samples are what generate gives, and 2 ZeRO-3 ranks give the tokens of one process."""
import json
import re
from pathlib import Path

import pytest

from helpers import free_port, run, run_all, train_cmd

pytestmark = pytest.mark.slow
E2E_EVAL = Path(__file__).resolve().parents[2] / "bigtrain" / "assets" / "e2e_eval.jsonl"


def bigtrain(nproc, *args):
    import sys

    if nproc == 1:
        return [sys.executable, "-m", "bigtrain", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port()), "-m", "bigtrain", *args]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two 30-step runs of the demo (its base and data), different seeds and learning rates; b with
    LoRA dropout (its eval must score without it, as bigtrain eval does)."""
    root = tmp_path_factory.mktemp("gen")
    out = {}
    specs = (("a", 0, 2e-3, 0.0), ("b", 1, 4e-3, 0.1))
    ps = run_all([train_cmd(1, [f"train.output_dir={root / name}", "train.max_steps=30", "train.eval_every=15",
                                f"train.seed={seed}", f"train.lr={lr}", "train.eval_examples=24",
                                f"lora.dropout={dropout}", "logging.progress_bar=false", "train.log_every=10",
                                "checkpoint.every=0"])
                  for name, seed, lr, dropout in specs])  # independent: side by side
    for (name, *_), p in zip(specs, ps, strict=True):
        log = [json.loads(line) for line in (root / name / "train_log.jsonl").read_text().splitlines()]
        out[name] = {"dir": root / name, "stdout": p.stdout,
                     "evals": {r["step"]: r["eval_loss"] for r in log if "eval_loss" in r}}
    return out


def _jsonl(text):
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_eval_equals_the_runs_own_eval(runs, tmp_path):
    import datasets

    a, b = runs["a"], runs["b"]
    rows = [json.loads(line) for line in E2E_EVAL.read_text().splitlines()]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    # the four evals below only read the runs: side by side
    p, p_saved, p_two, p_table = run_all([
        bigtrain(1, "eval", str(a["dir"]), "--adapter", f"b={b['dir']}", "--data", "builtin:e2e-eval", "--json"),
        bigtrain(1, "eval", str(a["dir"]), "--data", str(tmp_path / "saved"), "--json"),
        bigtrain(2, "eval", str(a["dir"]), "--data", "builtin:e2e-eval", "--json"),
        bigtrain(1, "eval", str(a["dir"]), "--data", "builtin:e2e-eval")],
        env=[None, None, {"OMP_NUM_THREADS": "1"}, None])
    res = {r["adapter"]: r for r in json.loads(p.stdout.strip().splitlines()[-1])["results"]}
    print({k: v["loss"] for k, v in res.items()}, a["evals"], b["evals"])
    assert res["base"]["loss"] == a["evals"][0] == b["evals"][0]  # step 0: adapters zero, the base
    assert res["a"]["loss"] == a["evals"][30]
    assert res["b"]["loss"] == b["evals"][30]  # with lora.dropout=0.1: dropout is off in both
    assert res["a"]["perplexity"] == pytest.approx(2.718281828459045 ** res["a"]["loss"], rel=1e-12)
    assert res["a"]["examples"] == 24 and res["a"]["loss"] < res["base"]["loss"] - 0.3
    # another format training accepts (a saved datasets directory): the same examples, the same figures
    p = p_saved
    saved = {r["adapter"]: r["loss"] for r in json.loads(p.stdout.strip().splitlines()[-1])["results"]}
    assert saved == {"base": res["base"]["loss"], "a": res["a"]["loss"]}
    # 2 ZeRO-3 ranks split the examples: the same figure up to the order of the final sum
    p = p_two
    two = {r["adapter"]: r["loss"] for r in json.loads(p.stdout.strip().splitlines()[-1])["results"]}
    assert two["base"] == pytest.approx(res["base"]["loss"], rel=1e-6)
    assert two["a"] == pytest.approx(res["a"]["loss"], rel=1e-6)
    # the table
    p = p_table
    assert re.search(rf"^a\s+{res['a']['loss']:.4f}\s+{res['a']['perplexity']:.4f}$", p.stdout, re.M), p.stdout


def test_switching_gives_each_adapter_its_own_output_at_one_and_two_ranks(runs, tmp_path):
    a, b = runs["a"], runs["b"]
    prompts = [json.loads(line)["prompt"] for line in E2E_EVAL.read_text().splitlines()[:3]]
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts[:2]))
    mixed = tmp_path / "mixed.jsonl"
    order = [(0, "a"), (1, "b"), (0, "b"), (1, "base"), (2, "a"), (1, "a")]
    mixed.write_text("".join(json.dumps({"prompt": prompts[i], "adapter": n}) + "\n" for i, n in order))
    gen = ("--max-new-tokens", "48", "--format", "jsonl")
    # each adapter alone (and the bare base), one process each
    # (the four generate commands below only read the runs: side by side)
    p_a, p_b, p, p2 = run_all([
        bigtrain(1, "generate", str(a["dir"]), "--prompts", str(plain), "--use", "base", "--use", "a", *gen),
        bigtrain(1, "generate", str(b["dir"]), "--prompts", str(plain), *gen),
        bigtrain(1, "generate", str(a["dir"]), "--adapter", f"b={b['dir']}", "--prompts", str(mixed), *gen),
        bigtrain(2, "generate", str(a["dir"]), "--adapter", f"b={b['dir']}", "--prompts", str(mixed), *gen)],
        env=[None, None, None, {"OMP_NUM_THREADS": "1"}])
    own = {}
    for r in _jsonl(p_a.stdout):
        own[(r["prompt"], r["adapter"])] = r["token_ids"]
    for r in _jsonl(p_b.stdout):
        own[(r["prompt"], r["adapter"])] = r["token_ids"]
    one = _jsonl(p.stdout)
    assert [(r["prompt"], r["adapter"]) for r in one] == [(prompts[i], n) for i, n in order]
    for r in one:
        if r["prompt"] != prompts[2]:
            assert r["token_ids"] == own[(r["prompt"], r["adapter"])], r["adapter"]
    by = {(r["prompt"], r["adapter"]): r["token_ids"] for r in one}
    assert by[(prompts[0], "a")] != by[(prompts[0], "b")] and by[(prompts[1], "a")] != by[(prompts[1], "base")]
    print(p.stderr.strip().splitlines()[-1])
    # the switch cost: a to b and back copies the adapter (16,384 fp32 values); the base is built once
    assert re.search(r"generated [\d,]+ tokens for 6 prompt\(s\) in [\d.]+ s: [\d,.]+ tokens/s", p.stderr)
    assert re.search(r"2 adapter switch\(es\), 65,536 bytes copied each, [\d.]+ ms median", p.stderr), p.stderr
    # 2 ranks, the base partitioned by ZeRO-3: the same tokens (greedy)
    assert "partitioned over 2 ranks" in p2.stderr
    assert [r["token_ids"] for r in _jsonl(p2.stdout)] == [r["token_ids"] for r in one]
    assert _jsonl(p2.stdout) == one


def test_the_demo_prints_what_generate_gives_before_and_after_training(runs, tmp_path):
    a = runs["a"]
    samples = re.findall(r"\[(\d)\] prompt: +(.*)\n +reference: +(.*)\n +before: +(.*)\n +after: +(.*)", a["stdout"])
    assert len(samples) == 2, a["stdout"][-3000:]
    rows = [json.loads(line) for line in E2E_EVAL.read_text().splitlines()[:2]]
    plain = tmp_path / "two.jsonl"
    plain.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))
    got = _jsonl(run(bigtrain(1, "generate", str(a["dir"]), "--prompts", str(plain), "--use", "base", "--use", "a",
                              "--max-new-tokens", "48", "--format", "jsonl")).stdout)
    from bigtrain.generate import one_line as _one_line  # a sample's one log line: every non-printable escaped

    text = {(r["prompt"], r["adapter"]): _one_line(r["completion"]) for r in got}
    for (k, prompt, ref, before, after), row in zip(samples, rows):
        assert prompt == _one_line(row["prompt"]) and ref == row["completion"].strip()
        assert before == text[(row["prompt"], "base")]
        assert after == text[(row["prompt"], "a")]
        assert before != after


def test_a_run_folder_named_base_keeps_its_adapter_apart_from_the_bare_base(runs, tmp_path):
    """"base" names the bare base model in generate and eval: a run folder called base (a natural
    name) was taken for it, so no adapter was applied and the table showed "base" twice. Its adapter
    is now "base-adapter", said in one line."""
    import shutil

    a = runs["a"]
    shutil.copytree(a["dir"], tmp_path / "base")
    p = run(bigtrain(1, "eval", str(tmp_path / "base"), "--data", "builtin:e2e-eval", "--json"))
    assert "its run folder is named 'base'" in p.stderr and "'base-adapter'" in p.stderr, p.stderr[-2000:]
    res = {r["adapter"]: r["loss"] for r in json.loads(p.stdout.strip().splitlines()[-1])["results"]}
    assert res == {"base": a["evals"][0], "base-adapter": a["evals"][30]}
