"""``bigtrain estimate``: per-GPU memory of full fine-tuning with Adam against LoRA, as a table, JSON
or a plot; with ``--paper``, the LoRA paper's GPT-3 175B figures, what model.quantize changes, the
anchor against PEFT's ZeRO-3 + QLoRA example and what accelerate's and DeepSpeed's estimators say.

The model of memory itself (what each row counts, and why) is :mod:`bigtrain.memory`; this module
only asks it and prints the answer.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import re
from dataclasses import asdict, replace

from .config import QUANTIZE_CHOICES
from .memory import (CATEGORIES, CATEGORY_LABELS, CUDA_CONTEXT_BYTES, FRAGMENTATION, GB, GiB, ModelShape, Setup,
                     estimate, host_offload_budget, layer_input_bytes, meta_cached, model_shape, named_config, peak_bytes, per_gpu,
                     quantized_gather_bytes)
from .presets import meta_model
from .steptime import Rates, compare_layouts

# Deferred imports: accelerate and deepspeed (--paper's comparisons with other tools; either may be
# missing) and matplotlib (--plot) are imported where used. This module and bigtrain.memory load no
# torch until a model is built: `bigtrain estimate` stays a CPU-only tool (tests/unit/test_imports.py).


# ---------------------------------------------------------------------------------------------
# The LoRA paper's GPT-3 175B figures, and what the usual tools say.

PAPER_FULL_VRAM = 1.2e12  # Hu et al. 2021, §4.2: "from 1.2TB to 350GB"
PAPER_LORA_VRAM = 350e9
PAPER_CHECKPOINT = 35e6  # "from 350GB to 35MB"


def paper_figures(model="gpt3-175b") -> dict:
    """The paper's headline figures recomputed from the meta-built model.

    * trainable parameters, W_q and W_v: r=1 and r=4 (the paper's setting);
    * adapter checkpoint at r=4 in bf16 (the paper's "35 MB" is 37.7 MB = 18,874,368 × 2 bytes);
    * the LoRA training VRAM "350 GB" is the 16-bit frozen weights, 2Ψ; adapter state (16Φ ≈ 0.3 GB)
      and activations are small beside it;
    * the full fine-tuning "1.2 TB" is the paper's own measured figure: no itemised accounting is
      given. It is ≈ 6.9 bytes/param, i.e. 16-bit weights + 16-bit Adam m and v (6Ψ = 1.05 TB) plus part
      of the 16-bit gradients live at once (all of them: 8Ψ = 1.40 TB); it is not the 16Ψ (2.79 TB) of
      mixed-precision Adam with an fp32 master copy, which is what ``bigtrain estimate`` reports.
    """
    shape = model_shape(model)
    P = shape.total_params
    r1 = shape.lora_params(["q_proj", "v_proj"], 1)
    r4 = shape.lora_params(["q_proj", "v_proj"], 4)
    return {
        "total_params": P, "lora_params_r1": r1, "lora_params_r4": r4,
        "param_reduction": P / r4,
        "checkpoint_full_bytes_bf16": 2 * P, "checkpoint_lora_bytes_bf16": 2 * r4,
        "checkpoint_reduction": P / r4,
        "paper_full_vram_bytes": PAPER_FULL_VRAM, "paper_lora_vram_bytes": PAPER_LORA_VRAM,
        "paper_checkpoint_bytes": PAPER_CHECKPOINT,
        "lora_vram_bf16_weights": 2 * P,
        "lora_vram_with_adapter_state": 2 * P + 16 * r4,
        "full_vram_implied_bytes_per_param": PAPER_FULL_VRAM / P,
        "full_vram_16bit_weights_adam": 6 * P,
        "full_vram_16bit_weights_grads_adam": 8 * P,
        "full_vram_mixed_precision_adam": 16 * P,
        "vram_reduction_paper": PAPER_FULL_VRAM / PAPER_LORA_VRAM,
    }


def quantize_comparison(shape: ModelShape, st: Setup, world_size: int = 64) -> dict:
    """What model.quantize changes for LoRA on ``world_size`` GPUs (the LoRA paper's 175B setup: 8
    nodes × 8), ``st`` otherwise (its ZeRO-3 base, no hpZ or offload): per GPU the frozen base bytes, the
    gather buffers and the LoRA peak, and the whole job's, for the unquantized base and each scheme."""
    out = {"world_size": world_size, "rows": []}
    for q in (None, *QUANTIZE_CHOICES):
        s = replace(st, world_size=world_size, quantize=q, zero_stage=3, hpz=1, offload_param=False)
        c = per_gpu(shape, s, "lora")
        total = peak_bytes(c, s, "lora")
        out["rows"].append({"quantize": q, "base": q or st.dtype, "frozen_weights": c["frozen_weights"],
                            "zero_buffers": c["zero_buffers"], "per_gpu_total": total,
                            "job_total": total * world_size})
    return out


# HF PEFT's "Use PEFT QLoRA and DeepSpeed with ZeRO3 for finetuning large models on multiple GPUs"
# (peft docs/source/accelerate/deepspeed.md; examples/sft/run_peft_qlora_deepspeed_stage3.sh and
# configs/deepspeed_config_z3_qlora.yaml): Llama-2-70B on 2 × 40 GB A100s, "36.6 GB" per GPU.
PEFT_QLORA = {"model": "llama2-70b", "gpus": 2, "gpu_mem_gib": 40, "micro_batch": 2, "grad_accum": 2,
              "seq_len": 2048, "lora_r": 8, "lora_alpha": 16, "lora_targets": "all-linear", "quantize": "nf4",
              "reported_gb_per_gpu": 36.6}


def peft_qlora_anchor() -> dict:
    """bigtrain's estimate for the job of PEFT's ZeRO-3 + QLoRA example (``PEFT_QLORA``): 2 GPUs,
    micro-batch 2 of 2,048 packed tokens, activation checkpointing, LoRA r=8 on every linear layer,
    an nf4 base, bf16 compute; with the CUDA context and fragmentation allowance (what
    nvidia-smi-like figures include) and without it (``torch.cuda.max_memory_allocated``)."""
    a = PEFT_QLORA
    st = Setup(world_size=a["gpus"], micro_batch=a["micro_batch"], seq_len=a["seq_len"], checkpointing=True,
               lora_r=a["lora_r"], lora_targets=(a["lora_targets"],), quantize=a["quantize"],
               gpu_mem_bytes=a["gpu_mem_gib"] * GiB)
    shape = model_shape(a["model"])
    c = per_gpu(shape, st, "lora")
    bare = per_gpu(shape, replace(st, include_context=False), "lora")
    bf16 = per_gpu(shape, replace(st, quantize=None), "lora")
    return {**a, "per_gpu": c, "per_gpu_total": peak_bytes(c, st, "lora"),
            "per_gpu_allocated": peak_bytes(bare, st, "lora"),
            "gather": quantized_gather_bytes(shape, st),
            "bf16_base_per_gpu_total": peak_bytes(bf16, st, "lora"),
            "fits": peak_bytes(c, st, "lora") <= st.gpu_mem_bytes}


def tool_estimates(model, num_gpus_per_node: int = 8, num_nodes: int = 1) -> dict:
    """What ``accelerate`` and DeepSpeed's estimators say, called for real on the meta model.

    * accelerate: ``calculate_maximum_sizes`` on the meta model (fp32 sizes), then
      ``estimate_training_usage(bytes=16-bit size, "float16")``: whole-job totals for full fine-tuning
      at batch 1, with no notion of LoRA, sharding or activations (model 2Ψ, gradients 3Ψ, optimizer
      and step 4Ψ). The ``accelerate estimate-memory`` command (which needs the Hub) passes the fp32
      size to the same function, so its float16 row says 8Ψ (1.40 TB for 175B): ``cli_float16_row_peak``.
    * DeepSpeed: ``estimate_zero3_model_states_mem_needs_all_live`` prints and returns nothing, and its
      ``model_to_params`` de-duplicates parameters by ``data_ptr()``, which is 0 for every meta tensor
      (it then sees only one parameter). We run it for real and report what it printed, then call the
      same formula it uses, ``estimate_zero3_model_states_mem_needs``, with the real counts: per GPU
      ``4·largest_layer + 18·Ψ/N`` bytes, every parameter charged 18 bytes whatever its requires_grad,
      so it gives LoRA the same figure as full fine-tuning.
    """
    if isinstance(model, str):
        mm = meta_cached(model)
    elif hasattr(model, "parameters"):
        mm = model
    else:

        mm = meta_model(named_config(model)[1])
    shape = model_shape(model)
    out: dict = {}
    try:
        from accelerate.commands.estimate import estimate_training_usage
        from accelerate.utils import calculate_maximum_sizes

        total_size, largest = calculate_maximum_sizes(mm)  # bytes, in the meta model's fp32
        sizes = estimate_training_usage(total_size // 2, "float16")
        # the `accelerate estimate-memory` command itself passes the fp32 size for every dtype row
        cli = estimate_training_usage(total_size, "float16")
        out["accelerate"] = {"ran": True, "model_bytes_fp32": int(total_size),
                             "params_counted": int(total_size // 4), **{k: int(v) for k, v in sizes.items()},
                             "peak": int(max(sizes.values())),
                             "cli_float16_row_peak": int(max(cli.values())),
                             "note": "whole job, full fine-tuning, no sharding/LoRA/activations"}
    except Exception as e:  # pragma: no cover - depends on the installed accelerate
        out["accelerate"] = {"ran": False, "error": repr(e)}
    N = num_gpus_per_node * num_nodes
    ds: dict = {}
    try:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            # imported here too: DeepSpeed's logger writes its "Setting accelerator" warning to the
            # stdout of the moment, which would otherwise come before --json's JSON
            from deepspeed.runtime.zero import stage3 as s3

            logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
            s3.estimate_zero3_model_states_mem_needs_all_live(mm, num_gpus_per_node, num_nodes)
        ds["all_live_output"] = "\n".join(  # its table, without DeepSpeed's log lines
            ln for ln in buf.getvalue().strip().splitlines() if not re.match(r"\[\d{4}-\d\d-\d\d ", ln))
        ds["all_live_params_seen"] = s3.model_to_params(mm)[0]
        cpu, gpu, largest_mem = s3.estimate_zero3_model_states_mem_needs(
            total_params=shape.total_params, largest_layer_params=shape.largest_module_params,
            num_gpus_per_node=num_gpus_per_node, num_nodes=num_nodes, cpu_offload=False,
            cpu_offload_params=False, zero_init=True)
        ds.update(ran=True, gpu_per_gpu=int(gpu), cpu_per_node=int(cpu),
                  formula="4*largest_layer + 18*params/N per GPU")
    except Exception as e:  # pragma: no cover - depends on the installed deepspeed
        ds.update(ran=False, error=repr(e),
                  gpu_per_gpu=4 * shape.largest_module_params + int(18 * shape.total_params / N),
                  formula="computed from DeepSpeed's documented formula: 4*largest_layer + 18*params/N")
    out["deepspeed_zero3"] = ds
    return out


# ---------------------------------------------------------------------------------------------
# Output: the table and the plot (the command, bigtrain.commands.estimate, prints them or the JSON).


def _gb(x: float) -> str:
    return f"{x / GB:,.2f}"


def _lora_width(est: dict) -> int:
    """The LoRA column's width: wider for a quantized base's longer heading."""
    return 26 if est["setup"].get("quantize") else 22


def _header(est: dict) -> list[str]:
    """The model and the setup, then the columns' heads."""
    st = est["setup"]
    N = st["world_size"]
    q = st.get("quantize")
    W = _lora_width(est)
    return [
        f"{est['model']}: {est['total_params']:,} parameters (meta build); LoRA r={st['lora_r']} on "
        f"{','.join(st['lora_targets'])}: {est['lora_params']:,} trainable "
        f"({100 * est['lora_params'] / est['total_params']:.4f} %)",
        f"{N} GPU(s), seq {st['seq_len']}, micro-batch {st['micro_batch']}, "
        + (f"checkpointing {'on' if st['checkpointing'] else 'off'}" if st["checkpoint_layers"] is None else
           f"LoRA checkpointing the first {st['checkpoint_layers']} layers (full FT: "
           f"{'on' if st['checkpointing'] else 'off'})")
        + (", LoRA layers compiled" if st["compiled"] else "") + f", {st['dtype']}, "
        f"GPU memory {st['gpu_mem_bytes'] / GiB:g} GiB"
        + (", parameters offloaded to CPU" if st["offload_param"] else "")
        + (f", hpZ over {st['hpz']} GPUs" if st.get("hpz", 1) > 1 else "")
        + (f", LoRA's base partitioned over groups of {st['shard_group']} GPUs (zero.shard_group)"
           if st.get("shard_group", 0) not in (0, N) else "")
        + (f", LoRA's base quantized {q} (model.quantize={q}: the decoder layers' linear weights)" if q else "")
        + (f", LoRA's sequences split over {st['sequence_parallel']} GPUs (train.sequence_parallel)"
           if st.get("sequence_parallel", 1) > 1 else ""),
        "",
        f"{'per GPU, GB (1e9 bytes)':<32}{'full FT (ZeRO-' + str(est['full']['stage']) + ')':>20}"
        f"{'LoRA (ZeRO-' + str(est['lora']['stage']) + (f', {q}' if q else '') + ' base)':>{W}}",
    ]


def _rows(est: dict) -> list[str]:
    """A row per category, the totals below the rule, the full / LoRA ratios."""
    st = est["setup"]
    N = st["world_size"]
    W = _lora_width(est)
    lines = []
    for k in CATEGORIES:
        lines.append(f"{CATEGORY_LABELS[k]:<32}{_gb(est['full']['per_gpu'][k]):>20}"
                     f"{_gb(est['lora']['per_gpu'][k]):>{W}}")
    lines.append("-" * (52 + W))
    f, lo = est["full"], est["lora"]
    lines += [
        f"{'peak per GPU':<32}{_gb(f['per_gpu_total']):>20}{_gb(lo['per_gpu_total']):>{W}}",
        f"{'whole job (x' + str(N) + ')':<32}{_gb(f['job_total']):>20}{_gb(lo['job_total']):>{W}}",
        f"{'host memory per rank (peak)':<32}{'-':>20}{_gb(lo['host_per_rank']):>{W}}",
        f"{'fits the GPU':<32}{'yes' if f['fits'] else 'NO':>20}{'yes' if lo['fits'] else 'NO':>{W}}",
        f"{'fewest GPUs that fit':<32}{str(f['fewest_gpus'] or 'none'):>20}"
        f"{str(lo['fewest_gpus'] or 'none'):>{W}}",
        f"full / LoRA: {est['ratio_per_gpu']:.2f}x per GPU, {est['ratio_job']:.2f}x whole job",
    ]
    if st["full_recipe"] == "torch-amp":
        lines.append("(torch-amp: gradients and activations never coexist, so the full FT peak is below "
                     "the sum of its rows)")
    return lines


def _paper_lines(p: dict) -> list[str]:
    """The LoRA paper's GPT-3 175B figures beside the meta build's."""
    return [
        "",
        "LoRA paper (Hu et al. 2021), GPT-3 175B, recomputed from the meta build:",
        f"  trainable params W_q,W_v: r=1 {p['lora_params_r1']:,}, r=4 {p['lora_params_r4']:,} "
        f"({p['param_reduction']:,.0f}x fewer than {p['total_params']:,}; paper: ~10,000x)",
        f"  adapter checkpoint r=4 bf16: {p['checkpoint_lora_bytes_bf16'] / 1e6:.1f} MB (paper: 35 MB) "
        f"vs full {p['checkpoint_full_bytes_bf16'] / GB:.1f} GB (paper: 350 GB)",
        f"  training VRAM, whole job: paper 1.2 TB -> 350 GB ({p['vram_reduction_paper']:.1f}x)",
        f"    350 GB = the bf16 frozen weights 2*Psi = {p['lora_vram_bf16_weights'] / GB:.1f} GB "
        f"(+ adapter state {16 * p['lora_params_r4'] / GB:.2f} GB)",
        f"    1.2 TB = the paper's own measurement, {p['full_vram_implied_bytes_per_param']:.2f} bytes/param: "
        f"between 16-bit weights+Adam m,v (6*Psi = {p['full_vram_16bit_weights_adam'] / 1e12:.2f} TB) and "
        f"with 16-bit grads too (8*Psi = {p['full_vram_16bit_weights_grads_adam'] / 1e12:.2f} TB);",
        f"    mixed-precision Adam with an fp32 master (16*Psi, this tool's 'full FT') is "
        f"{p['full_vram_mixed_precision_adam'] / 1e12:.2f} TB before activations",
    ]


def _quantized_lines(est: dict, qc: dict) -> list[str]:
    """What model.quantize changes for LoRA at the paper's GPU count (:func:`quantize_comparison`)."""
    lines = ["", f"What model.quantize changes for LoRA, {est['model']} on {qc['world_size']} GPUs "
                 f"(8 nodes x 8, the paper's setup; the rest as above), GB:",
             f"  {'base':<10}{'base per GPU':>14}{'gather buffers':>16}{'LoRA per GPU':>14}"
             f"{'LoRA whole job':>16}{'base, whole job':>17}"]
    for r in qc["rows"]:
        lines.append(f"  {r['base']:<10}{_gb(r['frozen_weights']):>14}{_gb(r['zero_buffers']):>16}"
                     f"{_gb(r['per_gpu_total']):>14}{_gb(r['job_total']):>16}"
                     f"{_gb(r['frozen_weights'] * qc['world_size']):>17}")
    return lines


def _anchor_lines(a: dict) -> list[str]:
    """bigtrain's estimate beside PEFT's ZeRO-3 + QLoRA example (:func:`peft_qlora_anchor`)."""
    return [
        "",
        "Anchor: HF PEFT's DeepSpeed ZeRO-3 + QLoRA example (PEFT docs, accelerate/deepspeed; "
        "examples/sft/run_peft_qlora_deepspeed_stage3.sh):",
        f"  Llama-2-70B, {a['gpus']} x {a['gpu_mem_gib']} GB A100, micro-batch {a['micro_batch']} x "
        f"{a['seq_len']} packed tokens, checkpointing, LoRA r={a['lora_r']} all-linear, bnb nf4 + double "
        f"quant, bf16: reported {a['reported_gb_per_gpu']} GB per GPU",
        f"  bigtrain estimate {a['model']} --gpus-per-node {a['gpus']} --micro-batch {a['micro_batch']} "
        f"--seq-len {a['seq_len']} --lora-r {a['lora_r']} --lora-targets {a['lora_targets']} --quantize "
        f"{a['quantize']} --gpu-mem-gib {a['gpu_mem_gib']}:",
        f"    {_gb(a['per_gpu_total'])} GB per GPU ({a['per_gpu_total'] / GiB:.2f} GiB; "
        f"{a['per_gpu_total'] / (a['reported_gb_per_gpu'] * GB) - 1:+.1%} against 36.6 GB), "
        f"{_gb(a['per_gpu_allocated'])} GB without the CUDA context and fragmentation allowance; "
        f"with a bf16 base {_gb(a['bf16_base_per_gpu_total'])} GB",
        f"    of which: nf4 base partition {_gb(a['per_gpu']['frozen_weights'])}, gather buffers "
        f"{_gb(a['per_gpu']['zero_buffers'])} (3 dequantized bf16 layers {_gb(a['gather']['units'])}, "
        f"embeddings and head {_gb(a['gather']['root'])}), activations {_gb(a['per_gpu']['activations'])}, "
        f"replicated fp32 adapters + AdamW "
        f"{_gb(sum(a['per_gpu'][k] for k in ('trainable_weights', 'gradients', 'optimizer_state')))}",
        "    (docs/quantized_estimate.md: what differs, and what DeepSpeed ZeRO-3 does with bitsandbytes' "
        "4-bit weights)",
    ]


def _tools_lines(est: dict, tools: dict) -> list[str]:
    """What accelerate's and DeepSpeed's estimators say (:func:`tool_estimates`), beside bigtrain's."""
    N, lo = est["setup"]["world_size"], est["lora"]
    a, d = tools.get("accelerate", {}), tools.get("deepspeed_zero3", {})
    lines = ["", "What the usual estimators say for this model:"]
    if a.get("ran"):
        lines.append(f"  accelerate estimate_training_usage (fp16, whole job, batch 1): model {_gb(a['model'])}, "
                     f"gradients {_gb(a['gradients'])}, optimizer {_gb(a['optimizer'])}, step "
                     f"{_gb(a['step'])} GB; no LoRA, no sharding, no activations")
        lines.append(f"    (the `accelerate estimate-memory` command passes the fp32 size: its float16 row "
                     f"says {_gb(a['cli_float16_row_peak'])} GB)")
    else:
        lines.append(f"  accelerate: could not run ({a.get('error')})")
    lines.append(f"  DeepSpeed estimate_zero3_model_states_mem_needs ({d.get('formula')}): "
                 f"{_gb(d.get('gpu_per_gpu', 0))} GB per GPU on {N} GPUs, the same for LoRA: it charges "
                 f"18 bytes to every parameter, frozen or not, and counts no activations")
    if "all_live_params_seen" in d:
        lines.append(f"    (its _all_live variant on a meta model sees {d['all_live_params_seen']:,} params: "
                     f"it de-duplicates by data_ptr(), 0 for every meta tensor)")
    lines.append(f"  bigtrain: LoRA keeps no grads/Adam for the base and shards it: "
                 f"{_gb(lo['per_gpu_total'])} GB per GPU including activations and buffers")
    return lines


def layouts(shape: ModelShape, st: Setup, nodes: int, gpus_per_node: int, grad_accum: int = 1,
            rates: Rates = Rates()) -> dict | None:
    """The layouts of LoRA's frozen base (zero.shard_group: world, node, 1) side by side, memory and
    predicted step time, and the one to choose (:func:`bigtrain.steptime.compare_layouts`), with the
    inputs; None where the layout is not a choice (a whole base per GPU at --zero-stage 0, hpZ, or
    parameters offloaded to the host, whose gathers this model does not describe)."""
    if st.lora_stage != 3 or st.hpz > 1 or st.offload_param:
        return None
    out = compare_layouts(shape, st, nodes, gpus_per_node, grad_accum, rates)
    return {"nodes": nodes, "gpus_per_node": gpus_per_node, "grad_accum": grad_accum,
            "rates": asdict(rates), **out}


def training_plan(shape: ModelShape, st: Setup, host_mem_bytes: int | None, gpus_per_node: int = 1,
                  headroom: float = 0.1) -> dict:
    """What a training run of this job takes with its memory settings at ``auto``
    (model.gradient_checkpointing, model.tiled_mlp, model.offload_activations: bigtrain.recompute's
    choose_memory, the same rule a run applies on a GPU): the LoRA peak per GPU within the GPU's memory
    less ``headroom``, the offloaded inputs within ``host_mem_bytes`` less it (None: unbounded) shared
    by the node's ``gpus_per_node`` GPUs."""
    from .recompute import choose_memory, describe  # loads transformers: the CLI's parsers read this module

    budget = int(st.gpu_mem_bytes * (1 - headroom))
    host_budget = (host_offload_budget(host_mem_bytes, gpus_per_node, headroom) if host_mem_bytes
                   else None)
    inp = layer_input_bytes(shape, st)

    def at(n, t, o):
        return replace(st, checkpoint_layers=n, checkpointing=n > 0, tiled_mlp=t, offload_layers=o)

    plan = choose_memory("auto", "auto", "auto", shape.layers, shape.hidden,
                         lambda n, t, o: estimate(shape, at(n, t, o))["lora"]["per_gpu_total"], budget,
                         lambda o: o * inp, host_budget)
    chosen = at(plan.checkpointed, plan.tiled, plan.offloaded)
    lora = estimate(shape, chosen)["lora"]
    return {"checkpointed": plan.checkpointed, "layers": plan.layers, "tiled_mlp": plan.tiled,
            "offloaded": plan.offloaded, "line": describe(plan), "per_gpu_total": lora["per_gpu_total"],
            "budget": budget, "fits": lora["per_gpu_total"] <= budget, "offload_bytes": plan.offloaded * inp,
            "host_per_rank": lora["host_per_rank"], "host_budget": host_budget}


def _plan_lines(est: dict) -> list[str]:
    p, st = est["plan"], est["setup"]
    host = (f"{p['host_per_rank'] / GiB:.1f} GiB of host memory per GPU ({p['offload_bytes'] / GiB:.1f} of it "
            f"offloaded inputs" + (f"; budget {p['host_budget'] / GiB:.1f})" if p["host_budget"] else ")"))
    return ["", f"training at seq {st['seq_len']:,}, micro-batch {st['micro_batch']} (model.gradient_checkpointing, "
                f"model.tiled_mlp, model.offload_activations at auto; 10% headroom):",
            f"  {p['line']}",
            f"  LoRA peak per GPU {p['per_gpu_total'] / GiB:.1f} GiB of {st['gpu_mem_bytes'] / GiB:.0f} "
            f"({'fits' if p['fits'] else 'DOES NOT FIT'} the {p['budget'] / GiB:.1f} GiB budget); {host}"]


def _layout_lines(est: dict) -> list[str]:
    """The layouts table (:func:`layouts`) and the recommendation."""
    lay, st = est["layouts"], est["setup"]
    r = lay["rates"]
    link = {"intra-node": "NVLink", "inter-node": "network", "none": "-"}
    lines = ["", f"Layouts of LoRA's frozen base over {st['world_size']} GPUs ({lay['nodes']} nodes x "
                 f"{lay['gpus_per_node']}), zero.shard_group; step time PREDICTED, not measured:",
             f"  micro-batch {st['micro_batch']} x {st['seq_len']} tokens, grad-accum {lay['grad_accum']}, "
             f"{r['gpu_tflops']:g} TFLOP/s x {r['mfu']:g}, NVLink {r['intra_node_gbps']:g} GB/s, network "
             f"{r['inter_node_gbps']:g} GB/s per GPU; GB = 1e9 bytes",
             f"  {'layout':<8}{'ranks/group':>12}{'base/GPU GB':>13}{'LoRA peak GB':>14}{'fits':>6}"
             f"{'gathers GB':>12}{'over':>9}{'gathers s':>11}{'compute s':>11}{'step s':>9}{'tokens/s/GPU':>14}"]
    for row in lay["rows"]:
        lines.append(f"  {row['layout']:<8}{row['shard_group']:>12}{_gb(row['frozen_weights']):>13}"
                     f"{_gb(row['per_gpu_total']):>14}{'yes' if row['fits'] else 'NO':>6}"
                     f"{row['gather_bytes'] / GB:>12,.1f}{link[row['gather_link']]:>9}{row['gather_s']:>11.2f}"
                     f"{row['compute_s']:>11.2f}{row['step_s']:>9.2f}{row['tokens_per_s_per_gpu']:>14,.0f}")
    lines.append("  (gathers: received per GPU per micro-step, every decoder layer gathered for forward, backward "
                 "and each recomputation; a step: grad-accum x max(gathers, compute) + the adapters' all-reduce)")
    rec = lay["recommended"]
    lines.append(f"recommended: zero.shard_group={rec}: " + lay["why"].split(": ", 1)[1] if rec else
                 f"recommended: none: {lay['why']}")
    return lines


def format_table(est: dict, paper: dict | None = None, tools: dict | None = None) -> str:
    """The table, what its rows count, the layouts of the base when the job spans nodes and, with
    ``paper`` and ``tools`` (``--paper``), the paper's figures, the quantized bases, the PEFT anchor
    and the other estimators."""
    lines = [*_header(est), *_rows(est), "", *_legend(est)]
    if est.get("plan"):
        lines += _plan_lines(est)
    if est.get("layouts") and est["layouts"]["nodes"] > 1:
        lines += _layout_lines(est)
    if paper:
        lines += _paper_lines(paper)
    if paper and paper.get("quantized"):
        lines += _quantized_lines(est, paper["quantized"])
    if paper and paper.get("qlora_anchor"):
        lines += _anchor_lines(paper["qlora_anchor"])
    if tools:
        lines += _tools_lines(est, tools)
    return "\n".join(lines)


def _legend(est: dict) -> list[str]:
    """What each row of :func:`format_table` counts, for this setup (the two rows that are not a
    tensor the model owns above all: the gather buffers and the CUDA allowance)."""
    st = est["setup"]
    N, w = st["world_size"], st["dtype"]
    full_st, lora_st = est["full"]["stage"], est["lora"]["stage"]
    if full_st == 3:
        full_buf = "the largest module gathered + DeepSpeed's prefetch bucket (5e7) + reduce bucket (5e8)"
    elif full_st >= 1:
        full_buf = "DeepSpeed's reduce bucket (5e8 elements)"
    else:
        full_buf = ("autocast's 16-bit copy of every weight" if st["full_recipe"] == "torch-amp" else "none")
    q = st.get("quantize")
    K = st.get("shard_group") or N  # the ranks LoRA's base is partitioned over, and gathered within
    if lora_st == 3 and q:
        lora_buf = (f"3 decoder layers dequantized to {w} (the one computing, the next prefetched, one more in "
                    f"flight)" + (f" + the packed {q} all-gather output of one layer + embeddings and head, "
                                  f"gathered for the whole step" if K > 1 else
                                  " (at 1 GPU too: the gatherer dequantizes layer by layer; embeddings and head "
                                  "are not copied)")
                    + "; the dequantization temporaries of the largest weight"
                    + ("; and the fp32 all-reduce of the adapter gradients" if N > 1 else ""))
    elif lora_st == 3 and K > 1:
        lora_buf = (f"3 decoder layers gathered in {w} (the one computing, the next prefetched, its "
                    f"all-gather output) + embeddings and head, gathered for the whole step; and the fp32 "
                    f"all-reduce of the adapter gradients")
    elif N > 1:
        lora_buf = "the fp32 all-reduce of the adapter gradients" + (
            " (groups of 1 GPU: the whole base on every GPU, nothing gathered)" if lora_st == 3 else "")
    else:
        lora_buf = "none at 1 GPU (each partition is the whole tensor: nothing is gathered)"
    ctx = (f"{CUDA_CONTEXT_BYTES / GiB:g} GiB CUDA context + {FRAGMENTATION:.0%} of every other row for "
           f"the allocator's fragmentation; neither is in torch.cuda.max_memory_allocated"
           if st.get("include_context", True) else "not counted in this estimate")
    return [
        "what the rows count (per GPU):",
        (f"  frozen weights      LoRA: this GPU's ZeRO-3 partition of the base, the decoder layers' linear "
         f"weights in {q} with their scales, the rest in {w} plus small parameters kept whole" if q else
         f"  frozen weights      LoRA: this GPU's ZeRO-3 partition of the base ({w}), plus small parameters "
         f"kept whole (persistence threshold)" if lora_st == 3 else
         f"  frozen weights      LoRA: the whole base ({w}) on every GPU"),
        "  trainable weights   full FT: the 16-bit weights; LoRA: the fp32 adapters (A, B)",
        "  gradients           of the trainable weights only (LoRA: the adapters')",
        "  optimizer state     full FT: fp32 master + Adam m, v; LoRA: AdamW m, v of the adapters",
        (f"  activations         kept for backward, LoRA: the first {st['checkpoint_layers']} layers' inputs "
         f"(recomputed) + the other layers' activations{' (compiled layers)' if st['compiled'] else ''}"
         if st["checkpoint_layers"] is not None else
         "  activations         kept for backward: each layer's input + one layer being recomputed "
         "(checkpointing)" if st["checkpointing"] else "  activations         kept for backward, every layer"
         + (" (LoRA: compiled layers)" if st["compiled"] else "")),
        "  logits + loss       the logits, their fp32 copy and the log-softmax kept for backward "
        "(LoRA: one chunk at a time)",
        f"  ZeRO/comm buffers   full FT: {full_buf}",
        f"                      LoRA: {lora_buf}",
        f"  CUDA context + frag {ctx}",
    ]


def write_plot(est: dict, path: str, shape: ModelShape | None = None, st: Setup | None = None) -> str:
    """Stacked bars (full vs LoRA per GPU, by category) and per-GPU total vs GPU count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    bottoms = [0.0, 0.0]
    for k in CATEGORIES:
        vals = [est["full"]["per_gpu"][k] / GB, est["lora"]["per_gpu"][k] / GB]
        ax1.bar(["full FT", "LoRA"], vals, bottom=bottoms, label=CATEGORY_LABELS[k])
        bottoms = [b + v for b, v in zip(bottoms, vals)]
    gpu = est["setup"]["gpu_mem_bytes"] / GB
    ax1.axhline(gpu, color="k", ls="--", lw=1, label=f"GPU {est['setup']['gpu_mem_bytes'] / GiB:g} GiB")
    ax1.set_ylabel("GB per GPU")
    ax1.set_title(f"{est['model']} on {est['setup']['world_size']} GPU(s)")
    ax1.legend(fontsize=7)
    if shape is not None and st is not None:
        unit = math.lcm(st.hpz, st.shard_group or 1)  # the world sizes DeepSpeed / the shard group accept
        ns = [n for n in (2 ** i for i in range(0, 11)) if n % unit == 0] or \
            [unit * 2 ** i for i in range(0, 8)]
        for which, lab in (("full", "full FT"), ("lora", "LoRA")):
            ys = [sum(per_gpu(shape, replace(st, world_size=n), which).values()) / GB for n in ns]
            ax2.plot(ns, ys, marker="o", label=lab)
        ax2.axhline(gpu, color="k", ls="--", lw=1)
        ax2.set_xscale("log", base=2)
        ax2.set_yscale("log")
        ax2.set_xlabel("GPUs")
        ax2.set_ylabel("GB per GPU")
        ax2.set_title("per-GPU memory vs GPU count")
        ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
