"""Ulysses sequence parallelism, ``train.sequence_parallel=N``: each sequence split over N ranks.

The ranks form groups of N consecutive ranks (one group per node's GPUs when N divides them: the
all-to-alls stay on NVLink). A group trains on one micro-batch together: every rank of it collates
the same samples (its data-parallel rank's, :func:`Layout` / ``sampler.step_batches`` at world/N
ranks) and keeps its own slice of the sequence, positions ``[r·T/N, (r+1)·T/N)`` (:func:`shard`).
Everything outside attention works token by token, so it runs on the shard as it is. In each
attention (Jacobs et al. 2023, DeepSpeed-Ulysses) the group exchanges q, k and v by an all-to-all
from "T/N positions x all heads" to "all T positions x H/N heads", computes causal sdpa over the
whole sequence for its heads, and exchanges the output back. Activations per GPU fall to ~1/N.

Exactness, the reason each piece is as it is:

* labels are shifted left on the whole sequence before it is cut (``shift_labels``): the target of
  a shard's last position is the next shard's first token, which the shard does not hold;
* positions are given explicitly (``position_ids``): a model given a shard would number it from 0;
* attention is causal over the whole sequence (sdpa's ``is_causal``, no mask): batches are
  right-padded (``data.collate``), so the real tokens never see a pad, and a pad has no target;
  a packed row attends across its examples as it does on one GPU;
* the loss of a micro-batch is the sum of its shards' sums (each rank's own targets), and every
  rank divides by the step's *global* target count (``sampler.count_tokens`` counts the shards),
  so the step's one all-reduce SUM over the world gives the single-process gradient: a rank's
  adapter gradient is the part of the group's loss gradient that flows through its own tokens
  (the all-to-all's backward carries the other ranks' parts to where they were computed), and the
  sum over the group's ranks is the whole sequence's gradient;
* every rank of a group makes the same module calls (one forward, the head once, in the same
  order), so ZeRO-3's per-layer gathers stay collective.

What of DeepSpeed's ALST (``deepspeed.runtime.sequence_parallel.ulysses_sp``, 0.19.8) is used:

* ``UlyssesSPAttentionHF``, the all-to-all of heads around transformers' own attention function
  (with GQA's KV heads replicated when N exceeds them, and DeepSpeed's differentiable all-to-all
  operator), is used as it is, built over bigtrain's own process group for the rank's sequence
  group (``dist.new_groups``: bigtrain does not call ``deepspeed.initialize``). DeepSpeed's comm
  layer carries it, which bigtrain starts at zero.stage=3 only: hence SP needs zero.stage=3.
* Its ``register_with_transformers`` is not used: it makes its own process groups
  (``parallel_state_sp``), and it replaces transformers' sdpa for the whole process and for good,
  while a bigtrain process also runs whole sequences through the same model (the end-of-run
  samples; its frozen base is always in eval mode, so ``disable_in_eval`` cannot tell them apart).
  bigtrain installs its own thin wrapper (:class:`SequenceParallel`), active only inside
  :meth:`SequenceParallel.attending` (a training micro-batch's forward and backward, recomputation
  included; an eval batch); it also gives the attention the shard's ``position_ids`` where a model
  does not pass them on (GPT-2; DeepSpeed asserts them), puts back ``module.num_key_value_groups``
  which DeepSpeed rewrites when it replicates KV heads, and returns transformers' layout
  ``[B, T, heads, head_dim]`` (DeepSpeed returns ``[B, T, heads·head_dim]``, which GPT-2's own
  reshape misreads).
* ``UlyssesSPDataLoaderAdapter`` is not used: it all-gathers each rank's own batch within the group
  and hands out one batch's shards per call, which changes each rank's micro-batches and their
  order; bigtrain's global sampler already tells every rank of a group the same samples, so each
  rank slices its shard locally, with no communication. Its label convention is the one kept.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .config import ConfigError
from .losses import IGNORE_INDEX, token_loss_sum


@dataclass(frozen=True)
class Layout:
    """Where a rank sits: sequence groups of ``size`` consecutive ranks; ``rank`` within its group;
    its data-parallel rank (= its group's index) among ``dp_world`` groups."""

    size: int
    rank: int
    dp_rank: int
    dp_world: int

    @classmethod
    def of(cls, rank: int, world: int, size: int) -> "Layout":
        if size < 1 or world % size:
            raise ValueError(f"sequence groups of {size} ranks do not tile a world of {world}")
        return cls(size, rank % size, rank // size, world // size)

    @staticmethod
    def groups(world: int, size: int) -> list[list[int]]:
        """Every sequence group, in rank order (every rank makes every group, as torch requires)."""
        return [list(range(g, g + size)) for g in range(0, world, size)]


def attention_heads(hf_config) -> tuple[int, int]:
    """(attention heads, KV heads) of a transformers config (KV heads = heads without GQA)."""
    c = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    heads = int(c.num_attention_heads)
    kv = getattr(c, "num_key_value_heads", None)
    return heads, int(kv) if kv else heads


def check(sp: int, world: int, hf_config, attn_implementation: str | None) -> None:
    """What train.sequence_parallel needs of the world and the model, each refused in one line naming
    the key (config.Config.validate has checked zero.stage, data.max_length, model.compile)."""
    if sp <= 1:
        return
    key = f"train.sequence_parallel={sp}"
    if world % sp:
        raise ConfigError(f"{key} must divide the world size {world} (groups of {sp} consecutive ranks; "
                          f"data-parallel ranks = world / {sp})")
    heads, kv = attention_heads(hf_config)
    if heads % sp:
        raise ConfigError(f"{key}: the model's {heads} attention heads are not divisible by {sp} (each rank of a "
                          f"group computes {heads}/{sp} heads); use a divisor of {heads}")
    if kv % sp and sp % kv:
        raise ConfigError(f"{key}: the model's {kv} KV heads must be divisible by {sp}, or {sp} by them (KV heads "
                          f"are then replicated); use a divisor or a multiple of {kv} that divides {heads}")
    if attn_implementation != "sdpa":
        raise ConfigError(f"{key} needs sdpa attention (causal over the whole sequence, no mask); "
                          f"model.attn_implementation is {attn_implementation} for this model")


def shard(batch: dict, size: int, rank: int) -> dict:
    """Rank ``rank``'s slice of a collated micro-batch (``data.collate``: right-padded, (B, T), T a
    multiple of ``size``): ``input_ids``, ``attention_mask`` (counted, not given to the model),
    ``shift_labels`` (the labels shifted left on the whole sequence: position t's target) and
    ``position_ids`` (global positions), each (B, T/size)."""
    ids = batch["input_ids"]
    B, T = ids.shape
    if T % size:
        raise ValueError(f"a batch of {T} tokens per sequence does not split into {size} equal shards")
    n = T // size
    cut = slice(rank * n, (rank + 1) * n)
    shifted = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
    positions = torch.arange(T, dtype=torch.long).unsqueeze(0).expand(B, T)
    return {"input_ids": ids[:, cut].contiguous(), "attention_mask": batch["attention_mask"][:, cut].contiguous(),
            "shift_labels": shifted[:, cut].contiguous(), "position_ids": positions[:, cut].contiguous()}


def loss_sum(model, b: dict, vocab: int | None) -> tuple[torch.Tensor, int]:
    """The summed token loss and target count of one micro-batch: a whole one (labels) or a shard
    (:func:`shard`: pre-shifted labels, global positions, no mask: attention is causal over the
    whole sequence inside :meth:`SequenceParallel.attending`)."""
    if "shift_labels" in b:
        return token_loss_sum(model, b["input_ids"], None, None, vocab, shift_labels=b["shift_labels"],
                              position_ids=b["position_ids"])
    return token_loss_sum(model, b["input_ids"], b["attention_mask"], b["labels"], vocab)


class SequenceParallel:
    """This rank's sequence group and the attention wrapper (see the module docstring)."""

    def __init__(self, layout: Layout, group, hf_config, micro_batch_size: int):
        # deferred: DeepSpeed takes seconds to import (engine/__init__.py), and only SP runs need this
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

        self.layout, self.group = layout, group
        c = hf_config.get_text_config()
        heads, kv = attention_heads(hf_config)
        self._functions = ALL_ATTENTION_FUNCTIONS
        self.core = ALL_ATTENTION_FUNCTIONS["sdpa"]
        self.ulysses = UlyssesSPAttentionHF(
            attn=self.core, batch_size=micro_batch_size, attn_head_count=heads,
            attn_head_size=getattr(c, "head_dim", None) or c.hidden_size // heads, kv_head_count=kv,
            num_hidden_layers=c.num_hidden_layers, process_group=group, seq_length_is_variable=True)
        self.ulysses.core_attn_implementation = "sdpa"
        self._position_ids = None  # the shard's, while attending
        ALL_ATTENTION_FUNCTIONS["sdpa"] = self._attention

    @property
    def size(self) -> int:
        return self.layout.size

    def close(self) -> None:
        """Give transformers its own sdpa back."""
        if self._functions["sdpa"] is self._attention:
            self._functions["sdpa"] = self.core

    def shard(self, batch: dict) -> dict:
        return shard(batch, self.layout.size, self.layout.rank)

    @contextlib.contextmanager
    def attending(self, b: dict):
        """Attention runs sequence-parallel for shard ``b`` inside this context: its forward, and its
        backward, where checkpointed layers are recomputed."""
        self._position_ids = b["position_ids"]
        try:
            yield
        finally:
            self._position_ids = None

    def _attention(self, module, query, key, value, attention_mask, *args, **kwargs):
        if self._position_ids is None:  # a whole sequence (samples): the plain kernel
            return self.core(module, query, key, value, attention_mask, *args, **kwargs)
        if kwargs.get("position_ids") is None:
            kwargs["position_ids"] = self._position_ids
        groups = getattr(module, "num_key_value_groups", None)
        try:
            # no mask: causal over the whole sequence (right padding; module docstring)
            out, weights = self.ulysses(module, query, key, value, None, *args, **kwargs)
        finally:
            if groups is not None:
                module.num_key_value_groups = groups
        return out.reshape(*out.shape[:2], -1, query.shape[-1]), weights


def attending(sp: SequenceParallel | None, b: dict):
    """:meth:`SequenceParallel.attending` for a shard, nothing otherwise."""
    return sp.attending(b) if sp is not None and "shift_labels" in b else contextlib.nullcontext()
