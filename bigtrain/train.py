"""The training loop: one loop for a ZeRO-3-partitioned (or whole) frozen base with replicated adapters.

Read top to bottom, :func:`train` does:
  1. start the process group and build the frozen base (engine.py, over dist.py, zero3.py and loader.py);
  2. attach LoRA adapters beside it, make them identical on every rank, AdamW over them;
  3. load data; resume from the last good checkpoint if there is one;
  4. per optimizer step: count the step's target tokens on all ranks, forward/backward each
     micro-batch with loss_sum / global_tokens, one flat all-reduce of the adapter gradients (plus
     the loss and a preemption flag), clip, step (or skip a non-finite step on every rank together);
  5. log, evaluate, checkpoint; on SIGTERM/SIGUSR1 save at the step boundary and exit cleanly.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from . import checkpoint as ckpt
from .config import Config, ConfigError
from .data import DataError, collate, load_examples, load_tokenizer
from .engine import DTYPES, Engine
from .export import merge_live
from .inject import find_targets, inject_lora, output_layer_names, parameter_report
from .losses import token_loss_sum
from .memory import GiB, Setup, format_savings, measure_states, predict_states, run_savings
from .metrics import Loggers, lora_flops_per_token, peak_tflops
from .presets import count_parameters, hf_config_for, meta_model
from .vocab import run_config as pad_vocab
from .sampler import GlobalSampler, rank_micro_batches
from .zero3 import check_world


class Preemption:
    """Remembers that SIGTERM or SIGUSR1 arrived; the loop acts on it at the next step boundary."""

    def __init__(self, pending: list[int] | None = None):
        self.signum = pending[-1] if pending else 0  # caught by the CLI before torch was imported
        for s in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(s, self._handler)

    def _handler(self, signum, frame):
        self.signum = signum


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_lambda(cfg, step: int) -> float:
    """Multiplier of train.lr at optimizer step ``step``: linear warm-up, then decay to min_lr_ratio."""
    t = cfg.train
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if t.schedule == "cosine" else 1 - progress
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * decay


def train(cfg: Config, pending_signals: list[int] | None = None) -> dict:
    t = cfg.train
    # SIGTERM/SIGUSR1 from here on (and those `bigtrain train` caught while importing, passed in
    # ``pending_signals``) are acted on at the first step boundary: a preemption notice during the
    # (long, at scale) start-up must not kill the job or be dropped
    preempt = Preemption(pending_signals)
    # -- 0. everything that can fail on bad input, before any process group or model exists --------
    model_path = cfg.model.local_path
    tokenizer = load_tokenizer(cfg.model.tokenizer or _tokenizer_dir(model_path))
    hf_config = _hf_config(cfg, model_path, len(tokenizer))
    meta = meta_model(hf_config)  # shapes only: for the target check and the memory prediction
    try:
        targets = find_targets(meta, cfg.lora.targets)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    # the run's model: the vocabulary padded to a multiple of 64 (a faster LM-head GEMM); only the
    # real vocabulary's logits enter the loss, and nothing written outside the run is padded
    vocab = int(hf_config.vocab_size)
    build_config = pad_vocab(hf_config, head_is_target=bool(set(targets) & output_layer_names(meta)))
    base_params = count_parameters(meta)  # the real model's, for FLOPs
    if build_config is not hf_config:
        meta = meta_model(build_config)
    check_world(cfg.zero, t.device)
    _check_positions(cfg, hf_config)
    explicit_resume = _check_resume_choice(cfg, Path(t.output_dir) / "checkpoints")
    train_ds, train_stats = load_examples(cfg.data.train, tokenizer, cfg.data)
    eval_ds = load_examples(cfg.data.eval, tokenizer, cfg.data)[0] if cfg.data.eval else None

    # -- 1. process group and frozen base --------------------------------------------------------
    engine = Engine(cfg.zero, t.device, t.micro_batch_size, t.grad_accum)
    info, dev = engine.info, engine.info.device
    out_dir = Path(t.output_dir)
    ckpt_root = out_dir / "checkpoints"
    say = print if info.is_main else (lambda *a, **k: None)
    host = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    print(f"[bigtrain] rank {info.rank}/{info.world_size} on host {host} device {dev}", flush=True)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg.dump(out_dir / "config.yaml")
        for name in ckpt.clean_partial(ckpt_root):
            say(f"[bigtrain] removed {name}: left by a save that did not finish")
    _check_same_data(engine, cfg, train_stats, eval_ds)
    say(f"[bigtrain] train data {cfg.data.train}: {train_stats['examples']} examples, "
        f"{train_stats.get('skipped', 0)} skipped, {train_stats.get('truncated', 0)} truncated")

    set_seed(t.seed)
    model = engine.build_base(build_config, model_path, cfg.model.dtype, cfg.model.attn_implementation, vocab)
    if build_config is not hf_config:
        say(f"[bigtrain] vocabulary {vocab:,} padded to {build_config.vocab_size:,} inside the run "
            f"(zero rows, masked out of the loss; checkpoints and merges keep {vocab:,})")
    for note in engine.ds_config_notes:
        say(f"[bigtrain] DeepSpeed config: {note}")
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # transformers only recomputes in training mode; the base has no dropout left

    # -- 2. adapters, identical on every rank ----------------------------------------------------
    set_seed(t.seed)
    lora = inject_lora(model, cfg.lora.targets, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout,
                       cfg.lora.rslora, DTYPES[cfg.lora.dtype], dev)
    params = list(lora.parameters())
    engine.broadcast_(params)
    set_seed(t.seed + 1_000_003 * info.rank)  # per-rank stream for LoRA dropout
    if cfg.model.compile:  # after the LoRA hooks exist: they are traced into each layer's graph
        from .compile import compile_layers

        say(f"[bigtrain] model.compile: {compile_layers(model)} decoder layers torch.compile'd "
            f"(dynamic=False); the first steps compile them")
    report = parameter_report(model, lora)
    say(f"[bigtrain] {report['trainable']:,} trainable adapter parameters "
        f"({len(lora.names())} modules, r={cfg.lora.r}) over a frozen base of {report['base']:,} "
        f"({report['trainable_pct']:.4f}% trainable); base bytes on this rank: "
        f"{engine.local_param_bytes(model):,}")
    predicted = predict_states(meta, cfg.lora.targets, cfg.lora.r, info.world_size, cfg.model.dtype,
                               engine.persistence_threshold, cfg.zero.stage, cfg.lora.dtype, engine.hpz_size)
    say("[bigtrain] predicted model states per rank: " + _fmt_bytes(predicted))
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay,
                                  fused=dev.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(cfg, s))
    at_start = measure_states(model, lora, optimizer)  # no gradients or Adam moments exist yet
    say("[bigtrain] model states on rank 0 at start, predicted/measured: " + ", ".join(
        f"{k} {predicted[k]:,}/{at_start[k]:,}" for k in ("frozen_weights", "trainable_weights"))
        + " bytes (gradients, optimizer state and whole copies of persistent parameters appear at "
        "the first step; all are compared at the end)")

    # -- 3. data and resume ----------------------------------------------------------------------
    sampler = GlobalSampler(len(train_ds), t.seed)
    global_batch = t.micro_batch_size * t.grad_accum * info.world_size
    pad_id = tokenizer.pad_token_id

    fingerprint = ckpt.base_fingerprint(hf_config, model_path, cfg.model.preset, t.seed)
    state = {"step": 0, "position": 0, "bad_steps": 0, "tokens": 0, "wandb_id": None}
    resume_from = (_latest_resumable(ckpt_root, engine, say) if cfg.checkpoint.resume == "auto"
                   else explicit_resume)
    if resume_from is not None:
        ckpt.check_base(resume_from, fingerprint, cfg.checkpoint.force_base_mismatch)
        saved = ckpt.load_checkpoint(resume_from, lora, optimizer, info.rank)
        scheduler.load_state_dict(saved["scheduler"])
        for note in _apply_changed_hparams(cfg, optimizer, scheduler):
            say(f"[bigtrain] {note}")
        state.update({k: saved[k] for k in state if k in saved})
        say(f"[bigtrain] resumed from {resume_from} at step {state['step']} "
            f"(sample {state['position']}, saved with {saved['world_size']} ranks, now {info.world_size})")
        if info.is_main:
            (out_dir / "preempted").unlink(missing_ok=True)

    loggers = Loggers.build(cfg.logging, out_dir, cfg.to_dict(), info.is_main, state["wandb_id"])
    state["wandb_id"] = loggers.wandb_id
    loggers.summary({f"memory/{k}_start_measured": v for k, v in at_start.items()})
    use_bf16 = t.precision == "bf16" or (t.precision == "auto" and dev.type == "cuda"
                                         and torch.cuda.is_bf16_supported())
    autocast = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    peak = peak_tflops(torch.cuda.get_device_name(dev)) if dev.type == "cuda" else None
    flops_per_token = lora_flops_per_token(base_params, getattr(hf_config, "num_hidden_layers", 0),
                                           getattr(hf_config, "hidden_size", 0), cfg.data.max_length)

    def save(step: int) -> Path:
        assert all(torch.isfinite(p).all() for p in params), "non-finite adapter weights: not saved"
        digests = engine.replica_digests(params)
        if len(set(digests)) != 1:  # replicas drifted: a bug or a hardware fault; never save that
            raise RuntimeError(f"adapters differ across ranks at step {step}: sha256 per rank {digests}")
        path = ckpt.save_checkpoint(
            ckpt_root, step, engine, lora, optimizer,
            {**state, "scheduler": scheduler.state_dict()},
            adapter_config(cfg, lora), fingerprint, yaml.safe_dump(cfg.to_dict(), sort_keys=False),
            cfg.checkpoint.keep)
        size = (path / ckpt.ADAPTER_FILE).stat().st_size
        say(f"[bigtrain] checkpoint {path} (adapter {size / 1e6:.3f} MB, whole {ckpt.dir_size(path) / 1e6:.3f} MB)")
        return path

    # -- 4. the loop -----------------------------------------------------------------------------
    if eval_ds is not None and state["step"] == 0:  # the base model's own score, for reference
        base_eval = evaluate(model, eval_ds, engine, cfg, autocast, pad_id, vocab)
        loggers.log({"eval_loss": base_eval}, 0)
        say(f"[bigtrain] step 0 (adapters are zero: the base model): eval loss {base_eval:.4f}")
    bar = _progress(cfg, state["step"], info.is_main)
    window = {"loss": 0.0, "steps": 0, "tokens": 0, "t0": time.perf_counter()}
    last_eval, last_save, measured = None, None, None
    save_clock = time.monotonic()  # rank 0's clock decides time-based saves (checkpoint.every_minutes)
    while state["step"] < t.max_steps:
        step_idx = sampler.take(state["position"], global_batch)
        micro = [collate([train_ds[i] for i in idx], pad_id)
                 for idx in rank_micro_batches(step_idx, t.micro_batch_size, t.grad_accum,
                                               info.rank, info.world_size)]
        local_targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        local_tokens = sum(int(b["attention_mask"].sum()) for b in micro)
        global_targets, global_tokens = engine.all_reduce_scalars([local_targets, local_tokens])

        loss_sum = torch.zeros((), dtype=torch.float32, device=dev)
        for b in micro:
            b = {k: v.to(dev, non_blocking=True) for k, v in b.items()}
            with autocast():
                ls, _ = token_loss_sum(model, b["input_ids"], b["attention_mask"], b["labels"], vocab)
            if _inject_nan(state["step"] + 1, info.rank):
                ls = ls * float("nan")
            (ls / max(global_targets, 1)).backward()
            engine.after_backward()
            loss_sum += ls.detach().float()

        # One flat all-reduce: adapter gradients, the loss, whether any rank was signalled, and
        # whether rank 0's clock says a time-based checkpoint is due (so every rank agrees).
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        due = (info.is_main and cfg.checkpoint.every_minutes > 0
               and time.monotonic() - save_clock >= 60 * cfg.checkpoint.every_minutes)
        extras = torch.tensor([0.0, float(preempt.signum != 0), float(due)], device=dev)
        extras[0] = loss_sum
        engine.all_reduce_sum_(grads + [extras])
        for p, g in zip(params, grads):
            p.grad = g
        if state["step"] + 1 == t.max_steps:  # steady state: grads and Adam moments all live
            measured = measure_states(model, lora, optimizer)
        step_loss = extras[0].item() / max(global_targets, 1)
        stop_requested = extras[1].item() > 0 or state["step"] + 1 == t.stop_at_step
        save_due = extras[2].item() > 0
        grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm if t.max_grad_norm > 0 else float("inf"))
        state["position"] += global_batch
        state["tokens"] += int(global_tokens)

        if not (math.isfinite(step_loss) and torch.isfinite(grad_norm)):
            # Every rank sees the same summed values, so every rank skips this step together.
            optimizer.zero_grad(set_to_none=True)
            state["bad_steps"] += 1
            say(f"[bigtrain] step {state['step'] + 1}: non-finite loss/gradient, skipped "
                f"({state['bad_steps']}/{t.max_bad_steps} allowed)")
            loggers.log({"bad_steps": state["bad_steps"]}, state["step"])
            if state["bad_steps"] > t.max_bad_steps:
                raise FloatingPointError(f"more than train.max_bad_steps={t.max_bad_steps} non-finite steps")
            continue
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        step = state["step"]
        window["loss"] += step_loss
        window["steps"] += 1
        window["tokens"] += int(global_tokens)
        bar.update(1)

        if step % t.log_every == 0 or step == t.max_steps:
            dt = time.perf_counter() - window["t0"]
            tps = window["tokens"] / dt
            m = {"loss": window["loss"] / window["steps"], "lr": scheduler.get_last_lr()[0],
                 "grad_norm": float(grad_norm), "tokens_per_s": tps, "epoch": sampler.epoch(state["position"]),
                 "samples": state["position"]}
            if dev.type == "cuda":
                m["gpu_max_allocated_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
                m["gpu_max_reserved_gib"] = torch.cuda.max_memory_reserved(dev) / 2**30
                if peak:
                    m["mfu"] = tps / info.world_size * flops_per_token / (peak * 1e12)
            loggers.log(m, step)
            bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{tps:,.0f}")
            window = {"loss": 0.0, "steps": 0, "tokens": 0, "t0": time.perf_counter()}
        if eval_ds is not None and ((t.eval_every and step % t.eval_every == 0) or step == t.max_steps):
            last_eval = evaluate(model, eval_ds, engine, cfg, autocast, pad_id, vocab)
            loggers.log({"eval_loss": last_eval}, step)
            say(f"\n[bigtrain] step {step}: eval loss {last_eval:.4f}")
        if (stop_requested or save_due or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0)
                or step == t.max_steps):
            last_save = save(step)
            save_clock = time.monotonic()
        if stop_requested and step < t.max_steps:  # at the last step the run just ends: done
            bar.close()
            if info.is_main:
                (out_dir / "preempted").write_text(f"{step}\n")
            say(f"[bigtrain] stopped early ({'signal' if preempt.signum else 'train.stop_at_step'}): saved step {step}; rerun the same command to resume")
            loggers.close()
            engine.close()
            return {"step": step, "preempted": True, "checkpoint": str(last_save)}
    bar.close()

    # -- 5. the end ------------------------------------------------------------------------------
    if measured is not None:
        say("[bigtrain] model states on rank 0, predicted vs measured: " + ", ".join(
            f"{k} {predicted[k]:,}/{measured[k]:,}" for k in measured))
        loggers.summary({f"memory/{k}_{w}": d[k] for k in measured
                         for w, d in (("predicted", predicted), ("measured", measured))})
    ranks = rank_report(engine, model, params, optimizer, host)
    if info.is_main:
        (out_dir / "ranks.json").write_text(json.dumps(ranks, indent=1))
    _report_savings(cfg, meta, info.world_size, ranks, measured, engine, loggers, say)
    if last_save is None:  # resumed at max_steps: nothing new, keep the checkpoint there
        last_save = ckpt.find_resumable(ckpt_root, say)
    if cfg.checkpoint.merge_at_end:  # every rank: the base is gathered tensor by tensor
        st = merge_live(model, lora, engine, out_dir / "merged", tokenizer, _tokenizer_dir(model_path),
                        cfg.checkpoint.merge_max_shard_size, progress=cfg.logging.progress_bar, vocab=vocab)
        if st is not None:
            say(f"[bigtrain] merged model (W0 + s·B·A, {st['merged_weights']} weights) written to {st['out']}: "
                f"{len(st['shards'])} shard(s), {st['total_bytes']:,} bytes")
    size = (last_save / ckpt.ADAPTER_FILE).stat().st_size if last_save else 0
    result = {"step": state["step"], "eval_loss": last_eval, "checkpoint": str(last_save),
              "adapter_bytes": size, "trainable_params": report["trainable"], "bad_steps": state["bad_steps"]}
    if cfg.model.compile:
        from torch._dynamo.utils import counters

        result["compile_graph_breaks"] = sum(counters["graph_break"].values())
        say(f"[bigtrain] model.compile: {counters['stats']['unique_graphs']} graphs compiled, "
            f"{result['compile_graph_breaks']} graph breaks")
    loggers.summary(result)
    loggers.close()
    say(f"[bigtrain] done: {state['step']} steps; adapter written to {last_save / ckpt.ADAPTER_FILE if last_save else '-'} "
        f"({size / 1e6:.3f} MB)")
    engine.close()
    return result


def rank_report(engine: Engine, model, params, optimizer, host: str) -> list[dict]:
    """Per rank: where it ran, base bytes it holds, and digests of its adapter and optimizer state."""
    opt_tensors = [v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    dev = engine.info.device
    mine = {"rank": engine.info.rank, "host": host, "base_param_bytes": engine.local_param_bytes(model),
            "gpu_peak_allocated_bytes": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None,
            "adapter_elems": sum(p.numel() for p in params),
            "optimizer_state_elems": sum(v.numel() for v in opt_tensors)}
    out = engine.all_gather_objects(mine)
    for d, a, o in zip(out, engine.replica_digests(params), engine.replica_digests(opt_tensors)):
        d["adapter_sha256"], d["optimizer_sha256"] = a, o
    return out


def _report_savings(cfg: Config, meta, world: int, ranks: list[dict], measured: dict | None,
                    engine: Engine, loggers, say) -> None:
    """The VRAM LoRA saved in this run: its measured peak per GPU (the largest over ranks) beside the
    estimate for full fine-tuning with Adam of the same model on the same GPUs; printed, and sent to
    W&B as summary values and a table."""
    peaks = [r["gpu_peak_allocated_bytes"] for r in ranks if r.get("gpu_peak_allocated_bytes")]
    st = Setup(world_size=world, zero_stage=3 if cfg.zero.stage == 3 else 0,
               micro_batch=cfg.train.micro_batch_size, seq_len=cfg.data.max_length,
               checkpointing=cfg.model.gradient_checkpointing, lora_r=cfg.lora.r,
               lora_targets=tuple(cfg.lora.targets), dtype=cfg.model.dtype,
               persistence_threshold=engine.persistence_threshold, hpz=engine.hpz_size,
               include_context=False)  # allocated bytes, as torch.cuda.max_memory_allocated counts
    try:
        sv = run_savings(meta, st, max(peaks) if peaks else None, measured)
    except (KeyError, ValueError) as e:  # a model the estimator does not know
        say(f"[bigtrain] memory: no estimate for this model ({e})")
        return
    say("[bigtrain] " + format_savings(sv))
    loggers.summary({f"memory/{k}": v for k, v in sv.items()})
    if "ratio" in sv:
        loggers.table("memory/savings", ["basis", "ranks", "lora_measured_GiB", "lora_estimated_peak_GiB",
                                         "full_ft_estimated_GiB", "saved_GiB", "ratio"],
                      [[sv["basis"], world, sv["lora_measured_bytes"] / GiB, sv["lora_estimated_peak_bytes"] / GiB,
                        sv["full_ft_estimated_bytes"] / GiB, sv["saved_bytes"] / GiB, sv["ratio"]]])


@torch.no_grad()
def evaluate(model, eval_ds, engine: Engine, cfg: Config, autocast, pad_id: int, vocab: int | None = None) -> float:
    """Mean token loss over the first ``train.eval_examples`` examples of the eval set, each scored
    once, split over the ranks. Every rank runs the same number of forwards (ZeRO-3's gathers are
    collective): the last batches are filled with example 0 with its loss masked out, so the figure
    does not depend on the micro-batch size or the world size."""
    info, m = engine.info, cfg.train.micro_batch_size
    n = len(eval_ds) if cfg.train.eval_examples == 0 else min(cfg.train.eval_examples, len(eval_ds))
    total, count = 0.0, 0
    for bi in range(math.ceil(n / (m * info.world_size))):
        base = (bi * info.world_size + info.rank) * m
        rows = []
        for i in range(base, base + m):
            ex = dict(eval_ds[i if i < n else 0])
            if i >= n:  # filler: keeps the forward count equal on every rank, scores nothing
                ex["labels"] = [-100] * len(ex["labels"])
            rows.append(ex)
        b = {k: v.to(info.device) for k, v in collate(rows, pad_id).items()}
        with autocast():
            ls, c = token_loss_sum(model, b["input_ids"], b["attention_mask"], b["labels"], vocab)
        total += float(ls)
        count += c
    engine.after_backward()
    total, count = engine.all_reduce_scalars([total, count])
    return total / max(count, 1)


def _check_same_data(engine: Engine, cfg: Config, stats: dict, eval_ds) -> None:
    """Every rank read its own copy of the data (node-local disks, a stale copy on one node...).
    The global sample order assumes they are the same: compare a summary across ranks and, if any
    differs, every rank raises the same error (after also serving as the start-up barrier)."""
    mine = {k: stats.get(k) for k in ("examples", "skipped", "rows", "tokens", "target_tokens")}
    mine["eval_rows"] = len(eval_ds) if eval_ds is not None else None
    seen = engine.all_gather_objects(mine)
    if any(s != seen[0] for s in seen):
        diff = "; ".join(f"rank {r}: " + ", ".join(f"{k} {v}" for k, v in s.items()) for r, s in enumerate(seen))
        raise DataError(f"data.train {cfg.data.train} / data.eval {cfg.data.eval}: the ranks read "
                        f"different data ({diff}); every rank must see the same files")


def adapter_config(cfg: Config, lora) -> dict:
    return {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "dropout": cfg.lora.dropout,
            "rslora": cfg.lora.rslora, "targets": cfg.lora.targets, "modules": lora.names(),
            "base_model": cfg.model.path or f"preset:{cfg.model.preset}", "dtype": cfg.lora.dtype}


def _check_positions(cfg: Config, hf_config) -> None:
    """data.max_length beyond the model's position table fails deep in the first forward pass
    ("index out of range in self") on every rank: say so before any work, naming both."""
    limit = getattr(hf_config, "max_position_embeddings", None) or getattr(hf_config, "n_positions", None)
    if limit and cfg.data.max_length > limit:
        raise ConfigError(f"data.max_length={cfg.data.max_length} exceeds the model's "
                          f"{limit} positions (max_position_embeddings of {cfg.model.local_path or cfg.model.preset}); "
                          f"set data.max_length <= {limit}")


def _check_resume_choice(cfg: Config, root: Path) -> Path | None:
    """checkpoint.resume, checked before any process group: an explicit checkpoint (or a run dir:
    its latest) must exist and verify, with no silent fallback; ``never`` refuses an output_dir that
    already holds another run's checkpoints (pruning and a later auto-resume would mix the two)."""
    mode = cfg.checkpoint.resume
    if mode == "never":
        old = ckpt.list_checkpoints(root) if root.is_dir() else []
        if old:
            raise ConfigError(
                f"checkpoint.resume=never, but {root} already holds checkpoints of an earlier run "
                f"(newest {old[0].name}): a fresh run there would prune them together with its own "
                f"and a later checkpoint.resume=auto could pick theirs up. Use another "
                f"train.output_dir, remove {root}, or checkpoint.resume=auto to continue that run")
        return None
    if mode == "auto":
        return None
    from .export import resolve_checkpoint  # a checkpoint dir, a run dir or its checkpoints/ dir

    try:
        p = resolve_checkpoint(mode)
        ckpt.verify(p)
    except (OSError, ckpt.CheckpointError) as e:
        raise ConfigError(f"checkpoint.resume={mode}: {e}") from None
    return p


