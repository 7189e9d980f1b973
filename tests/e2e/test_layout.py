"""zero.shard_group on 4 real gloo ranks as 2 nodes x 2: two torchrun agents (--nnodes 2,
--node-rank 0 and 1) on this host, each starting 2 ranks, as on two machines.

What must hold, each counted from the run itself:
* the layout: ``auto`` takes ``node`` for a job that spans nodes and says so in one line;
* the arithmetic: partitioning the base within a node changes where a layer's all-gather reads from,
  nothing else, so losses and adapters are bit-identical to the world-partitioned run, and equal to
  one process to float rounding (the noise floor of tests/e2e/test_engine_dist.py);
* the memory: each rank holds base / 2 (its node's share), not base / 4;
* the traffic (``tests/dist/comm_count.py`` counts every collective on every rank): the base's
  all-gathers (and the build's broadcasts) stay inside a node; only the adapters' all-reduce spans
  the job;
* checkpoints are layout-free: a run saved under ``node`` resumes under ``world`` bit-exactly.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf

from helpers import ROOT, _env, final_adapters, free_port, losses, ranks, run_all, tiny_overrides, train_cmd

pytestmark = pytest.mark.slow
STEPS = 4
COUNT = ROOT / "tests" / "dist" / "comm_count.py"


def two_nodes(out: Path, overrides: list[str], timeout: int = 400) -> str:
    """``bigtrain train`` on 4 ranks as 2 nodes x 2 (two torchrun agents), every rank's collectives
    counted into ``out``/comm<R>.json. Returns node 0's output."""
    out.mkdir(parents=True, exist_ok=True)
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank",
                               str(n), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", port,
                               str(COUNT), str(out), "train", *overrides],
                              cwd=ROOT, env=_env({"PYTHONPATH": str(ROOT)}), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for n in (0, 1)]
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
    for n, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"node {n} exited {p.returncode}:\n{log[-4000:]}"
    return logs[0]


