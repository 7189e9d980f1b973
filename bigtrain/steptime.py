"""The time of one LoRA optimizer step for each layout of the frozen base (zero.shard_group), and the
layout to choose.

A module of its own, not part of :mod:`bigtrain.memory`: the memory model counts bytes, exactly, and
is tested against live partitions; this is a roofline model with assumed rates (a fraction of the
GPU's peak, link bandwidths), good for ranking layouts and for the order of magnitude of a step, not
a measurement. :mod:`bigtrain.estimate` prints it beside the memory (``bigtrain estimate --nodes N``).

The model, per GPU, for ``nodes × gpus_per_node`` ranks whose base is partitioned over groups of
``K`` ranks (``world``: K = N; ``node``: K = gpus_per_node; ``1``: the base whole on every GPU):

* **compute** per micro-step: ``tokens · flops_per_token / (gpu_tflops · mfu)``, with tokens =
  micro_batch × seq_len and FLOPs per token :func:`bigtrain.metrics.lora_flops_per_token` (4·P +
  8·L·s·d: forward and input gradients; frozen weights get no weight gradient; what a run's MFU
  counts) plus the recomputed layers' forward, ``k · (2·layer_params + 4·s·d)`` (checkpointing: every
  layer; ``checkpoint_layers=k``: the first k), which the run's MFU leaves out. Defaults: 989 TFLOP/s
  (H100/H200 bf16 dense) × 0.6. Measured against them: Llama-2-13B on one H200, no recomputation,
  9,730 tokens/s per GPU = 573 TFLOP/s = 0.58 of 989 (README: MFU 0.725 of the 790 TFLOP/s
  bigtrain's MFU divides by); Llama-2-70B on 2 H200s, seq 8192, every layer recomputed, 1,145
  tokens/s per GPU = 0.55 of 989 by this count (docs/results.md).
* **gathers** per micro-step: every decoder layer is all-gathered within its group once for the
  forward, once for the backward and once more for each recomputed layer, and the embeddings and
  head once (kept until the backward is done: ``LayerGatherer``); a GPU receives the other ``K − 1``
  ranks' partitions of each, ``(K − 1)·ceil(numel / K)`` elements of each gathered parameter, in its
  stored form (quantized with ``model.quantize``; the small persistent parameters are never
  gathered). A ring all-gather runs at its slowest link: over a group within a node at the
  intra-node bandwidth (default 450 GB/s per GPU, NVLink 4 one way), over a group spanning nodes at
  the inter-node bandwidth (default 50 GB/s per GPU, 400 Gb/s), every byte of the ring crossing it.
* The next layer's gather overlaps this layer's compute (the gatherer prefetches), so a micro-step
  takes ``max(compute, gathers)``; the first layer's gather, the host's launch overhead and the loss
  are not counted.
* Per optimizer step, ``grad_accum`` micro-steps and the adapters' fp32 gradient all-reduce over the
  world, not overlapped: ``2 · 4Φ · (N − 1) / N`` bytes at the inter-node bandwidth when the job
  spans nodes, else the intra-node one (identical in every layout).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .config import DTYPE_BYTES
from .layout import choose
from .memory import GiB, ModelShape, Setup, peak_bytes, per_gpu, quantized_gather_bytes
from .metrics import lora_flops_per_token

DEFAULT_GPU_TFLOPS = 989.0  # H100 / H200 SXM, bf16 dense
DEFAULT_MFU = 0.6
DEFAULT_INTRA_NODE_GBPS = 450.0  # NVLink 4, one direction, per GPU
DEFAULT_INTER_NODE_GBPS = 50.0  # 400 Gb/s per GPU
LAYOUTS = ("world", "node")  # the named ones; an integer K is a layout too ("1": the base replicated)


@dataclass(frozen=True)
class Rates:
    """What the step-time model assumes of the hardware (GB = 1e9 bytes, per GPU, one direction)."""

    gpu_tflops: float = DEFAULT_GPU_TFLOPS
    mfu: float = DEFAULT_MFU  # the achieved fraction of gpu_tflops
    intra_node_gbps: float = DEFAULT_INTRA_NODE_GBPS
    inter_node_gbps: float = DEFAULT_INTER_NODE_GBPS

    def check(self) -> None:
        for name in ("gpu_tflops", "mfu", "intra_node_gbps", "inter_node_gbps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.mfu > 1:
            raise ValueError(f"mfu is a fraction of the peak, at most 1, got {self.mfu}")


def shard_group_size(layout, nodes: int, gpus_per_node: int) -> int:
    """The ranks one base group spans, K, for a layout: ``"world"`` (every rank), ``"node"`` (the GPUs
    of a node) or an integer K (or its string) dividing the world size."""
    n = nodes * gpus_per_node
    if layout == "world":
        return n
    if layout == "node":
        return gpus_per_node
    try:
        k = int(layout)
    except (TypeError, ValueError):
        raise ValueError(f"shard_group={layout!r} is not world, node or an integer") from None
    if k < 1 or n % k:
        raise ValueError(f"shard_group={k} must be a positive divisor of the world size {n} "
                         f"({nodes} node(s) x {gpus_per_node})")
    return k


def recomputed_layers(shape: ModelShape, st: Setup) -> int:
    """Decoder layers recomputed in backward: ``checkpoint_layers``, else all with checkpointing."""
    k = st.checkpoint_layers if st.checkpoint_layers is not None else (shape.layers if st.checkpointing else 0)
    return max(0, min(k, shape.layers))


def flops_per_token(shape: ModelShape, st: Setup) -> dict:
    """FLOPs per trained token: ``model`` (:func:`bigtrain.metrics.lora_flops_per_token`, what a run's
    MFU counts), ``recompute`` (the recomputed layers' forward again: 2 FLOPs per weight and the
    attention's 4·s·d per layer) and ``total``."""
    model = lora_flops_per_token(shape.total_params, shape.layers, shape.hidden, st.seq_len)
    k = recomputed_layers(shape, st)
    recompute = k * (2.0 * shape.layer_params + 4.0 * st.seq_len * shape.hidden)
    return {"model": model, "recompute": recompute, "total": model + recompute}


def gather_bytes(shape: ModelShape, st: Setup, k: int) -> dict:
    """Bytes one GPU receives per micro-step from the all-gathers of a base partitioned over ``k``
    ranks: ``layer`` (one decoder layer, once), ``passes`` (2 + the recomputed fraction: forward,
    backward, recomputation), ``root`` (embeddings, final norm and head, once) and ``total`` =
    ``layers · passes · layer + root``. None over a group of 1."""
    w = DTYPE_BYTES[st.dtype]
    if k <= 1:
        return {"layer": 0, "passes": 0.0, "root": 0, "total": 0}
    if st.quantize is not None:
        # this rank's packed partitions of one layer, as the gatherer all-gathers them
        layer = (k - 1) * quantized_gather_bytes(shape, replace(st, shard_group=k))["packed"]
    else:
        numels = shape.layer_numels or ((shape.layer_params or shape.largest_module_params, False),)
        # persistent parameters (at most persistence_threshold elements) are whole everywhere: not gathered
        layer = (k - 1) * w * sum(-(-n // k) for n, _ in numels if n > st.persistence_threshold)
    root_params = max(0, shape.total_params - shape.layers * shape.layer_params)
    root = (k - 1) * w * -(-root_params // k)
    passes = 2.0 + recomputed_layers(shape, st) / max(1, shape.layers)
    return {"layer": layer, "passes": passes, "root": root, "total": int(shape.layers * passes * layer) + root}


def step_time(shape: ModelShape, st: Setup, nodes: int, gpus_per_node: int, shard_group=0,
              grad_accum: int = 1, rates: Rates = Rates()) -> dict:
    """One optimizer step's predicted time (seconds) and tokens/s per GPU at ``nodes × gpus_per_node``
    ranks with LoRA's base partitioned over ``shard_group`` ranks (0 or ``"world"``: all of them;
    ``"node"``; an integer). ``st`` gives the model's run (micro-batch, sequence, checkpointing,
    quantization, LoRA); its world size is taken from the nodes. See the module's docstring."""
    rates.check()
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
    n = nodes * gpus_per_node
    k = shard_group_size(shard_group or "world", nodes, gpus_per_node)
    st = replace(st, world_size=n, shard_group=k)
    tokens = st.micro_batch * st.seq_len
    fpt = flops_per_token(shape, st)
    compute_s = tokens * fpt["total"] / (rates.gpu_tflops * 1e12 * rates.mfu)
    g = gather_bytes(shape, st, k)
    link = "none" if k == 1 else ("inter-node" if k > gpus_per_node else "intra-node")
    bw = rates.inter_node_gbps if link == "inter-node" else rates.intra_node_gbps
    gather_s = g["total"] / (bw * 1e9)
    micro_s = max(compute_s, gather_s)
    grad_bytes = 4 * shape.lora_params(list(st.lora_targets), st.lora_r)  # fp32 adapter gradients
    ar_bw = rates.inter_node_gbps if nodes > 1 else rates.intra_node_gbps
    allreduce_s = 2 * grad_bytes * (n - 1) / n / (ar_bw * 1e9) if n > 1 else 0.0
    step_s = grad_accum * micro_s + allreduce_s
    return {"world_size": n, "shard_group": k, "tokens_per_micro_step": tokens, "grad_accum": grad_accum,
            "flops_per_token": fpt, "compute_s": compute_s, "gather_bytes": g["total"], "gather": g,
            "gather_link": link, "gather_gbps": bw if k > 1 else None, "gather_s": gather_s,
            "bound": "gathers" if gather_s > compute_s else "compute", "micro_step_s": micro_s,
            "allreduce_bytes": grad_bytes, "allreduce_s": allreduce_s, "step_s": step_s,
            "tokens_per_s_per_gpu": grad_accum * tokens / step_s}


def layout_names(nodes: int, gpus_per_node: int) -> list:
    """The layouts worth comparing: ``world``, ``node`` when a node is not the world, and ``1`` (the
    base replicated: no gathers at all) when the world has more than one GPU."""
    out = ["world"]
    if nodes > 1:
        out.append("node")
    if nodes * gpus_per_node > 1 and gpus_per_node > 1:
        out.append("1")
    return out


def lora_peak_per_gpu(shape: ModelShape, st: Setup, shard_group: int) -> int:
    """LoRA's predicted peak per GPU (bytes) with the base partitioned over ``shard_group`` ranks
    (0: the world): the sum of :func:`bigtrain.memory.per_gpu`'s rows, as ``bigtrain estimate``
    prints it."""
    s = replace(st, shard_group=shard_group)
    return peak_bytes(per_gpu(shape, s, "lora"), s, "lora")


def compare_layouts(shape: ModelShape, st: Setup, nodes: int, gpus_per_node: int, grad_accum: int = 1,
                    rates: Rates = Rates(), names=None) -> dict:
    """Each layout's memory (frozen base per GPU, LoRA peak, fits ``st.gpu_mem_bytes``) and step time
    (:func:`step_time`), and the one to choose: the fastest of those that fit (on a tie, the one with
    the most memory to spare). ``{"rows": [...], "recommended": name or None, "why": str}``."""
    rows = []
    for name in names or layout_names(nodes, gpus_per_node):
        k = shard_group_size(name, nodes, gpus_per_node)
        s = replace(st, world_size=nodes * gpus_per_node, shard_group=k)
        c = per_gpu(shape, s, "lora")
        peak = peak_bytes(c, s, "lora")
        t = step_time(shape, s, nodes, gpus_per_node, k, grad_accum, rates)
        rows.append({"layout": name, "shard_group": k, "frozen_weights": c["frozen_weights"],
                     "per_gpu_total": peak, "fits": peak <= st.gpu_mem_bytes,
                     "spare_bytes": st.gpu_mem_bytes - peak, **t})
    fit = [r for r in rows if r["fits"]]
    if not fit:
        least = min(rows, key=lambda r: r["per_gpu_total"])
        return {"rows": rows, "recommended": None,
                "why": f"none fits {st.gpu_mem_bytes / GiB:g} GiB: the least is {least['layout']} at "
                       f"{least['per_gpu_total'] / GiB:.1f} GiB per GPU; add nodes or quantize the base"}
    best = min(fit, key=lambda r: (r["step_s"], r["per_gpu_total"]))
    return {"rows": rows, "recommended": best["layout"], "why": _why(best, rows, st, nodes)}


def _why(best: dict, rows: list, st: Setup, nodes: int) -> str:
    k = best["shard_group"]
    where = ("no gathers: the whole base on every GPU" if k == 1 else
             "gathers stay on NVLink" if best["gather_link"] == "intra-node" else
             f"gathers cross nodes at {best['gather_gbps']:g} GB/s"
             + (" but hide under compute" if best["bound"] == "compute" else ""))
    share = "the whole base" if k == 1 else f"the base at 1/{k} per GPU"
    out = (f"{best['layout']}: {where}; {share} fits with {best['spare_bytes'] / GiB:.0f} GiB to spare; "
           f"{best['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU")
    others = []
    for r in rows:
        if r is best:
            continue
        if not r["fits"]:
            others.append(f"{r['layout']} does not fit ({r['per_gpu_total'] / GiB:.1f} GiB per GPU)")
        elif r["step_s"] > best["step_s"]:
            why = (f"{r['gather_s']:.2f} s of gathers per micro-step over {r['gather_gbps']:g} GB/s against "
                   f"{r['compute_s']:.2f} s of compute" if r["bound"] == "gathers" else "")
            others.append(f"{r['layout']} is {r['step_s'] / best['step_s']:.2f}x slower" + (f" ({why})" if why else ""))
        else:
            others.append(f"{r['layout']} is as fast but holds {(r['per_gpu_total'] - best['per_gpu_total']) / GiB:.1f} "
                          f"GiB more per GPU")
    return out + ("; " + "; ".join(others) if others else "")


def auto_layout(shape: ModelShape, st: Setup, nodes: int, gpus_per_node: int, headroom: float = 0.9) -> str:
    """zero.shard_group=auto as a run takes it (:func:`bigtrain.layout.choose`, the one rule), for
    ``nodes`` x ``gpus_per_node`` ranks: ``node`` when the job spans nodes and LoRA's predicted peak
    with the base partitioned within a node is at most ``headroom`` of the GPU's memory, else ``world``."""
    job = replace(st, world_size=nodes * gpus_per_node)
    keys = [rank // gpus_per_node for rank in range(job.world_size)]
    return choose("auto", keys,
                  lambda k: (lora_peak_per_gpu(shape, job, k) <= headroom * st.gpu_mem_bytes, "")).name
