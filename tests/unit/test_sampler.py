"""bigtrain/sampler.py: one global sample order, cut the same way at any world size."""

import pytest
import torch

from bigtrain.sampler import GlobalSampler, rank_micro_batches


def test_each_epoch_is_a_permutation_seeded_by_seed_and_epoch():
    s = GlobalSampler(10, seed=3)
    e0, e1 = s.epoch_order(0), s.epoch_order(1)
    assert sorted(e0) == sorted(e1) == list(range(10)) and e0 != e1
    g = torch.Generator().manual_seed(3 * 100_003 + 1)
    assert e1 == torch.randperm(10, generator=g).tolist()
    assert GlobalSampler(10, seed=3).epoch_order(0) == e0 and GlobalSampler(10, seed=4).epoch_order(0) != e0


def test_take_crosses_epochs_and_any_cut_gives_the_same_stream():
    s = GlobalSampler(7, seed=0)
    stream = s.take(0, 30)
    assert stream[:7] == s.epoch_order(0) and stream[7:14] == s.epoch_order(1) and stream[28:] == s.epoch_order(4)[:2]
    # a resume at any position continues the same stream: nothing skipped or repeated
    for p in (0, 5, 7, 13, 22):
        assert GlobalSampler(7, seed=0).take(p, 30 - p) == stream[p:]
    assert s.epoch(14) == 2.0 and s.epoch(7 + 3) == pytest.approx(10 / 7)


def test_empty_dataset_is_refused():
    with pytest.raises(ValueError, match="empty"):
        GlobalSampler(0, seed=0)


@pytest.mark.parametrize("micro,accum,world", [(1, 1, 1), (2, 3, 2), (4, 2, 3), (3, 1, 4)])
def test_ranks_split_each_micro_step_like_one_process_with_n_times_the_batch(micro, accum, world):
    step = list(range(100, 100 + micro * accum * world))
    per_rank = [rank_micro_batches(step, micro, accum, r, world) for r in range(world)]
    one = rank_micro_batches(step, micro * world, accum, 0, 1)
    for a in range(accum):
        # micro-step a of N ranks × m holds exactly micro-step a of 1 process × N·m, in rank order
        assert sum((per_rank[r][a] for r in range(world)), []) == one[a]
    assert sorted(i for r in per_rank for mb in r for i in mb) == step  # every sample once


def test_wrong_step_size_is_an_error():
    with pytest.raises(AssertionError):
        rank_micro_batches(list(range(5)), 2, 1, 0, 2)
