"""One place builds a run: :func:`build_run` turns a :class:`~bigtrain.config.Config` into a
:class:`Run` that ``bigtrain train`` (the loop, trainer.py) and ``bigtrain measure`` use as it is;
``bigtrain generate``/``eval`` build their session from the same pieces (:func:`model_config`,
:func:`set_seed`, :func:`autocast_for`). In order:

0. :func:`check_inputs`: every check that can fail on bad input (preflight.py), the tokenizer, the
   model's config, the data and the fingerprints a resume is checked against, before any process
   group or model exists;
1. the process group and the frozen base (the engine package: DeepSpeed, the loader), the output
   folder's lock, the compile and activation-checkpointing decisions;
2. the LoRA adapters beside the base, identical on every rank, and AdamW over them;
3. the data order, a resume from the last good checkpoint if there is one;
4. the loggers (a resumed run continues its W&B run).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import datasets
import numpy as np
import torch
import transformers
import yaml

from . import checkpoint as ckpt
from . import longctx, preflight, recompute, seqpar
from .compile import compile_layers, pad_multiple, use_shared_cache
from .compile import resolve as compile_setting
from .config import Config, ConfigError
from .data import (DataError, load_examples, load_tokenizer, skipped_summary, source_path, tokenizer_fingerprint,
                   tokenizer_source)
from .dist import detect_world, new_groups
from .engine.core import DTYPES, Engine
from .evaluate import sample_prompts
from .inject import find_targets, inject_lora, output_layer_names, parameter_report
from .loader import checkpoint_files
from .lora import AdapterSpec
from .memory import (GiB, estimate, host_offload_budget, layer_input_bytes, measure_states, model_shape,
                     predict_states, setup_for_run)
from .metrics import Loggers, lora_flops_per_token, peak_tflops
from .presets import count_parameters, hf_config_for, meta_model
from .progress import use_bar
from .runlock import RunLock, RunLocked
from .sampler import GlobalSampler
from .signals import PreemptedBeforeStep, interactive_srun_note
from .vocab import run_config as pad_vocab
from .engine.ds_config import check_world


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast_for(precision: str, dev: torch.device):
    """train.precision as a context factory: bf16 autocast (bf16, or auto on a bf16-capable GPU),
    else none. Training, its eval, and bigtrain generate/eval all run under this one rule."""
    use_bf16 = precision == "bf16" or (precision == "auto" and dev.type == "cuda" and torch.cuda.is_bf16_supported())
    return (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext


def lr_lambda(cfg: Config, step: int) -> float:
    """Multiplier of train.lr at optimizer step ``step``: linear warm-up, then decay to min_lr_ratio."""
    t = cfg.train
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if t.schedule == "cosine" else 1 - progress
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * decay


def model_config(cfg: Config, model_path: str | None, vocab: int):
    """The base's transformers config: read from model.path, or the preset's at the tokenizer's
    vocabulary; a tokenizer larger than the model's vocabulary is refused."""
    if model_path:
        hf_config = transformers.AutoConfig.from_pretrained(model_path)
    else:
        hf_config = hf_config_for(cfg.model.preset, vocab_size=vocab, num_layers=cfg.model.num_layers)
    if vocab > hf_config.vocab_size:
        raise ConfigError(f"model.tokenizer: {vocab} tokens, more than the model's vocab_size "
                          f"{hf_config.vocab_size}; use the model's own tokenizer")
    return hf_config


def adapter_config(cfg: Config, modules: list[str]) -> dict:
    """The checkpoint's adapter_config.json (:class:`bigtrain.lora.AdapterSpec`) for the adapted
    ``modules`` (their names, in the model's order)."""
    return AdapterSpec(r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout, rslora=cfg.lora.rslora,
                       targets=cfg.lora.targets, modules=list(modules),
                       base_model=_base_model_name(cfg.model.path, cfg.model.preset), dtype=cfg.lora.dtype).to_json()


