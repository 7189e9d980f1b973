"""bigtrain.export's pieces, on tiny tensors and without a run: the PEFT adapter config, the
arithmetic both merges share (W0 + s·B·A, in fp32, rounded once), the dtype names, which targets
are GPT-2 Conv1D layers, and the refusals that name the bad value. Whole exports and merges of
trained runs (against PEFT and transformers) are tests/e2e/test_export.py."""

import argparse

import pytest
import torch

from bigtrain.commands.export import cmd_export
from bigtrain.export import (DTYPE_NAMES, PEFT_PREFIX, base_dir, conv1d_modules, merged_weight, peft_config,
                             quantized_base)
from bigtrain.lora import AdapterSpec


def test_peft_config_names_the_adapter_as_peft_reads_it():
    spec = AdapterSpec(r=4, alpha=8.0, dropout=0.05, rslora=False, targets=["q_proj"],
                       modules=["model.decoder.layers.0.self_attn.q_proj"], base_model="/models/opt")
    cfg = peft_config(spec, "/models/opt", fan_in_fan_out=False)
    assert cfg == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "/models/opt",
        "r": 4, "lora_alpha": 8.0, "lora_dropout": 0.05, "use_rslora": False,
        "target_modules": ["model.decoder.layers.0.self_attn.q_proj"],
        "fan_in_fan_out": False, "bias": "none", "inference_mode": True, "init_lora_weights": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
        "alpha_pattern": {}, "use_dora": False, "revision": None}
    assert peft_config(AdapterSpec(r=1, alpha=1.0, rslora=True), "b", True)["use_rslora"] is True
    assert PEFT_PREFIX == "base_model.model."


W = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])  # (d_out 2, d_in 3)
A = torch.tensor([[1.0, 0.0, -1.0]])  # (r 1, d_in 3)
B = torch.tensor([[2.0], [-1.0]])  # (d_out 2, r 1)


def test_merge_is_w_plus_alpha_over_r_b_a_exactly():
    s = AdapterSpec(r=1, alpha=0.5).scale  # alpha / r
    assert s == 0.5
    # B·A = [[2, 0, -2], [-1, 0, 1]]; times 0.5 = [[1, 0, -1], [-0.5, 0, 0.5]]
    assert merged_weight(W, A, B, s, conv1d=False).tolist() == [[2.0, 2.0, 2.0], [3.5, 5.0, 6.5]]
    # GPT-2 Conv1D stores W0 as (d_in, d_out): the delta is transposed to match
    assert merged_weight(W.t(), A, B, s, conv1d=True).tolist() == [[2.0, 3.5], [2.0, 5.0], [2.0, 6.5]]


def test_merge_rounds_once_to_the_output_dtype():
    w16 = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], dtype=torch.bfloat16)
    tiny = torch.tensor([[2.0 ** -9, 0.0, 0.0]])  # below bf16's resolution at 1.0 (2^-7)
    out = merged_weight(w16, tiny, torch.tensor([[1.0], [3.0]]), 1.0, conv1d=False)
    assert out.dtype == torch.bfloat16 and out.tolist()[0][0] == 1.0  # 1 + 2^-9 rounds to 1 in bf16
    out = merged_weight(w16, tiny, torch.tensor([[1.0], [3.0]]), 1.0, conv1d=False, to_dtype=torch.float32)
    assert out.dtype == torch.float32
    assert out.tolist()[0][0] == 1.0 + 2.0 ** -9 and out.tolist()[1][0] == 1.0 + 3 * 2.0 ** -9


def test_merge_of_a_mismatched_adapter_names_the_weight_and_both_shapes():
    with pytest.raises(ValueError) as e:
        merged_weight(W, A, B, 1.0, conv1d=True, where="model.safetensors: h.0.attn.c_attn.weight")
    assert str(e.value) == "model.safetensors: h.0.attn.c_attn.weight: shape (2, 3), the adapter gives (3, 2)"


def test_dtype_names_take_short_and_long_forms():
    assert DTYPE_NAMES == {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16",
                           "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def test_conv1d_targets_are_found_on_the_meta_model():
    gpt2 = ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc"]
    assert conv1d_modules("preset:tiny-gpt2", gpt2) == set(gpt2)
    assert conv1d_modules("preset:tiny-opt", ["model.decoder.layers.0.self_attn.q_proj"]) == set()
    with pytest.raises(ValueError) as e:
        conv1d_modules("preset:tiny-opt", ["model.decoder.layers.9.self_attn.q_proj"])
    assert str(e.value) == ("preset:tiny-opt: the checkpoint adapts modules this model does not have: "
                            "['model.decoder.layers.9.self_attn.q_proj']")


def test_base_dir_refusals_say_what_to_pass(tmp_path):
    ckpt = tmp_path / "step-1"
    with pytest.raises(FileNotFoundError) as e:
        base_dir(AdapterSpec(r=1, alpha=1.0, base_model="preset:tiny-opt"), None, ckpt)
    assert str(e.value) == (f"{ckpt}: base_model is 'preset:tiny-opt', a randomly initialised preset with no "
                            f"weights on disk; pass --base DIR")
    with pytest.raises(FileNotFoundError) as e:
        base_dir(AdapterSpec(r=1, alpha=1.0, base_model="x"), str(tmp_path), ckpt)
    assert str(e.value) == f"base model {str(tmp_path)!r} (from --base): no config.json there; pass --base DIR"
    (tmp_path / "config.json").write_text("{}")
    assert base_dir(AdapterSpec(r=1, alpha=1.0, base_model="preset:tiny-opt"), str(tmp_path), ckpt) == tmp_path


def test_into_quantized_needs_the_runs_config(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        quantized_base(tmp_path, tmp_path, set())
    assert str(e.value) == (f"{tmp_path / 'config.yaml'}: missing; --into-quantized reads the run's model.quantize "
                            f"and model.dtype from it (merge without --into-quantized)")


def test_export_refuses_an_unknown_format_before_reading_anything(tmp_path):
    args = argparse.Namespace(format="onnx", checkpoint=str(tmp_path / "none"), out=str(tmp_path / "out"),
                              dtype=None, base=None)
    with pytest.raises(ValueError) as e:
        cmd_export(args)
    assert str(e.value) == "--format 'onnx': unknown export format (known: peft)"
    assert not (tmp_path / "out").exists()
