"""Model presets: the GPT-3 family and the LLaMA-2/3 family as ``transformers`` configs, plus tiny
models for tests and the demo.

GPT-3 shapes come from Brown et al. 2020, Table 2.1 (context 2048, FFN 4·d_model, GELU, vocabulary
50257). They are carried by ``transformers``' OPT architecture: OPT (Zhang et al. 2022) reproduces
GPT-3's shapes with separate q/k/v/out projections, which is what LoRA on W_q, W_v needs.
The 13B row uses d_model 5120 (the paper prints 5140; 5120 = 40 heads × 128 is the real width).
The XL row uses 16 heads: the table's 24 heads × d_head 128 does not equal its d_model 2048.

LLaMA shapes are the published ones (Touvron et al. 2023, "Llama 2", Table 1 and the released
config.json files; Meta's Llama 3 model card and config.json): d_model, layers, attention heads,
key/value heads (grouped-query attention: 70B models and every Llama-3 model share each k/v head
among heads/kv_heads query heads), SwiGLU FFN width, vocabulary, context, RoPE base, RMSNorm epsilon.
The output head is untied. Llama-2-70B has 68,976,648,192 parameters, Llama-3-70B 70,553,706,496.

Any preset's depth can be changed (``model.num_layers=N``, ``bigtrain estimate --num-layers N``): a
GPT-3 175B-wide model with 40 layers, or a 2-layer Llama-2-70B for tests. Every other shape stays.

Random weights (``model.path=null``) use the architecture's own initialisation from ``transformers``:
every linear and embedding matrix drawn from N(0, 0.02²) (``initializer_range``/``init_std``), biases
zero, LayerNorm/RMSNorm weights one.

Parameter counts are exact: :func:`count_parameters` builds the model on the meta device (no memory
is allocated) and counts its tensors, tied weights once.
"""

from __future__ import annotations

from dataclasses import dataclass