def _base_model_name(path: str | None, preset: str) -> str:
    """adapter_config.json's base_model: a directory as an absolute path (export and merge read it
    from wherever they run; a relative one only worked from the training's directory), `..` resolved
    by name and symlinks kept, so it reads as the user wrote it; builtin:NAME and preset:NAME as they are."""
    if path is None:
        return f"preset:{preset}"
    if path.startswith("builtin:"):
        return path
    return os.path.abspath(os.path.expanduser(path))


@dataclass
class TrainState:
    """What a checkpoint's trainer_state.json records of the loop (with the scheduler beside it);
    saved as ``dataclasses.asdict`` and rebuilt from the saved keys, so the on-disk format is the
    plain dict it always was."""

    step: int = 0  # optimizer steps taken
    position: int = 0  # samples consumed in the global sample order (skipped steps included)
    train_rows: str = ""  # the rows' cache key (data content, tokenizer, length, packing): what position counts in
    bad_steps: int = 0  # non-finite steps skipped
    tokens: int = 0  # attended tokens seen, all ranks
    wandb_id: str | None = None  # the W&B run a resume continues

    @classmethod
    def from_saved(cls, saved: dict) -> "TrainState":
        """The fields a checkpoint holds (older ones may lack some: those keep their defaults)."""
        return cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls) if f.name in saved})


@dataclass
class Inputs:
    """What :func:`check_inputs` read and checked, before any process group or model exists."""

    model_path: str | None  # model.path as a local folder; None for a random preset
    tokenizer: Any
    hf_config: Any  # the model's own config
    build_config: Any  # the config the run builds: the vocabulary padded to a multiple of 64 (vocab.py)
    vocab: int  # the real vocabulary: only its logits enter the loss
    meta: Any  # the run's model on the meta device: shapes, for the checks and the estimator
    base_params: int  # the real model's parameters, for FLOPs
    attn_note: str  # why this attention kernel
    train_ds: Any
    train_stats: dict
    eval_ds: Any
    samples: list  # (prompt row, reference) printed at the end (evaluate.sample_prompts)
    base_fp: dict  # what the adapters are trained against: base, tokenizer (checkpoint.base_fingerprint)


def _silent(*a, **k) -> None:
    """``say`` on ranks other than 0."""


