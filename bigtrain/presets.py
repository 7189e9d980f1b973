"""Model presets: the GPT-3 family as ``transformers`` configs, plus tiny models for tests and the demo.

GPT-3 shapes come from Brown et al. 2020, Table 2.1 (context 2048, FFN 4·d_model, GELU, vocabulary
50257). They are carried by ``transformers``' OPT architecture: OPT (Zhang et al. 2022) reproduces
GPT-3's shapes with separate q/k/v/out projections, which is what LoRA on W_q, W_v needs.
The 13B row uses d_model 5120 (the paper prints 5140; 5120 = 40 heads × 128 is the real width).
The XL row uses 16 heads: the table's 24 heads × d_head 128 does not equal its d_model 2048.

Parameter counts are exact: :func:`count_parameters` builds the model on the meta device (no memory
is allocated) and counts its tensors, tied weights once.
"""

from __future__ import annotations

from dataclasses import dataclass

GPT3_VOCAB = 50257
GPT3_CONTEXT = 2048


@dataclass(frozen=True)
class Preset:
    name: str
    arch: str  # transformers model_type: opt, llama, gpt2, gpt_neox
    layers: int
    d_model: int
    heads: int
    vocab: int
    context: int
    ffn: int
    source: str

    def to_hf_config(self, vocab_size: int | None = None):
        """A ``transformers`` config for this preset. ``vocab_size`` overrides the table's
        (tiny presets take the built-in tokenizer's)."""
        import transformers as tf

        v = vocab_size or self.vocab
        if self.arch == "opt":
            return tf.OPTConfig(
                vocab_size=v, hidden_size=self.d_model, num_hidden_layers=self.layers,
                ffn_dim=self.ffn, num_attention_heads=self.heads, max_position_embeddings=self.context,
                word_embed_proj_dim=self.d_model, activation_function="gelu", do_layer_norm_before=True,
                dropout=0.0, attention_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                tie_word_embeddings=True)
        if self.arch == "llama":
            return tf.LlamaConfig(
                vocab_size=v, hidden_size=self.d_model, num_hidden_layers=self.layers,
                intermediate_size=self.ffn, num_attention_heads=self.heads,
                num_key_value_heads=self.heads, max_position_embeddings=self.context,
                pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
        if self.arch == "gpt2":
            return tf.GPT2Config(
                vocab_size=v, n_embd=self.d_model, n_layer=self.layers, n_head=self.heads,
                n_positions=self.context, n_inner=self.ffn, resid_pdrop=0.0, embd_pdrop=0.0,
                attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
        if self.arch == "gpt_neox":
            return tf.GPTNeoXConfig(
                vocab_size=v, hidden_size=self.d_model, num_hidden_layers=self.layers,
                num_attention_heads=self.heads, intermediate_size=self.ffn,
                max_position_embeddings=self.context, bos_token_id=1, eos_token_id=2,
                hidden_dropout=0.0, attention_dropout=0.0, tie_word_embeddings=False)
        raise ValueError(f"unknown arch {self.arch!r}")


def _gpt3(name: str, layers: int, d: int, heads: int) -> Preset:
    return Preset(name, "opt", layers, d, heads, GPT3_VOCAB, GPT3_CONTEXT, 4 * d,
                  "Brown et al. 2020, Table 2.1 (OPT architecture)")


_TINY = "bigtrain tiny preset (tests, demo)"

# One literal table. Tiny presets use vocab 0 = "the built-in tokenizer's size".
PRESETS: dict[str, Preset] = {p.name: p for p in [
    _gpt3("gpt3-small", 12, 768, 12),
    _gpt3("gpt3-medium", 24, 1024, 16),
    _gpt3("gpt3-large", 24, 1536, 16),
    _gpt3("gpt3-xl", 24, 2048, 16),  # Table 2.1 prints 24 heads × d_head 128 = 3072 ≠ 2048: 16 × 128
    _gpt3("gpt3-2.7b", 32, 2560, 32),
    _gpt3("gpt3-6.7b", 32, 4096, 32),
    _gpt3("gpt3-13b", 40, 5120, 40),
    _gpt3("gpt3-175b", 96, 12288, 96),
    Preset("tiny-opt", "opt", 4, 128, 4, 0, 256, 512, _TINY),
    Preset("tiny-llama", "llama", 2, 64, 4, 0, 256, 128, _TINY),
    Preset("tiny-gpt2", "gpt2", 2, 64, 4, 0, 256, 256, _TINY),
    Preset("tiny-neox", "gpt_neox", 2, 64, 4, 0, 256, 256, _TINY),
]}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return PRESETS[name]


def hf_config_for(name: str, vocab_size: int | None = None):
    p = get_preset(name)
    return p.to_hf_config(vocab_size if p.vocab == 0 else None)


def meta_model(hf_config):
    """The causal-LM for ``hf_config`` on the meta device: shapes only, no storage."""
    import torch
    import transformers as tf

    with torch.device("meta"):
        return tf.AutoModelForCausalLM.from_config(hf_config)


def count_parameters(model) -> int:
    """Distinct parameter elements (tied weights counted once)."""
    seen, n = set(), 0
    for p in model.parameters():  # parameters() already de-duplicates shared tensors
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n
