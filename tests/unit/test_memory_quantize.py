"""bigtrain.memory with a quantized LoRA base (``Setup.quantize``): the frozen bytes by hand from the
storage formats, the layer gatherer's buffer model (and, on one CPU rank, against the buffers the
gatherer really allocates), and the runs that build a Setup from their config (the end-of-run savings
line, ``bigtrain measure``'s report). ``bigtrain estimate --quantize``'s table, JSON and errors, the
--paper comparison and the PEFT ZeRO-3 + QLoRA anchor: test_estimate.py."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from bigtrain import memory as M
from bigtrain.memory import GiB, Setup, estimate, model_shape, per_gpu, predict_states, preset_shape
from bigtrain.quantize import quantized_bytes

ROOT = Path(__file__).resolve().parents[2]
H, F = 12288, 49152  # GPT-3 175B: d_model, the MLP's width


def _int8(part):  # 1 byte per element + one fp32 scale per block of 64
    return part + 4 * -(-part // 64)


def _nf4(part):  # 4 bits per element of whole blocks, an int8 scale per block, fp32 per 256 scales + offset
    nb = -(-part // 64)
    return nb * 32 + nb + 4 * (-(-nb // 256) + 1)


BY_HAND = {"int8": _int8, "nf4": _nf4}


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
@pytest.mark.parametrize("n", [1, 2, 64])
def test_frozen_bytes_of_175b_by_hand(scheme, n):
    """GPT-3 175B (transformers' OPT): per layer q, k, v, out 12288² and fc1, fc2 12288 x 49152 are
    quantized; everything else (embeddings, positions, biases, norms) is bf16, the small ones
    persistent (whole on every rank beside their partition at N > 1)."""
    shape = model_shape("gpt3-175b")
    assert dict(shape.numels) == {H: 96 * 9 + 2, F: 96, H * H: 4 * 96, H * F: 2 * 96,
                                  50257 * H: 1, 2050 * H: 1}
    assert dict(shape.quant_numels) == {H * H: 4 * 96, H * F: 2 * 96}
    part = lambda x: -(-x // n)  # noqa: E731
    q = BY_HAND[scheme]
    assert quantized_bytes(part(H * H), scheme) == q(part(H * H))
    assert quantized_bytes(part(H * F), scheme) == q(part(H * F))
    small = (96 * 9 + 2) * (part(H) + (H if n > 1 else 0)) + 96 * (part(F) + (F if n > 1 else 0))
    want = 96 * (4 * q(part(H * H)) + 2 * q(part(H * F))) + 2 * (part(50257 * H) + part(2050 * H) + small)
    assert per_gpu(shape, Setup(world_size=n, quantize=scheme), "lora")["frozen_weights"] == want
    assert predict_states(shape, ["q_proj", "v_proj"], 4, n, "bfloat16", quantize=scheme)["frozen_weights"] == want
    plain = predict_states(shape, ["q_proj", "v_proj"], 4, n, "bfloat16")["frozen_weights"]
    # int8: ~0.53 of bf16's bytes; nf4: ~0.26 (the embeddings stay bf16)
    ratio = want / plain
    assert (0.52 < ratio < 0.54) if scheme == "int8" else (0.25 < ratio < 0.27), ratio
    print(f"gpt3-175b {scheme} at {n} GPU(s): {want:,} bytes of base per GPU (bf16: {plain:,}; {ratio:.3f}x)")


def _buffers_by_hand(layer, N, scheme, w=2, threshold=100000):
    """The stated model, from (numel, quantized) of one layer's parameters."""
    p = lambda x: -(-x // N)  # noqa: E731
    gathered = [(n, q) for n, q in layer if q or n > threshold]
    unit = w * sum(N * p(n) for n, _ in gathered)
    packed = sum(BY_HAND[scheme](p(n)) if q else w * p(n) for n, q in gathered)
    big = max(n for n, q in layer if q)
    nb = -(-p(big) // 64)
    padded = w * N * nb * 64 if p(big) % 64 else 0  # rows not whole blocks: a padded temporary
    if scheme == "int8":  # int8 pads its values too (1 byte each)
        temp = padded + (N * nb * 64 if padded else 0) + (4 * N * nb if N > 1 else 0)
    else:
        ng = -(-nb // 256)
        temp = padded + 4 * N * ng * 256 + 4 * N * nb + (4 * N * (ng + 1) if N > 1 else 0)
    return unit, packed, temp


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_gather_buffers_are_the_stated_model(scheme):
    """3 dequantized layers in bf16 + the packed all-gather output (none at 1 GPU) + the largest
    weight's dequantization temporaries + embeddings and head (gathered at N > 1; aliased at 1), and
    the adapters' fp32 gradient all-reduce at N > 1: the LoRA column's ZeRO/comm row."""
    big = model_shape("gpt3-175b")
    llama = preset_shape("llama2-70b", 2)  # Llama-2-70B's layers (GQA, SwiGLU), 2 of them
    llama_layer = ([(8192 ** 2, True)] * 2 + [(1024 * 8192, True)] * 2 + [(28672 * 8192, True)] * 3
                   + [(8192, False)] * 2)  # q, o; k, v; gate, up, down; the two RMSNorms
    big_layer = [(H * H, True)] * 4 + [(H * F, True)] * 2 + [(F, False)] + [(H, False)] * 9
    for shape, N, layer in ((big, 64, big_layer), (llama, 1, llama_layer), (llama, 2, llama_layer)):
        assert sorted(shape.layer_numels) == sorted(layer)
        st = Setup(world_size=N, quantize=scheme)
        g = M.quantized_gather_bytes(shape, st)
        unit, packed, temp = _buffers_by_hand(layer, N, scheme)
        root = 2 * (shape.total_params - shape.layers * shape.layer_params) if N > 1 else 0
        assert (g["unit"], g["units"], g["packed"]) == (unit, 3 * unit, packed)
        assert (g["dequant_temp"], g["root"]) == (temp, root)
        assert g["all_gather"] == (N * packed if N > 1 else 0)
        assert g["total"] == 3 * unit + g["all_gather"] + temp + root
        c = per_gpu(shape, st, "lora")
        assert c["zero_buffers"] == g["total"] + (c["trainable_weights"] if N > 1 else 0)
        print(f"{shape.name} {scheme} N={N}: unit {unit:,} packed {packed:,} temp {temp:,} root {root:,}")
    # the 175B layer: 1.81e9 elements; int8's temporaries = fc1's fp32 scale rows (604M / 64),
    # the kernel writing the values straight into the layer's buffer
    g = M.quantized_gather_bytes(big, Setup(world_size=64, quantize="int8"))
    assert g["unit"] == 2 * (4 * H * H + 2 * H * F)  # all divisible by 64: no padding
    assert g["dequant_temp"] == 4 * H * F // 64


def test_unquantized_is_unchanged_and_full_ft_ignores_quantize():
    big = model_shape("gpt3-175b")
    for N in (1, 8, 64):
        plain, q = estimate(big, Setup(world_size=N)), estimate(big, Setup(world_size=N, quantize="nf4"))
        assert q["full"]["per_gpu"] == plain["full"]["per_gpu"]
        assert q["lora"]["per_gpu"]["frozen_weights"] < plain["lora"]["per_gpu"]["frozen_weights"]
        assert plain["setup"]["quantize"] is None and q["setup"]["quantize"] == "nf4"
    # at 1 GPU the unquantized base gathers nothing (partitions are whole tensors), the quantized one
    # dequantizes each layer
    assert per_gpu(big, Setup(world_size=1), "lora")["zero_buffers"] == 0
    assert per_gpu(big, Setup(world_size=1, quantize="int8"), "lora")["zero_buffers"] > 0


@pytest.mark.parametrize("bad", [dict(zero_stage=0), dict(hpz=8), dict(offload_param=True), dict(quantize="int4")])
def test_settings_a_quantized_base_refuses(bad):
    with pytest.raises(ValueError, match="quantize"):
        per_gpu(model_shape("gpt3-2.7b"), replace(Setup(world_size=8, quantize="int8"), **bad), "lora")


def test_world_one_buffers_equal_the_gatherers_allocations(tmp_path):
    """One gloo rank, a random bf16 tiny-llama built into partitions with model.quantize through
    Engine.build_base (tests/dist/quant_buffers_worker.py): for every decoder-layer unit the
    dequantized buffer the gatherer allocates is the estimator's unit, its local packed buffer the
    estimator's packed bytes, the root is aliased to its partitions (no root buffer), and for int8
    the most bytes the gather allocated beyond the unit buffer, traced by torch's CPU profiler, are the
    CPU's eager path's fp32 copy of the largest weight (the estimate models the GPU's kernels, which
    write into the unit's buffer: none). nf4 on the CPU dequantizes in chunks with temporaries of its
    own: its unit and packed bytes are checked, not its temporaries."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "dist" / "quant_buffers_worker.py"), str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "rank0.json").read_text())
    from bigtrain.presets import hf_config_for

    shape = model_shape(hf_config_for("tiny-llama", vocab_size=512))
    assert len(res) == 4
    for key, got in res.items():
        scheme, th = key.split("/")
        st = Setup(world_size=1, dtype="bfloat16", persistence_threshold=int(th), quantize=scheme)
        g = M.quantized_gather_bytes(shape, st)
        assert got["world"] == 1 and len(got["units"]) == shape.layers == 2
        assert got["root_unit"] is False and got["root_aliased"] and g["root"] == 0 and g["all_gather"] == 0
        for u in got["units"]:
            assert u["whole"] == g["unit"], key
            assert u["packed"] == g["packed"], key
            if scheme == "int8":  # the CPU's eager path: an fp32 copy of the largest weight (128 x 64);
                # on a GPU the kernel writes into the unit's buffer: no temporary at one rank
                assert u["peak_during_gather"] - u["whole"] == 4 * 128 * 64 and g["dequant_temp"] == 0, key
        print(key, got["units"][0], {k: g[k] for k in ("unit", "packed", "dequant_temp")})
    # the threshold decides what is in the unit: the two RMSNorm weights (64 elements each)
    assert res["int8/0"]["units"][0]["whole"] - res["int8/100000"]["units"][0]["whole"] == 2 * 2 * 64


def test_end_of_run_savings_line_uses_the_quantized_estimate():
    """trainer.report_savings builds its Setup from the run's config: a model.quantize run's
    'estimate for this LoRA run' is the quantized one (it was the bf16 base's before)."""
    from bigtrain.config import load_config
    from bigtrain.presets import hf_config_for, meta_model
    from bigtrain.trainer import report_savings as _report_savings

    cfg = load_config(None, ["model.path=null", "model.preset=tiny-llama", "model.dtype=bfloat16",
                             "model.quantize=int8", "train.micro_batch_size=2", "data.max_length=64",
                             "lora.r=4"])
    meta = meta_model(hf_config_for("tiny-llama", vocab_size=512))
    # the three numbers _report_savings reads off the engine (base_shards: the base over both ranks,
    # zero.shard_group=world), and loggers that keep what they are given
    engine = SimpleNamespace(persistence_threshold=cfg.zero.persistence_threshold, hpz_size=1, base_shards=2)
    kept = {}
    loggers = SimpleNamespace(summary=kept.update, table=lambda *a: None)
    said = []
    _report_savings(cfg, meta, 2, [{"gpu_peak_allocated_bytes": 10 ** 6}], None, engine, loggers, said.append)
    st = Setup(world_size=2, micro_batch=2, seq_len=64, checkpointing=cfg.model.gradient_checkpointing,
               lora_r=4, lora_targets=tuple(cfg.lora.targets), dtype="bfloat16", include_context=False)
    want = estimate(meta, replace(st, quantize="int8"))["lora"]["per_gpu_total"]
    assert kept["memory/lora_estimated_peak_bytes"] == want
    assert want != estimate(meta, st)["lora"]["per_gpu_total"]
    assert M.fmt_binary(want) in said[0]


def test_measure_estimates_the_quantized_lora_base():
    """bigtrain measure's report predicts the LoRA mode of a model.quantize run with the quantized
    base (measured equal on CPU: `bigtrain measure ... model.quantize=int8`, states +0.0%); full
    fine-tuning's prediction is the same as without."""
    from bigtrain.config import load_config
    from bigtrain.measure_report import _setup_for

    cfg = load_config(None, ["model.path=null", "model.preset=tiny-opt", "model.dtype=bfloat16",
                             "model.quantize=nf4"])
    shape = model_shape("tiny-opt")
    st = _setup_for(cfg, "lora", 2, 80 * GiB, False)
    assert st.quantize == "nf4"
    e = estimate(shape, st)
    want = predict_states("tiny-opt", cfg.lora.targets, cfg.lora.r, 2, "bfloat16", cfg.zero.persistence_threshold,
                          quantize="nf4")["frozen_weights"]
    assert e["lora"]["per_gpu"]["frozen_weights"] == want
    full = estimate(shape, _setup_for(cfg, "full-zero3", 2, 80 * GiB, False))["full"]
    assert full == estimate(shape, replace(st, quantize=None))["full"]