@dataclass
class Run:
    """A built run: everything the loop reads and updates. Made by :func:`build_run` only."""

    cfg: Config
    inputs: Inputs
    out_dir: Path  # train.output_dir, `..` resolved by name
    lock: RunLock  # the output folder's lock, held until the process ends
    engine: Engine | None = None
    say: Callable[..., None] = _silent  # print on rank 0, nothing elsewhere
    host: str = ""
    model: Any = None  # the frozen base, partitioned (ZeRO-3) or whole, with the adapters' hooks
    compiled: bool = False  # model.compile as resolved
    pad_multiple: int = 1  # batches padded to a multiple of this (compiled, unpacked data)
    recompute_plan: recompute.Plan | None = None
    recompute_budget: int | None = None  # the smallest GPU's memory less the headroom; None on CPU
    # the checkpointed layer inputs held in host memory from forward to backward (model.offload_activations):
    # a context around each micro-batch's forward and backward
    offload: Any = contextlib.nullcontext()
    host_fits: Callable[[int], bool] | None = None  # whether the host holds that many offloaded inputs
    autocast: Callable = contextlib.nullcontext
    seqpar: Any = None  # seqpar.SequenceParallel under train.sequence_parallel > 1, else None
    peak_tflops: float | None = None  # the GPU's bf16 dense peak, for MFU
    flops_per_token: float = 0.0
    lora: Any = None  # the adapters (lora.LoraModules)
    params: list = field(default_factory=list)  # their parameters, in a fixed order on every rank
    optimizer: Any = None
    scheduler: Any = None
    report: dict = field(default_factory=dict)  # trainable / base parameter counts
    predicted: dict = field(default_factory=dict)  # model states per rank, predicted
    at_start: dict = field(default_factory=dict)  # ... and measured at start
    sampler: GlobalSampler | None = None
    global_batch: int = 0
    checkpoints: ckpt.CheckpointManager | None = None
    state: TrainState = field(default_factory=TrainState)
    loggers: Loggers | None = None
    closed: bool = False

    @property
    def info(self):
        return self.engine.info

    @property
    def dev(self) -> torch.device:
        return self.engine.info.device

    # -- model.gradient_checkpointing ------------------------------------------------------------
    def estimate_at(self, n: int, tile: int | None = None, offloaded: int | None = None) -> dict:
        """The estimator's LoRA column for this run with the first ``n`` layers recomputed, the MLP
        in tiles of ``tile`` tokens and the first ``offloaded`` inputs in host memory (None: as the
        current plan has them)."""
        plan = self.recompute_plan
        tile = (plan.tiled if plan else 0) if tile is None else tile
        offloaded = (plan.offloaded if plan else 0) if offloaded is None else offloaded
        st = setup_for_run(self.cfg, self.info.world_size, persistence_threshold=self.engine.zero.persistence_threshold,
                           hpz=self.engine.hpz_size, shard_group=self.engine.base_shards, checkpoint_layers=n,
                           checkpointing=n > 0, compiled=self.compiled, tiled_mlp=tile,
                           offload_layers=offloaded)
        return estimate(model_shape(self.inputs.meta), st)["lora"]

    def apply_recompute(self, plan: recompute.Plan) -> None:
        have = recompute.apply(self.model, plan.checkpointed)
        if plan.checkpointed and not have and plan.checkpointed < plan.layers:
            plan = dataclasses.replace(plan, checkpointed=plan.layers, why=plan.why + "; this architecture "
                                       "has no per-layer flag, so every layer is recomputed")
        if plan.tiled and not longctx.install_tiled_mlp(self.model, plan.tiled):
            plan = dataclasses.replace(plan, tiled=0, long_why=plan.long_why + "; no dense MLP module in the "
                                       "decoder layers to tile")
        if plan.offloaded and not have:
            plan = dataclasses.replace(plan, offloaded=0, long_why=plan.long_why + "; offloading needs "
                                       "transformers' per-layer checkpointing, which this architecture lacks")
        self.offload = longctx.CheckpointOffload(plan.offloaded, self.dev)
        self.recompute_plan = plan
        self.say(f"[bigtrain] {recompute.describe(plan)}")

    def correct_recompute(self) -> bool:
        """After the first step, once: model.gradient_checkpointing=auto chosen again from the measured
        peak (the largest over ranks). True if the plan changed."""
        plan = self.recompute_plan
        if not (plan.auto or plan.offload_auto) or self.recompute_budget is None:
            return False
        measured = max(self.engine.all_gather_objects(torch.cuda.max_memory_allocated(self.dev)))
        est = self.estimate_at(plan.checkpointed)
        ctx = est["per_gpu"]["cuda_context"]  # max_memory_allocated counts no CUDA context

        def act_at(n: int) -> int:
            c = self.estimate_at(n)["per_gpu"]
            return c["activations"] + c["logits_loss"]

        def act_off(o: int) -> int:
            c = self.estimate_at(plan.checkpointed, plan.tiled, o)["per_gpu"]
            return c["activations"] + c["logits_loss"]

        new = recompute.corrected(plan, measured + ctx, est["per_gpu_total"], act_at(plan.checkpointed),
                                  act_at, self.recompute_budget, act_off, self.host_fits)
        if new is None:
            self.say(f"[bigtrain] step 1 measured peak {measured / GiB:.1f} GiB, estimate "
                     f"{(est['per_gpu_total'] - ctx) / GiB:.1f} (without the CUDA context): "
                     + (f"{plan.offloaded} layer inputs in host memory still the fewest that fit" if plan.offload_auto
                        else f"{plan.checkpointed} of {plan.layers} layers recomputed still the fewest that fit"))
            return False
        self.apply_recompute(new)
        return True

    def close(self, failed: bool = False, leave_group: bool = False, farewell: str | None = None) -> None:
        """Tear down, once: the loggers, then (unless the run failed, or ``leave_group``: stopped
        before its first step) ``farewell`` and the engine and its process group."""
        if self.closed:
            return
        self.closed = True
        if self.loggers is not None:
            self.loggers.close(failed=failed)  # a failed run is marked so in W&B
        if failed or leave_group:
            # An exception may be this rank's alone while the others wait in a collective: the
            # engine's tear-down starts with a barrier that could then wait forever. The process
            # group is left to the process's exit (torchrun ends the other ranks).
            return
        if self.seqpar is not None:
            self.seqpar.close()
        if farewell:
            self.say(farewell)  # after the loggers' own closing output (W&B's sync note)
        if self.engine is not None:
            self.engine.close()


