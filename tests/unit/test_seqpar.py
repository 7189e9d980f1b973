"""bigtrain/seqpar.py without a process group: the sequence groups, a batch's shards (exact values),
the checks of train.sequence_parallel (one line naming the key and the value), the loss on
pre-shifted labels, and the estimator's sequence-parallel term. The attention itself (the all-to-all)
is tested on gloo ranks: tests/e2e/test_seqpar.py."""
import pytest
import torch
import transformers as tf

from bigtrain import seqpar
from bigtrain.config import ConfigError, load_config
from bigtrain.losses import IGNORE_INDEX, token_loss_sum
from bigtrain.memory import Setup, estimate, setup_for_run
from bigtrain.sampler import count_tokens

X = IGNORE_INDEX


def test_layout_groups_consecutive_ranks():
    assert seqpar.Layout.groups(8, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert seqpar.Layout.groups(4, 2) == [[0, 1], [2, 3]]
    assert seqpar.Layout.of(5, 8, 4) == seqpar.Layout(size=4, rank=1, dp_rank=1, dp_world=2)
    assert seqpar.Layout.of(2, 4, 2) == seqpar.Layout(size=2, rank=0, dp_rank=1, dp_world=2)
    assert seqpar.Layout.of(1, 2, 2) == seqpar.Layout(size=2, rank=1, dp_rank=0, dp_world=1)
    with pytest.raises(ValueError):
        seqpar.Layout.of(0, 6, 4)


def _batch():
    # two right-padded rows of T=6: a prompt (-100) then the completion; row 1 has 2 pads
    return {"input_ids": torch.tensor([[10, 11, 12, 13, 14, 15], [20, 21, 22, 23, 0, 0]]),
            "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]),
            "labels": torch.tensor([[X, X, 12, 13, 14, 15], [X, 21, 22, 23, X, X]])}


def test_shard_exact_values():
    b = _batch()
    s0, s1 = seqpar.shard(b, 2, 0), seqpar.shard(b, 2, 1)
    assert s0["input_ids"].tolist() == [[10, 11, 12], [20, 21, 22]]
    assert s1["input_ids"].tolist() == [[13, 14, 15], [23, 0, 0]]
    # shifted on the whole sequence before the cut: shard 0's last position keeps its target (13, 23),
    # the first token of shard 1; the sequence's last position has none
    assert s0["shift_labels"].tolist() == [[X, 12, 13], [21, 22, 23]]
    assert s1["shift_labels"].tolist() == [[14, 15, X], [X, X, X]]
    assert s0["position_ids"].tolist() == [[0, 1, 2], [0, 1, 2]]
    assert s1["position_ids"].tolist() == [[3, 4, 5], [3, 4, 5]]
    assert s1["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert set(s0) == {"input_ids", "attention_mask", "shift_labels", "position_ids"}  # no unshifted labels
    t = [seqpar.shard(b, 3, r) for r in range(3)]
    assert [s["shift_labels"].tolist() for s in t] == [[[X, 12], [21, 22]], [[13, 14], [23, X]], [[15, X], [X, X]]]
    assert [s["position_ids"][0].tolist() for s in t] == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ValueError, match="6 tokens per sequence does not split into 4"):
        seqpar.shard(b, 4, 0)


def test_shards_count_the_sequence_targets_and_tokens():
    b = _batch()
    for n in (1, 2, 3, 6):
        shards = [seqpar.shard(b, n, r) for r in range(n)]
        assert tuple(map(sum, zip(*(count_tokens([s]) for s in shards)))) == count_tokens([b]) == (7, 10)


def _cfg(**kw):
    return tf.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, vocab_size=64, **kw)


def test_check_refuses_in_one_line_naming_the_key():
    seqpar.check(1, 3, _cfg(num_attention_heads=8), "eager")  # off: nothing checked
    seqpar.check(2, 4, _cfg(num_attention_heads=4, num_key_value_heads=4), "sdpa")
    seqpar.check(4, 4, _cfg(num_attention_heads=8, num_key_value_heads=2), "sdpa")  # KV heads replicated
    cases = [
        ((2, 3, _cfg(num_attention_heads=4), "sdpa"), "train.sequence_parallel=2 must divide the world size 3"),
        ((4, 4, _cfg(num_attention_heads=2, num_key_value_heads=2), "sdpa"),
         "train.sequence_parallel=4: the model's 2 attention heads are not divisible by 4"),
        ((4, 8, tf.LlamaConfig(hidden_size=36, num_attention_heads=12, num_key_value_heads=6), "sdpa"),
         "train.sequence_parallel=4: the model's 6 KV heads must be divisible by 4, or 4 by them"),
        ((2, 2, _cfg(num_attention_heads=4), "eager"), "train.sequence_parallel=2 needs sdpa attention"),
    ]
    for args, msg in cases:
        with pytest.raises(ConfigError) as e:
            seqpar.check(*args)
        assert str(e.value).startswith(msg) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("overrides,msg", [
    (["train.sequence_parallel=0"], "train.sequence_parallel must be an integer >= 1 (1: off), got 0"),
    (["train.sequence_parallel=true"], "train.sequence_parallel: expected int"),
    (["train.sequence_parallel=2", "zero.stage=0"], "train.sequence_parallel=2 runs under the ZeRO-3 base"),
    (["train.sequence_parallel=3"], "train.sequence_parallel=3 splits each sequence into 3 equal shards: "
                                    "data.max_length=128 must be a multiple of 3 (e.g. 129)"),
    (["train.sequence_parallel=2", "model.compile=true"], "model.compile=true is not verified with "
                                                          "train.sequence_parallel=2"),
    (["train.sequence_parallel=2", "model.attn_implementation=eager"],
     "train.sequence_parallel=2 needs model.attn_implementation=sdpa"),
])
def test_config_errors_name_the_key(overrides, msg):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert str(e.value).startswith(msg), str(e.value)


