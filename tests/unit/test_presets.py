"""GPT-3 presets: exact parameter counts on the meta device."""
import pytest

from bigtrain.inject import find_targets
from bigtrain.presets import PRESETS, count_parameters, hf_config_for, meta_model


def test_175b_has_gpt3_size_and_exact_lora_count():
    model = meta_model(hf_config_for("gpt3-175b"))
    n = count_parameters(model)
    # OPT architecture with GPT-3 shapes: vocab 50257, context 2048 (+ OPT's 2 position offsets),
    # output head tied to the embeddings. 175,222,210,560 (accelerate's count for the same model) is the
    # same model with OPT's vocab of 50272 and the head counted separately: 50272 + 15 = 50287 rows.
    assert n == 174_604_283_904
    assert n + (50272 + 15) * 12288 == 175_222_210_560
    assert abs(n - 175.0e9) / 175.0e9 < 0.0025
    targets = find_targets(model, ["q_proj", "v_proj"])
    assert len(targets) == 96 * 2
    r1 = sum(1 * (m.in_features + m.out_features) for m in targets.values())
    assert r1 == 4_718_592  # paper Table 4: 4.7M at r=1
    assert 4 * r1 == 18_874_368  # r=4: 37.7 MB in bf16


def test_table_shapes():
    assert PRESETS["gpt3-13b"].d_model == 5120 and PRESETS["gpt3-13b"].layers == 40
    for name in ("gpt3-small", "gpt3-2.7b", "gpt3-6.7b"):
        p = PRESETS[name]
        assert p.d_model % p.heads == 0 and p.ffn == 4 * p.d_model and p.context == 2048


def test_llama_presets_have_the_published_parameter_counts():
    published = {"llama2-7b": 6_738_415_616, "llama2-13b": 13_015_864_320, "llama2-70b": 68_976_648_192,
                 "llama3-8b": 8_030_261_248, "llama3-70b": 70_553_706_496}
    for name, n in published.items():
        assert count_parameters(meta_model(hf_config_for(name))) == n, name


def test_llama2_70b_gqa_shape_and_the_mlperf_lora_count():
    cfg = hf_config_for("llama2-70b")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.vocab_size) == (8192, 80, 64, 8, 28672, 32000)
    model = meta_model(cfg)
    targets = find_targets(model, ["q_proj", "k_proj", "v_proj", "o_proj"])
    k = model.model.layers[0].self_attn.k_proj
    assert (k.in_features, k.out_features) == (8192, 1024)  # 8 kv heads x 128
    lora = sum(16 * (m.in_features + m.out_features) for m in targets.values())
    assert lora == 65_536_000  # MLPerf llama2_70b_lora: r=16 on q, k, v, o
    assert count_parameters(model) + lora == 69_042_184_192
    assert hf_config_for("llama3-70b").rope_parameters["rope_theta"] == 500000.0


def test_num_layers_changes_depth_only():
    full, cut = hf_config_for("gpt3-175b"), hf_config_for("gpt3-175b", num_layers=40)
    assert cut.num_hidden_layers == 40 and cut.hidden_size == full.hidden_size == 12288
    per_layer = 12 * 12288 ** 2 + 13 * 12288  # 4 d² attention + 8 d² MLP, biases, 2 LayerNorms
    n_full, n_cut = (count_parameters(meta_model(c)) for c in (full, cut))
    assert n_full - n_cut == 56 * per_layer
    with pytest.raises(ValueError, match="num_layers"):
        hf_config_for("gpt3-175b", num_layers=0)


def test_num_layers_config_errors_name_the_key(tmp_path):
    from bigtrain.config import ConfigError, load_config

    cfg = load_config(None, ["model.path=null", "model.preset=llama2-70b", "model.num_layers=2"])
    assert cfg.model.num_layers == 2
    with pytest.raises(ConfigError, match="model.num_layers"):
        load_config(None, ["model.num_layers=2"])  # a checkpoint's depth is its own
    with pytest.raises(ConfigError, match="model.num_layers"):
        load_config(None, ["model.path=null", "model.num_layers=0"])
