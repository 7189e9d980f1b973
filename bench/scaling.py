"""Scaling benchmark: bigtrain against FSDP2 + PEFT and DeepSpeed ZeRO-3 + PEFT on 1 and N GPUs.

One command runs the whole grid (models × activation checkpointing × GPU counts × contenders), each
run in its own process group with a fresh output directory and a per-job timeout:

  bigtrain    exactly what a user runs: ``torchrun -m bigtrain train model.path=null
              model.preset=<m> model.dtype=bfloat16 data.train=<jsonl> data.pack=true ...``, engine
              defaults, no tuning flags. tokens/s from ``train_log.jsonl`` (global / N, median after
              the first 3 steps); peak from ``ranks.json`` (``gpu_peak_allocated_bytes``, max over
              ranks), else the last train_log row's ``gpu_max_allocated_gib`` (rank 0)
  fsdp2-peft  torchrun + ``fully_shard`` on each decoder layer then the root,
              MixedPrecisionPolicy(bf16 params, fp32 reduce), reshard_after_forward=True, PEFT LoRA
              (r=8, α=16, q_proj+v_proj, fp32 adapters) on a bf16 base, the model's own loss
              (labels=input_ids), fused torch AdamW, no autocast
  fsdp2-peft-compile  the same with each decoder layer ``.compile()``d before ``fully_shard``
              (torchtune's recipe for compiled FSDP2 training)
  ds-peft     torchrun + HfDeepSpeedConfig + PEFT LoRA (same) + deepspeed.initialize ZeRO-3, bf16,
              DeepSpeed's AdamW

Same model for all: GPT-3 shapes (bigtrain.presets, vocabulary 50,257) on the OPT architecture, sdpa,
bf16 base, random weights, sequence 2048; 2.7B at micro-batch 4, 6.7B at micro-batch 2 (per GPU).
Baselines: random tokens, per-rank seeds; median of --steps steps after 2 warm-ups,
torch.cuda.synchronize() around each step (a step's time is the slowest rank's); peak =
torch.cuda.max_memory_allocated() after reset_peak_memory_stats() right after the build, max over ranks.
MFU = tokens/s per GPU × (4·P + 8·L·s·d) / 790e12 (P all parameters, tied embedding once).

  python bench/scaling.py --out $OUT                          # whole grid, GPUs 1 and all
  python bench/scaling.py --models gpt3-2.7b --ckpt off --out $OUT/a
  python bench/scaling.py --render a/scaling.jsonl b/scaling.jsonl --out merged/
  python bench/scaling.py --cpu --models tiny-opt --out /tmp/s   # CPU smoke (gloo), no timing claims
"""

from __future__ import annotations

import argparse
import json
import math
import re
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

PEAK_FLOPS = 790e12
SEQ = 2048
WARMUP = 2
BIGTRAIN_SKIP = 3
CONTENDERS = ["bigtrain", "fsdp2-peft", "fsdp2-peft-compile", "ds-peft", "bigtrain-eager", "bigtrain-compile",
              "bigtrain-dshooks", "bigtrain-int8", "bigtrain-nf4"]
# bigtrain train runs: -eager adds model.compile=false (bigtrain's default, auto, compiles on GPUs);
# -compile model.compile=true; -dshooks zero.gather=deepspeed (DeepSpeed's own fetch hooks instead of
# bigtrain's per-layer gather: the before/after of that change); -int8 and -nf4 model.quantize=int8 /
# nf4 (a quantized frozen base). AC "auto" (bigtrain only): model.gradient_checkpointing left at its
# default, which recomputes as few layers as fit.
BIGTRAIN = ("bigtrain", "bigtrain-eager", "bigtrain-compile", "bigtrain-dshooks", "bigtrain-int8", "bigtrain-nf4")
FSDP2 = ("fsdp2-peft", "fsdp2-peft-compile")
MICRO = {"gpt3-2.7b": 4, "gpt3-6.7b": 2, "llama2-7b": 2, "llama2-13b": 2, "llama2-70b": 1}
LABEL = {"gpt3-2.7b": "GPT-3 2.7B", "gpt3-6.7b": "GPT-3 6.7B", "tiny-opt": "tiny-opt (CPU smoke)",
         "llama2-7b": "Llama-2-7B", "llama2-13b": "Llama-2-13B", "llama2-70b": "Llama-2-70B"}
