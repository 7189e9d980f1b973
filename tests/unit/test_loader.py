"""bigtrain.loader's key matching: checkpoint keys renamed and converted by transformers' own
conversion mapping (MoE bases), plain models matched as before."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from bigtrain.loader import checkpoint_files, plan_keys
from bigtrain.presets import meta_model


def _meta(d):
    import transformers as tf

    return meta_model(tf.AutoConfig.from_pretrained(str(d)))


def test_hub_mixtral_keys_are_renamed_and_experts_collected_in_order(moe_models):
    d = moe_models["tiny-mixtral"]
    model, files = _meta(d), checkpoint_files(d)
    plan = plan_keys(model, files)
    # the router: block_sparse_moe -> mlp (a WeightRenaming), read as is (slice-wise)
    assert plan.keys["model.layers.1.mlp.gate.weight"] == "model.layers.1.block_sparse_moe.gate.weight"
    assert plan.keys["model.layers.0.self_attn.q_proj.weight"] == "model.layers.0.self_attn.q_proj.weight"
    assert sorted(plan.converted) == [f"model.layers.{i}.mlp.experts.{p}" for i in range(2)
                                      for p in ("down_proj", "gate_up_proj")]
    src = plan.converted_sources
    assert src["model.layers.0.mlp.experts.gate_up_proj"] == sorted(
        f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight" for e in range(4) for w in ("w1", "w3"))
    assert src["model.layers.1.mlp.experts.down_proj"] == [
        f"model.layers.1.block_sparse_moe.experts.{e}.w2.weight" for e in range(4)]
    # every parameter is accounted for, and every checkpoint key used once
    names = {n for n, _ in model.named_parameters()}
    assert set(plan.keys) | set(plan.converted) == names and not set(plan.keys) & set(plan.converted)
    used = set(plan.keys.values()) | {k for ks in src.values() for k in ks}
    assert used == set(files)


def test_converted_parameter_equals_from_pretrained(moe_models):
    """The converter, fed the checkpoint tensors in the plan's order, builds what from_pretrained
    builds (the fused experts of every layer, bit for bit)."""
    import transformers as tf
    from safetensors.torch import load_file

    for name in ("tiny-mixtral", "tiny-qwen2-moe"):
        d = moe_models[name]
        saved = load_file(str(d / "model.safetensors"))
        plan = plan_keys(_meta(d), checkpoint_files(d), read=lambda k: saved[k])
        ref = dict(tf.AutoModelForCausalLM.from_pretrained(str(d)).named_parameters())
        assert len(plan.converted) == 4
        for first, conv in plan.converted.items():
            built = conv.convert(first)
            assert list(built) == [first]
            assert torch.equal(built[first], ref[first]), first


def test_fused_and_plain_checkpoints_are_read_as_named(moe_models, tiny_models):
    for d in (moe_models["tiny-qwen2-moe-fused"], tiny_models["tiny-llama"], tiny_models["tiny-gpt2"]):
        model, files = _meta(d), checkpoint_files(d)
        plan = plan_keys(model, files)
        assert plan.converted == {}
        assert plan.keys == {n: n if n in files else n.split(".", 1)[1] for n, _ in model.named_parameters()}


PEAK_SCRIPT = textwrap.dedent("""
    import ctypes, json, re, sys
    import transformers as tf
    from bigtrain.loader import checkpoint_files, open_safetensors, plan_keys
    from bigtrain.presets import meta_model

    def kib(field):
        return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))

    def reset_peak():  # give freed heap back to the OS, then (Linux: '5') reset VmHWM to the RSS
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return kib("VmRSS")

    d, first = sys.argv[1], "model.layers.0.mlp.experts.gate_up_proj"
    files = checkpoint_files(d)
    with open_safetensors(files[first.replace("mlp.experts.gate_up_proj", "block_sparse_moe.gate.weight")]) as h:
        conv = plan_keys(meta_model(tf.AutoConfig.from_pretrained(d)), files, read=h.get_tensor).converted[first]
        r0 = reset_peak()
        t = conv.convert(first)[first]   # what load_partitions does for one converted parameter
        peak = (kib("VmHWM") - r0) * 1024
    print(json.dumps({"param_bytes": t.numel() * t.element_size(), "peak_growth": peak}))
""")


def test_host_peak_of_one_converted_parameter(tmp_path):
    """Building one fused parameter from a per-expert checkpoint (Mixtral layout, 8 experts, fp32
    gate_up_proj of 33.6 MB) grows the process's peak RSS by about 3x the parameter: the expert
    tensors, the file pages mapped while reading them, and the stacked result. Bounded by 3.5x;
    the module docstring and README scale it to Mixtral-8x7B."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.MixtralConfig(vocab_size=64, hidden_size=256, intermediate_size=2048, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=8)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "m")
    p = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tmp_path / "m")], capture_output=True, text=True,
                       check=True)
    r = json.loads(p.stdout.strip().splitlines()[-1])
    ratio = r["peak_growth"] / r["param_bytes"]
    print(f"converted gate_up_proj {r['param_bytes']:,} bytes: peak RSS growth {r['peak_growth']:,} ({ratio:.2f}x)")
    assert r["param_bytes"] == 8 * 2 * 2048 * 256 * 4
    assert ratio < 3.5


def test_mixtral_8x7b_fused_expert_size():
    """The size the host peak scales with (module doc): Mixtral-8x7B's gate_up_proj, one layer's
    fused experts, is 8 x 28,672 x 4,096 elements, 1.88 GB in bf16."""
    import transformers as tf

    p = dict(meta_model(tf.MixtralConfig(num_hidden_layers=1)).named_parameters())["model.layers.0.mlp.experts.gate_up_proj"]
    assert tuple(p.shape) == (8, 28672, 4096)
    assert p.numel() * 2 == 1_879_048_192
    print(f"Mixtral-8x7B gate_up_proj: {p.numel():,} elements, {p.numel() * 2 / 1e9:.2f} GB bf16")


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-qwen2-moe"])
def test_lora_target_inside_experts_says_what_it_can_target(moe_models, name):
    from bigtrain.inject import find_targets

    with pytest.raises(ValueError) as e:
        find_targets(_meta(moe_models[name]), ["gate_up_proj"])
    msg = str(e.value)
    assert "\n" not in msg and "'gate_up_proj' matched no linear layer" in msg
    assert "k_proj, o_proj, q_proj, v_proj" in msg or "q_proj, shared_expert_gate, up_proj, v_proj" in msg
    assert "experts.down_proj, experts.gate_up_proj are 3-D parameters holding every expert" in msg
