"""bigtrain.memory: exact counts for GPT-3 175B (the LoRA paper's figures), ZeRO stage formulas, the
full-vs-LoRA estimate and fit logic (the ``estimate`` command's table, JSON and plot:
test_estimate.py)."""

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from bigtrain import memory as M
from bigtrain.memory import GB, GiB, Setup, estimate, model_shape, peak_bytes, per_gpu

ROOT = Path(__file__).resolve().parents[2]
P175 = 174_604_283_904  # GPT-3 175B shapes on transformers' OPT, built on the meta device, tied once


@pytest.fixture(scope="module")
def big():
    return model_shape("gpt3-175b")


def test_175b_parameter_count_from_meta_build(big):
    assert big.total_params == P175
    assert abs(big.total_params - 175.0e9) / 175.0e9 < 0.005
    assert big.layers == 96 and big.hidden == 12288 and big.vocab == 50257
    assert big.layer_params == 12 * 12288 ** 2 + 13 * 12288  # one decoder layer, biases and norms


def test_paper_lora_parameter_counts(big):
    assert big.lora_params(["q_proj", "v_proj"], 1) == 4_718_592
    assert big.lora_params(["q_proj", "v_proj"], 4) == 18_874_368
    assert big.lora_params(["q_proj", "v_proj"], 8) == 37_748_736


def test_tiny_lora_count_matches_injected_model():
    import torch
    from bigtrain.inject import inject_lora
    from bigtrain.presets import hf_config_for, meta_model

    m = meta_model(hf_config_for("tiny-opt", vocab_size=512))
    with torch.device("meta"):
        lora = inject_lora(m, ["q_proj", "v_proj"], r=4, alpha=8)
    assert model_shape("tiny-opt").lora_params(["q_proj", "v_proj"], 4) == lora.num_parameters() == 8192
    with torch.device("meta"):
        lora.remove_hooks()
        all_lin = inject_lora(m, ["all-linear"], r=2, alpha=4)
    assert model_shape("tiny-opt").lora_params(["all-linear"], 2) == all_lin.num_parameters()
    assert all_lin.num_parameters() == 4 * 2 * (4 * (128 + 128) + 2 * (128 + 512))


def test_zero3_partition_rule():
    assert M.zero3_local_numel(10, 3, persistence_threshold=0) == 4  # padded to 12
    assert M.zero3_local_numel(10, 3, persistence_threshold=10) == 14  # whole + partition
    assert M.zero3_local_numel(11, 1, persistence_threshold=0) == 11


