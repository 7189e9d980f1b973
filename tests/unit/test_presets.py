"""GPT-3 presets: exact parameter counts on the meta device."""
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