def output_dir(cfg: Config) -> Path:
    """train.output_dir with `..` resolved by name (runs/x/../demo is runs/demo): mkdir(parents=True)
    of the literal path would also create the stray runs/x."""
    return Path(os.path.abspath(os.path.expanduser(cfg.train.output_dir)))


def build_run(cfg: Config) -> Run:
    """Build the run ``cfg`` describes, in the order of the module docstring. A stop signal during
    the build (signals.Preemption, not yet armed) raises ``PreemptedBeforeStep`` out of here with
    ``step`` set: the step a rerun resumes from."""
    out = output_dir(cfg)
    run = Run(cfg, check_inputs(cfg), out, RunLock(out))
    try:
        _build_base(run)
        _build_adapters(run)
        _load_state(run)
        _open_loggers(run)
    except PreemptedBeforeStep as e:
        e.step = run.state.step
        raise
    return run


# -- 0. checks ---------------------------------------------------------------------------------------
def check_inputs(cfg: Config) -> Inputs:
    """Everything that can fail on bad input, before any process group or model exists."""
    t = cfg.train
    model_path = cfg.model.local_path
    # a missing file or folder named by a key is a config error like any other (exit 2, the key)
    for key, spec in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval)):
        if spec:
            try:
                source_path(spec)
            except DataError as e:
                raise ConfigError(f"{key}: {e}") from None
    try:
        tokenizer = load_tokenizer(tokenizer_source(cfg.model.tokenizer, model_path))
    except DataError as e:
        raise ConfigError(f"{'model.tokenizer' if cfg.model.tokenizer else 'model.path'}: {e}") from None
    hf_config = model_config(cfg, model_path, len(tokenizer))
    meta = meta_model(hf_config)  # shapes only: for the target check and the memory prediction
    try:
        targets = find_targets(meta, cfg.lora.targets)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    preflight.check_rank(cfg.lora.r, targets)
    # the run's model: the vocabulary padded to a multiple of 64 (a faster LM-head GEMM); only the
    # real vocabulary's logits enter the loss, and nothing written outside the run is padded
    vocab = int(hf_config.vocab_size)
    build_config = pad_vocab(hf_config, head_is_target=bool(set(targets) & output_layer_names(meta)))
    base_params = count_parameters(meta)  # the real model's, for FLOPs
    if build_config is not hf_config:
        meta = meta_model(build_config)
    # config.yaml (written at start-up, and in every checkpoint) records the kernel used
    cfg.model.attn_implementation, attn_note = preflight.attention(cfg.model.attn_implementation, meta)
    check_world(cfg.zero, t.device, cfg.model.quantize)
    seqpar.check(t.sequence_parallel, detect_world()[1], hf_config, cfg.model.attn_implementation)
    preflight.check_positions(cfg, hf_config)
    try:  # a number of layers to checkpoint above the model's depth
        recompute.fixed_layers(cfg.model.gradient_checkpointing, model_shape(meta).layers)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    out_dir = output_dir(cfg)
    preflight.check_output_dir(out_dir, t.output_dir)
    if model_path:  # every weight file's header: a truncated or garbled file is named now
        try:
            checkpoint_files(model_path, check=True)
        except (OSError, ValueError) as e:
            raise ConfigError(f"model.path: {e}") from None
    # the checkpoint a resume will continue: a changed lora.r / alpha / rslora / targets is
    # refused now, not after the base is built (for a 70B job, after minutes of loading); a
    # changed lora.dropout is said at the resume itself (CheckpointManager.resume)
    ckpt_root = out_dir / "checkpoints"
    resume_from = ckpt.check_resume(cfg.checkpoint.resume, ckpt_root)
    if cfg.checkpoint.resume == "auto":
        resume_from = ckpt.newest_adapter_config(ckpt_root)
    saved_state = {}
    if resume_from is not None:
        ckpt.check_adapter(resume_from, adapter_config(cfg, list(targets)))
        try:
            saved_state = json.loads((resume_from / "trainer_state.json").read_text())
        except (OSError, ValueError):
            pass  # unreadable here: the resume's own verification names the file
        preflight.check_stop_after_resume(t.stop_at_step, resume_from, saved_state)
    if not use_bar(cfg):  # datasets' own bars (tokenisation's map) would put \r in the log too
        datasets.disable_progress_bars()
    train_ds, train_stats = load_examples(cfg.data.train, tokenizer, cfg.data)
    eval_ds = load_examples(cfg.data.eval, tokenizer, cfg.data)[0] if cfg.data.eval else None
    # what the adapters were trained against: the base (config, weight files, sampled bytes) and the
    # tokenizer; and the rows a resume's position counts in. A change is refused now, before the base
    # is built (the resume itself checks the checkpoint rank 0 finally picks the same way)
    base_fp = ckpt.base_fingerprint(hf_config, model_path, cfg.model.preset, t.seed, cfg.model.quantize,
                                    tokenizer_fingerprint(tokenizer))
    if resume_from is not None:
        ckpt.check_base(resume_from, base_fp, cfg.checkpoint.force_base_mismatch)
        preflight.rows_changed(resume_from, saved_state, train_stats.get("rows_key", ""), cfg.checkpoint.new_data)
    return Inputs(model_path=model_path, tokenizer=tokenizer, hf_config=hf_config, build_config=build_config,
                  vocab=vocab, meta=meta, base_params=base_params, attn_note=attn_note, train_ds=train_ds,
                  train_stats=train_stats, eval_ds=eval_ds, samples=sample_prompts(cfg), base_fp=base_fp)


