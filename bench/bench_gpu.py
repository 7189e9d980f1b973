"""One-GPU throughput and memory benchmark: bigtrain against the usual LoRA / fine-tuning recipes.

Every contender gets the same model (GPT-3 shapes on the OPT architecture, random weights, bf16,
sdpa attention), the same random tokens (sequence 2048) and the same timing, each in its own
subprocess so that peak memory and DeepSpeed state never leak from one to the next:

  bigtrain          Engine(ZeroConfig(stage=3)) at world size 1, bf16 base under DeepSpeedZeRoOffload,
                    whole decoder layers as fetch units, external fp32 LoRA (r=8, α=16, q_proj+v_proj),
                    torch AdamW (fused on CUDA), bf16 autocast, bigtrain.losses.token_loss_sum
                    and zero.single_rank_plain=True (opt-in): at world size 1 every partition is a
                    whole tensor, the engine aliases it and installs no ZeRO-3 hooks
  bigtrain-hooks    Engine(ZeroConfig(stage=3)) defaults (single_rank_plain=False): ZeRO-3 fetch hooks on,
                    whole decoder layers as fetch units, default persistence threshold (the path
                    every rank takes at world size > 1)
  bigtrain-compile  (not in the default list) bigtrain with each decoder layer torch.compile'd
  bigtrain-persist  (not in the default list) hooks on, stage3_param_persistence_threshold=1e12:
                    every parameter persistent and aliased, so hooks run but never gather
  peft              plain PyTorch + PEFT LoRA (same r/targets), bf16 base, autocast, HF loss
  ds-peft           HfDeepSpeedConfig + PEFT + deepspeed.initialize ZeRO-3, bf16, DeepSpeed AdamW
  full              full fine-tuning: fp32 master weights, bf16 autocast, fused torch AdamW

MFU (one formula for all rows): model FLOPs per token = 6·P (full) or 4·P (LoRA: forward + input
gradients; adapter FLOPs neglected) plus attention 12·L·s·d (full) or 8·L·s·d (LoRA), P = all
parameters (tied embedding once), divided by 790 TFLOP/s (bf16 matmul rate measured on an H200).
Recomputation under activation checkpointing is not counted (model FLOPs, not hardware FLOPs).
Step time: median of --steps steps after --warmup warm-ups, torch.cuda.synchronize() around each.
Peak: torch.cuda.max_memory_allocated() from after the model is built (weights included) to the end.

  python bench/bench_gpu.py --out results/            # the whole table on one GPU
  python bench/bench_gpu.py --smoke --out /tmp/s      # CPU, tiny-opt, seconds (CI)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PEAK_FLOPS = 790e12
SEQ = 2048
R, ALPHA, TARGETS = 8, 16, ["q_proj", "v_proj"]
CONTENDERS = ["bigtrain", "bigtrain-hooks", "peft", "ds-peft", "full"]
LORA_CONTENDERS = {"bigtrain", "bigtrain-hooks", "bigtrain-persist", "bigtrain-compile", "peft", "ds-peft"}
MODEL_LABEL = {"gpt3-2.7b": "GPT-3 2.7B", "gpt3-6.7b": "GPT-3 6.7B", "175b-2l": "175B width, 2 layers",
               "tiny-opt": "tiny-opt (smoke)"}
ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# model and data


def hf_config(model: str, smoke: bool):
    sys.path.insert(0, str(ROOT))
    from bigtrain.presets import hf_config_for

    if model == "175b-2l":
        cfg = hf_config_for("gpt3-175b")
        cfg.num_hidden_layers = 2
        return cfg
    if model.startswith("tiny"):
        return hf_config_for(model, vocab_size=1000)
    return hf_config_for(model)


def count_params(cfg) -> int:
    from bigtrain.presets import count_parameters, meta_model

    return count_parameters(meta_model(cfg))


def flops_per_token(cfg, n_params: int, seq: int, lora: bool) -> float:
    L, d = cfg.num_hidden_layers, cfg.hidden_size
    if lora:
        return 4 * n_params + 8 * L * seq * d
    return 6 * n_params + 12 * L * seq * d


def peft_lora(model, ac: bool, r: int = R, targets=TARGETS):
    """The one PEFT LoRA recipe both PEFT baselines use (r, α, targets as bigtrain's), with
    activation checkpointing if asked, in training mode."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=ALPHA, target_modules=list(targets),
                                             lora_dropout=0.0))
    if ac:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def make_batch(cfg, mb: int, seq: int, device):
    import torch

    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(3, cfg.vocab_size, (mb, seq), generator=g).to(device)
    return ids, torch.ones_like(ids), ids.clone()