JOB_ENV = {"TORCH_CUDA_ARCH_LIST": "9.0", "NCCL_NVLS_ENABLE": "0", "PYTHONUNBUFFERED": "1",
           "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}


# ---------------------------------------------------------------------------------------------
# model shapes (shared by every contender)


def model_config(name: str, num_layers: int | None = None):
    """The preset's own transformers config: GPT-3 presets keep the table's vocabulary (50,257);
    tiny presets (vocabulary 0 in the table) take the built-in tokenizer's, as bigtrain does.
    ``num_layers``: the depth, as bigtrain's model.num_layers."""
    from bigtrain.presets import get_preset, hf_config_for

    if get_preset(name).vocab == 0:
        from bigtrain.data import load_tokenizer

        return hf_config_for(name, vocab_size=len(load_tokenizer(None)), num_layers=num_layers)
    return hf_config_for(name, num_layers=num_layers)


def flops_per_token(name: str, seq: int, num_layers: int | None = None, r: int = 8,
                    targets=("q_proj", "v_proj")) -> tuple[int, float]:
    """(P, model FLOPs per token): P = base + LoRA parameters; 4·P + 8·L·s·d."""
    from bench_gpu import count_params
    from bench_gpu import flops_per_token as fpt

    from bigtrain.memory import model_shape

    cfg = model_config(name, num_layers)
    n = count_params(cfg) + model_shape(cfg).lora_params(list(targets), r)
    return n, fpt(cfg, n, seq, lora=True)


# ---------------------------------------------------------------------------------------------
# baseline worker: one torchrun process of fsdp2-peft or ds-peft


def _decoder_layers(model, n_layers: int):
    import torch

    for _, m in model.named_modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers:
            return list(m)
    raise RuntimeError("no ModuleList of decoder layers found")


def build_fsdp2_peft(cfg, ac: bool, r: int, lora_targets, dev, compile_layers: bool = False):
    """The FSDP2 + PEFT baseline model: PEFT LoRA (fp32 adapters) on a bf16 base, ``fully_shard`` on
    each decoder layer then the root, bf16 params and fp32 gradient reduction; with
    ``compile_layers`` each decoder layer ``.compile()``d first (torchtune). The whole model never
    exists: it is built on the meta device and sharded, then each rank allocates and initialises
    only its own shards (``to_empty`` + :func:`init_shards`)."""
    import torch
    import transformers as tf
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from bench_gpu import peft_lora

    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    model = peft_lora(model, ac, r, lora_targets)  # PEFT upcasts the adapters to fp32
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in _decoder_layers(model, cfg.num_hidden_layers):
        if compile_layers:
            layer.compile()
        fully_shard(layer, mp_policy=mp, reshard_after_forward=True)
    fully_shard(model, mp_policy=mp, reshard_after_forward=True)
    model.to_empty(device=dev)
    init_shards(model, dev)
    return model


def init_shards(model, dev) -> None:
    """After ``to_empty``: each rank fills its own shards as ``transformers`` would initialise the
    whole tensors (matrices N(0, 0.02²), norm weights 1, biases 0; LoRA A N(0, 0.02²), B 0) and
    recomputes the rotary tables (non-persistent buffers that ``to_empty`` left uninitialised)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            if "lora_B" in name or name.endswith(".bias"):
                local.zero_()
            elif local.dim() == 1:
                local.fill_(1.0)
            else:
                local.normal_(0.0, 0.02)
        for m in model.modules():
            if hasattr(m, "inv_freq") and hasattr(m, "compute_default_rope_parameters"):
                inv_freq, _ = m.compute_default_rope_parameters(m.config, device=dev)
                m.inv_freq.copy_(inv_freq)
                if hasattr(m, "original_inv_freq"):
                    m.original_inv_freq.copy_(inv_freq)


def worker(job: dict) -> None:
    import torch
    import torch.distributed as dist
    import transformers as tf

    from bench_gpu import peft_lora, timed_steps

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    cpu = job["cpu"]
    if cpu:
        dev = torch.device("cpu")
    else:
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    cfg = model_config(job["model"], job.get("layers"))
    mb, seq, ac, name = job["mb"], job["seq"], job["ckpt"], job["contender"]
    r, lora_targets = job.get("r", 8), job.get("targets", ["q_proj", "v_proj"])
    torch.manual_seed(0)  # same random base on every rank (values do not matter, shapes do)

    if name in FSDP2:
        dist.init_process_group("gloo" if cpu else "nccl", device_id=None if cpu else dev)
        model = build_fsdp2_peft(cfg, ac, r, lora_targets, dev, compile_layers=name == "fsdp2-peft-compile")
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, fused=not cpu)

        def step():
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

    elif name == "ds-peft":
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        deepspeed.init_distributed(dist_backend="gloo" if cpu else "nccl", verbose=False)
        ds = {"train_micro_batch_size_per_gpu": mb, "gradient_accumulation_steps": 1,
              "bf16": {"enabled": not cpu}, "zero_optimization": {"stage": 3},
              "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}
        if not cpu:
            ds["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-4}}  # DeepSpeed's FusedAdam
        else:
            ds["zero_allow_untested_optimizer"] = True
        dschf = HfDeepSpeedConfig(ds)  # noqa: F841  (must stay alive while the model is built)
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32 if cpu else torch.bfloat16,
                                                    attn_implementation="sdpa")
        model = peft_lora(model, ac, r, lora_targets)
        params = [p for p in model.parameters() if p.requires_grad]
        client_opt = torch.optim.AdamW(params, lr=1e-4) if cpu else None  # no FusedAdam on the CPU
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=ds,
                                               optimizer=client_opt)

        def step():
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            return loss.detach()
    else:
        raise ValueError(name)

    g = torch.Generator().manual_seed(1234 + rank)  # per-rank data
    ids = torch.randint(3, cfg.vocab_size, (mb, seq), generator=g).to(dev)
    sync = (lambda: None) if cpu else torch.cuda.synchronize
    if not cpu:
        sync()
        torch.cuda.reset_peak_memory_stats()
    times, losses = timed_steps(step, job["warmup"], job["steps"], sync)
    peak = torch.cuda.max_memory_allocated() if not cpu else None
    mine = {"rank": rank, "times": times, "losses": losses, "peak": peak}
    every = [None] * world
    dist.all_gather_object(every, mine)
    if rank == 0:
        slowest = [max(r["times"][i] for r in every) for i in range(len(times))]
        step_s = statistics.median(slowest)
        peaks = [r["peak"] for r in every]
        res = {"step_ms": 1000 * step_s, "tokens_per_s_per_gpu": mb * seq / step_s,
               "step_ms_all": [round(1000 * t, 2) for t in slowest], "losses": losses,
               "peak_gib": max(peaks) / 2 ** 30 if not cpu else None,
               "peak_gib_ranks": [p / 2 ** 30 for p in peaks] if not cpu else None,
               "peak_source": "torch.cuda.max_memory_allocated after the build, max over ranks"}
        Path(job["result_file"]).write_text(json.dumps(res))
        print("RESULT " + json.dumps(res), flush=True)
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# the grid


def job_name(j: dict) -> str:
    depth = f"_l{j['layers']}" if j.get("layers") else ""
    return f"{j['model']}{depth}_{j['contender']}_g{j['gpus']}_{ac_label(j['ckpt'], short=True)}"


def ac_label(ckpt, short: bool = False, row: dict | None = None) -> str:
    """Activation checkpointing of a job: off, on, or auto (bigtrain's default) with the layers it chose."""
    if ckpt == "auto":
        if short:
            return "autoac"
        n, L = (row or {}).get("checkpointed_layers"), (row or {}).get("layers_total")
        return f"auto: {n} of {L} layers" if n is not None else "auto"
    return ("ac" if ckpt else "noac") if short else ("on" if ckpt else "off")


def plan(args, n_avail: int) -> list[dict]:
    """Jobs in priority order: (no AC; bigtrain, fsdp2-peft) first, then ds-peft, then the same
    with AC. Within a tier the 1-GPU jobs come first, adjacent, so two of them share the machine."""
    tiers = [("auto", list(BIGTRAIN)),
             (False, ["bigtrain", "fsdp2-peft", "fsdp2-peft-compile"]), (False, ["ds-peft"]),
             (True, ["bigtrain", "fsdp2-peft", "fsdp2-peft-compile"]), (True, ["ds-peft"]),
             (False, ["bigtrain-compile", "bigtrain-dshooks"]), (True, ["bigtrain-compile"]),
             (False, ["bigtrain-int8", "bigtrain-nf4"]), (True, ["bigtrain-int8", "bigtrain-nf4"])]
    jobs = []
    for ckpt, group in tiers:
        if ckpt not in args.ckpt:
            continue
        for g in args.gpus:
            for m in args.models:
                for c in group:
                    if c not in args.contenders or (c == "bigtrain-dshooks" and g == 1):
                        continue  # (at 1 GPU bigtrain installs no fetch hooks at all)
                    if args.cpu and ckpt is False and c in BIGTRAIN and "auto" in args.ckpt:
                        continue  # on a CPU auto checkpoints no layer (no GPU memory to size): the auto row is this run
                    j = dict(model=m, contender=c, gpus=g, ckpt=ckpt, mb=args.mb or MICRO.get(m, 2),
                             seq=args.seq, steps=args.steps, cpu=args.cpu,
                             warmup=1 if args.cpu else WARMUP,  # baselines' warm-up steps
                             skip_steps=0 if args.cpu else BIGTRAIN_SKIP,  # bigtrain's skipped steps
                             r=args.lora_r, targets=args.lora_targets, layers=args.num_layers)
                    j["name"] = job_name(j)
                    j["vocab"] = int(model_config(m, args.num_layers).vocab_size)  # bigtrain: padded, from its log
                    if g > n_avail:
                        j["skip"] = f"skipped: needs {g} GPUs, {n_avail} here"
                    jobs.append(j)
    return jobs


def write_data(path: Path, tokens_needed: int) -> None:
    """A jsonl of {"text": random words} that packs into at least ``tokens_needed`` tokens with
    bigtrain's built-in tokenizer (measured on the first lines, 25% spare)."""
    import random

    from bigtrain.data import load_tokenizer

    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 8))) for _ in range(5000)]
    lines = [" ".join(rng.choice(words) for _ in range(300)) for _ in range(64)]
    tok = load_tokenizer(None)
    per_line = sum(len(tok(s)["input_ids"]) for s in lines) / len(lines)
    n = int(math.ceil(1.25 * tokens_needed / per_line)) + 4
    with open(path, "w") as f:
        for i in range(n):
            s = lines[i] if i < len(lines) else " ".join(rng.choice(words) for _ in range(300))
            f.write(json.dumps({"text": s}) + "\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(job: dict, data: Path, run_dir: Path) -> list[str]:
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(job["gpus"]),
              "--master_port", str(job["port"])]
    if job["contender"] in BIGTRAIN:
        cmd = launch + ["-m", "bigtrain", "train", "model.path=null", f"model.preset={job['model']}",
                        "model.dtype=bfloat16", f"data.train={data}", "data.eval=null", "data.pack=true",
                        f"data.max_length={job['seq']}", f"train.micro_batch_size={job['mb']}",
                        f"train.max_steps={job['skip_steps'] + job['steps']}", "train.log_every=1",
                        "checkpoint.every=0", "logging.progress_bar=false",
                        f"train.output_dir={run_dir / 'out'}"]
        if job["ckpt"] != "auto":
            cmd.append(f"model.gradient_checkpointing={'true' if job['ckpt'] else 'false'}")
        if job["cpu"]:
            cmd.append("train.device=cpu")
        cmd += [f"lora.r={job.get('r', 8)}", f"lora.targets=[{','.join(job.get('targets', ['q_proj', 'v_proj']))}]"]
        if job.get("layers"):
            cmd.append(f"model.num_layers={job['layers']}")
        if job["contender"] == "bigtrain-compile":
            cmd.append("model.compile=true")
        if job["contender"] == "bigtrain-eager":
            cmd.append("model.compile=false")
        if job["contender"] == "bigtrain-dshooks":
            cmd.append("zero.gather=deepspeed")
        if job["contender"] in ("bigtrain-int8", "bigtrain-nf4"):
            cmd.append(f"model.quantize={job['contender'].split('-')[1]}")
        return cmd
    w = {k: job[k] for k in ("model", "contender", "gpus", "ckpt", "mb", "seq", "steps", "warmup", "cpu",
                             "r", "targets", "layers") if k in job}
    w["result_file"] = str(run_dir / "result.json")
    return launch + [str(Path(__file__).resolve()), "--worker", json.dumps(w)]