def _apply_changed_hparams(cfg: Config, optimizer, scheduler) -> list[str]:
    """The optimizer and scheduler state of a checkpoint carry the lr, weight decay and betas they
    were saved with; a resumed run uses the config's (what its config.yaml records), and says so.
    Nothing is touched when they agree, so an unchanged resume stays bit-exact."""
    t, notes = cfg.train, []
    for g in optimizer.param_groups:
        for key, name, new in (("initial_lr", "train.lr", t.lr), ("weight_decay", "train.weight_decay",
                                                                   t.weight_decay),
                               ("betas", "train.betas", tuple(t.betas))):
            old = g.get(key)
            old = tuple(old) if isinstance(old, list) else old
            if old is not None and old != new:
                notes.append(f"{name} changed on resume: {old} -> {new} (the config's value is used)")
                g[key] = new
    if any(b != t.lr for b in scheduler.base_lrs):
        scheduler.base_lrs = [t.lr] * len(scheduler.base_lrs)
        lr = t.lr * lr_lambda(cfg, scheduler.last_epoch)  # what LambdaLR computes for this step
        for g in optimizer.param_groups:
            g["lr"] = lr
        scheduler._last_lr = [lr] * len(optimizer.param_groups)
    return sorted(set(notes))


def _latest_resumable(root: Path, engine: Engine, say) -> Path | None:
    """checkpoint.resume=auto: the newest checkpoint under ``root`` that verifies, as rank 0 sees it."""
    choice = ckpt.find_resumable(root, say) if engine.info.is_main else None
    choice = engine.all_gather_objects(str(choice) if choice else None)[0]  # rank 0 decides
    return Path(choice) if choice else None