# ---------------------------------------------------------------------------------------------
# one contender, in its own process


def timed_steps(step, warmup: int, steps: int, sync) -> tuple[list[float], list[float]]:
    """Run ``step()`` warmup + steps times, ``sync()`` around each; (seconds of the timed steps,
    every step's loss)."""
    times, losses = [], []
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        loss = step()
        sync()
        dt = time.perf_counter() - t0
        losses.append(float(loss))
        if i >= warmup:
            times.append(dt)
    return times, losses


def worker(job: dict) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    torch.manual_seed(0)
    cuda = torch.cuda.is_available() and not job["smoke"]
    dev = torch.device("cuda", 0) if cuda else torch.device("cpu")
    cfg = hf_config(job["model"], job["smoke"])
    seq, mb, ac, name = job["seq"], job["mb"], job["ac"], job["contender"]
    n_params = count_params(cfg)
    ids, mask, labels = make_batch(cfg, mb, seq, dev)
    amp_dtype = torch.bfloat16
    # bf16 autocast on the GPU; fp32 on the CPU (smoke), where bf16 kernels are only slow
    autocast = torch.autocast(device_type=dev.type, dtype=amp_dtype, enabled=cuda)
    base_dtype = "bfloat16" if cuda else "float32"
    t_build = time.perf_counter()
    extra = {}

    if name.startswith("bigtrain"):
        from bigtrain.config import ZeroConfig
        from bigtrain.engine.core import Engine
        from bigtrain.inject import inject_lora
        from bigtrain.losses import token_loss_sum

        zc = ZeroConfig(stage=3, leaf_blocks=True)
        # bigtrain / bigtrain-compile: the world-size-1 fast path (opt-in); bigtrain-hooks: defaults
        zc.single_rank_plain = name in ("bigtrain", "bigtrain-compile")
        if name == "bigtrain-persist":
            zc.persistence_threshold = 10 ** 12
        eng = Engine(zc, device="cuda" if cuda else "cpu", micro_batch_size=mb)
        model = eng.build_base(cfg, dtype=base_dtype, attn_implementation="sdpa")
        lora = inject_lora(model, TARGETS, r=R, alpha=ALPHA, device=dev)
        if ac:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()  # HF checkpoints only in training mode; the presets have no dropout
        if name == "bigtrain-compile":  # torch.compile each decoder layer (LoRA hooks inside)
            from bigtrain.presets import decoder_layer_classes

            torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
            classes = tuple(decoder_layer_classes(model))
            for m in model.modules():
                if isinstance(m, classes):
                    m.compile(dynamic=False)
        opt = torch.optim.AdamW(lora.parameters(), lr=1e-4, fused=cuda)
        extra["trainable"] = lora.num_parameters()

        def step():
            with autocast:
                loss, n = token_loss_sum(model, ids, mask, labels)
            (loss / n).backward()
            eng.after_backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach() / n

    elif name in ("peft", "full"):
        import transformers as tf

        dtype = torch.float32 if name == "full" or not cuda else torch.bfloat16
        with torch.device(dev):  # random init on the GPU (on the CPU it takes minutes at 6.7B)
            model = tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
        if name == "peft":
            model = peft_lora(model, ac)
        else:
            if ac:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        extra["trainable"] = sum(p.numel() for p in params)
        opt = torch.optim.AdamW(params, lr=1e-4, fused=cuda)

        def step():
            with autocast:
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

    elif name == "ds-peft":
        import deepspeed
        import transformers as tf
        from transformers.integrations import HfDeepSpeedConfig

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
        ds = {"train_micro_batch_size_per_gpu": mb, "gradient_accumulation_steps": 1,
              "bf16": {"enabled": cuda}, "zero_optimization": {"stage": 3},
              "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}
        if cuda:
            ds["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-4}}
        else:
            ds["zero_allow_untested_optimizer"] = True
        dschf = HfDeepSpeedConfig(ds)  # noqa: F841  (must stay alive while the model is built)
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if cuda else torch.float32,
                                                    attn_implementation="sdpa")
        model = peft_lora(model, ac)
        params = [p for p in model.parameters() if p.requires_grad]
        extra["trainable"] = sum(getattr(p, "ds_numel", p.numel()) for p in params)
        client_opt = None if cuda else torch.optim.AdamW(params, lr=1e-4)  # CPU smoke: no FusedAdam
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=ds,
                                               optimizer=client_opt)

        def step():
            loss = engine(input_ids=ids, attention_mask=mask, labels=labels).loss
            engine.backward(loss)
            engine.step()
            return loss.detach()
    else:
        raise ValueError(name)

    build_s = time.perf_counter() - t_build
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        sync()
        extra["after_build_gib"] = torch.cuda.memory_allocated() / 2 ** 30
        torch.cuda.reset_peak_memory_stats()
    times, losses = timed_steps(step, job["warmup"], job["steps"], sync)
    step_s = statistics.median(times)
    tokens = mb * seq
    tps = tokens / step_s
    fpt = flops_per_token(cfg, n_params, seq, name in LORA_CONTENDERS)
    out = dict(job, params=n_params, step_ms=1000 * step_s, tokens_per_s=tps,
               mfu=tps * fpt / PEAK_FLOPS, flops_per_token=fpt, build_s=build_s,
               step_ms_all=[1000 * t for t in times], losses=losses,
               peak_gib=(torch.cuda.max_memory_allocated() / 2 ** 30) if cuda else None,
               reserved_gib=(torch.cuda.max_memory_reserved() / 2 ** 30) if cuda else None, **extra)
    if not all(math.isfinite(x) for x in losses):
        out["error"] = f"non-finite loss {losses}"
    return out