def log_tail(path: Path, n: int = 6) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " / ".join(lines[-n:])[-600:]


def collect(job: dict, run_dir: Path, out: Path, rc: int | None, timed_out: bool) -> dict:
    row = {k: v for k, v in job.items() if k not in ("port", "skip")}
    log = out / "logs" / f"{job['name']}.txt"
    if timed_out:
        row["status"] = f"failed: timeout after {job['timeout']:.0f} s: {log_tail(log, 3)}"
        return row
    try:
        if job["contender"] in BIGTRAIN:
            o = run_dir / "out"
            keep = out / "runs" / job["name"]
            keep.mkdir(parents=True, exist_ok=True)
            for f in ("train_log.jsonl", "ranks.json", "config.yaml"):
                if (o / f).exists():
                    shutil.copy(o / f, keep / f)
            text = log.read_text(errors="replace") if log.exists() else ""
            chose = re.findall(r"activation checkpointing: (\d+) of (\d+) decoder layers", text)
            if chose:
                row["checkpointed_layers"], row["layers_total"] = map(int, chose[-1])
            padded = re.search(r"vocabulary ([\d,]+) padded to ([\d,]+) inside the run", text)
            if padded:
                row["vocab"] = int(padded.group(2).replace(",", ""))
            row["compiled"] = "model.compile auto: on" in text or "model.compile=true" in text
            if rc != 0:
                raise RuntimeError(f"exit {rc}")
            rows = [json.loads(ln) for ln in (o / "train_log.jsonl").read_text().splitlines() if ln.strip()]
            steps = [r for r in rows if "tokens_per_s" in r]
            tps = [r["tokens_per_s"] / job["gpus"] for r in steps]
            use = tps[job["skip_steps"]:] if len(tps) > job["skip_steps"] else tps
            med = statistics.median(use)
            row.update(tokens_per_s_per_gpu=med, step_ms=1000 * job["mb"] * job["seq"] / med,
                       tokens_per_s_per_gpu_all=tps, losses=[r.get("loss") for r in steps])
            ranks = json.loads((o / "ranks.json").read_text()) if (o / "ranks.json").exists() else []
            peaks = [r.get("gpu_peak_allocated_bytes") for r in ranks if isinstance(r, dict)]
            if peaks and all(p is not None for p in peaks):
                row["peak_gib"] = max(peaks) / 2 ** 30
                row["peak_gib_ranks"] = [p / 2 ** 30 for p in peaks]
                row["peak_source"] = "ranks.json gpu_peak_allocated_bytes, max over ranks"
            elif steps and steps[-1].get("gpu_max_allocated_gib") is not None:
                row["peak_gib"] = steps[-1]["gpu_max_allocated_gib"]
                row["peak_source"] = "train_log gpu_max_allocated_gib (rank 0, last row): ranks.json has no gpu_peak_allocated_bytes"
            else:
                row["peak_gib"] = None
                row["peak_source"] = "none (CPU)" if job["cpu"] else "none: neither ranks.json nor train_log has a GPU peak"
        else:
            rf = run_dir / "result.json"
            if rc != 0 or not rf.exists():
                raise RuntimeError(f"exit {rc}")
            row.update(json.loads(rf.read_text()))
        bad = [x for x in row.get("losses", []) if x is None or not math.isfinite(x)]
        row["status"] = "failed: non-finite loss" if bad else "ok"
    except Exception as e:  # noqa: BLE001 - a row, never a crash of the grid
        row["status"] = f"failed: {e}: {log_tail(log)}"
    if row.get("tokens_per_s_per_gpu"):
        row["mfu"] = row["tokens_per_s_per_gpu"] * row["flops_per_token"] / PEAK_FLOPS
    return row


