"""token_loss_sum (chunked LM head, no full logits) equals the plain full-logits cross-entropy."""

import pytest
import torch
import transformers as tf

from bigtrain import losses
from bigtrain.inject import inject_lora
from bigtrain.losses import IGNORE_INDEX, token_loss_sum, token_loss_sum_reference
from bigtrain.presets import hf_config_for

VOCAB = 1000


def _model(preset):
    torch.manual_seed(0)
    cfg = hf_config_for(preset, vocab_size=VOCAB)
    return tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float()


def _batch(B=3, T=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    labels = ids.clone()
    labels[0, :7] = IGNORE_INDEX  # a prompt
    labels[1, -5:] = IGNORE_INDEX  # padding
    mask[1, -5:] = 0
    return ids, mask, labels


@pytest.mark.parametrize("preset", ["tiny-opt", "tiny-llama"])
@pytest.mark.parametrize("chunk_logits", [losses.CHUNK_LOGITS, 7 * VOCAB])  # one chunk / several
def test_equals_plain_cross_entropy(preset, chunk_logits, monkeypatch):
    monkeypatch.setattr(losses, "CHUNK_LOGITS", chunk_logits)
    model = _model(preset)
    lora = inject_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    with torch.no_grad():  # B != 0 so the adapters get gradients through both paths
        for p in lora.parameters():
            p.normal_(0, 0.05)
    ids, mask, labels = _batch()
    assert losses._final_hidden(model, ids, mask) is not None  # the chunked path, not the fallback
    grads = []
    results = []
    for fn in (token_loss_sum_reference, token_loss_sum):
        lora.zero_grad(set_to_none=True)
        loss, n = fn(model, ids, mask, labels)
        loss.backward()
        results.append((loss.detach(), n))
        grads.append([p.grad.clone() for p in lora.parameters()])
    (ref, n_ref), (got, n_got) = results
    assert n_got == n_ref == int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5), (got, ref)
    for gr, gg in zip(*grads):
        assert torch.allclose(gg, gr, rtol=1e-5, atol=1e-6)


def test_all_ignored_batch_has_zero_loss_and_backward_works():
    model = _model("tiny-opt")
    lora = inject_lora(model, ["q_proj"], r=2, alpha=4)
    ids, mask, _ = _batch()
    labels = torch.full_like(ids, IGNORE_INDEX)
    loss, n = token_loss_sum(model, ids, mask, labels)
    assert n == 0 and float(loss.detach()) == 0.0
    loss.backward()


def test_no_grad_path():
    model = _model("tiny-llama")
    ids, mask, labels = _batch()
    with torch.no_grad():
        a, _ = token_loss_sum(model, ids, mask, labels)
        b, _ = token_loss_sum_reference(model, ids, mask, labels)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("targets", [0, 5, 60])  # no target, one chunk, many chunks
def test_head_called_once_whatever_the_target_count(targets, monkeypatch):
    """Under ZeRO-3 every module call is a collective gather, so the number of head calls must
    not depend on a rank's target count (ranks with different counts used to make different
    numbers of chunked calls: mismatched collectives; reproduced with 2 gloo ranks). The chunks
    all run inside one head call; an all-prompt batch still makes that call."""
    monkeypatch.setattr(losses, "CHUNK_LOGITS", 7 * VOCAB)  # 7 rows per chunk
    model = _model("tiny-opt")
    lora = inject_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    head = model.get_output_embeddings()
    calls = []
    hook = head.register_forward_pre_hook(lambda m, a: calls.append(tuple(a[0].shape)))
    ids, mask, _ = _batch(B=3, T=24)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels.view(-1)[1:1 + targets] = ids.view(-1)[1:1 + targets]
    n_real = int((labels[:, 1:] != IGNORE_INDEX).sum())
    loss, n = token_loss_sum(model, ids, mask, labels)
    loss.backward()
    hook.remove()
    # one call inside the model's forward (logits_to_keep=empty: no positions), one for all chunks
    assert calls == [(3, 0, model.config.hidden_size), (0, model.config.hidden_size)], calls
    assert n == n_real
    ref, n_ref = token_loss_sum_reference(model, ids, mask, labels)
    assert n_ref == n and torch.allclose(loss, ref, rtol=1e-5, atol=1e-6)
    assert "forward" not in head.__dict__  # the module is left as it was
    if targets == 0:
        assert float(loss.detach()) == 0.0 and all(p.grad is None or not p.grad.any() for p in lora.parameters())