# -- 1. the process group and the frozen base --------------------------------------------------------
def _build_base(run: Run) -> None:
    cfg, t, inp = run.cfg, run.cfg.train, run.inputs
    run.engine = engine = Engine(cfg.zero, t.device, t.micro_batch_size, t.grad_accum)
    info, dev = engine.info, engine.info.device
    run.say = say = print if info.is_main else _silent
    run.host = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    print(f"[bigtrain] rank {info.rank}/{info.world_size} on host {run.host} device {dev}", flush=True)
    _lock_output_dir(run)
    if (note := interactive_srun_note()) is not None:
        say(f"[bigtrain] {note}")
    if info.is_main:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        say(f"[bigtrain] output directory {run.out_dir}")
        cfg.dump(run.out_dir / "config.yaml")
        for name in ckpt.clean_partial(run.out_dir / "checkpoints"):
            say(f"[bigtrain] removed {name}: left by a save that did not finish")
    _say_data(run, preflight.check_same_data(engine, cfg, inp.train_stats, inp.eval_ds))
    say(f"[bigtrain] attention: {cfg.model.attn_implementation}{inp.attn_note}")
    if t.warmup_steps > t.max_steps:
        say(f"[bigtrain] train.warmup_steps={t.warmup_steps} is more than train.max_steps={t.max_steps}: the "
            f"learning rate reaches only {t.max_steps}/{t.warmup_steps} of train.lr")
    if cfg.zero.stage == 3:
        engine.use_layout(preflight.choose_layout(cfg, inp.meta, engine, inp.model_path is not None))
        say(f"[bigtrain] {engine.layout.line}")
    if t.check_memory:
        say(f"[bigtrain] {preflight.check_memory(cfg, inp.meta, engine, inp.model_path is not None)}")
    set_seed(t.seed)
    built = time.perf_counter()
    run.model = model = engine.build_base(inp.build_config, inp.model_path, cfg.model.dtype,
                                          cfg.model.attn_implementation, inp.vocab, cfg.model.quantize)
    say(f"[bigtrain] base built in {time.perf_counter() - built:.1f} s; on rank {info.rank}: "
        f"{engine.local_param_bytes(model) / 2**20:,.1f} MiB of partitions"
        + (f", GPU peak {torch.cuda.max_memory_allocated(dev) / GiB:.2f} GiB" if dev.type == "cuda" else "")
        + f", host peak RSS {preflight.host_peak_rss() / GiB:.2f} GiB")
    if engine.quantize_summary:
        say(f"[bigtrain] {engine.quantize_summary}")
    if inp.build_config is not inp.hf_config:
        say(f"[bigtrain] vocabulary {inp.vocab:,} padded to {inp.build_config.vocab_size:,} inside the run "
            f"(zero rows, masked out of the loss; checkpoints and merges keep {inp.vocab:,})")
    for note in engine.ds_config_notes:
        say(f"[bigtrain] DeepSpeed config: {note}")
    if t.sequence_parallel > 1 and cfg.model.compile == "auto":  # true is refused with it (Config.validate)
        run.compiled, why = False, "model.compile=auto: off under train.sequence_parallel (not yet verified compiled)"
    else:
        run.compiled, why = compile_setting(cfg.model.compile, dev.type, cfg.zero.stage, cfg.zero.leaf_blocks)
    say(f"[bigtrain] {why}")
    run.pad_multiple = pad_multiple(run.compiled, cfg.data.pack, cfg.data.max_length)
    if run.pad_multiple > 1:
        say(f"[bigtrain] unpacked data under model.compile: batches padded to a multiple of "
            f"{run.pad_multiple} tokens, so that a few sequence lengths compile (data.pack=true: one)")
    _start_seqpar(run)
    _plan_recompute(run)
    run.autocast = autocast_for(t.precision, dev)
    run.peak_tflops = peak_tflops(torch.cuda.get_device_name(dev)) if dev.type == "cuda" else None
    run.flops_per_token = lora_flops_per_token(
        inp.base_params, getattr(inp.hf_config, "num_hidden_layers", 0),
        getattr(inp.hf_config, "hidden_size", 0), cfg.data.max_length)


