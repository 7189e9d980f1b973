"""zero.shard_group's decision (bigtrain/layout.py): the groups for world | node | K | auto, from each
rank's node, and the one line each run prints."""
import pytest

from bigtrain.config import ConfigError, load_config
from bigtrain.layout import choose, consecutive, node_ranks

TWO_BY_TWO = [("h", "0"), ("h", "0"), ("h", "1"), ("h", "1")]


def test_nodes_are_read_from_every_ranks_key_in_rank_order():
    assert node_ranks(TWO_BY_TWO) == [[0, 1], [2, 3]]
    assert node_ranks(["b", "a", "b", "a"]) == [[0, 2], [1, 3]]  # Slurm's cyclic distribution
    assert consecutive(8, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_each_layout_gives_its_groups():
    assert choose("world", TWO_BY_TWO).groups == ((0, 1, 2, 3),)
    node = choose("node", TWO_BY_TWO)
    assert node.groups == ((0, 1), (2, 3)) and node.size == 2 and node.group_of(3) == (2, 3)
    assert node.line == ("zero.shard_group=node: the base is partitioned over each node's 2 rank(s) and "
                         "replicated across 2 node(s); its all-gathers stay inside a node")
    assert choose(1, TWO_BY_TWO).groups == ((0,), (1,), (2,), (3,))
    assert choose(4, TWO_BY_TWO).is_world
    # groups of K that span nodes are allowed, and said
    odd = choose(2, [("a", ""), ("b", ""), ("a", ""), ("b", "")])
    assert odd.groups == ((0, 1), (2, 3)) and odd.line.endswith("2 group(s) span nodes, so their all-gathers "
                                                                "cross nodes")
    # node under a cyclic rank order: the node's ranks, not consecutive ones
    assert choose("node", ["a", "b", "a", "b"]).groups == ((0, 2), (1, 3))


def test_auto_takes_node_only_when_the_job_spans_nodes_and_the_base_fits():
    asked = []

    def fits(k):
        asked.append(k)
        return True, "estimated 1.0 GiB per GPU of 80.0 GiB"

    one_node = choose("auto", [("h", "")] * 4, fits)
    assert one_node.is_world and asked == []
    assert one_node.line == "zero.shard_group=auto: world: the job is on one node; the base is partitioned over its 4 rank(s)"
    two = choose("auto", TWO_BY_TWO, fits)
    assert two.groups == ((0, 1), (2, 3)) and asked == [2]
    assert two.line == ("zero.shard_group=auto: node: the job spans 2 node(s) x 2 rank(s) and the base over one "
                        "node's 2 rank(s) fits (estimated 1.0 GiB per GPU of 80.0 GiB); partitioned within each "
                        "node and replicated across nodes, its all-gathers stay inside a node")
    tight = choose("auto", TWO_BY_TWO, lambda k: (False, "estimated 90.0 GiB per GPU of 80.0 GiB"))
    assert tight.is_world and "would not fit with headroom (estimated 90.0 GiB per GPU of 80.0 GiB)" in tight.line
    uneven = choose("auto", [("a", "")] * 3 + [("b", "")], fits)
    assert uneven.is_world and "the nodes hold different numbers of ranks (2 nodes with 3, 1 ranks)" in uneven.line


def test_a_layout_the_job_cannot_take_is_one_line_naming_the_key():
    with pytest.raises(ConfigError, match=r"^zero.shard_group=3 must divide the world size 4 \(2 node\(s\) x 2"):
        choose(3, TWO_BY_TWO)
    with pytest.raises(ConfigError, match=r"^zero.shard_group=8 must divide the world size 4"):
        choose(8, TWO_BY_TWO)
    with pytest.raises(ConfigError, match=r"^zero.shard_group=node needs the same number of ranks on every node; "
                                          r"this job has 2 nodes with 3, 1 ranks"):
        choose("node", [("a", "")] * 3 + [("b", "")])


@pytest.mark.parametrize("value,ok", [("auto", True), ("world", True), ("node", True), ("2", True), ("0", False),
                                      ("-1", False), ("nodes", False), ("true", False)])
def test_the_config_key_is_checked_before_any_work(value, ok):
    if ok:
        load_config(None, [f"zero.shard_group={value}"])
        return
    with pytest.raises(ConfigError, match=r"^zero.shard_group: expected"):
        load_config(None, [f"zero.shard_group={value}"])
