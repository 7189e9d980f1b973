"""Injection per architecture: targets found, base frozen, step-0 outputs equal the base's."""
import pytest
import torch
import transformers as tf

from bigtrain.inject import find_targets, inject_lora, parameter_report

CASES = {  # preset -> (targets, expected module-name suffixes, per layer)
    "tiny-opt": (["q_proj", "v_proj"], {"q_proj", "v_proj"}),
    "tiny-llama": (["q_proj", "v_proj"], {"q_proj", "v_proj"}),
    "tiny-gpt2": (["c_attn"], {"c_attn"}),
    "tiny-neox": (["query_key_value"], {"query_key_value"}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_inject_per_architecture(tiny_models, name):
    targets, suffixes = CASES[name]
    model = tf.AutoModelForCausalLM.from_pretrained(tiny_models[name])
    layers = model.config.num_hidden_layers
    x = torch.randint(3, 100, (2, 12))
    with torch.no_grad():
        before = model(x).logits
    lora = inject_lora(model, targets, r=4, alpha=8)
    assert {n.split(".")[-1] for n in lora.names()} == suffixes
    assert len(lora.names()) == layers * len(suffixes)
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.requires_grad for p in lora.parameters())
    with torch.no_grad():
        after = model(x).logits
    assert torch.equal(before, after)  # B = 0: identical at step 0
    rep = parameter_report(model, lora)
    expected = sum(4 * (ad.d_in + ad.d_out) for _, ad in lora.named_adapters())
    assert rep["trainable"] == expected
    assert rep["base"] == sum(p.numel() for p in model.parameters())


def test_all_linear_excludes_head(tiny_models):
    model = tf.AutoModelForCausalLM.from_pretrained(tiny_models["tiny-llama"])
    t = find_targets(model, ["all-linear"])
    assert "lm_head" not in t
    assert {n.split(".")[-1] for n in t} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_unmatched_target_lists_available(tiny_models):
    model = tf.AutoModelForCausalLM.from_pretrained(tiny_models["tiny-gpt2"])
    with pytest.raises(ValueError) as e:
        find_targets(model, ["q_proj", "c_attn"])
    msg = str(e.value)
    assert "'q_proj' matched no linear layer of GPT2LMHeadModel" in msg
    assert "c_attn" in msg and "c_fc" in msg


@pytest.mark.parametrize("name", list(CASES))
def test_head_target_refused_and_not_offered(tiny_models, name):
    """The chunked loss projects through the head's own weight: an adapter on it would never be
    applied (before: accepted, then a shape error at step 1). Refused, naming why; and the
    unmatched-target error does not offer the head as a choice."""
    model = tf.AutoModelForCausalLM.from_pretrained(tiny_models[name])
    head = "lm_head"
    with pytest.raises(ValueError) as e:
        find_targets(model, [CASES[name][0][0], head])
    msg = str(e.value)
    assert msg.startswith(f"lora.targets: {head!r} is the output head") and "\n" not in msg
    assert "tied to the embeddings" in msg and "in chunks" in msg
    with pytest.raises(ValueError) as e:
        find_targets(model, ["nope"])
    assert "matched no linear layer" in str(e.value) and head not in str(e.value)