def _start_seqpar(run: Run) -> None:
    """train.sequence_parallel > 1: this rank's sequence group, the attention wrapper, and batches
    padded to a multiple of the group's size (bigtrain/seqpar.py)."""
    cfg, info, sp = run.cfg, run.info, run.cfg.train.sequence_parallel
    if sp <= 1:
        return
    lay = seqpar.Layout.of(info.rank, info.world_size, sp)
    group = new_groups(seqpar.Layout.groups(info.world_size, sp), info.rank, cfg.zero.timeout_s)
    run.seqpar = seqpar.SequenceParallel(lay, group, run.inputs.build_config, cfg.train.micro_batch_size)
    run.pad_multiple = math.lcm(run.pad_multiple, sp)
    run.say(f"[bigtrain] sequence parallelism (Ulysses): each sequence split over {sp} consecutive ranks, "
            f"attention heads exchanged by all-to-all; {lay.dp_world} data-parallel group(s) of {sp}")


def _lock_output_dir(run: Run) -> None:
    """One run per output folder (runlock.RunLock): rank 0 takes the folder's lock before anything
    is written there, and every rank stops with the same line if another live run holds it."""
    err = None
    if run.info.is_main:
        try:
            run.lock.acquire()
        except RunLocked as e:
            err = str(e)
        except OSError as e:
            err = f"train.output_dir={run.out_dir}: cannot take its lock file: {e}"
    err = run.engine.all_gather_objects(err)[0]
    if err:
        raise ConfigError(err)


