"""model.quantize=int8: the block-wise int8 quantizer against an element-by-element reference, its
error bound, the world-size dependence of the dequantized values, the per-rank byte prediction, and
the settings a quantized base refuses before start-up."""
import math

import pytest
import torch

from bigtrain import quantize as Z
from bigtrain.config import ConfigError, load_config
from bigtrain.memory import model_shape, predict_states


def _by_hand(x: torch.Tensor, block: int):
    """Element by element, in Python floats on fp32 values: the quantizer's definition."""
    xs = x.reshape(-1).float().tolist()
    q, scales = [], []
    for s in range(0, len(xs), block):
        blk = xs[s:s + block]
        scale = float(torch.tensor(max(abs(v) for v in blk), dtype=torch.float32) / 127.0)
        scales.append(scale)
        for v in blk:
            q.append(0 if scale == 0 else int(torch.round(torch.tensor(v, dtype=torch.float32)
                                                          / torch.tensor(scale, dtype=torch.float32))))
    return q, scales


@pytest.mark.parametrize("n", [1, 63, 64, 65, 1000, 1024])
def test_quantize_matches_definition_and_error_bound(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * torch.logspace(-3, 1, n)  # blocks of very different ranges
    x[1:64:7] = 0  # some exact zeros
    q, sc = Z.quantize_blocks(x, 64)
    q_ref, sc_ref = _by_hand(x, 64)
    assert q.dtype == torch.int8 and sc.dtype == torch.float32
    assert q.tolist() == q_ref and sc.tolist() == sc_ref
    assert sc.numel() == math.ceil(n / 64) and Z.quantized_bytes(n) == n + 4 * sc.numel()
    deq = Z.dequantize_blocks(q, sc, torch.float32)
    # q·scale: exact in double, then rounded once to fp32 (as an fp32 product is)
    by_hand = torch.tensor([q_ref[i] * sc_ref[i // 64] for i in range(n)], dtype=torch.float32)
    assert torch.equal(deq, by_hand)
    out = torch.empty(n, dtype=torch.bfloat16)
    assert Z.dequantize_blocks(q, sc, torch.bfloat16, out=out) is out
    assert torch.equal(out, by_hand.to(torch.bfloat16))
    assert torch.equal(Z.dequantize_blocks(q, sc, torch.bfloat16), out)
    bound = sc.repeat_interleave(64)[:n]
    err = (x - deq).abs()
    # |x - q·scale| <= scale/2, up to the fp32 rounding of x/scale and of q·scale
    assert bool((err <= bound / 2 * (1 + 1e-6) + 1e-12).all()), float((err - bound / 2).max())
    rel = float((x - deq).norm() / x.norm())
    print(f"n={n}: relative Frobenius error {rel:.3e}, max |x-deq|/scale {float((err / bound.clamp_min(1e-30)).max()):.4f}")
    assert rel < 0.01


def test_zero_block_and_extremes():
    x = torch.zeros(130)
    x[64] = -3.0
    x[65] = 3.0
    q, sc = Z.quantize_blocks(x)
    assert sc.tolist() == [0.0, pytest.approx(3.0 / 127), 0.0]
    assert q[64].item() == -127 and q[65].item() == 127 and q[:64].abs().sum() == 0
    assert torch.equal(Z.dequantize_blocks(q, sc, torch.float32)[:64], torch.zeros(64))


def test_dequantize_rows_equal_per_row():
    """At a gather the int8 rows of all ranks are dequantized at once: the same as one by one."""
    x = torch.randn(3, 200)
    parts = [Z.quantize_blocks(r) for r in x]
    q = torch.stack([p[0] for p in parts])
    sc = torch.stack([p[1] for p in parts])
    together = Z.dequantize_blocks(q, sc, torch.bfloat16)
    one_by_one = torch.stack([Z.dequantize_blocks(a, b, torch.bfloat16) for a, b in parts])
    assert together.dtype == torch.bfloat16 and torch.equal(together, one_by_one)


def test_blocks_follow_the_partitions_so_values_depend_on_world_size():
    w = torch.randn(128, 128, generator=torch.Generator().manual_seed(0))
    d1, d2, d3 = (Z.reference_dequantized(w, n) for n in (1, 2, 3))
    # 16384 / 2 = 8192 is a multiple of 64: the same blocks, the same values
    assert torch.equal(d1, d2)
    # 16384 / 3 -> partitions of 5462 elements: the blocks shift, the values change
    assert not torch.equal(d1, d3)
    # rank 1's partition starts at element 5462: its first block is elements 5462..5525
    q, sc = Z.quantize_blocks(w.reshape(-1)[5462:5462 + 64])
    assert torch.equal(d3.reshape(-1)[5462:5462 + 64], Z.dequantize_blocks(q, sc, torch.float32))


def test_quantizable_weights_are_the_decoder_linears():
    from bigtrain.presets import hf_config_for, meta_model

    m = meta_model(hf_config_for("tiny-llama", vocab_size=512))
    names = sorted(Z.quantizable_weights(m).values())
    assert len(names) == 2 * 7  # 2 layers x q, k, v, o, gate, up, down
    assert all(n.startswith("model.layers.") and n.endswith("_proj.weight") for n in names)
    assert not any("embed" in n or "norm" in n or "lm_head" in n for n in names)


def test_prediction_counts_int8_and_scales():
    """tiny-opt (vocab 512 in the estimator): 16 attention projections of 16,384 elements and 8 MLP
    maps of 65,536, quantized; at 2 ranks each partition is half, one fp32 scale per 64 elements.
    Everything else as before (fp32 partitions; persistent whole tensors at threshold 1e5)."""
    shape = model_shape("tiny-opt")
    assert dict(shape.quant_numels) == {16384: 16, 65536: 8}
    for n in (1, 2, 3):
        plain = predict_states("tiny-opt", ["q_proj"], 4, n, "float32", 100000)["frozen_weights"]
        quant = predict_states("tiny-opt", ["q_proj"], 4, n, "float32", 100000, quantize="int8")["frozen_weights"]
        p16, p65 = -(-16384 // n), -(-65536 // n)
        q_bytes = 16 * (p16 + 4 * -(-p16 // 64)) + 8 * (p65 + 4 * -(-p65 // 64))
        # the quantized weights' unquantized bytes: fp32 partition, plus the whole tensor when
        # persistent (all of them are <= 1e5 elements) at world size > 1
        whole = (16 * 16384 + 8 * 65536) if n > 1 else 0
        assert plain - quant == 4 * (16 * p16 + 8 * p65) + 4 * whole - q_bytes, n


@pytest.mark.parametrize("overrides,match", [
    (["zero.stage=0"], r"^model.quantize=int8 .* needs zero.stage=3 \(got zero.stage=0\)$"),
    (["zero.gather=deepspeed"], r"^model.quantize=int8 needs bigtrain's layer gatherer .*zero.gather=deepspeed"),
    (["zero.leaf_blocks=false"], r"zero.leaf_blocks=false\)$"),
    (["checkpoint.merge_at_end=true"], r"^checkpoint.merge_at_end=true cannot merge into a model.quantize=int8 base"),
])
def test_refused_settings_are_one_line_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_config(None, ["model.quantize=int8", *overrides])
    assert "\n" not in str(e.value)


def test_unknown_quantize_value():
    with pytest.raises(ConfigError, match=r"^model.quantize: 'int4' is not one of null, 'int8', 'nf4'$"):
        load_config(None, ["model.quantize=int4"])
    assert load_config(None, ["model.quantize=int8"]).model.quantize == "int8"
    assert load_config(None, ["model.quantize=nf4"]).model.quantize == "nf4"
    assert load_config(None, []).model.quantize is None


# -- nf4 ---------------------------------------------------------------------------------------------
def _nf4_by_hand(x: torch.Tensor):
    """QLoRA's NF4 with double-quantized scales, element by element on fp32 scalars: the definition in
    quantize.quantize_nf4's docstring. Returns (codes as a list of 4-bit indices, int8 scales, [s2..., mean])."""
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    xs = x.reshape(-1).float().tolist()
    n = len(xs)
    blocks = [xs[s:s + 64] + [0.0] * (64 - len(xs[s:s + 64])) for s in range(0, n, 64)]
    absmax = [f32(max(abs(v) for v in b)) for b in blocks]
    mean = torch.stack(absmax).mean()
    c = [a - mean for a in absmax]
    q2, s2 = [], []
    for g in range(0, len(c), 256):
        grp = c[g:g + 256]
        s = f32(max(abs(float(v)) for v in grp)) / 127.0
        s2.append(float(s))
        q2 += [0 if float(s) == 0 else int(torch.clamp(torch.round(v / s), -127, 127)) for v in grp]
    code = [f32(v) for v in Z.NF4_CODE]
    idx = []
    for j, b in enumerate(blocks):
        scale = f32(q2[j]) * f32(s2[j // 256]) + mean
        safe = scale if float(scale) != 0 else f32(1.0)
        for v in b:
            t = f32(v) / safe
            idx.append(min(range(16), key=lambda i: (abs(float(t - code[i])), i)))  # nearest, ties low
    return idx, q2, s2 + [float(mean)]


@pytest.mark.parametrize("n", [1, 63, 64, 65, 1000, 64 * 256 + 64 * 3 + 5])
def test_nf4_matches_definition_and_stores_0_258_of_bf16(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * torch.logspace(-3, 0, n)  # blocks of very different ranges
    x[1:64:7] = 0
    codes, q2, s2m = Z.quantize_nf4(x)
    idx, q2_ref, s2m_ref = _nf4_by_hand(x)
    nb = math.ceil(n / 64)
    assert codes.dtype == torch.uint8 and q2.dtype == torch.int8 and s2m.dtype == torch.float32
    assert codes.numel() == nb * 32 and q2.numel() == nb and s2m.numel() == math.ceil(nb / 256) + 1
    assert q2.tolist() == q2_ref and s2m.tolist() == s2m_ref
    unpacked = torch.stack([codes >> 4, codes & 15], dim=1).reshape(-1).tolist()
    assert unpacked == idx  # two 4-bit indices per byte, the first in the high nibble
    assert Z.quantized_bytes(n, "nf4") == nb * 32 + nb + 4 * (math.ceil(nb / 256) + 1)
    # dequantized: NF4[index] · (q2·s2 + mean) in fp32, rounded once
    deq = Z.quantize_dequantize(x, "nf4", torch.float32)
    scale = [float(torch.tensor(q2_ref[j], dtype=torch.float32) * torch.tensor(s2m_ref[j // 256], dtype=torch.float32)
                   + torch.tensor(s2m_ref[-1], dtype=torch.float32)) for j in range(nb)]
    by_hand = torch.tensor([Z.NF4_CODE[idx[i]] for i in range(n)], dtype=torch.float32) * torch.tensor(
        [scale[i // 64] for i in range(n)], dtype=torch.float32)
    assert torch.equal(deq, by_hand)
    assert torch.equal(Z.quantize_dequantize(x, "nf4", torch.bfloat16), by_hand.to(torch.bfloat16))
    if n > 10000:  # the storage the issue asks for: ~0.28 of bf16 (here 4.127 bits per element)
        assert 0.255 < Z.quantized_bytes(n, "nf4") / (2 * n) < 0.26


def test_nf4_error_on_gaussian_weights_and_chunking():
    """N(0, 0.02²) weights (what presets draw): NF4's relative Frobenius error is ~9.2% (the
    information-theoretic 4-bit code for normal data), int8's ~0.6%; quantizing in chunks (the
    host-to-GPU path) gives the same bytes as at once."""
    x = torch.randn(300_000, generator=torch.Generator().manual_seed(0)) * 0.02
    errs = {s: float((x - Z.quantize_dequantize(x, s)).norm() / x.norm()) for s in ("int8", "nf4")}
    print(errs)
    assert 0.0055 < errs["int8"] < 0.0065 and 0.090 < errs["nf4"] < 0.094
    whole = Z.SCHEMES["nf4"].quantize(x)
    old = Z._Q_CHUNK
    try:
        Z._Q_CHUNK = 64 * 256 * 3  # not a multiple of the partition: the last chunk is short
        sums = [0.0, 0.0]
        chunked = Z.SCHEMES["nf4"].quantize(x, sums=sums)
        q8 = Z.quantize_blocks(x)
    finally:
        Z._Q_CHUNK = old
    assert all(torch.equal(whole[k], chunked[k]) for k in whole)
    assert all(torch.equal(a, b) for a, b in zip(q8, Z.quantize_blocks(x)))
    assert math.isclose(math.sqrt(sums[1] / sums[0]), errs["nf4"], rel_tol=1e-6)


def test_nf4_partitions_and_rows_dequantize_as_one():
    """What the gatherer does: each rank's partition quantized on its own; the gathered rows
    dequantized together (eager, in chunks) equal each row dequantized alone, and equal
    reference_dequantized of the whole tensor, which depends on the world size."""
    w = torch.randn(96, 130, generator=torch.Generator().manual_seed(2)) * 0.02
    old = Z._DEQ_CHUNK
    try:
        Z._DEQ_CHUNK = 128  # several chunks per row
        for world in (1, 2, 3):
            part = -(-w.numel() // world)
            flat = torch.zeros(part * world)
            flat[:w.numel()] = w.reshape(-1)
            parts = [Z.SCHEMES["nf4"].quantize(flat[r * part:(r + 1) * part]) for r in range(world)]
            rows = {k: torch.stack([p[k] for p in parts]) for k in parts[0]}
            together = Z.SCHEMES["nf4"].dequantize(rows, part, torch.bfloat16)
            ref = Z.reference_dequantized(w, world, torch.bfloat16, scheme="nf4")
            assert torch.equal(together.reshape(-1)[:w.numel()].view(w.shape), ref), world
    finally:
        Z._DEQ_CHUNK = old
    d1, d2 = (Z.reference_dequantized(w, n, scheme="nf4") for n in (1, 2))
    assert not torch.equal(d1, d2)  # 12,480 elements: rank 1's blocks start mid-block of the whole


def test_triton_kernels_under_the_interpreter():
    """The GPU kernels' logic (quantize._triton_kernels, both schemes, whole and padded rows) against the
    CPU's values, run by Triton's interpreter on the CPU (TRITON_INTERPRET=1) with fp32 output: the
    interpreter does not round to bf16 as a GPU does, which bench/quant_gpu.py checks bit for bit on
    an H200. Needs Triton (CUDA builds of torch ship it; the CPU build does not: skipped there)."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = '''
import torch
from bigtrain import quantize as Z
eager = Z._use_triton  # False on the CPU: the reference values
Z._KERNELS[("code", torch.device("cpu"))] = torch.tensor(Z.NF4_CODE)
g = torch.Generator().manual_seed(0)
for world, part in ((1, 4096), (2, 64 * 37), (3, 1000), (2, 130)):
    x = torch.randn(world, part, generator=g) * 0.02
    for scheme in ("int8", "nf4"):
        s = Z.SCHEMES[scheme]
        parts = [s.quantize(x[r]) for r in range(world)]
        st = {k: torch.stack([p[k] for p in parts]) for k in parts[0]}
        Z._use_triton = eager
        ref = torch.stack([Z.quantize_dequantize(x[r], scheme, torch.float32) for r in range(world)])
        Z._use_triton = lambda d: True  # the kernels, interpreted
        out = torch.empty(world, part)
        assert s.dequantize(st, part, torch.float32, out=out) is out and torch.equal(out, ref), (world, part, scheme)
        assert torch.equal(s.dequantize(st, part, torch.float32), ref), (world, part, scheme)
        strided = torch.empty(world, part + 3)[:, :part]  # an out the kernel cannot write flat
        assert s.dequantize(st, part, torch.float32, out=strided) is strided, (world, part, scheme)
        assert torch.equal(strided, ref), (world, part, scheme)
        assert Z._KERNELS.get("int8") is not None  # the kernels did run
print("ok")
'''
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root), "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout[-2000:] + r.stderr[-3000:]