def _fmt_bytes(d: dict) -> str:
    return ", ".join(f"{k} {v / 2**20:,.2f} MiB" for k, v in d.items())


_FIRED: set[str] = set()


def _inject_nan(step: int, rank: int) -> bool:
    """Fault injection for tests: BIGTRAIN_FAULT_NAN="STEP:RANK[,STEP:RANK]" poisons that rank's loss
    the first time optimizer step STEP is attempted (a skipped step is retried on the next batch)."""
    key = f"{step}:{rank}"
    if key in os.environ.get("BIGTRAIN_FAULT_NAN", "").split(",") and key not in _FIRED:
        _FIRED.add(key)
        return True
    return False


def _hf_config(cfg: Config, model_path: str | None, vocab: int):
    if model_path:
        import transformers as tf

        hf_config = tf.AutoConfig.from_pretrained(model_path)
    else:
        hf_config = hf_config_for(cfg.model.preset, vocab_size=vocab)
    if vocab > hf_config.vocab_size:
        raise ConfigError(f"model.tokenizer: {vocab} tokens, more than the model's vocab_size "
                          f"{hf_config.vocab_size}; use the model's own tokenizer")
    return hf_config


def _tokenizer_dir(model_path: str | None) -> str | None:
    if model_path and any((Path(model_path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return model_path
    return None


def _progress(cfg: Config, initial: int, is_main: bool):
    if is_main and cfg.logging.progress_bar:
        from tqdm import tqdm

        return tqdm(total=cfg.train.max_steps, initial=initial, desc="train", unit="step",
                    dynamic_ncols=True, file=sys.stderr)

    class _Null:
        def update(self, n): ...
        def set_postfix(self, **k): ...
        def close(self): ...

    return _Null()
