"""Measured == predicted, exactly, per rank: the ZeRO-3 frozen base, adapters, grads and AdamW state of
a real LoRA training step under the real torchrun, for 1, 2 and 3 ranks, persistence threshold 0 and
DeepSpeed's default 1e5 (where every tiny-opt parameter stays whole on every rank besides its
partition)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bigtrain.memory import predict_states
from helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "dist" / "memory_dist_worker.py"
THRESHOLDS = (0, 100000)
WORLDS = (1, 2, 3)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = {}
    for n in WORLDS:  # all three jobs at once: the processes are mostly importing
        out = tmp_path_factory.mktemp(f"w{n}")
        cmd = [torchrun, "--nproc_per_node", str(n), "--master_port", str(free_port()),
               str(WORKER), str(out), ",".join(map(str, THRESHOLDS))]
        procs[n] = (subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True), out)
    results = {}
    for n, (p, out) in procs.items():
        log, _ = p.communicate(timeout=300)
        assert p.returncode == 0, f"torchrun N={n} failed:\n{log[-3000:]}"
        results[n] = [json.loads((out / f"rank{r}.json").read_text()) for r in range(n)]
    return results


@pytest.mark.parametrize("n", WORLDS)
@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_measured_equals_predicted_per_rank(measured, n, threshold):
    pred = predict_states("tiny-opt", ["q_proj", "v_proj"], r=4, world_size=n, base_dtype="float32",
                          persistence_threshold=threshold)
    for rank, res in enumerate(measured[n]):
        got = res[str(threshold)]
        assert got["world_size"] == n
        assert got["measured"] == pred, f"rank {rank} of {n}, threshold {threshold}"


def test_partition_shrinks_with_ranks(measured):
    fw = {n: measured[n][0]["0"]["measured"]["frozen_weights"] for n in WORLDS}
    assert fw[1] > fw[2] > fw[3]
    # tiny-opt, vocab 512, fp32: 891,904 elements; padded partitions ceil(numel/N)
    assert fw[1] == 891904 * 4
    # every tiny-opt parameter is <= 1e5 elements: with the default threshold each stays whole too
    assert measured[2][1]["100000"]["measured"]["frozen_weights"] == fw[2] + 891904 * 4