# ---------------------------------------------------------------------------------------------
# the table


def memory_floor_gib(cfg, n_params: int, trainable: int, mb: int, seq: int) -> dict:
    """Lower bound for LoRA with activation checkpointing: bf16 frozen weights + adapter state
    (16 B/param) + checkpointed layer inputs (2·s·b·h·L) + one layer's working set during its
    recompute+backward (34·s·b·h, flash/sdpa attention, Korthikanti et al. 2022) + the loss (one
    logits chunk in bf16 + fp32 + its fp32 gradient, plus the fp32 final hidden state and its
    gradient)."""
    from bigtrain.losses import CHUNK_LOGITS

    h, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    rows = min(mb * seq, max(1, CHUNK_LOGITS // V))
    parts = {"weights_bf16": 2 * n_params, "adapter_state": 16 * trainable,
             "layer_inputs": 2 * seq * mb * h * L, "one_layer": 34 * seq * mb * h,
             "loss": rows * V * (2 + 4 + 4) + 2 * 4 * mb * seq * h}
    parts = {k: v / 2 ** 30 for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


def fmt_row(r: dict) -> str:
    label = MODEL_LABEL.get(r["model"], r["model"])
    who = r["contender"] + (" + AC" if r["ac"] else "")
    if r.get("error"):
        return f"| {label} | {who} | {r['mb']} | – | – | – | – | {r['error'][:90]} |"
    peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "n/a (CPU)"
    return (f"| {label} | {who} | {r['mb']} | {r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} | "
            f"{r['mfu']:.3f} | {peak} | {r.get('run', '')} |")


def render(results: list[dict], args) -> str:
    lines = ["| model | contender | micro-batch | tokens/s | step ms | MFU | peak GiB | note |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [fmt_row(r) for r in results]
    lines.append("")
    lines.append(f"Sequence {args.seq}; median of {args.steps} steps after {args.warmup} warm-ups. "
                 "MFU = tokens/s × FLOPs/token / 790e12, FLOPs/token = 6·P + 12·L·s·d (full) or "
                 "4·P + 8·L·s·d (LoRA), P = all parameters (tied once); recomputation not counted. "
                 "Peak = torch.cuda.max_memory_allocated() after the build (weights included). "
                 "AC = activation checkpointing (non-reentrant).")
    # ratios
    by = {(r["model"], r["contender"], r["mb"], r["ac"]): r for r in results if not r.get("error")}
    ratio_lines = []
    for (m, c, mb, ac), r in by.items():
        if not c.startswith("bigtrain"):
            continue
        for other in ("peft", "ds-peft"):
            o = by.get((m, other, mb, ac))
            if o:
                ratio_lines.append(f"- {MODEL_LABEL.get(m, m)}, mb {mb}{' AC' if ac else ''}: {c} / {other} "
                                   f"= {r['tokens_per_s'] / o['tokens_per_s']:.2f}×")
    if ratio_lines:
        lines += ["", "Throughput ratios:"] + ratio_lines
    mem = [r for r in results if r.get("floor")]
    if mem:
        lines += ["", "Memory at micro-batch {} with activation checkpointing (GiB):".format(mem[0]["mb"])]
        for r in mem:
            f = r["floor"]
            lines.append(f"- {MODEL_LABEL.get(r['model'], r['model'])} {r['contender']}: peak "
                         f"{r['peak_gib']:.1f} vs floor {f['total']:.1f} (bf16 weights {f['weights_bf16']:.1f}"
                         f" + adapter state {f['adapter_state']:.2f} + layer inputs {f['layer_inputs']:.2f}"
                         f" + one layer {f['one_layer']:.2f} + loss {f['loss']:.2f})")
        for r in results:
            if r["contender"] in ("peft", "full") and r["ac"] and not r.get("error") and r.get("peak_gib"):
                lines.append(f"- {MODEL_LABEL.get(r['model'], r['model'])} {r['contender']} + AC: peak "
                             f"{r['peak_gib']:.1f}")
    return "\n".join(lines) + "\n"


def plan(args) -> list[dict]:
    if args.smoke:
        jobs = [dict(model="tiny-opt", contender=c, mb=2, ac=ac) for c in args.contenders
                for ac in ([False, True] if c == "bigtrain" else [False])]
    else:
        mbs = {"gpt3-2.7b": 4, "gpt3-6.7b": 2, "175b-2l": 1}
        jobs = []
        for m in args.models:
            jobs += [dict(model=m, contender=c, mb=args.mb or mbs.get(m, 1), ac=False) for c in args.contenders]
            if args.memory and m == "gpt3-6.7b":  # item 3: 6.7B, micro-batch 2, activation checkpointing
                jobs += [dict(model="gpt3-6.7b", contender=c, mb=2, ac=True, memory=True)
                         for c in args.memory_contenders]
    for j in jobs:
        j.update(seq=args.seq, steps=args.steps, warmup=args.warmup, smoke=args.smoke)
    return jobs


def fits(job: dict, gpu_gib: float | None) -> str | None:
    """Reason to skip full fine-tuning that cannot fit (16 B/param of model state alone)."""
    if job["contender"] != "full" or gpu_gib is None:
        return None
    cfg = hf_config(job["model"], job["smoke"])
    need = 16 * count_params(cfg) / 2 ** 30
    if need > 0.9 * gpu_gib:
        return f"skipped: full fine-tuning needs {need:.0f} GiB of model state, GPU has {gpu_gib:.0f}"
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny-opt, a few steps (CI)")
    ap.add_argument("--models", default="gpt3-2.7b,gpt3-6.7b,175b-2l")
    ap.add_argument("--contenders", default=",".join(CONTENDERS))
    ap.add_argument("--mb", type=int, default=0, help="micro-batch for every model (default 4/2/1)")
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--memory", action="store_true", help="add 6.7B mb 2 activation-checkpointing rows")
    ap.add_argument("--memory-contenders", default="bigtrain,bigtrain-hooks,peft,full")
    ap.add_argument("--budget-s", type=float, default=None, help="time limit per contender process")
    ap.add_argument("--deadline-s", type=float, default=0,
                    help="whole-run limit: jobs that would start after it are listed as not run")
    ap.add_argument("--render", nargs="+", help="re-render the table from results.json files (merged)")
    ap.add_argument("--out", default=os.environ.get("OUT") or "bench/results")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        job = json.loads(args.worker)
        try:
            res = worker(job)
        except Exception as e:  # report, never hang the table
            import traceback

            traceback.print_exc()
            msg = str(e).strip().splitlines()
            res = dict(job, error=f"{type(e).__name__}: {msg[-1] if msg else ''}")
        print("RESULT " + json.dumps(res), flush=True)
        return 0

    if args.render:
        merged = []
        for f in args.render:
            merged += json.loads(Path(f).read_text())
        first = next((r for r in merged if not r.get("error")), merged[0])
        args.seq, args.steps, args.warmup = first["seq"], first["steps"], first["warmup"]
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(merged, indent=1))
        (out / "results.md").write_text(render(merged, args))
        print(render(merged, args))
        return 0
    args.contenders = [c for c in args.contenders.split(",") if c]
    args.memory_contenders = [c for c in args.memory_contenders.split(",") if c]
    args.models = [m for m in args.models.split(",") if m]
    args.seq = args.seq or (32 if args.smoke else SEQ)
    args.steps = args.steps or (2 if args.smoke else 6)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 2)
    args.budget_s = args.budget_s or (120 if args.smoke else 150)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu_gib = None
    if not args.smoke:
        import torch

        if torch.cuda.is_available():
            gpu_gib = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
            print(f"# {torch.cuda.get_device_name(0)}, {gpu_gib:.0f} GiB, torch {torch.__version__}", flush=True)
    results = []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in
               os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.perf_counter()

    def run_job(job: dict) -> dict:
        skip = fits(job, gpu_gib)
        t0 = time.perf_counter()
        budget = args.budget_s
        if args.deadline_s:
            budget = min(budget, args.deadline_s - (t0 - start))
            if budget < 20:
                skip = "not run: the run's --deadline-s was reached"
        if skip:
            res = dict(job, error=skip)
        else:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=budget, env=env)
                got = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
                if got:
                    res = json.loads(got[-1][len("RESULT "):])
                else:
                    tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
                    res = dict(job, error=f"exit {p.returncode}: {' / '.join(tail)[-200:]}")
                if res.get("error"):
                    with (out / "errors.log").open("a") as f:
                        f.write(f"== {job}\n{p.stderr[-4000:]}\n")
            except subprocess.TimeoutExpired:
                res = dict(job, error=f"over its {budget:.0f} s budget")
        res["wall_s"] = time.perf_counter() - t0
        if job.get("memory") and not res.get("error") and job["contender"].startswith("bigtrain"):
            cfg = hf_config(job["model"], job["smoke"])
            res["floor"] = memory_floor_gib(cfg, res["params"], res["trainable"], job["mb"], job["seq"])
        return res

    jobs = plan(args)
    if args.smoke:
        # the CPU smoke makes no timing claims: its workers run one thread each, as many at a time
        # as there are cores (each is mostly its imports); the rows keep the plan's order
        from concurrent.futures import ThreadPoolExecutor

        env["OMP_NUM_THREADS"] = "1"
        pool = ThreadPoolExecutor(max(1, min(len(jobs), os.cpu_count() or 1)))
        futures = [pool.submit(run_job, j) for j in jobs]
        pending = (f.result() for f in futures)
    else:  # one at a time: each job's timing and peak memory are its own
        pool = None
        pending = (run_job(j) for j in jobs)
    for res in pending:
        results.append(res)
        line = fmt_row(res)
        print(line + f" ({res['wall_s']:.0f} s)", flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))
        (out / "results.md").write_text(render(results, args))
    if pool is not None:
        pool.shutdown()
    print()
    print(render(results, args), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
