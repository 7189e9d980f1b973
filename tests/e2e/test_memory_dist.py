"""Measured == predicted, exactly, per rank: the ZeRO-3 frozen base, adapters, grads and AdamW state of
a real LoRA training step under the real torchrun, for 1, 2 and 3 ranks, persistence threshold 0 and
DeepSpeed's default 1e5 (where every tiny-opt parameter stays whole on every rank besides its
partition)."""

from pathlib import Path

import pytest

from bigtrain.memory import predict_states
from helpers import torchrun_workers

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "dist" / "memory_dist_worker.py"
THRESHOLDS = (0, 100000)
WORLDS = (1, 2, 3)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    return torchrun_workers(WORKER, WORLDS, tmp_path_factory, [",".join(map(str, THRESHOLDS))], timeout=300)


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