def test_config_accepts_and_documents_the_key():
    from bigtrain.config import describe

    assert load_config(None, ["train.sequence_parallel=2"]).train.sequence_parallel == 2
    assert load_config(None, []).train.sequence_parallel == 1
    row = next(r for r in describe() if r[0] == "train.sequence_parallel")
    assert row[1:3] == ("int", "1") and "Ulysses" in row[3]


def test_loss_on_pre_shifted_labels_equals_the_shift_inside():
    """One shard of the whole sequence (N=1) through shift_labels and position_ids: the same loss sum,
    target count and gradient as the labels shifted inside, bit for bit; and the plain recipe too."""
    from bigtrain.losses import token_loss_sum_reference

    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(_cfg(num_attention_heads=4), attn_implementation="sdpa").eval()
    b = {"input_ids": torch.randint(3, 64, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long),
         "labels": torch.randint(3, 64, (2, 8))}
    b["labels"][:, :3] = X
    whole, n = token_loss_sum(model, b["input_ids"], b["attention_mask"], b["labels"])
    g = torch.autograd.grad(whole, model.model.embed_tokens.weight)[0]
    s = seqpar.shard(b, 1, 0)
    shard, m = token_loss_sum(model, s["input_ids"], None, None, shift_labels=s["shift_labels"],
                              position_ids=s["position_ids"])
    gs = torch.autograd.grad(shard, model.model.embed_tokens.weight)[0]
    assert (n, m) == (10, 10) and torch.equal(whole, shard) and torch.equal(g, gs)
    ref, k = token_loss_sum_reference(model, s["input_ids"], None, None, shift_labels=s["shift_labels"],
                                      position_ids=s["position_ids"])
    assert k == 10 and ref.item() == pytest.approx(whole.item(), rel=1e-6)
    with pytest.raises(ValueError, match="labels or shift_labels"):
        token_loss_sum(model, b["input_ids"], None, b["labels"], shift_labels=s["shift_labels"])


def test_estimate_divides_the_sequence_proportional_parts():
    """LoRA's activations and loss buffers at sequence_parallel=N are those of seq_len/N; the all-to-all's
    transient buffers (5 shards of s/N x b x h in bf16) join the comm buffers; full FT is unchanged."""
    base = Setup(world_size=8, seq_len=32768, micro_batch=1)
    sp = estimate("llama3-8b", Setup(world_size=8, seq_len=32768, micro_batch=1, sequence_parallel=8))
    short = estimate("llama3-8b", Setup(world_size=8, seq_len=4096, micro_batch=1))
    one = estimate("llama3-8b", base)
    L, S, O = sp["lora"]["per_gpu"], short["lora"]["per_gpu"], one["lora"]["per_gpu"]
    assert (L["activations"], L["logits_loss"]) == (S["activations"], S["logits_loss"])
    assert L["zero_buffers"] - O["zero_buffers"] == 5 * 2 * 4096 * 1 * 4096
    assert sp["full"] == one["full"]
    assert sp["lora"]["fewest_gpus"] % 8 == 0


def test_setup_for_run_carries_the_degree():
    cfg = load_config(None, ["train.sequence_parallel=2"])
    assert setup_for_run(cfg, 4).sequence_parallel == 2


def test_estimate_command_flag(capsys):
    from bigtrain.cli import main

    assert main(["estimate", "llama3-8b", "--gpus-per-node", "8", "--seq-len", "65536",
                 "--sequence-parallel", "8"]) == 0
    assert "LoRA's sequences split over 8 GPUs (train.sequence_parallel)" in capsys.readouterr().out
    assert main(["estimate", "llama3-8b", "--gpus-per-node", "6", "--sequence-parallel", "4"]) == 2
    assert "--sequence-parallel 4 must be >= 1 and divide the GPU count 6" in capsys.readouterr().err
