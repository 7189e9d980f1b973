"""Scoring the adapters: :func:`evaluate` (the eval loss a run logs and ``bigtrain eval`` reports)
and :func:`sample_prompts` (the held-out prompts a run prints its samples of, generate.py's
``show_samples``)."""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING

import torch

from .config import Config
from .data import collate, iter_records
from .losses import IGNORE_INDEX
from .seqpar import SequenceParallel, attending, loss_sum

if TYPE_CHECKING:
    from .engine.core import Engine


@torch.no_grad()
def evaluate(model, eval_ds, engine: Engine, cfg: Config, autocast, pad_id: int, vocab: int | None = None,
             multiple: int = 1, sp: SequenceParallel | None = None) -> float:
    """Mean token loss over the first ``train.eval_examples`` examples of the eval set, each scored
    once, split over the ranks. Every rank runs the same number of forwards (ZeRO-3's gathers are
    collective): the last batches are filled with example 0 with its loss masked out, so the figure
    does not depend on the micro-batch size or the world size. ``sp`` (train.sequence_parallel): the
    examples are split over the sequence groups, and each rank scores its shard of them."""
    info, m = engine.info, cfg.train.micro_batch_size
    rank, world = (sp.layout.dp_rank, sp.layout.dp_world) if sp else (info.rank, info.world_size)
    n = len(eval_ds) if cfg.train.eval_examples == 0 else min(cfg.train.eval_examples, len(eval_ds))
    total, count = 0.0, 0
    for bi in range(math.ceil(n / (m * world))):
        base = (bi * world + rank) * m
        rows = []
        for i in range(base, base + m):
            ex = dict(eval_ds[i if i < n else 0])
            if i >= n:  # filler: keeps the forward count equal on every rank, scores nothing
                ex["labels"] = [IGNORE_INDEX] * len(ex["labels"])
            rows.append(ex)
        b = collate(rows, pad_id, multiple, cfg.data.max_length)
        b = {k: v.to(info.device) for k, v in (sp.shard(b) if sp else b).items()}
        with attending(sp, b), autocast():
            ls, c = loss_sum(model, b, vocab)
        total += float(ls)
        count += c
    engine.after_backward()
    total, count = engine.all_reduce_scalars([total, count])
    return total / max(count, 1)


def sample_prompts(cfg: Config) -> list[tuple[dict, str]]:
    """(prompt row, reference) of the first train.sample_prompts examples of data.eval: a
    ``{"prompt"}`` row and its completion, or for conversations a ``{"messages"}`` row up to the last
    assistant turn and that turn; none when there is no eval set or it is text data (no prompt to
    continue). Reads only those first records."""
    n = cfg.train.sample_prompts
    if not (cfg.data.eval and n):
        return []
    records, _ = iter_records(cfg.data.eval, cfg.data.on_bad_line, cfg.data.format)
    out = []
    for rec in itertools.islice(records, n):
        if "prompt" in rec:
            out.append(({"prompt": rec["prompt"]}, rec["completion"]))
        elif "messages" in rec:
            msgs = rec["messages"]
            last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
            if last > 0 and msgs[last].get("content"):
                out.append(({"messages": msgs[:last]}, msgs[last]["content"]))
    return out
