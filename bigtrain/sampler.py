"""Which examples each rank sees: one global order, cut the same way at any world size.

Epoch e visits the dataset in ``randperm(n)`` drawn from a generator seeded with (seed, e). The
data position is a count of *global* samples consumed, so it means the same thing at any world
size: a run resumed with a different number of ranks continues at the same sample, none skipped
or seen twice.

One optimizer step consumes G = m·A·W samples (micro-batch m, accumulation A, world W). Micro-step a
takes the slice [a·m·W, (a+1)·m·W) of the step's samples, and rank r the r-th m of that slice. With
W=1 and micro-batch m·W the same slice is one micro-batch: N ranks × m and 1 process × N·m see the
same examples in the same optimizer step.
"""

from __future__ import annotations

import torch

from .data import collate
from .losses import IGNORE_INDEX


class GlobalSampler:
    def __init__(self, n: int, seed: int):
        if n <= 0:
            raise ValueError("the training set is empty")
        self.n, self.seed = n, seed
        self._cache: dict[int, list[int]] = {}

    def epoch_order(self, epoch: int) -> list[int]:
        if epoch not in self._cache:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._cache = {epoch: torch.randperm(self.n, generator=g).tolist()}
        return self._cache[epoch]

    def take(self, position: int, count: int) -> list[int]:
        """Dataset indices of global samples [position, position + count), across epochs."""
        out = []
        while len(out) < count:
            epoch, off = divmod(position + len(out), self.n)
            order = self.epoch_order(epoch)
            out.extend(order[off:off + count - len(out)])
        return out

    def epoch(self, position: int) -> float:
        return position / self.n


def rank_micro_batches(step_indices: list[int], micro: int, accum: int, rank: int,
                       world: int) -> list[list[int]]:
    """This rank's ``accum`` micro-batches of one optimizer step's samples."""
    assert len(step_indices) == micro * accum * world
    out = []
    for a in range(accum):
        chunk = step_indices[a * micro * world:(a + 1) * micro * world]
        out.append(chunk[rank * micro:(rank + 1) * micro])
    return out


def step_batches(ds, sampler: GlobalSampler, position: int, micro: int, accum: int, rank: int, world: int,
                 pad_id: int, multiple: int = 1, cap: int | None = None) -> list[dict]:
    """This rank's collated micro-batches of the optimizer step that starts at global sample
    ``position`` (the LoRA loop's and ``bigtrain measure``'s full fine-tuning alike)."""
    idx = sampler.take(position, micro * accum * world)
    return [collate([ds[i] for i in mb], pad_id, multiple, cap)
            for mb in rank_micro_batches(idx, micro, accum, rank, world)]


def count_tokens(batches: list[dict]) -> tuple[int, int]:
    """(target tokens, attended tokens) of this rank's micro-batches: a step's loss is divided by
    the target tokens summed over all ranks. A sequence shard (``seqpar.shard``) counts its own
    pre-shifted targets, so the shards of a sequence add up to the sequence's count."""
    targets = sum(int((b["shift_labels"] != IGNORE_INDEX).sum()) if "shift_labels" in b
                  else int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    return targets, sum(int(b["attention_mask"].sum()) for b in batches)
