"""bench/bench_gpu.py --smoke: every contender that runs on a CPU gives a row with positive numbers."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CPU_CONTENDERS = ["bigtrain", "bigtrain-hooks", "peft", "ds-peft", "full"]


@pytest.mark.slow
def test_bench_smoke(tmp_path):
    out = tmp_path / "bench"
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_gpu.py"), "--smoke", "--out", str(out)],
                       capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())
    table = (out / "results.md").read_text()
    got = {(r["contender"], r["ac"]) for r in rows}
    for c in CPU_CONTENDERS:
        assert (c, False) in got, f"no row for {c}"
    assert ("bigtrain", True) in got  # activation checkpointing path
    for r in rows:
        assert not r.get("error"), (r["contender"], r.get("error"), (out / "errors.log").read_text()
                                    if (out / "errors.log").exists() else "")
        assert r["tokens_per_s"] > 0 and r["step_ms"] > 0 and r["mfu"] > 0
        assert r["params"] > 0 and all(x == x for x in r["losses"])  # finite, not NaN
        assert f"| {r['contender']}" in table
    assert "MFU = tokens/s" in table  # the formula is stated


@pytest.mark.slow
def test_scaling_smoke(tmp_path):
    """bench/scaling.py --cpu: all three contenders (bigtrain under torchrun, FSDP2 + PEFT and
    DeepSpeed ZeRO-3 + PEFT workers) at 1 and 2 processes on gloo give an ok row each, plus the
    table and the plot. Every contender runs on the CPU: none is skipped. ~2 min on 2 cores."""
    out = tmp_path / "scaling"
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "scaling.py"), "--cpu", "--models", "tiny-opt",
                        "--ckpt", "off", "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = [json.loads(ln) for ln in (out / "scaling.jsonl").read_text().splitlines() if ln.strip()]
    assert {(r["contender"], r["gpus"]) for r in rows} == {
        (c, n) for c in ("bigtrain", "fsdp2-peft", "ds-peft") for n in (1, 2)}
    for r in rows:
        assert r["status"] == "ok", (r["name"], r["status"])
        assert r["tokens_per_s_per_gpu"] > 0 and r["step_ms"] > 0
        assert all(x == x for x in r["losses"])  # finite, not NaN
        assert (out / "logs" / f"{r['name']}.txt").exists()
    assert "| tiny-opt (CPU smoke) | bigtrain | 2 |" in (out / "scaling.md").read_text()
    assert (out / "scaling.png").stat().st_size > 0