def comm(out: Path) -> list[list[dict]]:
    return [json.loads((out / f"comm{r}.json").read_text()) for r in range(4)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("layout")
    model = tiny_models["tiny-llama"]
    o = lambda d, **kw: tiny_overrides(root / d / "run", model, STEPS, 1, **kw)  # noqa: E731
    out = {"model": model}
    out["node_log"] = two_nodes(root / "node", o("node"))  # zero.shard_group=auto, the default
    out["world_log"] = two_nodes(root / "world", o("world", **{"zero.shard_group": "world"}))
    # saved under node at step 2, resumed under world to the end
    two_nodes(root / "switch", o("switch", **{"train.stop_at_step": 2, "zero.shard_group": "node"}))
    out["switch_log"] = two_nodes(root / "switch", o("switch", **{"zero.shard_group": "world"}))
    # one process with the same global batch of 4, and the same cut into micro-batches of 1 (the floor);
    # the two are independent single-core runs: side by side
    run_all([train_cmd(1, tiny_overrides(root / "one", model, STEPS, 4, **{"zero.stage": 0})),
             train_cmd(1, tiny_overrides(root / "alt", model, STEPS, 1, **{"zero.stage": 0, "train.grad_accum": 4}))])
    out.update({k: root / k for k in ("node", "world", "switch")})
    out.update({k: root / k for k in ("one", "alt")})
    return out


def _equal(a: Path, b: Path) -> bool:
    A, B = final_adapters(a), final_adapters(b)
    return A.keys() == B.keys() and all(torch.equal(A[k], B[k]) for k in A)


def test_auto_takes_node_when_the_job_spans_nodes(runs):
    lines = [ln for ln in runs["node_log"].splitlines() if "zero.shard_group=" in ln]
    assert len(lines) == 1, runs["node_log"][-3000:]
    assert lines[0].startswith("[bigtrain] zero.shard_group=auto: node: the job spans 2 node(s) x 2 rank(s) and "
                               "the base over one node's 2 rank(s) fits"), lines[0]
    assert "zero.shard_group=world: the base is partitioned over all 4 rank(s) (2 node(s) x 2 rank(s))" \
        in runs["world_log"]


def test_node_layout_equals_world_bit_for_bit_and_one_process_to_rounding(runs):
    node, world = runs["node"] / "run", runs["world"] / "run"
    a, b = losses(node), losses(world)
    assert sorted(a) == list(range(1, STEPS + 1)) and a == b  # exact
    assert _equal(node, world)
    one, alt = runs["one"], runs["alt"]
    for s, v in losses(one).items():
        assert a[s] == pytest.approx(v, rel=1e-5), (s, a[s], v)
    A, O, L = final_adapters(node), final_adapters(one), final_adapters(alt)
    floor = max((O[k] - L[k]).abs().max().item() for k in O)
    worst = max((A[k] - O[k]).abs().max().item() for k in A)
    moved = max(A[k].abs().max().item() for k in A if k.endswith("lora_B"))
    assert worst <= max(2 * floor, 1e-6) and moved > 100 * worst, (worst, floor, moved)
    rk = ranks(node)
    assert len({r["adapter_sha256"] for r in rk}) == 1 and len({r["optimizer_sha256"] for r in rk}) == 1


def test_each_rank_holds_its_nodes_share_of_the_base(runs):
    m = tf.AutoModelForCausalLM.from_pretrained(runs["model"])
    half = sum(-(-p.numel() // 2) * 4 for p in m.parameters())
    quarter = sum(-(-p.numel() // 4) * 4 for p in m.parameters())
    assert [r["base_param_bytes"] for r in ranks(runs["node"] / "run")] == [half] * 4
    assert [r["base_param_bytes"] for r in ranks(runs["world"] / "run")] == [quarter] * 4
    # predicted = measured, at the end of the run (memory.predict_states over the node's 2 ranks)
    assert f"frozen_weights {half:,}/{half:,}" in runs["node_log"]


def test_the_bases_all_gathers_stay_inside_a_node(runs):
    nodes = ([0, 1], [2, 3])
    gathered = {}
    for layout in ("node", "world"):
        gathered[layout] = []
        for rank, rows in enumerate(comm(runs[layout])):
            ops = {(r["op"], tuple(r["ranks"])): r for r in rows}
            mine = list(next(n for n in nodes if rank in n))
            base = [r for r in rows if r["op"] in ("all_gather_into_tensor", "broadcast") and r["ranks"] != [0, 1, 2, 3]]
            if layout == "node":
                # every base all-gather and every build broadcast within this rank's node
                assert {tuple(r["ranks"]) for r in rows if r["op"] == "all_gather_into_tensor"} == {tuple(mine)}
                assert {tuple(r["ranks"]) for r in base} == {tuple(mine)}
                # across nodes: the adapters' gradient all-reduces and the start's adapter broadcast only
                across = [r for r in rows if len(r["ranks"]) == 4]
                assert {r["op"] for r in across} == {"all_reduce", "broadcast"}, across
                assert ops[("broadcast", (0, 1, 2, 3))]["calls"] == 1
            else:
                assert {tuple(r["ranks"]) for r in rows if r["op"] == "all_gather_into_tensor"} == {(0, 1, 2, 3)}
            g = ops[("all_gather_into_tensor", tuple(mine) if layout == "node" else (0, 1, 2, 3))]
            n = 2 if layout == "node" else 4
            gathered[layout].append((g["calls"], g["bytes"], g["bytes"] * (n - 1) // n))
    # the same layers gathered as often, whole; what arrives from other ranks: 1/2 of it, against 3/4
    for (cn, bn, rn), (cw, bw, rw) in zip(gathered["node"], gathered["world"]):
        assert (cn, bn) == (cw, bw) and cn > 0
        assert rn * 3 == rw * 2
    # the adapters' all-reduces: the same in both layouts, besides auto's one 8-byte vote on whether
    # the base fits a node
    red = [[(r["calls"], r["bytes"]) for r in rows if r["op"] == "all_reduce"] for rows in comm(runs["node"])]
    assert red == [[(r["calls"] + 1, r["bytes"] + 8) for r in rows if r["op"] == "all_reduce"]
                   for rows in comm(runs["world"])]


def test_a_run_saved_under_node_resumes_under_world_exactly(runs):
    switch = runs["switch"] / "run"
    assert "resumed from" in runs["switch_log"] and "at step 2" in runs["switch_log"]
    assert "zero.shard_group=world" in runs["switch_log"]
    assert losses(switch) == losses(runs["world"] / "run")
    assert _equal(switch, runs["world"] / "run")