def _say_data(run: Run, built_by: list[int]) -> None:
    """The training data as read: its format, counts, skipped lines, and who tokenised it."""
    cfg, st, say, info = run.cfg, run.inputs.train_stats, run.say, run.info
    decided = "decided from its first record" if cfg.data.format == "auto" else "data.format"
    say(f"[bigtrain] train data {cfg.data.train}: {st['format']} ({decided}), {st['examples']} examples, "
        f"{st.get('skipped', 0)} skipped, {st.get('truncated', 0)} truncated"
        + (f", {st['rows_without_target']} rows with no assistant token within data.max_length"
           if st.get("rows_without_target") else ""))
    if skipped_summary(st):
        say(f"[bigtrain] train data: {skipped_summary(st)}")
    if built_by:
        shared = (f"; {info.world_size - len(built_by)} of {info.world_size} rank(s) memory-mapped it"
                  if info.world_size > 1 else "")
        say(f"[bigtrain] train data tokenised by rank {built_by[0]} in {st['seconds']:.1f} s{shared} "
            f"(cached at {st['cache_dir']})")
    else:
        say(f"[bigtrain] train data read from the cache {st['cache_dir']} (tokenised by an earlier run)")


def _plan_recompute(run: Run) -> None:
    """model.gradient_checkpointing: how many decoder layers to recompute (bigtrain.recompute),
    from the estimate on a GPU: the budget is the smallest GPU's memory over the ranks, less
    train.memory_headroom."""
    cfg, dev, engine = run.cfg, run.dev, run.engine
    if dev.type == "cuda":
        total = torch.cuda.get_device_properties(dev).total_memory
        run.recompute_budget = int(min(engine.all_gather_objects(total)) * (1 - cfg.train.memory_headroom))
    peak = ((lambda n, t, o: run.estimate_at(n, t, o)["per_gpu_total"]) if run.recompute_budget is not None
            else None)
    shape = model_shape(run.inputs.meta)
    avail = preflight.mem_available() if dev.type == "cuda" else None
    # pinned by every rank of this host, beside what each already holds
    host_budget = (host_offload_budget(avail, preflight.local_ranks(), cfg.train.memory_headroom)
                   if avail is not None else None)
    tile_setting = 0 if cfg.model.compile is True else cfg.model.tiled_mlp  # never inside a compiled layer
    inp = layer_input_bytes(shape, setup_for_run(cfg, run.info.world_size))
    if host_budget is not None:
        run.host_fits = lambda o: o * inp <= host_budget
    plan = recompute.choose_memory(
        cfg.model.gradient_checkpointing, tile_setting, cfg.model.offload_activations, shape.layers, shape.hidden,
        peak, run.recompute_budget, lambda o: o * inp, host_budget)
    if plan.tiled and run.compiled:
        run.compiled = False
        run.say("[bigtrain] model.compile auto: off, the MLP is tiled (model.tiled_mlp) for this sequence length")
    run.apply_recompute(plan)


