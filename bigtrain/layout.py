"""Which ranks partition the frozen base among themselves: ``zero.shard_group``.

ZeRO-3 all-gathers every decoder layer of the base from every rank of its partition group, in the
forward, in the backward and again in each recomputation, at every micro-step. Over the whole world
that traffic crosses the inter-node fabric as soon as a job spans nodes (Llama-2-70B at seq 8192:
about 3 × 138 GB received per GPU per micro-step). A frozen base has no gradients and no optimizer
state, so it can be partitioned within each node (or each group of K ranks) and replicated across
groups at no cost but memory (base / K per GPU instead of base / N): the base's all-gathers then stay
on the node's own links and the only collective that crosses nodes is the adapters' gradient
all-reduce, once per optimizer step.

The partitioning itself is DeepSpeed's: each decoder layer is handed to ``zero.Init`` with its group
as ``data_parallel_group`` (``engine/build.py``), so every ZeRO-3 parameter carries that group as its
``ds_process_group`` and everything that reads partitions (bigtrain's layer gatherer, DeepSpeed's
fetch hooks, the checkpoint loader, whole-parameter gathers) follows it. Not hpZ's secondary
partitions: those keep a 1/N primary partition *and* a 1/K secondary copy per GPU and rebuild the
secondary from the primary over the whole world after each step's first release; a frozen base needs
neither.

This module holds the decision alone (pure functions, no process group): who shares a node, the
groups for ``world`` | ``node`` | K, and ``auto``'s choice, each with the one line the run prints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable, Sequence

from .config import ConfigError


@dataclass(frozen=True)
class Layout:
    groups: tuple[tuple[int, ...], ...]  # every partition group, each its ranks in order
    name: str  # "world", "node" or the number of ranks per group, as zero.shard_group spells it
    line: str  # what the run says it took, and why

    @property
    def size(self) -> int:
        """Ranks per group: the base's partition count, base / size per rank."""
        return len(self.groups[0])

    def group_of(self, rank: int) -> tuple[int, ...]:
        return next(g for g in self.groups if rank in g)

    @property
    def is_world(self) -> bool:
        return len(self.groups) == 1


def node_ranks(keys: Sequence[Hashable]) -> list[list[int]]:
    """The ranks of each node, from every rank's node key (rank order), nodes in order of their
    first rank."""
    nodes: dict[Hashable, list[int]] = {}
    for rank, key in enumerate(keys):
        nodes.setdefault(key, []).append(rank)
    return list(nodes.values())


def consecutive(world: int, k: int) -> list[list[int]]:
    """Groups of ``k`` consecutive ranks."""
    return [list(range(i, i + k)) for i in range(0, world, k)]


def _spans(groups: list[list[int]], nodes: list[list[int]]) -> int:
    """How many groups have ranks on more than one node."""
    where = {r: i for i, node in enumerate(nodes) for r in node}
    return sum(len({where[r] for r in g}) > 1 for g in groups)


def _nodes_text(nodes: list[list[int]]) -> str:
    sizes = [len(n) for n in nodes]
    if len(set(sizes)) == 1:
        return f"{len(nodes)} node(s) x {sizes[0]} rank(s)"
    return f"{len(nodes)} nodes with {', '.join(map(str, sizes))} ranks"


def choose(shard_group: int | str, keys: Sequence[Hashable],
           fits: Callable[[int], tuple[bool, str]] | None = None) -> Layout:
    """The layout for ``zero.shard_group`` = ``shard_group`` given each rank's node key (``keys``,
    rank order). ``fits(k)`` -> (whether the run fits with the base over k ranks, the figures that say
    so); ``auto`` asks it for the node's size. Raises ConfigError naming the key for a layout the job
    cannot take."""
    world = len(keys)
    nodes = node_ranks(keys)
    where = _nodes_text(nodes)
    even = len({len(n) for n in nodes}) == 1
    if shard_group == "world" or world == 1:
        return Layout((tuple(range(world)),), "world",
                      f"zero.shard_group={shard_group}: the base is partitioned over all {world} rank(s) ({where})")
    if shard_group == "node":
        if not even:
            raise ConfigError(f"zero.shard_group=node needs the same number of ranks on every node; this job "
                              f"has {where}: use zero.shard_group=world or a number of ranks that divides each node's")
        groups = [tuple(n) for n in nodes]
        return Layout(tuple(groups), "node",
                      f"zero.shard_group=node: the base is partitioned over each node's {len(groups[0])} "
                      f"rank(s) and replicated across {len(groups)} node(s); its all-gathers stay inside a node")
    if shard_group == "auto":
        if len(nodes) == 1:
            return Layout((tuple(range(world)),), "world",
                          f"zero.shard_group=auto: world: the job is on one node; the base is partitioned "
                          f"over its {world} rank(s)")
        if not even:
            return Layout((tuple(range(world)),), "world",
                          f"zero.shard_group=auto: world: the nodes hold different numbers of ranks ({where}), "
                          f"so node groups would partition the base unevenly; its all-gathers cross nodes")
        k = len(nodes[0])
        ok, figures = fits(k) if fits is not None else (True, "")
        if not ok:
            return Layout((tuple(range(world)),), "world",
                          f"zero.shard_group=auto: world: the base over one node's {k} rank(s) would not fit "
                          f"with headroom ({figures}); partitioned over all {world} ranks ({where}), its "
                          f"all-gathers cross nodes (zero.shard_group=K for groups of K ranks)")
        groups = [tuple(n) for n in nodes]
        return Layout(tuple(groups), "node",
                      f"zero.shard_group=auto: node: the job spans {where} and the base over one node's {k} "
                      f"rank(s) fits{f' ({figures})' if figures else ''}; partitioned within each node and "
                      f"replicated across nodes, its all-gathers stay inside a node")
    k = int(shard_group)
    if k > world or world % k:
        raise ConfigError(f"zero.shard_group={k} must divide the world size {world} ({where})")
    groups = consecutive(world, k)
    crossing = _spans(groups, nodes)
    line = (f"zero.shard_group={k}: the base is partitioned over groups of {k} consecutive rank(s) and "
            f"replicated across {len(groups)} group(s) ({where})")
    if crossing:
        line += f"; {crossing} group(s) span nodes, so their all-gathers cross nodes"
    return Layout(tuple(tuple(g) for g in groups), str(k), line)
