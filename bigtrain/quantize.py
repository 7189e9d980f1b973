"""A quantized frozen base (``model.quantize=int8 | nf4``): the schemes and their CPU and GPU kernels.

* int8: symmetric block-wise int8, one fp32 scale (absmax/127) per block of ``QUANT_BLOCK`` elements
  (:func:`quantize_blocks`, :func:`dequantize_blocks`);
* nf4: QLoRA's NormalFloat4 with double-quantized int8 scales (:func:`quantize_nf4`,
  :func:`dequantize_nf4`);
* ``SCHEMES``: how each scheme stores one partition (its sections) and turns gathered rows back into
  values; :func:`quantized_bytes`: what a rank stores; :func:`reference_dequantized`: what a weight
  is after its gather at a given world size; :func:`quantizable_weights`: which weights are
  quantized; :func:`quantize_layer`: one decoder layer's partitions quantized as the base is built.

Blocks are counted from the start of each rank's ZeRO-3 partition; the layer gatherer
(:class:`bigtrain.engine.gather.LayerGatherer`) packs, all-gathers and dequantizes them. Nothing here
imports DeepSpeed (``bigtrain estimate`` and export use this module without it); Triton is imported
only when a GPU dequantizes (:func:`_triton_kernels`).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from .presets import decoder_layer_classes


QUANT_BLOCK = 64  # elements per block of both schemes, counted from the start of each rank's partition
NF4_SCALE_BLOCK = 256  # nf4's double quantization: int8 absmax scales, one fp32 scale per 256 of them
# QLoRA's NormalFloat4 code (Dettmers et al. 2023, bitsandbytes' NF4 table): quantiles of N(0, 1)
# scaled to [-1, 1], with an exact zero; 16 values, one 4-bit index each.
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)
_DEQ_CHUNK = 1 << 22  # elements the eager nf4 path dequantizes at a time (bounds its temporaries)


_Q_CHUNK = 1 << 24  # elements quantized at a time: bounds the temporaries (a multiple of every block size)


def _block_chunks(x: torch.Tensor, block: int):
    """``x`` read flat, ``_Q_CHUNK`` elements at a time, as fp32 on x's device viewed as whole
    blocks of ``block`` (zeros pad the last one): yields (first block's index, blocks)."""
    x = x.detach().reshape(-1)
    n = x.numel()
    for a in range(0, max(n, 1), _Q_CHUNK):
        c = x[a:a + _Q_CHUNK].float()
        if c.numel() % block or c.numel() == 0:
            c = torch.cat([c, c.new_zeros(block - c.numel() % block)])
        yield a // block, c.view(-1, block)


def _add_error(sums: list | None, blocks: torch.Tensor, deq: torch.Tensor, dtype: torch.dtype) -> None:
    """Accumulate ``sum x²`` and ``sum (x - deq)²`` into ``sums`` (float64), if given, with ``deq``
    rounded to ``dtype`` as the gather hands it to the forward."""
    if sums is not None:
        x64 = blocks.double()
        sums[0] += float(x64.square().sum())
        sums[1] += float((x64 - deq.to(dtype).double()).square().sum())


@torch.no_grad()
def quantize_blocks(x: torch.Tensor, block: int = QUANT_BLOCK, sums: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric block-wise int8 of a tensor read flat: blocks of ``block`` consecutive elements
    from its start (the last one shorter when ``block`` does not divide it), one fp32 scale each,
    ``absmax / 127``; values ``round(x / scale)`` (half to even), so ``|x - q·scale| <= scale/2``.
    An all-zero block has scale 0 and values 0. Returns (int8 values, fp32 scales) on x's device,
    computed ``_Q_CHUNK`` elements at a time. ``sums``: a list [0.0, 0.0] that
    receives ``sum x²`` and ``sum (x - dequantized)²`` (fp32 dequantized values)."""
    n = x.numel()
    qs, scs = [], []
    for _, blocks in _block_chunks(x, block):
        scales = blocks.abs().amax(dim=1) / 127.0
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        q = torch.round(blocks / safe[:, None]).clamp_(-127, 127)
        _add_error(sums, blocks, q * scales[:, None], x.dtype)
        qs.append(q.to(torch.int8).view(-1))
        scs.append(scales)
    return torch.cat(qs)[:n].clone(), torch.cat(scs)[:-(-n // block)]


def dequantize_blocks(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype,
                      block: int = QUANT_BLOCK, out: torch.Tensor | None = None) -> torch.Tensor:
    """The inverse of :func:`quantize_blocks` along the last dimension (one row per rank at a gather):
    ``q·scale`` in fp32, then one rounding to ``dtype`` (written into ``out`` if given). On a GPU
    one Triton kernel does it (:func:`_triton_kernels`; rows that end inside a block through padded
    copies)."""
    n = q.shape[-1]
    lead = q.shape[:-1]
    nb = scales.shape[-1]
    if block == QUANT_BLOCK and _use_triton(q.device):
        if n != nb * block:  # rows that end inside a block: the kernel reads whole blocks
            padded = torch.zeros(*lead, nb * block, dtype=torch.int8, device=q.device)
            padded[..., :n] = q
            q = padded
        return _dequant_gpu("int8", q, scales, n, dtype, out)
    if n == nb * block:  # whole blocks (any partition of a size divisible by 64): no padded copy
        full = q.reshape(*lead, nb, block).float().mul_(scales.float()[..., None]).view(*lead, n)
    else:
        full = torch.zeros(*lead, nb * block, dtype=torch.float32, device=q.device)
        full[..., :n] = q
        full = full.view(*lead, nb, block).mul_(scales.float()[..., None]).view(*lead, nb * block)[..., :n]
    if out is not None:
        return out.copy_(full)  # the same cast as .to(dtype), without a second temporary
    return full.to(dtype)


_KERNELS: dict = {}  # scheme -> its Triton kernel, built at first use on a GPU


def _use_triton(device: torch.device) -> bool:
    """Whether ``device`` dequantizes with the Triton kernels: a CUDA device with Triton importable.
    Without Triton (a torch build that lacks it) the eager path runs, after one line on stderr."""
    if device.type != "cuda":
        return False
    if "available" not in _KERNELS:
        try:
            _triton_kernels()
            _KERNELS["available"] = True
        except ImportError as e:
            _KERNELS["available"] = False
            print(f"[bigtrain] model.quantize: Triton is not importable ({e}); dequantizing with eager "
                  f"PyTorch, several times slower", file=sys.stderr, flush=True)
    return _KERNELS["available"]


def _triton_kernels() -> dict:
    """The dequantization kernels for a GPU, one element per thread, reading the stored form once
    and writing the compute dtype once (~3 bytes of memory traffic per element for int8, ~2.5 for
    nf4). Eager PyTorch makes fp32 (and, for nf4, int64 index) temporaries of every element on its
    way, ~20-30 bytes per element, and inductor's dynamic-shape kernels reached only 0.2-0.8 TB/s of
    an H200's 4.8 (``bench/quant_gpu.py``): on GPT-3 6.7B at 2 GPUs that cost 14% (int8) and 34%
    (nf4) of the bf16 base's tokens/s. The same operations as the CPU's :func:`dequantize_blocks` and
    :func:`_nf4_values` (an fp32 product, one round-to-nearest-even to the compute dtype), so the
    same values: ``bench/quant_gpu.py`` checks them bit for bit. Triton ships with CUDA builds of
    torch; it is imported only here."""
    if "int8" in _KERNELS:
        return _KERNELS
    import triton
    import triton.language as tl

    @triton.jit
    def int8_kernel(q_ptr, s_ptr, out_ptr, n, QB: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        q = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.float32)
        s = tl.load(s_ptr + offs // QB, mask=mask, other=0.0)
        tl.store(out_ptr + offs, (q * s).to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)

    @triton.jit
    def nf4_kernel(c_ptr, s_ptr, code_ptr, out_ptr, n, QB: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        b = tl.load(c_ptr + offs // 2, mask=mask, other=0).to(tl.int32)
        nib = tl.where(offs % 2 == 0, b >> 4, b & 15)  # the first element of a byte in its high nibble
        v = tl.load(code_ptr + nib, mask=mask, other=0.0)
        s = tl.load(s_ptr + offs // QB, mask=mask, other=0.0)
        tl.store(out_ptr + offs, (v * s).to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)

    _KERNELS.update(int8=int8_kernel, nf4=nf4_kernel, block=4096, grid=lambda n, b: (triton.cdiv(n, b),))
    return _KERNELS


def _dequant_gpu(scheme: str, stored: torch.Tensor, scales: torch.Tensor, n: int, dtype: torch.dtype,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of whole blocks on a GPU (``stored``: ``[..., nb·64]`` values or ``[..., nb·32]`` nf4
    bytes; ``scales``: ``[..., nb]`` fp32), read as one flat run: each value × its block's scale,
    rounded to ``dtype``; the first ``n`` elements of each row, written into ``out`` if given. A
    contiguous ``out`` of whole blocks is written by the kernel directly; otherwise through a
    padded temporary."""
    k = _triton_kernels()
    lead, nb = scales.shape[:-1], scales.shape[-1]
    direct = n == nb * QUANT_BLOCK and (out is None or out.is_contiguous())
    if direct and out is None:
        out = torch.empty(*lead, n, dtype=dtype, device=stored.device)
    dest = out if direct else torch.empty(*lead, nb * QUANT_BLOCK, dtype=dtype, device=stored.device)
    args = (stored.contiguous().view(-1), scales.contiguous().view(-1).float())
    if scheme == "nf4":
        code = _KERNELS.get(("code", dest.device))
        if code is None:
            code = _KERNELS[("code", dest.device)] = torch.tensor(NF4_CODE, dtype=torch.float32, device=dest.device)
        args = args + (code,)
    total = dest.numel()
    k[scheme][k["grid"](total, k["block"])](*args, dest.view(-1), total, QUANT_BLOCK, k["block"])
    if direct:
        return out
    return dest[..., :n].clone() if out is None else out.copy_(dest[..., :n])


@torch.no_grad()
def quantize_nf4(x: torch.Tensor, block: int = QUANT_BLOCK, scale_block: int = NF4_SCALE_BLOCK,
                 sums: list | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """QLoRA's NF4 with double-quantized scales, of a tensor read flat.

    Blocks of ``block`` elements from its start (zeros pad the last one). Each block's absmax
    ``a_j`` is itself quantized (QLoRA's double quantization): ``c = a - mean(a)`` in groups of
    ``scale_block`` blocks, symmetric int8 ``round(c / s2)`` with ``s2 = absmax(c) / 127`` (fp32),
    so the scale used is ``â_j = q2_j·s2 + mean`` (QLoRA stores these 8-bit scales as an 8-bit
    float code; a linear int8 code costs the same bits and is one multiply-add to decode). Then each
    element is the index of the NF4 value nearest to ``x / â_j`` (``â_j`` rather than ``a_j``, so
    the index is the best one for the scale that dequantization will use), two indices per byte,
    the first in the high nibble. Storage: 4 bits per element + 8 bits per 64 + 32 bits per 16,384
    + 32 bits: 4.127 bits, 0.258 of bf16.

    Returns (uint8 codes, ``ceil(n/block)·block/2`` bytes; int8 scales, one per block; fp32
    ``[s2 per group..., mean]``) on x's device, computed ``_Q_CHUNK`` elements at a time (the mean of
    the absmaxes is reduced on that device). ``sums``: as for
    :func:`quantize_blocks`."""
    n = x.numel()
    nb = -(-n // block)
    absmax = torch.cat([blocks.abs().amax(dim=1) for _, blocks in _block_chunks(x, block)])[:nb]
    dev = absmax.device
    mean = absmax.mean()
    ng = -(-nb // scale_block)
    c = torch.zeros(ng * scale_block, dtype=torch.float32, device=dev)
    c[:nb] = absmax - mean
    cg = c.view(ng, scale_block)
    s2 = cg.abs().amax(dim=1) / 127.0
    safe2 = torch.where(s2 > 0, s2, torch.ones_like(s2))
    q2 = torch.round(cg / safe2[:, None]).clamp_(-127, 127).to(torch.int8).view(-1)[:nb].clone()
    s2m = torch.cat([s2, mean.view(1)])
    scale = _nf4_scales(q2, s2m, scale_block)
    safe = torch.where(scale != 0, scale, torch.ones_like(scale))
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=dev)
    mids = (code[1:] + code[:-1]) / 2
    packed = []
    for b0, blocks in _block_chunks(x, block):
        k = blocks.shape[0]
        idx = torch.bucketize(blocks / safe[b0:b0 + k, None], mids)  # the nearest code
        _add_error(sums, blocks, code[idx] * scale[b0:b0 + k, None], x.dtype)
        idx = idx.to(torch.uint8).view(-1, 2)
        packed.append((idx[:, 0] << 4) | idx[:, 1])
    return torch.cat(packed)[:nb * block // 2], q2, s2m


def _nf4_scales(q2: torch.Tensor, s2m: torch.Tensor, scale_block: int = NF4_SCALE_BLOCK) -> torch.Tensor:
    """Each block's scale ``q2·s2 + mean`` (fp32, a multiply then an add) along the last dimension."""
    nb, ng = q2.shape[-1], s2m.shape[-1] - 1
    lead = q2.shape[:-1]
    wide = torch.zeros(*lead, ng * scale_block, dtype=torch.float32, device=q2.device)
    wide[..., :nb] = q2
    wide = wide.view(*lead, ng, scale_block).mul_(s2m[..., :ng, None]).view(*lead, ng * scale_block)[..., :nb]
    return wide.add_(s2m[..., ng:])


def _nf4_values(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, block: int) -> torch.Tensor:
    """NF4 codes (uint8, two per byte, ``[..., nb·block/2]``) times their block's scale (``[..., nb]``),
    in fp32, rounded once to ``dtype``: ``[..., nb·block]``."""
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=codes.device)
    idx = torch.stack([codes >> 4, codes & 15], dim=-1).long()
    vals = code[idx].view(*scale.shape, block)
    return vals.mul_(scale[..., None]).view(*codes.shape[:-1], -1).to(dtype)


def dequantize_nf4(codes: torch.Tensor, q2: torch.Tensor, s2m: torch.Tensor, n: int, dtype: torch.dtype,
                   block: int = QUANT_BLOCK, scale_block: int = NF4_SCALE_BLOCK,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """The inverse of :func:`quantize_nf4` along the last dimension (one row per rank at a gather):
    ``NF4[index]·(q2·s2 + mean)`` in fp32, rounded once to ``dtype``, the first ``n`` elements of
    each row (written into ``out`` if given). On the CPU the rows are dequantized a chunk of blocks
    at a time, so the temporaries stay small; on a GPU one Triton kernel does them (:func:`_triton_kernels`)."""
    lead = codes.shape[:-1]
    scale = _nf4_scales(q2, s2m, scale_block)
    nb = scale.shape[-1]
    if block == QUANT_BLOCK and _use_triton(codes.device):
        return _dequant_gpu("nf4", codes, scale, n, dtype, out)
    if out is None:
        out = torch.empty(*lead, n, dtype=dtype, device=codes.device)
    step = max(1, _DEQ_CHUNK // block)
    for b0 in range(0, nb, step):
        b1 = min(nb, b0 + step)
        vals = _nf4_values(codes[..., b0 * block // 2:b1 * block // 2], scale[..., b0:b1], dtype, block)
        e0, e1 = b0 * block, min(n, b1 * block)
        out[..., e0:e1].copy_(vals[..., :e1 - e0])
    return out


class _Scheme:
    """How one quantized partition is stored: its sections (name, dtype, element count), in the
    order the packed unit buffer holds them (4-byte sections first, 1-byte ones last, so every
    offset stays aligned), how to make them and how to turn gathered rows of them back into values."""

    name = ""

    def sections(self, n: int) -> list[tuple[str, torch.dtype, int]]:
        raise NotImplementedError

    def quantize(self, x: torch.Tensor, sums: list | None = None) -> dict[str, torch.Tensor]:
        """The sections of ``x`` read flat, on x's device; ``sums`` as for :func:`quantize_blocks`."""
        raise NotImplementedError

    def dequantize(self, parts: dict, n: int, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def nbytes(self, n: int) -> int:
        return sum(c * torch.empty(0, dtype=d).element_size() for _, d, c in self.sections(n))


class _Int8(_Scheme):
    name = "int8"

    def sections(self, n):
        return [("scales", torch.float32, -(-n // QUANT_BLOCK)), ("values", torch.int8, n)]

    def quantize(self, x, sums=None):
        q, sc = quantize_blocks(x, sums=sums)
        return {"scales": sc, "values": q}

    def dequantize(self, parts, n, dtype, out=None):
        return dequantize_blocks(parts["values"], parts["scales"], dtype, out=out)


class _NF4(_Scheme):
    name = "nf4"

    def sections(self, n):
        nb = -(-n // QUANT_BLOCK)
        return [("scales2", torch.float32, -(-nb // NF4_SCALE_BLOCK) + 1), ("scales", torch.int8, nb),
                ("codes", torch.uint8, nb * QUANT_BLOCK // 2)]

    def quantize(self, x, sums=None):
        codes, q2, s2m = quantize_nf4(x, sums=sums)
        return {"scales2": s2m, "scales": q2, "codes": codes}

    def dequantize(self, parts, n, dtype, out=None):
        return dequantize_nf4(parts["codes"], parts["scales"], parts["scales2"], n, dtype, out=out)


SCHEMES = {"int8": _Int8(), "nf4": _NF4()}
QUANT_FORMATS = {  # how the load summary and the docs describe each scheme
    "int8": f"int8, one fp32 scale per block of {QUANT_BLOCK} elements (absmax/127)",
    "nf4": (f"NF4, one int8 scale per block of {QUANT_BLOCK} elements, double-quantized with one fp32 scale per "
            f"{NF4_SCALE_BLOCK} scales and one fp32 offset"),
}


def quantized_bytes(part_numel: int, scheme: str = "int8") -> int:
    """Bytes a rank stores for one quantized partition of ``part_numel`` elements: int8: the values
    and one fp32 scale per block; nf4: half a byte per element (whole blocks), one int8 scale per
    block, one fp32 scale per 256 blocks and one fp32 offset."""
    return SCHEMES[scheme].nbytes(part_numel)


def quantize_dequantize(x: torch.Tensor, scheme: str = "int8", dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x`` read flat, quantized as one partition and dequantized to ``dtype`` (default x's)."""
    s = SCHEMES[scheme]
    return s.dequantize(s.quantize(x), x.numel(), dtype or x.dtype).view(x.shape)


def reference_dequantized(full: torch.Tensor, world: int, dtype: torch.dtype | None = None,
                          scheme: str = "int8") -> torch.Tensor:
    """What a quantized base's weight is after its gather at ``world`` ranks, from the whole
    unquantized tensor: ZeRO-3's padded partitions (``ceil(numel/world)`` elements each, zeros after
    the end), each quantized on its own (blocks from the partition's start), dequantized, joined.
    The block boundaries follow the partitions, so the values depend on the world size."""
    dtype = dtype or full.dtype
    n = full.numel()
    part = -(-n // world)
    flat = torch.zeros(part * world, dtype=full.dtype)
    flat[:n] = full.detach().reshape(-1).cpu()
    out = [quantize_dequantize(flat[r * part:(r + 1) * part], scheme, dtype) for r in range(world)]
    return torch.cat(out)[:n].view(full.shape)


def _linear_weights(layer: nn.Module) -> list:
    """The 2-D weight of every ``nn.Linear`` inside one decoder layer: what ``model.quantize`` stores
    quantized (:func:`quantizable_weights`)."""
    return [sub.weight for sub in layer.modules()
            if type(sub) is nn.Linear and len(getattr(sub.weight, "ds_shape", sub.weight.shape)) == 2]


def quantizable_weights(model: nn.Module) -> dict:
    """The weights ``model.quantize`` stores quantized, by id: the 2-D weight of every ``nn.Linear``
    inside a decoder layer (LoRA's adapters are not there yet: they are injected after the base is
    built). Embeddings, norms, biases and the LM head stay in the compute dtype: norms and biases
    are small (1-D, a fraction of a percent of the bytes, usually persistent) and scale whole
    activations; the embedding and the LM head (often one tied matrix) are the root unit, gathered
    once per step rather than once per layer, and the head's error goes straight into every logit.
    Returns {id(param): dotted name}."""
    classes = tuple(decoder_layer_classes(model))
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    return {id(w): names.get(id(w), "?") for m in model.modules() if classes and isinstance(m, classes)
            for w in _linear_weights(m)}


@torch.no_grad()
def quantize_layer(layer: nn.Module, scheme: str, device: torch.device) -> None:
    """``model.quantize`` while the base is built (``build_streamed``'s ``after_layer``): each of
    the layer's :func:`quantizable_weights` has its freshly filled partition quantized on ``device``
    (a chunk at a time, :func:`quantize_blocks` / :func:`quantize_nf4`) and the unquantized
    partition freed. The sections wait on the parameter (``bt_quant``; ``bt_part`` its element
    count, ``bt_sums`` its error sums) until :class:`LayerGatherer` packs the layer."""
    for p in _linear_weights(layer):
        if hasattr(p, "bt_quant"):
            continue
        x = p.ds_tensor.data.reshape(-1).to(device)  # one copy over, in the model's dtype
        sums = [0.0, 0.0]
        p.bt_quant = SCHEMES[scheme].quantize(x, sums=sums)
        p.bt_sums, p.bt_part = tuple(sums), x.numel()
        p.ds_tensor.data = torch.empty(0, dtype=p.ds_tensor.dtype, device=device)
        del x