def kill_group(p: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_grid(args) -> list[dict]:
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    n_gpu = 0
    if args.cpu:
        n_avail = max(int(g) for g in args.gpus if g != "all")  # processes, not GPUs
    else:
        import torch

        n_gpu = torch.cuda.device_count()
        n_avail = n_gpu
        if n_gpu:
            print(f"# {n_gpu} × {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    args.gpus = sorted({n_gpu if g == "all" else int(g) for g in args.gpus} - {0})
    jobs = plan(args, n_avail)
    shapes = {m: flops_per_token(m, args.seq, args.num_layers, args.lora_r, args.lora_targets) for m in args.models}
    for j in jobs:
        j["params"], j["flops_per_token"] = shapes[j["model"]]
        j["timeout"] = args.job_timeout
    work = Path(tempfile.mkdtemp(prefix="bt_scaling_"))
    data = work / "train.jsonl"
    bt = [j for j in jobs if j["contender"] in BIGTRAIN and "skip" not in j]
    if bt:
        need = max(j["mb"] * j["gpus"] * j["seq"] * (j["skip_steps"] + j["steps"]) for j in bt)
        write_data(data, need)
    env = dict(os.environ, **JOB_ENV)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "bench")] + [
        p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    if args.cpu:
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    parallel = args.parallel_single and not args.cpu and n_gpu >= 2
    pending = list(jobs)
    running: list[tuple[dict, subprocess.Popen, list[int], float, Path]] = []
    rows, free = [], list(range(max(n_gpu, 1)))
    t_all = time.perf_counter()

    def finish(row: dict) -> None:
        rows.append(row)
        with open(out / "scaling.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        tps = row.get("tokens_per_s_per_gpu")
        peak = row.get("peak_gib")
        print(f"[{len(rows)}/{len(jobs)}] {row['name']}: {row['status'][:160]}"
              + (f", {tps:,.0f} tok/s/GPU" if tps else "")
              + (f", peak {peak:.1f} GiB" if peak is not None else "")
              + f", {row.get('elapsed_s', 0):.0f} s (total {time.perf_counter() - t_all:.0f} s)", flush=True)

    def stop_all(*_):
        for _, p, *_rest in running:
            kill_group(p)
        sys.exit(130)

    signal.signal(signal.SIGTERM, stop_all)
    try:
        while pending or running:
            while pending:
                j = pending[0]
                if "skip" in j:
                    pending.pop(0)
                    finish(dict({k: v for k, v in j.items() if k != "skip"}, status=j["skip"]))
                    continue
                if parallel:
                    need = j["gpus"]
                    if len(free) < need:
                        break
                else:  # one job at a time
                    need = min(j["gpus"], len(free))
                    if running:
                        break
                pending.pop(0)
                gpus, free = free[:need], free[need:]
                j["port"] = free_port()
                run_dir = work / j["name"]
                shutil.rmtree(run_dir, ignore_errors=True)
                run_dir.mkdir(parents=True)
                jenv = dict(env)
                if not args.cpu:
                    jenv["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus[:j["gpus"]]))
                cmd = command(j, data, run_dir)
                logf = open(out / "logs" / f"{j['name']}.txt", "w")
                logf.write("$ " + " ".join(cmd) + "\n")
                logf.flush()
                p = subprocess.Popen(cmd, cwd=run_dir, env=jenv, stdout=logf, stderr=subprocess.STDOUT,
                                     start_new_session=True)
                logf.close()
                running.append((j, p, gpus, time.perf_counter(), run_dir))
            time.sleep(0.5)
            for item in list(running):
                j, p, gpus, t0, run_dir = item
                rc, timed_out = p.poll(), False
                if rc is None and time.perf_counter() - t0 > args.job_timeout:
                    kill_group(p)
                    timed_out = True
                if rc is None and not timed_out:
                    continue
                kill_group(p)  # stragglers of the group, if any
                running.remove(item)
                free = sorted(free + gpus)
                row = collect(j, run_dir, out, p.returncode, timed_out)
                row["elapsed_s"] = time.perf_counter() - t0
                shutil.rmtree(run_dir, ignore_errors=True)
                finish(row)
    finally:
        for _, p, *_rest in running:
            kill_group(p)
        shutil.rmtree(work, ignore_errors=True)
    return rows


# ---------------------------------------------------------------------------------------------
# table, targets, plot


def merge(rows: list[dict]) -> list[dict]:
    """One row per (model, contender, GPUs, ckpt): the last ok one, else the last one."""
    by: dict = {}
    for r in rows:
        k = (r["model"], r["contender"], r["gpus"], r["ckpt"])
        if k not in by or r.get("status") == "ok" or by[k].get("status") != "ok":
            by[k] = r
    order = {c: i for i, c in enumerate(CONTENDERS)}
    ac = {"auto": 0, False: 1, True: 2}
    return sorted(by.values(), key=lambda r: (r["model"], ac.get(r["ckpt"], 3), r["gpus"], order.get(r["contender"], 9)))


def derive(rows: list[dict]) -> list[dict]:
    ok = {(r["model"], r["contender"], r["gpus"], r["ckpt"]): r for r in rows if r.get("status") == "ok"}
    for r in rows:
        for k in ("efficiency", "vs_fsdp2", "vs_ds", "peak_vs_fsdp2", "vs_best_fsdp2", "vs_best_fsdp2c"):
            r.pop(k, None)
        if r.get("status") != "ok":
            continue
        one = ok.get((r["model"], r["contender"], 1, r["ckpt"]))
        if one:
            r["efficiency"] = r["tokens_per_s_per_gpu"] / one["tokens_per_s_per_gpu"]
        if r["contender"] in BIGTRAIN:
            # against each FSDP2 baseline's best of AC off and on (whichever ran and fit)
            for other, key in (("fsdp2-peft", "vs_best_fsdp2"), ("fsdp2-peft-compile", "vs_best_fsdp2c")):
                best = max((ok[k]["tokens_per_s_per_gpu"] for k in ((r["model"], other, r["gpus"], c)
                                                                    for c in (False, True)) if k in ok), default=None)
                if best:
                    r[key] = r["tokens_per_s_per_gpu"] / best
            for other, key in (("fsdp2-peft", "vs_fsdp2"), ("ds-peft", "vs_ds")):
                o = ok.get((r["model"], other, r["gpus"], r["ckpt"]))
                if o:
                    r[key] = r["tokens_per_s_per_gpu"] / o["tokens_per_s_per_gpu"]
                    if other == "fsdp2-peft" and r.get("peak_gib") and o.get("peak_gib"):
                        r["peak_vs_fsdp2"] = r["peak_gib"] / o["peak_gib"]
    return rows


def _f(x, fmt):
    return format(x, fmt) if isinstance(x, (int, float)) and x is not None else "–"


def targets(rows: list[dict], cpu: bool) -> list[str]:
    ok = {(r["model"], r["contender"], r["gpus"], r["ckpt"]): r for r in rows if r.get("status") == "ok"}
    if cpu:
        return ["- CPU smoke run: no timing or memory claims; targets not evaluated."]
    out = []

    def mark(good: bool) -> str:
        return "**met**" if good else "**missed**"

    bts = [r for r in rows if r["contender"] == "bigtrain" and r.get("status") == "ok"]
    for r in bts:
        where = (f"{LABEL.get(r['model'], r['model'])}, {r['gpus']} GPU{'s' if r['gpus'] > 1 else ''}, "
                 f"AC {ac_label(r['ckpt'], row=r)}")
        if r["ckpt"] == "auto":  # bigtrain with no flags against the baselines' best settings
            for key, name, goal in (("vs_best_fsdp2", "eager FSDP2 + PEFT", 1.25),
                                    ("vs_best_fsdp2c", "compiled FSDP2 + PEFT", 1.10)):
                if r.get(key) is not None:
                    out.append(f"- no flags ≥ {goal:.2f}× {name} at its best AC ({where}): {r[key]:.2f}× "
                               f"{mark(r[key] >= goal)}")
            if r["model"] == "llama2-7b" and r["gpus"] == 1 and r.get("mfu") is not None:
                out.append(f"- MFU ≥ 0.70 at Llama-2-7B on 1 GPU ({where}): {r['mfu']:.3f} {mark(r['mfu'] >= 0.70)}")
            continue
        f = ok.get((r["model"], "fsdp2-peft", r["gpus"], r["ckpt"]))
        if f:
            ratio = r["tokens_per_s_per_gpu"] / f["tokens_per_s_per_gpu"]
            out.append(f"- tokens/s per GPU ≥ 1.05× fsdp2-peft ({where}): {ratio:.2f}× "
                       f"({r['tokens_per_s_per_gpu']:,.0f} vs {f['tokens_per_s_per_gpu']:,.0f}) {mark(ratio >= 1.05)}")
            if r.get("peak_gib") is not None and f.get("peak_gib") is not None:
                out.append(f"- peak per GPU ≤ fsdp2-peft's ({where}): {r['peak_gib']:.2f} vs {f['peak_gib']:.2f} GiB "
                           f"{mark(r['peak_gib'] <= f['peak_gib'])}")
        d = ok.get((r["model"], "ds-peft", r["gpus"], r["ckpt"]))
        if d:
            ratio = r["tokens_per_s_per_gpu"] / d["tokens_per_s_per_gpu"]
            out.append(f"- ≥ 2.5× ds-peft ({where}): {ratio:.2f}× "
                       f"({r['tokens_per_s_per_gpu']:,.0f} vs {d['tokens_per_s_per_gpu']:,.0f}) {mark(ratio >= 2.5)}")
        if r["gpus"] > 1 and r.get("efficiency") is not None:
            out.append(f"- weak scaling {r['gpus']} vs 1 GPU ≥ 0.95 ({where}): {r['efficiency']:.3f} "
                       f"{mark(r['efficiency'] >= 0.95)}")
        if r["model"] == "gpt3-6.7b" and r["gpus"] == 1 and r["ckpt"] != "auto":
            note = "" if not r["ckpt"] else " (with AC: recomputation not counted, for information)"
            out.append(f"- MFU ≥ 0.60 at 6.7B on 1 GPU ({where}): {r['mfu']:.3f} "
                       f"{mark(r['mfu'] >= 0.60) if not r['ckpt'] else ''}{note}")
    if not out:
        out.append("- no pair of ok rows to compare yet")
    return out


def render_md(rows: list[dict], cpu: bool) -> str:
    lines = ["| model | contender | vocab | GPUs | micro-batch/GPU | AC | tokens/s/GPU | step ms | MFU | peak GiB/GPU | "
             "weak-scaling eff. | bigtrain/fsdp2-peft | bigtrain/best fsdp2-peft | bigtrain/best fsdp2-peft-compile | "
             "bigtrain/ds-peft | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = _f(r.get("peak_gib"), ".2f")
        if r.get("peak_source", "").startswith("train_log"):
            peak += " (rank 0, train_log)"
        st = r.get("status", "?").replace("|", "/").replace("\n", " ")
        depth = f" ({r['layers']} layers)" if r.get("layers") else ""
        lines.append(f"| {LABEL.get(r['model'], r['model'])}{depth} | {r['contender']} | {_f(r.get('vocab'), ',')} | "
                     f"{r['gpus']} | {r['mb']} | {ac_label(r['ckpt'], row=r)} | "
                     f"{_f(r.get('tokens_per_s_per_gpu'), ',.0f')} | "
                     f"{_f(r.get('step_ms'), '.1f')} | {_f(r.get('mfu'), '.3f')} | {peak} | "
                     f"{_f(r.get('efficiency'), '.3f')} | {_f(r.get('vs_fsdp2'), '.2f')} | "
                     f"{_f(r.get('vs_best_fsdp2'), '.2f')} | {_f(r.get('vs_best_fsdp2c'), '.2f')} | "
                     f"{_f(r.get('vs_ds'), '.2f')} | {st[:300]} |")
    seq = rows[0]["seq"] if rows else SEQ
    skip = rows[0].get("skip_steps", BIGTRAIN_SKIP) if rows else BIGTRAIN_SKIP
    warm = rows[0].get("warmup", WARMUP) if rows else WARMUP
    r = rows[0].get("r", 8) if rows else 8
    tg = "+".join(rows[0].get("targets", ["q_proj", "v_proj"])) if rows else "q_proj+v_proj"
    lines += ["", f"Sequence {seq}; bf16 base, random weights, sdpa, LoRA r={r} α=16 on {tg}. "
              "tokens/s per GPU: bigtrain = train_log tokens_per_s / GPUs, median after the first "
              f"{skip} steps; baselines = micro-batch × sequence / step time, median after "
              f"{warm} warm-ups (slowest rank per step). MFU = tokens/s per GPU × (4·P + 8·L·s·d) / 790e12, "
              "recomputation not counted. Peak = max over ranks of torch.cuda.max_memory_allocated() "
              "(baselines: reset right after the build; bigtrain: ranks.json gpu_peak_allocated_bytes, or "
              "rank 0's train_log gpu_max_allocated_gib where marked). Weak-scaling efficiency = tokens/s "
              "per GPU at N / at 1 GPU (same contender, model, AC). Ratios: bigtrain over the baseline at "
              "the same model, GPUs and AC, or (best) over the baseline's faster of AC off and on. vocab: the "
              "vocabulary each contender's LM head computes (bigtrain pads an unaligned one to a multiple "
              "of 64 inside the run; the baselines use the model's own).", "", "## Targets", ""]
    lines += targets(rows, cpu)
    return "\n".join(lines) + "\n"


def render_png(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    colors = {"bigtrain": "tab:blue", "fsdp2-peft": "tab:orange", "ds-peft": "tab:green",
              "bigtrain-compile": "tab:purple", "bigtrain-dshooks": "tab:gray", "fsdp2-peft-compile": "tab:red",
              "bigtrain-eager": "tab:cyan"}
    markers = ["o", "s", "^", "D"]
    models = sorted({r["model"] for r in rows})
    ok = [r for r in rows if r.get("status") == "ok"]
    for (key, title), ax in zip((("tokens_per_s_per_gpu", "tokens/s per GPU"), ("peak_gib", "peak GiB per GPU")), axes):
        for c in CONTENDERS:
            for m in models:
                for ck in (False, True, "auto"):
                    pts = sorted((r["gpus"], r[key]) for r in ok if r["contender"] == c and r["model"] == m
                                 and r["ckpt"] == ck and r.get(key) is not None)
                    if not pts:
                        continue
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colors.get(c, "k"),
                            linestyle=":" if ck == "auto" else "--" if ck else "-", marker=markers[models.index(m) % 4],
                            label=f"{c} {LABEL.get(m, m)} AC {ac_label(ck)}")
        gp = sorted({r["gpus"] for r in rows})
        ax.set_xticks(gp or [1])
        ax.set_xlabel("GPUs")
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    h, lab = axes[0].get_legend_handles_labels()
    if h:
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(rows: list[dict], out: Path, cpu: bool) -> str:
    rows = derive(merge(rows))
    out.mkdir(parents=True, exist_ok=True)
    md = render_md(rows, cpu)
    (out / "scaling.md").write_text(md)
    render_png(rows, out / "scaling.png")
    return md


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="gpt3-2.7b,gpt3-6.7b")
    ap.add_argument("--contenders", default="bigtrain,fsdp2-peft,ds-peft",
                    help=f"comma-separated, of {', '.join(CONTENDERS)} (default: the first three; "
                         "bigtrain-compile adds model.compile=true, bigtrain-dshooks zero.gather=deepspeed)")
    ap.add_argument("--gpus", default="1,all", help="GPU counts, e.g. 1,2 ('all' = torch.cuda.device_count())")
    ap.add_argument("--ckpt", default="auto,off,on",
                    help="activation checkpointing: any of auto (bigtrain's default; bigtrain contenders "
                         "only), off, on (default auto,off,on)")
    ap.add_argument("--steps", type=int, default=None,
                    help="measured steps (default 6; baselines add 2 warm-ups, bigtrain skips 3)")
    ap.add_argument("--mb", type=int, default=0, help="micro-batch per GPU for every model (default 4 / 2)")
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--lora-r", type=int, default=8, help="LoRA rank for every contender (default 8)")
    ap.add_argument("--lora-targets", default="q_proj,v_proj", help="comma-separated (default q_proj,v_proj)")
    ap.add_argument("--num-layers", type=int, default=None, help="every model at this depth (model.num_layers)")
    ap.add_argument("--job-timeout", type=float, default=240.0, help="seconds per job (process group killed)")
    ap.add_argument("--no-parallel-single", dest="parallel_single", action="store_false",
                    help="do not run two 1-GPU jobs at once on different GPUs")
    ap.add_argument("--cpu", action="store_true", help="smoke: gloo, CPU, seq 64, micro-batch 2, 3 steps "
                    "(bigtrain's --ckpt off rows are left out when auto is asked too: on a CPU they are the same run)")
    ap.add_argument("--render", nargs="+", metavar="FILE.jsonl", help="re-render from saved rows")
    ap.add_argument("--out", default=os.environ.get("OUT") or "bench/results/scaling")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        worker(json.loads(args.worker))
        # the process group is destroyed, but gloo's threads can still abort the interpreter's
        # finalisation (SIGABRT, seen once on a 2-rank CPU FSDP2 worker): leave as bigtrain train does
        from bigtrain.dist import exit_after_teardown

        exit_after_teardown(0)
    out = Path(args.out)
    if args.render:
        rows = []
        for f in args.render:
            rows += [json.loads(ln) for ln in Path(f).read_text().splitlines() if ln.strip()]
        print(render(rows, out, cpu=any(r.get("cpu") for r in rows)))
        return 0
    args.models = [m for m in args.models.split(",") if m]
    args.contenders = [c for c in args.contenders.split(",") if c]
    args.lora_targets = [t for t in args.lora_targets.split(",") if t]
    bad = set(args.contenders) - set(CONTENDERS)
    if bad:
        ap.error(f"unknown contenders {sorted(bad)}; known: {CONTENDERS}")
    if args.cpu and args.gpus == "1,all":
        args.gpus = "1,2"  # processes on the CPU
    args.gpus = [g for g in args.gpus.split(",") if g]
    args.ckpt = {{"off": False, "on": True, "auto": "auto"}[c] for c in args.ckpt.split(",") if c}
    args.seq = args.seq or (64 if args.cpu else SEQ)
    args.steps = args.steps or (3 if args.cpu else 6)
    if args.cpu:
        args.mb = args.mb or 2
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.jsonl").unlink(missing_ok=True)
    rows = run_grid(args)
    md = render(rows, out, args.cpu)
    print()
    print(md, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
