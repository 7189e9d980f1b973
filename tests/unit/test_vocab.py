"""The vocabulary padded to a multiple of 64 inside a run (bigtrain/vocab.py): same loss and
gradients as the unpadded model, zero rows, and nothing padded leaves the run."""

import json

import pytest
import torch
import transformers as tf

from bigtrain.config import ZeroConfig
from bigtrain.data import load_tokenizer
from bigtrain.engine.core import Engine
from bigtrain.inject import inject_lora
from bigtrain.losses import token_loss_sum
from bigtrain.presets import hf_config_for
from bigtrain.vocab import padded_size, run_config, vocab_parameters

VOCAB = 1030  # the built-in tokenizer has 1,024 tokens; 1,030 is not a multiple of 64


@pytest.fixture(scope="module")
def odd_vocab_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("vocab1030")
    torch.manual_seed(7)
    model = tf.AutoModelForCausalLM.from_config(hf_config_for("tiny-opt", vocab_size=VOCAB))
    model.save_pretrained(d)
    load_tokenizer(None).save_pretrained(d)
    return d


def test_sizes_and_config():
    assert [padded_size(v) for v in (50257, 50304, 1, 64, 65)] == [50304, 50304, 64, 64, 128]
    cfg = hf_config_for("gpt3-2.7b")
    assert cfg.vocab_size == 50257
    assert run_config(cfg, head_is_target=False).vocab_size == 50304 and cfg.vocab_size == 50257
    assert run_config(cfg, head_is_target=True) is cfg  # an adapted head is never padded
    aligned = hf_config_for("tiny-opt", vocab_size=1024)
    assert run_config(aligned, head_is_target=False) is aligned


def _loss_and_grads(model, vocab, ids, labels):
    torch.manual_seed(3)
    lora = inject_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    with torch.no_grad():
        for _, ad in lora.named_adapters():
            ad.lora_B.normal_(0, 0.05)  # B = 0 would make the adapter gradients of A vanish
    loss, n = token_loss_sum(model, ids, torch.ones_like(ids), labels, vocab)
    loss.backward()
    return loss.detach(), n, [p.grad.clone() for p in lora.parameters()]


def test_padded_model_gives_the_unpadded_loss_and_gradients(odd_vocab_model):
    plain = tf.AutoModelForCausalLM.from_pretrained(odd_vocab_model).requires_grad_(False)
    padded_cfg = run_config(tf.AutoConfig.from_pretrained(odd_vocab_model), head_is_target=False)
    assert padded_cfg.vocab_size == 1088
    padded = Engine(ZeroConfig(stage=0), device="cpu").build_base(padded_cfg, str(odd_vocab_model), vocab=VOCAB)
    rows = vocab_parameters(padded, 1088)
    assert rows  # the tied embedding / head
    for p in rows.values():
        assert p.shape[0] == 1088 and torch.count_nonzero(p[VOCAB:]) == 0
    ids = torch.randint(0, 1024, (3, 40), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :10] = -100
    l0, n0, g0 = _loss_and_grads(plain, None, ids, labels)
    l1, n1, g1 = _loss_and_grads(padded, VOCAB, ids, labels)
    assert n0 == n1 == 3 * 30  # labels 10..39 are targets
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=0)
    # fp32 gradients through GEMMs of another width (1,088 columns against 1,030) are summed in another
    # order: each element may differ by a few ulps of the largest terms summed into it, not of itself
    # (cancellation), so the bound is relative to each gradient's scale: 64 ulps of its max|g| (sqrt(1088)
    # is 33). Measured on the 2-core CI machine: max|g| 1.59, largest difference 1.2e-6 (10 ulps); the
    # former bound, 1e-8 absolute, failed there at 7.5e-7.
    eps = torch.finfo(torch.float32).eps
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=64 * eps * a.abs().max().item())


@pytest.mark.slow
def test_two_rank_run_pads_inside_and_writes_the_real_vocabulary(odd_vocab_model, tmp_path):
    """2 ZeRO-3 ranks load the 1,030-row checkpoint into 1,088-row partitions (zero-filled), train,
    and the in-run merge writes 1,030 rows, bit-identical to `bigtrain merge` from disk."""
    from safetensors.torch import load_file

    from bigtrain.export import merge_checkpoint
    from helpers import run, tiny_overrides, train_cmd

    out = tmp_path / "run"
    p = run(train_cmd(2, tiny_overrides(out, odd_vocab_model, 3, 2, **{"checkpoint.merge_at_end": "true"})))
    assert "vocabulary 1,030 padded to 1,088 inside the run" in p.stdout
    merged = out / "merged"
    assert json.loads((merged / "config.json").read_text())["vocab_size"] == VOCAB
    offline = tmp_path / "offline"
    merge_checkpoint(out, offline)
    live = load_file(str(merged / "model.safetensors"))
    disk = load_file(str(offline / "model.safetensors"))
    base = load_file(str(odd_vocab_model / "model.safetensors"))
    assert live.keys() == disk.keys()
    for k in live:
        assert torch.equal(live[k], disk[k]), k
    emb = "model.decoder.embed_tokens.weight"
    assert live[emb].shape[0] == VOCAB and torch.equal(live[emb], base[emb])
    assert tf.AutoModelForCausalLM.from_pretrained(merged).config.vocab_size == VOCAB