# -- 2. adapters and their optimizer -----------------------------------------------------------------
def _build_adapters(run: Run) -> None:
    cfg, t, info, say, engine = run.cfg, run.cfg.train, run.info, run.say, run.engine
    set_seed(t.seed)
    run.lora = lora = inject_lora(run.model, cfg.lora.targets, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout,
                                  cfg.lora.rslora, DTYPES[cfg.lora.dtype], run.dev)
    run.params = params = list(lora.parameters())
    engine.broadcast_(params)
    set_seed(t.seed + 1_000_003 * info.rank)  # per-rank stream for LoRA dropout
    if run.compiled:  # after the LoRA hooks exist: they are traced into each layer's graph
        cache = use_shared_cache()
        say(f"[bigtrain] model.compile: {compile_layers(run.model)} decoder layers torch.compile'd "
            f"(dynamic=False); the first step compiles them (inductor's cache: {cache})")
    run.report = report = parameter_report(run.model, lora)
    say(f"[bigtrain] {report['trainable']:,} trainable adapter parameters "
        f"({len(lora.names())} modules, r={cfg.lora.r}) over a frozen base of {report['base']:,} "
        f"({report['trainable_pct']:.4f}% trainable); base bytes on this rank: "
        f"{engine.local_param_bytes(run.model):,}")
    run.predicted = predicted = predict_states(
        run.inputs.meta, cfg.lora.targets, cfg.lora.r, engine.base_shards, cfg.model.dtype,
        engine.persistence_threshold, cfg.zero.stage, cfg.lora.dtype, engine.hpz_size, cfg.model.quantize)
    say("[bigtrain] predicted model states per rank: "
        + ", ".join(f"{k} {v / 2**20:,.2f} MiB" for k, v in predicted.items()))
    run.optimizer = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay,
                                      fused=run.dev.type == "cuda")
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, lambda s: lr_lambda(cfg, s))
    run.at_start = at_start = measure_states(run.model, lora, run.optimizer)  # no gradients or Adam moments yet
    say("[bigtrain] model states on rank 0 at start, predicted/measured: " + ", ".join(
        f"{k} {predicted[k]:,}/{at_start[k]:,}" for k in ("frozen_weights", "trainable_weights"))
        + " bytes (gradients, optimizer state and whole copies of persistent parameters appear at "
        "the first step; all are compared at the end)")


# -- 3. the data order and a resume ------------------------------------------------------------------
def _load_state(run: Run) -> None:
    cfg, t, ck, info, say = run.cfg, run.cfg.train, run.cfg.checkpoint, run.info, run.say
    run.sampler = GlobalSampler(len(run.inputs.train_ds), t.seed)
    run.global_batch = t.micro_batch_size * t.grad_accum * info.world_size // t.sequence_parallel
    run.checkpoints = ckpt.CheckpointManager(
        run.out_dir / "checkpoints", run.engine, run.lora, run.optimizer,
        adapter_config=adapter_config(cfg, run.lora.names()),
        base_fingerprint=run.inputs.base_fp,
        config_yaml=yaml.safe_dump(cfg.to_dict(), sort_keys=False), keep=ck.keep, every=ck.every,
        every_minutes=ck.every_minutes, last_step=t.max_steps, force_base_mismatch=ck.force_base_mismatch,
        log=say)
    resumed = run.checkpoints.resume(ck.resume)
    rows = run.inputs.train_stats.get("rows_key", "")
    if resumed.path is None:
        run.state.train_rows = rows
        return
    run.scheduler.load_state_dict(resumed.state["scheduler"])
    for note in _apply_changed_hparams(cfg, run.optimizer, run.scheduler):
        say(f"[bigtrain] {note}")
    run.state = TrainState.from_saved(resumed.state)
    note = preflight.rows_changed(resumed.path, resumed.state, rows, ck.new_data)
    if note:
        say(f"[bigtrain] {note}")
        run.state.position = 0
    run.state.train_rows = rows
    say(f"[bigtrain] resumed from {resumed.path} at step {run.state.step} "
        f"(sample {run.state.position}, saved with {resumed.world_size} ranks, now {info.world_size})")
    if info.is_main:
        (run.out_dir / "preempted").unlink(missing_ok=True)


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


# -- 4. loggers --------------------------------------------------------------------------------------
def _open_loggers(run: Run) -> None:
    cfg = run.cfg
    run.loggers = Loggers.build(cfg.logging, run.out_dir, cfg.to_dict(), run.info.is_main, run.state.wandb_id)
    run.state.wandb_id = run.loggers.wandb_id
    run.loggers.summary({f"memory/{k}_start_measured": v for k, v in run.at_start.items()})