# Deferred imports: torch and transformers are imported where used, so the preset table is cheap to
# read (config validation, `bigtrain --help`).

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
    kv_heads: int = 0  # key/value heads (grouped-query attention); 0: as many as ``heads``
    rope_theta: float = 10000.0  # RoPE base (llama)
    norm_eps: float = 1e-5  # RMSNorm epsilon (llama)

    def to_hf_config(self, vocab_size: int | None = None, num_layers: int | None = None):
        """A ``transformers`` config for this preset. ``vocab_size`` overrides the table's
        (tiny presets take the built-in tokenizer's); ``num_layers`` the depth."""
        import transformers as tf

        v = vocab_size or self.vocab
        layers = num_layers or self.layers
        if self.arch == "opt":
            return tf.OPTConfig(
                vocab_size=v, hidden_size=self.d_model, num_hidden_layers=layers,
                ffn_dim=self.ffn, num_attention_heads=self.heads, max_position_embeddings=self.context,
                word_embed_proj_dim=self.d_model, activation_function="gelu", do_layer_norm_before=True,
                dropout=0.0, attention_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                tie_word_embeddings=True)
        if self.arch == "llama":
            return tf.LlamaConfig(
                vocab_size=v, hidden_size=self.d_model, num_hidden_layers=layers,
                intermediate_size=self.ffn, num_attention_heads=self.heads,
                num_key_value_heads=self.kv_heads or self.heads, max_position_embeddings=self.context,
                rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
                rms_norm_eps=self.norm_eps, hidden_act="silu", attention_bias=False, mlp_bias=False,
                pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
        if self.arch == "gpt2":
            return tf.GPT2Config(
                vocab_size=v, n_embd=self.d_model, n_layer=layers, n_head=self.heads,
                n_positions=self.context, n_inner=self.ffn, resid_pdrop=0.0, embd_pdrop=0.0,
                attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
        if self.arch == "gpt_neox":
            return tf.GPTNeoXConfig(
                vocab_size=v, hidden_size=self.d_model, num_hidden_layers=layers,
                num_attention_heads=self.heads, intermediate_size=self.ffn,
                max_position_embeddings=self.context, bos_token_id=1, eos_token_id=2,
                hidden_dropout=0.0, attention_dropout=0.0, tie_word_embeddings=False)
        raise ValueError(f"unknown arch {self.arch!r}")


def _gpt3(name: str, layers: int, d: int, heads: int) -> Preset:
    return Preset(name, "opt", layers, d, heads, GPT3_VOCAB, GPT3_CONTEXT, 4 * d,
                  "Brown et al. 2020, Table 2.1 (OPT architecture)")


def _llama(name: str, layers: int, d: int, heads: int, kv_heads: int, ffn: int, vocab: int, context: int,
           rope_theta: float, norm_eps: float, source: str) -> Preset:
    return Preset(name, "llama", layers, d, heads, vocab, context, ffn, source, kv_heads, rope_theta, norm_eps)


_LLAMA2 = "Touvron et al. 2023 (Llama 2), Table 1 + config.json"
_LLAMA3 = "Meta Llama 3 model card + config.json"
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
    _llama("llama2-7b", 32, 4096, 32, 32, 11008, 32000, 4096, 1e4, 1e-5, _LLAMA2),
    _llama("llama2-13b", 40, 5120, 40, 40, 13824, 32000, 4096, 1e4, 1e-5, _LLAMA2),
    _llama("llama2-70b", 80, 8192, 64, 8, 28672, 32000, 4096, 1e4, 1e-5, _LLAMA2),
    _llama("llama3-8b", 32, 4096, 32, 8, 14336, 128256, 8192, 5e5, 1e-5, _LLAMA3),
    _llama("llama3-70b", 80, 8192, 64, 8, 28672, 128256, 8192, 5e5, 1e-5, _LLAMA3),
    Preset("tiny-opt", "opt", 4, 128, 4, 0, 256, 512, _TINY),
    Preset("tiny-llama", "llama", 2, 64, 4, 0, 256, 128, _TINY),
    Preset("tiny-gpt2", "gpt2", 2, 64, 4, 0, 256, 256, _TINY),
    Preset("tiny-neox", "gpt_neox", 2, 64, 4, 0, 256, 256, _TINY),
]}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return PRESETS[name]


def hf_config_for(name: str, vocab_size: int | None = None, num_layers: int | None = None):
    """The preset's ``transformers`` config; ``vocab_size`` applies to tiny presets only (their table
    vocabulary is "the tokenizer's"), ``num_layers`` (if given) replaces the preset's depth."""
    p = get_preset(name)
    if num_layers is not None and num_layers < 1:
        raise ValueError(f"num_layers must be at least 1, got {num_layers}")
    return p.to_hf_config(vocab_size if p.vocab == 0 else None, num_layers)


def position_limit(hf_config) -> int | None:
    """The longest sequence a model's learned position table holds (OPT's, GPT-2's), None for rotary
    models (LLaMA, GPT-NeoX): their max_position_embeddings is the trained context, not a limit
    (MLPerf's llama2_70b_lora trains Llama-2-70B, context 4096, at 8192)."""
    if getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_theta", None):
        return None
    return getattr(hf_config, "max_position_embeddings", None) or getattr(hf_config, "n_positions", None)


def meta_model(hf_config):
    """The causal-LM for ``hf_config`` on the meta device: shapes only, no storage."""
    import torch
    import transformers as tf

    with torch.device("meta"):
        return tf.AutoModelForCausalLM.from_config(hf_config)


def count_parameters(model) -> int:
    """Distinct parameter elements, tied weights once (``parameters()`` yields a shared tensor once),
    at full size under ZeRO-3 (``ds_numel``: a partitioned parameter's own ``numel`` is 0)."""
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())


def decoder_layer_classes(model) -> list[type]:
    """The transformer-block classes of a ``transformers`` model (its ``_no_split_modules``)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    seen: dict[str, type] = {}
    for m in model.modules():
        if type(m).__name__ in names:
            seen[type(m).__name__] = type(m)
    return list(seen.values())