def test_full_ft_zero3_flat_buffers_are_per_parameter_padded():
    """DeepSpeed's ZeRO-3 optimizer flattens each parameter's padded partition (Σ ceil(numel/N)
    elements per rank, not ceil(Ψ/N)) into its gradient, fp32 master and Adam buffers, and torch's
    AdamW keeps a 4-byte step per sub-group; counted on the live optimizer by tests/e2e/test_measure.py."""
    shape = model_shape("tiny-opt")
    flat = sum(c * -(-n // 3) for n, c in shape.numels.items())
    assert flat > -(-shape.total_params // 3)  # three ranks: odd sizes pad
    c = per_gpu(shape, Setup(world_size=3, zero_stage=3, include_context=False), "full")
    assert c["gradients"] == 2 * flat
    assert c["optimizer_state"] == 12 * flat + 4
    assert M.predict_full_states(shape, 3) == {
        "weights": c["trainable_weights"], "gradients": 2 * flat, "master_weights": 4 * flat,
        "adam_states": 8 * flat + 4}
    # sub-groups: DeepSpeed's greedy cut at 1e9 elements, in parameter order (GPT-3 6.7B on one rank)
    big67 = model_shape("gpt3-6.7b")
    parts, groups, acc = list(big67.param_numels), 0, 0
    assert sum(parts) > 6 * 10 ** 9
    for i, n in enumerate(parts):
        acc += n
        if acc >= 10 ** 9 or i == len(parts) - 1:
            groups, acc = groups + 1, 0
    assert M.zero3_sub_groups(big67, 1) == groups == 7


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_full_ft_zero_stage_formulas(big, stage):
    """Mixed-precision Adam per GPU (ZeRO paper §3.1): 16Ψ; 4Ψ + 12Ψ/N; 2Ψ + 14Ψ/N; 16Ψ/N (model states only)."""
    N, P = 64, P175
    st = Setup(world_size=N, zero_stage=stage, persistence_threshold=0)
    c = per_gpu(big, st, "full")
    states = c["trainable_weights"] + c["gradients"] + c["optimizer_state"]
    want = {0: 16 * P, 1: 4 * P + 12 * P / N, 2: 2 * P + 14 * P / N, 3: 16 * P / N}[stage]
    assert states == pytest.approx(want, rel=1e-6)  # padding only
    assert c["frozen_weights"] == 0


def test_lora_states_and_worked_example(big):
    """The worked example: 175B, 64 GPUs, s=2048, b=1, checkpointing: full ≈ 53-56 GB per GPU;
    LoRA 5.47 GB base shard + 0.30 GB adapter state + activations + the per-layer gather's buffers
    (three 175B-wide layers and the embeddings: 12.2 GB) ≈ 26 GB."""
    st = Setup(world_size=64)
    e = estimate(big, st)
    lo, fu = e["lora"]["per_gpu"], e["full"]["per_gpu"]
    # 2Ψ/64 = 5.46 GB, plus the persistent (<= 1e5 elements) biases and norms kept whole: 5.49 GB
    small = sum(n * c for n, c in big.numels.items() if n <= 100000)
    assert small == 96 * (9 * 12288 + 49152) + 2 * 12288
    assert lo["frozen_weights"] == 2 * (sum(c * -(-n // 64) for n, c in big.numels.items()) + small)
    assert lo["frozen_weights"] == pytest.approx(2 * P175 / 64, rel=0.01)
    adapter = lo["trainable_weights"] + lo["gradients"] + lo["optimizer_state"]
    assert adapter == 16 * 18_874_368 + 4 * 2 * 192  # + AdamW's fp32 step per tensor
    assert 50 * GB < e["full"]["per_gpu_total"] < 60 * GB
    # LoRA's gather working set: the layer computing, the next one prefetched and the all-gather
    # output being copied out (3 layers of 1.81e9 elements), plus embeddings held for the step
    assert lo["zero_buffers"] == 2 * (3 * 1_812_099_072 + 642_772_992) + lo["trainable_weights"]
    assert 24 * GB < e["lora"]["per_gpu_total"] < 28 * GB
    assert e["lora"]["per_gpu_total"] < e["full"]["per_gpu_total"]
    assert e["ratio_per_gpu"] == pytest.approx(e["full"]["per_gpu_total"] / e["lora"]["per_gpu_total"])
    assert e["full"]["job_total"] == 64 * e["full"]["per_gpu_total"]
    # activations shrink only by the linear maps' inputs (frozen weights need no weight gradient):
    # gradients still flow through every layer, so most of them stay
    assert 0.75 * fu["activations"] < lo["activations"] < fu["activations"]


def test_activation_model(big):
    s, b, h, L = 2048, 1, 12288, 96
    st = Setup(world_size=64, checkpointing=False)
    c = per_gpu(big, st, "full")
    assert c["activations"] == L * 34 * s * b * h
    c = per_gpu(big, replace(st, checkpointing=True), "full")
    assert c["activations"] == L * 2 * s * b * h + 34 * s * b * h
    assert c["logits_loss"] == s * b * 50257 * 10
    # LoRA: frozen linears keep no input; the LayerNorms' fp32 inputs (2 × 4sbh), sdpa's q, k, v,
    # out (4 × 2sbh), the MLP activation's input (2·s·b·4h) and, per adapted matrix (2 per layer),
    # autocast's bf16 copy of its input plus the r-dim intermediate
    lo = per_gpu(big, st, "lora")
    assert lo["activations"] == L * (s * b * (8 * h + 2 * (4 * h + 4 * h)) + 2 * 2 * s * b * (h + 4))
    # the peak is the loss's backward, every layer held: one chunk of logits (fp32, the log-softmax and
    # their gradients: 16 bytes a logit), the final norm's fp32 input and three hidden-wide tensors
    # (the head's input rows, the norm's output, their gradient); larger than a layer's backward
    # transient (18·h per token) or the final norm's (24·h) on top of the same layers
    rows = min(s * b, (1 << 27) // 50257)  # 2,048 target rows fit in one chunk of 2,670
    assert lo["logits_loss"] == rows * 50257 * 16 + s * b * h * (4 + 3 * 2)


def test_lora_below_full_until_the_gather_buffers_dominate(big):
    for stage in (0, 1, 2, 3):
        for n in (1, 8, 64):
            st = Setup(world_size=n, zero_stage=stage)
            assert sum(per_gpu(big, st, "lora").values()) < sum(per_gpu(big, st, "full").values())
    # 175B over 512 GPUs: full fine-tuning's model states are 16Ψ/512 = 5.5 GB per GPU, while LoRA's
    # three gathered 175B-wide layers alone are 10.9 GB (DeepSpeed's defaults, modelled for full
    # fine-tuning, fetch one module at a time without prefetch): per GPU, LoRA is no longer smaller
    st = Setup(world_size=512)
    lora, full = per_gpu(big, st, "lora"), per_gpu(big, st, "full")
    assert lora["zero_buffers"] > full["trainable_weights"] + full["gradients"] + full["optimizer_state"]
    assert sum(lora.values()) > sum(full.values())


def test_fits_and_fewest_gpus(big):
    st = Setup(world_size=64, gpu_mem_bytes=80 * GiB)
    e = estimate(big, st)
    assert e["full"]["fits"] and e["lora"]["fits"]
    for which in ("full", "lora"):
        n = e[which]["fewest_gpus"]
        assert sum(per_gpu(big, replace(st, world_size=n), which).values()) <= st.gpu_mem_bytes
        assert sum(per_gpu(big, replace(st, world_size=n - 1), which).values()) > st.gpu_mem_bytes
    assert e["lora"]["fewest_gpus"] < e["full"]["fewest_gpus"]
    # stage 0 never fits 175B, however many GPUs
    e0 = estimate(big, replace(st, zero_stage=0))
    assert e0["full"]["fewest_gpus"] is None and not e0["full"]["fits"]
    # a small model fits on one GPU either way
    small = estimate("gpt3-small", Setup(world_size=4))
    assert small["full"]["fewest_gpus"] == 1 and small["lora"]["fewest_gpus"] == 1
    # too few GPUs: does not fit
    assert not estimate(big, replace(st, world_size=8))["full"]["fits"]


def test_offload_param_moves_weights_off_gpu(big):
    st = Setup(world_size=64, offload_param=True)
    assert per_gpu(big, st, "lora")["frozen_weights"] == 0
    assert per_gpu(big, st, "full")["trainable_weights"] == 0


def test_local_config_directory(tmp_path):
    from bigtrain.presets import hf_config_for

    hf_config_for("tiny-llama", vocab_size=512).save_pretrained(tmp_path)
    e = estimate(str(tmp_path), Setup(world_size=2, seq_len=64))
    assert e["lora_params"] == 2 * 4 * (64 + 64) * 2
    assert math.isfinite(e["ratio_job"]) and e["ratio_job"] > 1


def test_bench_smoke_cpu(tmp_path):
    """bench/memory_gpu.py runs end to end on CPU with a tiny preset (nothing is measured on CPU)."""
    out = tmp_path / "mem"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "memory_gpu.py"), "--device", "cpu",
                        "--presets", "tiny-opt", "--seq-len", "32", "--steps", "1", "--checkpointing", "on",
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = json.loads((tmp_path / "mem.json").read_text())["rows"]
    assert [(x["mode"], x["checkpointing"]) for x in rows] == [("full", True), ("lora", True)]
    for x in rows:
        assert x["predicted_bytes"] > 0 and math.isfinite(x["loss"]) and x["measured_bytes"] is None
    assert "| tiny-opt |" in (tmp_path / "mem.md").read_text()


def test_torch_amp_peak_phases():
    """Plain one-GPU full FT: peak = max(end of forward, optimizer step), not the sum of the rows."""
    shape = model_shape("gpt3-6.7b")
    st = Setup(world_size=1, zero_stage=0, full_recipe="torch-amp", micro_batch=2, checkpointing=False,
               include_context=False)
    c = per_gpu(shape, st, "full")
    P = shape.total_params
    assert (c["trainable_weights"], c["gradients"], c["optimizer_state"], c["zero_buffers"]) == (4 * P, 4 * P, 8 * P, 2 * P)
    peak = M.peak_bytes(c, st, "full")
    assert peak == 14 * P + c["activations"] + c["logits_loss"] < sum(c.values())
    assert 100 * GiB < peak < 110 * GiB  # measured on an H200: 105.3 GiB
    with pytest.raises(ValueError):
        per_gpu(shape, replace(st, world_size=2), "full")


def test_estimate_models_hpz_secondary_partitions():
    """--hpz N (ds_configs/zero3_hpz.json): each GPU holds its 1/world primary partition plus a
    1/N secondary one of the 16-bit weights (full FT) or of the frozen base (LoRA)."""
    st = Setup(world_size=32, seq_len=2048)
    plain, hpz = estimate("gpt3-175b", st), estimate("gpt3-175b", replace(st, hpz=8))
    base = 2 * P175  # bf16 bytes of the whole model
    for which, key in (("lora", "frozen_weights"), ("full", "trainable_weights")):
        a, b = plain[which]["per_gpu"][key], hpz[which]["per_gpu"][key]
        # what hpZ adds is a 1/8 secondary partition of every weight but the small persistent ones
        # (layer norms, biases: 0.3 % of the plain per-GPU share, kept whole on every rank)
        assert abs((b - a) / (base / 8) - 1) < 1e-3 and abs(a / (base / 32) - 1) < 5e-3, (which, a, b)
    assert hpz["lora"]["fewest_gpus"] % 8 == 0 and hpz["full"]["fewest_gpus"] % 8 == 0
    assert hpz["lora"]["fewest_gpus"] > plain["lora"]["fewest_gpus"]
    # the figure measured on 4 gloo ranks with zero_hpz_partition_size=2 (tests/e2e/test_engine_dist.py
    # ::test_hierarchical_partitioning_hpz_matches_plain_zero3): 2,872,320 bytes of base per rank
    tiny = estimate(str(ROOT / "bigtrain" / "assets" / "tiny-opt"),
                    Setup(world_size=4, hpz=2, dtype="float32", persistence_threshold=0))
    assert tiny["lora"]["per_gpu"]["frozen_weights"] == 2_872_320


def test_estimate_matches_the_h200_scaling_run():
    """The LoRA peak per GPU predicted for every bigtrain row of the 2-GPU benchmark
    (bench/results/scaling_h200x2.jsonl: GPT-3 2.7B and 6.7B, 1 and 2 GPUs, with and without
    activation checkpointing) is within 10% of the measured torch.cuda.max_memory_allocated."""
    import json
    from pathlib import Path

    rows = [json.loads(line) for line in (Path(__file__).resolve().parents[2] / "bench" / "results" /
                                          "scaling_h200x2.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["contender"] == "bigtrain" and r.get("status") == "ok"]
    assert len(rows) == 8
    for r in rows:
        st = Setup(world_size=r["gpus"], micro_batch=r["mb"], seq_len=r["seq"], checkpointing=r["ckpt"],
                   lora_r=8, dtype="bfloat16", include_context=False)
        c = per_gpu(model_shape(r["model"]), st, "lora")
        err = peak_bytes(c, st, "lora") / GiB / r["peak_gib"] - 1
        assert abs(err) < 0.10, (r["name"], r["peak_gib"], err)


def test_gated_mlp_activations_llama():
    """A SwiGLU MLP keeps three ffn-wide tensors (gate output, its silu, up output), not one."""
    shape = M.preset_shape("llama2-70b", 2)
    assert (shape.ffn, shape.ffn_maps, shape.layers, shape.hidden) == (28672, 2, 2, 8192)
    assert model_shape("gpt3-175b").ffn_maps == 1
    s, h, L = 8192, 8192, 2
    st = Setup(world_size=2, checkpointing=False, seq_len=s, lora_r=16,
               lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    lo = per_gpu(shape, st, "lora")
    # per adapted matrix its r-dim output; q, k, v share one bf16 input (RMSNorm's output), and o's
    # input is sdpa's output, which sdpa keeps anyway: one h-wide tensor per layer for the four
    adapters = L * (4 * 2 * s * 16 + 2 * s * h)
    assert lo["activations"] == L * (s * (8 * h + 2 * (4 * h + 3 * 28672))) + adapters
    # compiled layers keep the layer input and the mid residual instead of fp32 norm inputs, and the
    # gate and up outputs (silu is recomputed): 6 h + 2 ffn per token, the same adapters
    co = per_gpu(shape, replace(st, compiled=True), "lora")
    assert co["activations"] == L * (s * 2 * (6 * h + 2 * 28672)) + adapters


def test_host_peak_per_rank(big):
    """The build's host memory (bigtrain/memory.host_peak): a GPU run of a random base holds nothing
    of the model on the host, so its peak does not depend on the model; a checkpoint adds one
    layer's mapped pages and one tensor's slice (and its conversion), per rank; a CPU run holds
    everything the GPU would, plus one layer being built."""
    from bigtrain.memory import HOST_QUANT_TEMP_BYTES, HOST_RUNTIME_BYTES, host_peak, preset_shape

    st = Setup(world_size=1, quantize="nf4")
    gpu = host_peak(big, st)
    assert gpu == {"runtime": HOST_RUNTIME_BYTES["cuda"], "build": 0, "run": 0, "offload": 0,
                   "total": HOST_RUNTIME_BYTES["cuda"]}
    assert host_peak(preset_shape("gpt3-small"), st)["total"] == gpu["total"]  # not the model's size
    # GPT-3 175B (OPT's layout) from a checkpoint at 8 ranks: a layer is 12·12288² weights + 13·12288
    # biases and norms = 1,812,099,072 parameters; the largest tensor is the embedding, 50,257 x 12,288
    ck = host_peak(big, replace(st, world_size=8), from_checkpoint=True)
    assert big.layer_params == 12 * 12288 ** 2 + 13 * 12288 == 1_812_099_072 and big.largest_module_params == 50257 * 12288
    assert ck["build"] == 2 * (-(-1_812_099_072 // 8) + 2 * -(-50257 * 12288 // 8))
    cpu = host_peak(big, st, device="cpu")
    assert cpu["build"] == 2 * 2 * 1_812_099_072 + HOST_QUANT_TEMP_BYTES
    assert cpu["run"] == sum(per_gpu(big, replace(st, include_context=False), "lora").values())
    assert estimate(big, st)["lora"]["host_per_rank"] == gpu["total"]


def test_shard_group_partitions_lora_base_over_the_group():
    """zero.shard_group=K: LoRA's frozen base is partitioned over groups of K ranks and replicated
    across them, so at any world size a rank holds what a K-rank job holds: tiny-opt (891,904 fp32
    parameters, none persistent) on 4 ranks in groups of 2 is the 2-rank job's 1,783,808 bytes, and
    the gather buffers are the 2-rank ones too; the adapters' all-reduce stays (world size > 1)."""
    from bigtrain.memory import host_peak, quantized_gather_bytes

    shape = model_shape("tiny-opt")
    kw = dict(dtype="float32", persistence_threshold=0, include_context=False)
    four_by_two = per_gpu(shape, Setup(world_size=4, shard_group=2, **kw), "lora")
    two = per_gpu(shape, Setup(world_size=2, **kw), "lora")
    four = per_gpu(shape, Setup(world_size=4, **kw), "lora")
    assert shape.total_params == 891_904
    assert four_by_two["frozen_weights"] == two["frozen_weights"] == 4 * 891_904 // 2 == 1_783_808
    assert four["frozen_weights"] == 4 * 891_904 // 4 == 891_904
    assert four_by_two == two
    # shard_group == world size is the default's layout, byte for byte
    assert per_gpu(shape, Setup(world_size=4, shard_group=4, **kw), "lora") == four
    # groups of 1: the whole base on every rank, nothing gathered; only the fp32 adapter all-reduce
    one = per_gpu(shape, Setup(world_size=4, shard_group=1, **kw), "lora")
    assert one["frozen_weights"] == 4 * 891_904 == 3_567_616
    assert one["zero_buffers"] == one["trainable_weights"] == 4 * 8192
    # full fine-tuning ignores the key
    assert per_gpu(shape, Setup(world_size=4, shard_group=2, **kw), "full") == per_gpu(shape, Setup(world_size=4, **kw), "full")
    # a quantized base's gather buffers and a checkpoint's reads are the group's too
    q = dict(quantize="nf4", seq_len=64)
    assert quantized_gather_bytes(shape, Setup(world_size=8, shard_group=2, **q)) == \
        quantized_gather_bytes(shape, Setup(world_size=2, **q))
    big = model_shape("gpt3-175b")
    assert host_peak(big, Setup(world_size=64, shard_group=8), from_checkpoint=True) == \
        host_peak(big, Setup(world_size=8), from_checkpoint=True)
    assert host_peak(big, Setup(world_size=64, shard_group=8), from_checkpoint=True)["build"] == \
        2 * (-(-1_812_099_072 // 8) + 2 * -(-50257 * 12288 // 8))


def test_shard_group_llama2_70b_per_gpu_and_fewest_gpus():
    """Llama-2-70B (68,976,648,192 parameters) on 2 nodes of 8 in groups of 8: 1/8 of the bf16 base
    per GPU (17.25 GB, with the norms kept whole) against 1/16 (8.62 GB) over the world; LoRA's fewest
    GPUs with groups of 8 is one group."""
    shape = model_shape("llama2-70b")
    st = Setup(world_size=16, seq_len=8192, lora_r=16, lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    node, world = estimate(shape, replace(st, shard_group=8)), estimate(shape, st)
    P = shape.total_params
    assert P == 68_976_648_192
    small = sum(n * c for n, c in shape.numels.items() if n <= 100000)
    assert node["lora"]["per_gpu"]["frozen_weights"] == 2 * (sum(c * -(-n // 8) for n, c in shape.numels.items()) + small)
    assert node["lora"]["per_gpu"]["frozen_weights"] == 17_246_799_872
    assert world["lora"]["per_gpu"]["frozen_weights"] == 8_624_718_848
    assert node["lora"]["fewest_gpus"] == 8 and node["full"] == world["full"]
    assert node["setup"]["shard_group"] == 8


def test_shard_group_refusals():
    shape = model_shape("tiny-opt")
    with pytest.raises(ValueError, match=r"shard_group=3 must be 0 \(the world size\) or a positive divisor of "
                                         r"the world size 4"):
        per_gpu(shape, Setup(world_size=4, shard_group=3), "lora")
    with pytest.raises(ValueError, match="shard_group=-2"):
        Setup(world_size=4, shard_group=-2).base_shards
    with pytest.raises(ValueError, match=r"shard_group=2 cannot be combined with hpZ \(hpz=2\)"):
        per_gpu(shape, Setup(world_size=8, shard_group=2, hpz=2), "lora")
    # hpZ with the world as the group is the plain hpZ layout
    assert per_gpu(shape, Setup(world_size=8, shard_group=8, hpz=2), "lora") == \
        per_gpu(shape, Setup(world_size=8, hpz=2), "lora")
