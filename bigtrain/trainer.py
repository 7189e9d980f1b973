"""The training loop as a :class:`Trainer`: a ZeRO-3-partitioned (or whole) frozen base with
replicated LoRA adapters.

``Trainer(cfg).run()`` reads top to bottom:

* :meth:`Trainer.setup` builds the run:
    0. every check that can fail on bad input, before any process group or model exists;
    1. the process group and the frozen base (engine.py, over dist.py, zero3.py and loader.py);
    2. LoRA adapters beside it, made identical on every rank, AdamW over them;
    3. the data, a resume from the last good checkpoint if there is one, the loggers.
* :meth:`Trainer.train` is the loop: per optimizer step, :meth:`Trainer.train_step` counts the step's
  target tokens on all ranks, runs forward/backward on each micro-batch with
  loss_sum / global_tokens, sums the adapter gradients (plus the loss, a preemption flag and a
  save-due flag) in ONE flat all-reduce, clips and steps (or skips a non-finite step on every rank
  together); then the loop logs, evaluates and checkpoints; on SIGTERM/SIGUSR1/SIGINT it saves at the step
  boundary and stops cleanly. At the end: memory report, per-rank report, optional merge.
* :meth:`Trainer.close` runs once, in a ``finally``, on every exit path.

``bigtrain.train.train(cfg, pending_signals)`` is the entry point the CLI calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import random
import resource
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
import transformers
import yaml
from tqdm import tqdm

from . import checkpoint as ckpt
from . import faults, recompute
from .compile import cache_use, compile_layers, eager_layers, graphs_compiled, pad_multiple, use_shared_cache
from .compile import resolve as compile_setting
from .config import Config, ConfigError
from .data import (DataError, collate, escape_controls, has_tokenizer, iter_records, load_examples, load_tokenizer,
                   skipped_summary, source_path, tokenizer_fingerprint, tokenizer_source)
from .engine.core import DTYPES, Engine
from .export import merge_live
from .inject import find_targets, inject_lora, output_layer_names, parameter_report
from .loader import checkpoint_files
from .lora import AdapterSpec
from .losses import token_loss_sum
from .memory import (GiB, estimate, format_savings, host_peak, measure_states, model_shape, predict_states,
                     run_savings, setup_for_run)
from .metrics import Loggers, lora_flops_per_token, peak_tflops
from .presets import count_parameters, hf_config_for, meta_model, position_limit
from .runlock import RunLock, RunLocked
from .sampler import GlobalSampler, rank_micro_batches
from .vocab import run_config as pad_vocab
from .engine.ds_config import check_world


class PreemptedBeforeStep(Exception):
    """SIGTERM, SIGUSR1 or SIGINT before the run's first optimizer step: nothing new exists to save."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Preemption:
    """SIGTERM, SIGUSR1 or SIGINT (Ctrl-C). Once the loop runs (``arm``), the signal is remembered
    and the loop saves and stops at the next step boundary. Before that (start-up, the step-0 eval)
    nothing new exists to save, so the run ends at once (``PreemptedBeforeStep``): a start-up that
    takes minutes at scale, or hangs, must not outlive the scheduler's grace period. A second
    Ctrl-C while the first one's save is pending stops the process at once, with one line: nothing
    is written after it, and the last checkpoint (saved atomically) stays loadable."""

    def __init__(self, pending: list[int] | None = None):
        self.signum = pending[-1] if pending else 0  # caught by the CLI before torch was imported
        self.armed = False
        for s in STOP_SIGNALS:
            signal.signal(s, self._handler)

    def check(self) -> None:
        """Raise for a signal that came before the loop (the CLI's, caught while importing)."""
        if self.signum and not self.armed:
            raise PreemptedBeforeStep(self.signum)

    def arm(self) -> None:
        self.armed = True

    def _handler(self, signum, frame):
        if signum == signal.SIGINT and self.armed and self.signum:
            # a second interrupt: out at once (os.write: no buffered I/O inside a signal handler)
            os.write(2, b"[bigtrain] second Ctrl-C: stopped at once, nothing more saved; the last checkpoint "
                        b"is intact: rerun the same command to resume from it\n")
            os._exit(128 + signal.SIGINT)
        first = not self.signum
        self.signum = signum
        if not self.armed:
            raise PreemptedBeforeStep(signum)
        if signum == signal.SIGINT and first:
            os.write(2, b"[bigtrain] Ctrl-C: saving at the end of this step, then stopping "
                        b"(Ctrl-C again to stop at once)\n")


def autocast_for(precision: str, dev: torch.device):
    """train.precision as a context factory: bf16 autocast (bf16, or auto on a bf16-capable GPU),
    else none. Training, its eval, and bigtrain generate/eval all run under this one rule."""
    use_bf16 = precision == "bf16" or (precision == "auto" and dev.type == "cuda" and torch.cuda.is_bf16_supported())
    return (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext


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
class StepResult:
    """One optimizer step as every rank sees it (all values are after the step's all-reduce)."""

    loss: float  # mean token loss of the step over all ranks
    grad_norm: torch.Tensor  # of the summed adapter gradients, before clipping
    tokens: int  # attended tokens of the step, all ranks
    stop_requested: bool  # a rank was signalled, or train.stop_at_step is reached
    save_due: bool  # rank 0's clock says a time-based checkpoint is due
    skipped: bool  # non-finite loss or gradient: no update was made


# Slots of the scalars that ride in the step's one all-reduce after the adapter gradients.
LOSS_SUM, PREEMPTED, SAVE_DUE = range(3)
N_EXTRAS = 3


@dataclass
class Window:
    """Running sums between two log lines."""

    loss: float = 0.0
    steps: int = 0
    tokens: int = 0
    t0: float = field(default_factory=time.perf_counter)
    # a step left out of tokens/s (a compiled run's first step, which compiles the layers)
    skip_s: float = 0.0
    skip_tokens: int = 0

    def add(self, loss: float, tokens: int) -> None:
        self.loss += loss
        self.steps += 1
        self.tokens += tokens

    def tokens_per_s(self) -> float | None:
        """Tokens per second over the window's steps but a skipped one; None if it held only that."""
        tokens = self.tokens - self.skip_tokens
        dt = time.perf_counter() - self.t0 - self.skip_s
        return tokens / dt if tokens > 0 and dt > 0 else None


def _silent(*a, **k) -> None:
    """``say`` on ranks other than 0."""


class Trainer:
    """One training run; see the module docstring. ``run()`` = ``setup()``, ``train()``, ``close()``."""

    def __init__(self, cfg: Config, pending_signals: list[int] | None = None):
        self.cfg = cfg
        # SIGTERM/SIGUSR1 from here on (and those `bigtrain train` caught while importing, passed in
        # ``pending_signals``): before the first step they end the run at once, marked preempted so
        # that the Slurm scripts requeue it; from the first step on, at the next step boundary
        self.preempt = Preemption(pending_signals)
        # `..` resolved by name (runs/x/../demo is runs/demo): mkdir(parents=True) of the literal
        # path would also create the stray runs/x
        self.out_dir = Path(os.path.abspath(os.path.expanduser(cfg.train.output_dir)))
        self.ckpt_root = self.out_dir / "checkpoints"
        self.lock = RunLock(self.out_dir)  # taken at start-up, held until the process ends
        self.say = _silent
        self.engine: Engine | None = None
        self.loggers: Loggers | None = None
        self.state = TrainState()
        self.last_eval: float | None = None
        self.checkpoints: ckpt.CheckpointManager | None = None  # built with the adapters (_load_state)
        self.measured: dict | None = None  # model states at the last step, when all exist
        self._farewell: str | None = None  # the run's last line, printed after the loggers close
        self._closed = False

    def run(self) -> dict:
        """Set up and train; :meth:`close` runs exactly once, however this ends."""
        failed, early = True, False
        try:
            self.preempt.check()
            self.setup()
            result = self.train()
            failed = False
            return result
        except PreemptedBeforeStep as e:
            failed, early = False, True
            return self._preempted_before_step(e.signum)
        finally:
            self.close(failed, leave_group=early)

    def _preempted_before_step(self, signum: int) -> dict:
        """A signal before the first step: nothing new to save. Mark the run dir preempted (at the
        step of the checkpoint it will resume from) so that the Slurm scripts requeue the job, and
        return; the caller exits 0. The process group is left to the process's exit, as after a
        failure: the other ranks may be anywhere in their start-up."""
        step = self.state.step
        if int(os.environ.get("RANK", "0")) == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "preempted").write_text(f"{step}\n")
            print(f"[bigtrain] {signal.Signals(signum).name} before the first step: stopped, nothing new to "
                  f"save; rerun the same command to "
                  f"{f'resume from step {step}' if step else 'start again'}", file=sys.stderr, flush=True)
        return {"step": step, "preempted": True, "checkpoint": None}

    # -- setup -----------------------------------------------------------------------------------
    def setup(self) -> None:
        """Build the run, in this order: checks, base, adapters and optimizer, data and resume, loggers."""
        self._check_inputs()
        self._build_base()
        self._build_adapters()
        self._load_state()
        self._open_loggers()

    def _check_inputs(self) -> None:
        """0. Everything that can fail on bad input, before any process group or model exists."""
        cfg, t = self.cfg, self.cfg.train
        self.model_path = model_path = cfg.model.local_path
        # a missing file or folder named by a key is a config error like any other (exit 2, the key)
        for key, spec in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval)):
            if spec:
                try:
                    source_path(spec)
                except DataError as e:
                    raise ConfigError(f"{key}: {e}") from None
        try:
            self.tokenizer = load_tokenizer(tokenizer_source(cfg.model.tokenizer, model_path))
        except DataError as e:
            raise ConfigError(f"{'model.tokenizer' if cfg.model.tokenizer else 'model.path'}: {e}") from None
        self.hf_config = hf_config = _hf_config(cfg, model_path, len(self.tokenizer))
        meta = meta_model(hf_config)  # shapes only: for the target check and the memory prediction
        try:
            targets = find_targets(meta, cfg.lora.targets)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        _check_rank(cfg.lora.r, targets)
        # the run's model: the vocabulary padded to a multiple of 64 (a faster LM-head GEMM); only the
        # real vocabulary's logits enter the loss, and nothing written outside the run is padded
        self.vocab = int(hf_config.vocab_size)
        self.build_config = pad_vocab(hf_config, head_is_target=bool(set(targets) & output_layer_names(meta)))
        self.base_params = count_parameters(meta)  # the real model's, for FLOPs
        if self.build_config is not hf_config:
            meta = meta_model(self.build_config)
        self.meta = meta
        # config.yaml (written at start-up, and in every checkpoint) records the kernel used
        cfg.model.attn_implementation, self.attn_note = _attention(cfg.model.attn_implementation, meta)
        check_world(cfg.zero, t.device, cfg.model.quantize)
        _check_positions(cfg, hf_config)
        try:  # a number of layers to checkpoint above the model's depth
            recompute.fixed_layers(cfg.model.gradient_checkpointing, model_shape(meta).layers)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        _check_output_dir(self.out_dir, t.output_dir)
        if model_path:  # every weight file's header: a truncated or garbled file is named now
            try:
                checkpoint_files(model_path, check=True)
            except (OSError, ValueError) as e:
                raise ConfigError(f"model.path: {e}") from None
        # the checkpoint a resume will continue: a changed lora.r / alpha / rslora / targets is
        # refused now, not after the base is built (for a 70B job, after minutes of loading); a
        # changed lora.dropout is said at the resume itself (CheckpointManager.resume)
        resume_from = ckpt.check_resume(cfg.checkpoint.resume, self.ckpt_root)
        if cfg.checkpoint.resume == "auto":
            resume_from = ckpt.newest_adapter_config(self.ckpt_root)
        saved_state = {}
        if resume_from is not None:
            ckpt.check_adapter(resume_from, adapter_config(cfg, list(targets)))
            try:
                saved_state = json.loads((resume_from / "trainer_state.json").read_text())
            except (OSError, ValueError):
                pass  # unreadable here: the resume's own verification names the file
            _check_stop_after_resume(t.stop_at_step, resume_from, saved_state)
        if not _use_bar(cfg):  # datasets' own bars (tokenisation's map) would put \r in the log too
            datasets.disable_progress_bars()
        self.train_ds, self.train_stats = load_examples(cfg.data.train, self.tokenizer, cfg.data)
        self.eval_ds = load_examples(cfg.data.eval, self.tokenizer, cfg.data)[0] if cfg.data.eval else None
        self.samples = _sample_prompts(cfg)
        # what the adapters were trained against: the base (config, weight files, sampled bytes) and the
        # tokenizer; and the rows a resume's position counts in. A change is refused now, before the base
        # is built (the resume itself checks the checkpoint rank 0 finally picks the same way)
        self.base_fp = ckpt.base_fingerprint(hf_config, model_path, cfg.model.preset, t.seed, cfg.model.quantize,
                                             tokenizer_fingerprint(self.tokenizer))
        if resume_from is not None:
            ckpt.check_base(resume_from, self.base_fp, cfg.checkpoint.force_base_mismatch)
            _rows_changed(resume_from, saved_state, self.train_stats.get("rows_key", ""), cfg.checkpoint.new_data)

    def _build_base(self) -> None:
        """1. The process group and the frozen base."""
        cfg, t = self.cfg, self.cfg.train
        self.engine = engine = Engine(cfg.zero, t.device, t.micro_batch_size, t.grad_accum)
        self.info, self.dev = info, dev = engine.info, engine.info.device
        self.say = say = print if info.is_main else _silent
        self.host = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
        print(f"[bigtrain] rank {info.rank}/{info.world_size} on host {self.host} device {dev}", flush=True)
        self._lock_output_dir()
        if info.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            say(f"[bigtrain] output directory {self.out_dir}")
            cfg.dump(self.out_dir / "config.yaml")
            for name in ckpt.clean_partial(self.ckpt_root):
                say(f"[bigtrain] removed {name}: left by a save that did not finish")
        built_by = _check_same_data(engine, cfg, self.train_stats, self.eval_ds)
        st = self.train_stats
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

        say(f"[bigtrain] attention: {cfg.model.attn_implementation}{self.attn_note}")
        if t.warmup_steps > t.max_steps:
            say(f"[bigtrain] train.warmup_steps={t.warmup_steps} is more than train.max_steps={t.max_steps}: the "
                f"learning rate reaches only {t.max_steps}/{t.warmup_steps} of train.lr")
        if t.check_memory:
            say(f"[bigtrain] {_check_memory(cfg, self.meta, engine, self.model_path is not None)}")
        set_seed(t.seed)
        built = time.perf_counter()
        self.model = model = engine.build_base(self.build_config, self.model_path, cfg.model.dtype,
                                               cfg.model.attn_implementation, self.vocab, cfg.model.quantize)
        say(f"[bigtrain] base built in {time.perf_counter() - built:.1f} s; on rank {info.rank}: "
            f"{engine.local_param_bytes(model) / 2**20:,.1f} MiB of partitions"
            + (f", GPU peak {torch.cuda.max_memory_allocated(dev) / GiB:.2f} GiB" if dev.type == "cuda" else "")
            + f", host peak RSS {_host_peak_rss() / GiB:.2f} GiB")
        if engine.quantize_summary:
            say(f"[bigtrain] {engine.quantize_summary}")
        if self.build_config is not self.hf_config:
            say(f"[bigtrain] vocabulary {self.vocab:,} padded to {self.build_config.vocab_size:,} inside the run "
                f"(zero rows, masked out of the loss; checkpoints and merges keep {self.vocab:,})")
        for note in engine.ds_config_notes:
            say(f"[bigtrain] DeepSpeed config: {note}")
        self.compiled, why = compile_setting(cfg.model.compile, dev.type, cfg.zero.stage, cfg.zero.leaf_blocks)
        say(f"[bigtrain] {why}")
        self.pad_multiple = pad_multiple(self.compiled, cfg.data.pack, cfg.data.max_length)
        if self.pad_multiple > 1:
            say(f"[bigtrain] unpacked data under model.compile: batches padded to a multiple of "
                f"{self.pad_multiple} tokens, so that a few sequence lengths compile (data.pack=true: one)")
        self._plan_recompute()
        self.autocast = autocast_for(t.precision, dev)
        self.peak = peak_tflops(torch.cuda.get_device_name(dev)) if dev.type == "cuda" else None
        self.flops_per_token = lora_flops_per_token(
            self.base_params, getattr(self.hf_config, "num_hidden_layers", 0),
            getattr(self.hf_config, "hidden_size", 0), cfg.data.max_length)

    def _plan_recompute(self) -> None:
        """model.gradient_checkpointing: how many decoder layers to recompute (bigtrain.recompute),
        from the estimate on a GPU: the budget is the smallest GPU's memory over the ranks, less
        train.memory_headroom."""
        cfg, dev, engine = self.cfg, self.dev, self.engine
        self.recompute_budget = None
        if dev.type == "cuda":
            total = torch.cuda.get_device_properties(dev).total_memory
            self.recompute_budget = int(min(engine.all_gather_objects(total)) * (1 - cfg.train.memory_headroom))
        peak = self._estimated_peak if self.recompute_budget is not None else None
        plan = recompute.choose(cfg.model.gradient_checkpointing, model_shape(self.meta).layers, peak,
                                self.recompute_budget)
        self._apply_recompute(plan)

    def _estimate_at(self, n: int) -> dict:
        """The estimator's LoRA column for this run with the first ``n`` layers recomputed."""
        st = setup_for_run(self.cfg, self.info.world_size, persistence_threshold=self.engine.zero.persistence_threshold,
                           hpz=self.engine.hpz_size, checkpoint_layers=n, checkpointing=n > 0, compiled=self.compiled)
        return estimate(model_shape(self.meta), st)["lora"]

    def _estimated_peak(self, n: int) -> int:
        return self._estimate_at(n)["per_gpu_total"]

    def _apply_recompute(self, plan) -> None:
        have = recompute.apply(self.model, plan.checkpointed)
        if plan.checkpointed and not have and plan.checkpointed < plan.layers:
            plan = dataclasses.replace(plan, checkpointed=plan.layers, why=plan.why + "; this architecture "
                                       "has no per-layer flag, so every layer is recomputed")
        self.recompute_plan = plan
        self.say(f"[bigtrain] {recompute.describe(plan)}")

    def _correct_recompute(self) -> bool:
        """After the first step, once: model.gradient_checkpointing=auto chosen again from the measured
        peak (the largest over ranks). True if the plan changed."""
        plan = self.recompute_plan
        if not plan.auto or self.recompute_budget is None:
            return False
        measured = max(self.engine.all_gather_objects(torch.cuda.max_memory_allocated(self.dev)))
        est = self._estimate_at(plan.checkpointed)
        ctx = est["per_gpu"]["cuda_context"]  # max_memory_allocated counts no CUDA context

        def act_at(n: int) -> int:
            c = self._estimate_at(n)["per_gpu"]
            return c["activations"] + c["logits_loss"]

        new = recompute.corrected(plan, measured + ctx, est["per_gpu_total"], act_at(plan.checkpointed),
                                  act_at, self.recompute_budget)
        if new is None:
            self.say(f"[bigtrain] step 1 measured peak {measured / GiB:.1f} GiB, estimate "
                     f"{(est['per_gpu_total'] - ctx) / GiB:.1f} (without the CUDA context): "
                     f"{plan.checkpointed} of {plan.layers} layers recomputed still the fewest that fit")
            return False
        self._apply_recompute(new)
        return True

    def _lock_output_dir(self) -> None:
        """One run per output folder (runlock.RunLock): rank 0 takes the folder's lock before anything
        is written there, and every rank stops with the same line if another live run holds it."""
        err = None
        if self.info.is_main:
            try:
                self.lock.acquire()
            except RunLocked as e:
                err = str(e)
            except OSError as e:
                err = f"train.output_dir={self.out_dir}: cannot take its lock file: {e}"
        err = self.engine.all_gather_objects(err)[0]
        if err:
            raise ConfigError(err)

    def _build_adapters(self) -> None:
        """2. Adapters, identical on every rank, and AdamW over them."""
        cfg, t, info, say = self.cfg, self.cfg.train, self.info, self.say
        engine, model = self.engine, self.model
        set_seed(t.seed)
        self.lora = lora = inject_lora(model, cfg.lora.targets, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout,
                                       cfg.lora.rslora, DTYPES[cfg.lora.dtype], self.dev)
        self.params = params = list(lora.parameters())
        engine.broadcast_(params)
        set_seed(t.seed + 1_000_003 * info.rank)  # per-rank stream for LoRA dropout
        if self.compiled:  # after the LoRA hooks exist: they are traced into each layer's graph
            cache = use_shared_cache()
            say(f"[bigtrain] model.compile: {compile_layers(model)} decoder layers torch.compile'd "
                f"(dynamic=False); the first step compiles them (inductor's cache: {cache})")
        self.report = report = parameter_report(model, lora)
        say(f"[bigtrain] {report['trainable']:,} trainable adapter parameters "
            f"({len(lora.names())} modules, r={cfg.lora.r}) over a frozen base of {report['base']:,} "
            f"({report['trainable_pct']:.4f}% trainable); base bytes on this rank: "
            f"{engine.local_param_bytes(model):,}")
        self.predicted = predicted = predict_states(
            self.meta, cfg.lora.targets, cfg.lora.r, info.world_size, cfg.model.dtype,
            engine.persistence_threshold, cfg.zero.stage, cfg.lora.dtype, engine.hpz_size, cfg.model.quantize)
        say("[bigtrain] predicted model states per rank: " + _fmt_bytes(predicted))
        self.optimizer = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay,
                                           fused=self.dev.type == "cuda")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_lambda(cfg, s))
        self.at_start = at_start = measure_states(model, lora, self.optimizer)  # no gradients or Adam moments yet
        say("[bigtrain] model states on rank 0 at start, predicted/measured: " + ", ".join(
            f"{k} {predicted[k]:,}/{at_start[k]:,}" for k in ("frozen_weights", "trainable_weights"))
            + " bytes (gradients, optimizer state and whole copies of persistent parameters appear at "
            "the first step; all are compared at the end)")

    def _load_state(self) -> None:
        """3. The data order, and a resume from the last good checkpoint if there is one."""
        cfg, t, ck, info, say = self.cfg, self.cfg.train, self.cfg.checkpoint, self.info, self.say
        self.sampler = GlobalSampler(len(self.train_ds), t.seed)
        self.global_batch = t.micro_batch_size * t.grad_accum * info.world_size
        self.pad_id = self.tokenizer.pad_token_id
        self.checkpoints = ckpt.CheckpointManager(
            self.ckpt_root, self.engine, self.lora, self.optimizer,
            adapter_config=adapter_config(cfg, self.lora.names()),
            base_fingerprint=self.base_fp,
            config_yaml=yaml.safe_dump(cfg.to_dict(), sort_keys=False), keep=ck.keep, every=ck.every,
            every_minutes=ck.every_minutes, last_step=t.max_steps, force_base_mismatch=ck.force_base_mismatch,
            log=say)
        resumed = self.checkpoints.resume(ck.resume)
        if resumed.path is None:
            self.state.train_rows = self.train_stats.get("rows_key", "")
            return
        self.scheduler.load_state_dict(resumed.state["scheduler"])
        for note in _apply_changed_hparams(cfg, self.optimizer, self.scheduler):
            say(f"[bigtrain] {note}")
        self.state = TrainState.from_saved(resumed.state)
        rows = self.train_stats.get("rows_key", "")
        note = _rows_changed(resumed.path, resumed.state, rows, ck.new_data)
        if note:
            say(f"[bigtrain] {note}")
            self.state.position = 0
        self.state.train_rows = rows
        say(f"[bigtrain] resumed from {resumed.path} at step {self.state.step} "
            f"(sample {self.state.position}, saved with {resumed.world_size} ranks, now {info.world_size})")
        if info.is_main:
            (self.out_dir / "preempted").unlink(missing_ok=True)

    def _open_loggers(self) -> None:
        """The loggers; a resumed run continues its W&B run."""
        cfg = self.cfg
        self.loggers = Loggers.build(cfg.logging, self.out_dir, cfg.to_dict(), self.info.is_main,
                                     self.state.wandb_id)
        self.state.wandb_id = self.loggers.wandb_id
        self.loggers.summary({f"memory/{k}_start_measured": v for k, v in self.at_start.items()})

    # -- the loop --------------------------------------------------------------------------------
    def train(self) -> dict:
        """Optimizer steps up to train.max_steps (or a stop request); returns the run's summary."""
        t, state = self.cfg.train, self.state
        if self.eval_ds is not None and state.step == 0:
            # the base model's own score, the reference the adapters' evals are read against
            base_eval = self._evaluate()
            self.loggers.log({"eval_loss": base_eval}, 0)
            self.say(f"[bigtrain] step 0 (adapters are zero: the base model): eval loss {base_eval:.4f}")
        self.bar = _progress(self.cfg, state.step, self.info.is_main)
        self.window = Window()
        self.checkpoints.restart_clock()  # checkpoint.every_minutes counts from the first step
        self.preempt.arm()  # from here a signal saves at the next step boundary
        first, self.recompiles, self.recompiles_said, self.recompile_expected = True, 0, 0, False
        while state.step < t.max_steps:
            started, graphs = time.perf_counter(), graphs_compiled() if self.compiled else 0
            r = self.train_step(self._step_batches())
            took = time.perf_counter() - started
            # the samples are consumed even by a skipped step: a resume replays the same order
            state.position += self.global_batch
            state.tokens += r.tokens
            if r.skipped:
                # every rank skipped together (they saw the same sums); too many is a diverged run
                self._count_bad_step()
                continue
            state.step += 1
            step = state.step
            self.window.add(r.loss, r.tokens)
            self.bar.update(1)
            if first:
                first = False
                self._after_first_step(step, took, r.tokens, graphs)
            elif self.compiled and graphs_compiled() > graphs and not self.recompile_expected:
                self.recompiles += graphs_compiled() - graphs  # a new shape or mode in steady state
            self.recompile_expected = False

            # the last step always logs, evaluates and saves: the run's result is its final state
            if step % t.log_every == 0 or step == t.max_steps:
                self._log(step, r.grad_norm)
            if self.eval_ds is not None and ((t.eval_every and step % t.eval_every == 0) or step == t.max_steps):
                self.last_eval = self._evaluate()
                self.loggers.log({"eval_loss": self.last_eval}, step)
                sep = "\n" if isinstance(self.bar, tqdm) else ""  # a line of its own after the bar's
                self.say(f"{sep}[bigtrain] step {step}: eval loss {self.last_eval:.4f}")
            # a stop request saves first, so that rerunning the same command resumes from here
            self.checkpoints.maybe_save(step, self._saved_state(), force=r.stop_requested, due=r.save_due)
            if r.stop_requested and step < t.max_steps:  # at the last step the run just ends: done
                return self._stop_early(step)
        self.bar.close()
        return self._finish()

    def _step_batches(self) -> list[dict]:
        """This rank's micro-batches of the next optimizer step, cut from the global sample order."""
        t, info = self.cfg.train, self.info
        step_idx = self.sampler.take(self.state.position, self.global_batch)
        return [collate([self.train_ds[i] for i in idx], self.pad_id, self.pad_multiple, self.cfg.data.max_length)
                for idx in rank_micro_batches(step_idx, t.micro_batch_size, t.grad_accum,
                                              info.rank, info.world_size)]

    def train_step(self, step_batches: list[dict]) -> StepResult:
        """One optimizer step over this rank's micro-batches: forward/backward, the one all-reduce,
        clip, then step, or skip a non-finite step (on every rank alike: all see the same sums)."""
        t, info, dev, engine = self.cfg.train, self.info, self.dev, self.engine
        next_step = self.state.step + 1
        local_targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in step_batches)
        local_tokens = sum(int(b["attention_mask"].sum()) for b in step_batches)
        # every rank divides by the same global count: the summed gradients are of the global mean
        global_targets, global_tokens = engine.all_reduce_scalars([local_targets, local_tokens])

        loss_sum = torch.zeros((), dtype=torch.float32, device=dev)
        for b in step_batches:
            b = {k: v.to(dev, non_blocking=True) for k, v in b.items()}
            with self.autocast():
                ls, _ = token_loss_sum(self.model, b["input_ids"], b["attention_mask"], b["labels"], self.vocab)
            if faults.nan_due(next_step, info.rank):
                ls = ls * float("nan")
            (ls / max(global_targets, 1)).backward()
            engine.after_backward()
            loss_sum += ls.detach().float()

        # One flat all-reduce: adapter gradients, the loss, whether any rank was signalled, and
        # whether rank 0's clock says a time-based checkpoint is due (so every rank agrees).
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        due = self.checkpoints.time_due()
        extras = torch.zeros(N_EXTRAS, dtype=torch.float32, device=dev)
        extras[LOSS_SUM] = loss_sum
        extras[PREEMPTED] = float(self.preempt.signum != 0)
        extras[SAVE_DUE] = float(due)
        engine.all_reduce_sum_(grads + [extras])
        for p, g in zip(self.params, grads):
            p.grad = g
        if next_step == t.max_steps:  # steady state: grads and Adam moments all live
            self.measured = measure_states(self.model, self.lora, self.optimizer)
        loss = extras[LOSS_SUM].item() / max(global_targets, 1)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.params, t.max_grad_norm if t.max_grad_norm > 0 else float("inf"))
        skipped = not (math.isfinite(loss) and torch.isfinite(grad_norm))
        if not skipped:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss=loss, grad_norm=grad_norm, tokens=int(global_tokens),
                          stop_requested=extras[PREEMPTED].item() > 0 or next_step == t.stop_at_step,
                          save_due=extras[SAVE_DUE].item() > 0, skipped=skipped)

    def _after_first_step(self, step: int, took: float, tokens: int, graphs: int) -> None:
        """The first step of this process: a compiled run's compile time, said and left out of
        tokens/s; model.gradient_checkpointing=auto corrected from the measured peak."""
        self.recompile_expected = False
        if self.compiled:
            self.window.skip_s, self.window.skip_tokens = took, tokens
            sep = "\n" if isinstance(self.bar, tqdm) else ""
            hit, miss = cache_use()
            self.say(f"{sep}[bigtrain] step {step} took {took:.1f} s, compiling {graphs_compiled() - graphs} layer "
                     f"graph(s): inductor compiled {miss} forward/backward graph(s) and took {hit} from its cache "
                     f"(identical layers, earlier runs); tokens/s counts from step {step + 1}")
        if self.dev.type == "cuda" and self._correct_recompute():
            self.recompile_expected = True  # the layers whose flag changed compile again at the next step

    def _count_bad_step(self) -> None:
        t, state = self.cfg.train, self.state
        state.bad_steps += 1
        self.say(f"[bigtrain] step {state.step + 1}: non-finite loss/gradient, skipped "
                 f"({state.bad_steps}/{t.max_bad_steps} allowed)")
        self.loggers.log({"bad_steps": state.bad_steps}, state.step)
        if state.bad_steps > t.max_bad_steps:
            last = self.checkpoints.last if self.checkpoints is not None else None
            raise FloatingPointError(
                f"training diverged: more than train.max_bad_steps={t.max_bad_steps} non-finite steps, the last "
                f"at step {state.step + 1}; " + (f"the last checkpoint is {last}; " if last else "no checkpoint saved; ")
                + "lower train.lr (or raise train.max_grad_norm's clipping) and rerun")

    def _log(self, step: int, grad_norm) -> None:
        """One log line over the window since the last one."""
        w, info, dev = self.window, self.info, self.dev
        tps = w.tokens_per_s()
        m = {"loss": w.loss / w.steps, "lr": self.scheduler.get_last_lr()[0],
             "grad_norm": float(grad_norm), "epoch": self.sampler.epoch(self.state.position),
             "samples": self.state.position}
        if tps is not None:
            m["tokens_per_s"] = tps
        if self.compiled:
            m["compile_recompiles"] = self.recompiles
            if self.recompiles > self.recompiles_said:
                self.recompiles_said = self.recompiles
                self.say(f"{chr(10) if isinstance(self.bar, tqdm) else ''}[bigtrain] step {step}: "
                         f"{self.recompiles} layer graph(s) compiled after the first step (a new sequence "
                         f"length or batch shape; data.pack=true gives one)")
        if dev.type == "cuda":
            m["gpu_max_allocated_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
            m["gpu_max_reserved_gib"] = torch.cuda.max_memory_reserved(dev) / 2**30
            # cudaMalloc retries (the caching allocator freed its cache and synchronised the device
            # to find room): each costs a stall; a climbing count means memory is too tight to be fast
            m["gpu_alloc_retries"] = torch.cuda.memory_stats(dev).get("num_alloc_retries", 0)
            if self.peak and tps is not None:
                m["mfu"] = tps / info.world_size * self.flops_per_token / (self.peak * 1e12)
        self.loggers.log(m, step)
        self.bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{tps:,.0f}" if tps is not None else "-")
        self.window = Window()

    def _evaluate(self) -> float:
        """The eval loss with the adapters in eval mode: LoRA dropout off, as ``bigtrain eval`` scores
        them (it was on, so with lora.dropout > 0 the logged figure carried dropout noise and drew
        from the training's dropout stream)."""
        self.lora.eval()
        try:
            return evaluate(self.model, self.eval_ds, self.engine, self.cfg, self.autocast, self.pad_id, self.vocab,
                            self.pad_multiple)
        finally:
            self.lora.train()

    def _saved_state(self) -> dict:
        """What a checkpoint's trainer_state.json records of the loop: TrainState and the scheduler."""
        return {**dataclasses.asdict(self.state), "scheduler": self.scheduler.state_dict()}

    def _stop_early(self, step: int) -> dict:
        """A signal or train.stop_at_step: step ``step`` is saved; mark the run dir as preempted."""
        self.bar.close()
        if self.info.is_main:
            (self.out_dir / "preempted").write_text(f"{step}\n")
        why = signal.Signals(self.preempt.signum).name if self.preempt.signum else "train.stop_at_step"
        self.say(f"[bigtrain] stopped early ({why}): "
                 f"saved step {step}; rerun the same command to resume")
        return {"step": step, "preempted": True, "checkpoint": str(self.checkpoints.last)}

    # -- the end ---------------------------------------------------------------------------------
    def _finish(self) -> dict:
        """After the last step: memory and per-rank reports, the optional merge, the result."""
        cfg, info, say, engine, loggers = self.cfg, self.info, self.say, self.engine, self.loggers
        measured, predicted = self.measured, self.predicted
        if measured is not None:
            say("[bigtrain] model states on rank 0, predicted vs measured: " + ", ".join(
                f"{k} {predicted[k]:,}/{measured[k]:,}" for k in measured))
            loggers.summary({f"memory/{k}_{w}": d[k] for k in measured
                             for w, d in (("predicted", predicted), ("measured", measured))})
        ranks = rank_report(engine, self.model, self.params, self.optimizer, self.host)
        if info.is_main:
            (self.out_dir / "ranks.json").write_text(json.dumps(ranks, indent=1))
        _report_savings(cfg, self.meta, info.world_size, ranks, measured, engine, loggers, say,
                        checkpoint_layers=self.recompute_plan.checkpointed,
                        checkpointing=self.recompute_plan.checkpointed > 0, compiled=self.compiled)
        last_save = self.checkpoints.latest()  # resumed at max_steps: nothing new, the checkpoint there
        if cfg.checkpoint.merge_at_end:  # every rank: the base is gathered tensor by tensor
            st = merge_live(self.model, self.lora, engine, self.out_dir / "merged", self.tokenizer,
                            self.model_path if self.model_path and has_tokenizer(self.model_path) else None,
                            cfg.checkpoint.merge_max_shard_size,
                            progress=_use_bar(cfg), vocab=self.vocab)
            if st is not None:
                say(f"[bigtrain] merged model (W0 + s·B·A, {st['merged_weights']} weights) written to {st['out']}: "
                    f"{len(st['shards'])} shard(s), {st['total_bytes']:,} bytes")
        size = (last_save / ckpt.ADAPTER_FILE).stat().st_size if last_save else 0
        result = {"step": self.state.step, "eval_loss": self.last_eval, "checkpoint": str(last_save),
                  "adapter_bytes": size, "trainable_params": self.report["trainable"],
                  "bad_steps": self.state.bad_steps}
        result["checkpointed_layers"] = self.recompute_plan.checkpointed
        if self.compiled:
            # deferred: importing torch._dynamo costs start-up time, and only compiled runs need it
            from torch._dynamo.utils import counters

            result["compile_graph_breaks"] = sum(counters["graph_break"].values())
            result["compile_recompiles"] = self.recompiles
            say(f"[bigtrain] model.compile: {graphs_compiled()} graphs compiled, "
                f"{result['compile_graph_breaks']} graph breaks, {self.recompiles} compiled after the first step")
        loggers.summary(result)
        self._show_samples()
        self._farewell = (f"[bigtrain] done: {self.state.step} steps; adapter written to "
                          f"{last_save / ckpt.ADAPTER_FILE if last_save else '-'} ({size / 1e6:.3f} MB)")
        return result

    def _show_samples(self) -> None:
        """train.sample_prompts held-out prompts, generated greedily with the adapters off (the base)
        and on (what training made), printed with the reference: what LoRA changed. Every rank
        generates (the base's gathers are collective); rank 0 prints. Greedy draws no random
        numbers, and this comes after the last eval and save."""
        cfg, say = self.cfg, self.say
        if not self.samples:
            return
        from .generate import Sampling, generate_ids, row_ids  # deferred: only runs that print samples

        s = Sampling(max_new_tokens=cfg.train.sample_max_new_tokens)
        ids = [row_ids(self.tokenizer, row) for row, _ in self.samples]  # as training rendered them
        limit = position_limit(self.hf_config)
        if limit:  # a prompt too long for the positions loses its left end, as training's prompts do
            room = limit - s.max_new_tokens
            if room < 2:
                say(f"[bigtrain] samples skipped: train.sample_max_new_tokens={s.max_new_tokens} leaves no room "
                    f"for a prompt in the model's {limit} positions")
                return
            nb = int(self.tokenizer.bos_token_id is not None)  # bos stays, as in training's rows
            ids = [p[:nb] + p[len(p) - room + nb:] if len(p) > room else p for p in ids]
        outs, t0 = {}, time.perf_counter()
        was_training = self.lora.training
        self.lora.eval()  # no adapter dropout
        try:
            for label, enabled in (("base", False), ("after", True)):
                self.lora.enabled = enabled
                with eager_layers(self.model):  # compiled layers would compile again for every length
                    outs[label] = generate_ids(self.model, self.tokenizer, ids, s, vocab=self.vocab,
                                               synced=self.engine.distributed, autocast=self.autocast,
                                               after=self.engine.after_backward)
        finally:
            self.lora.enabled = True
            self.lora.train(was_training)
        dt = time.perf_counter() - t0
        n = sum(len(o) for out in outs.values() for o in out)
        say(f"[bigtrain] {len(ids)} held-out prompt(s) of {cfg.data.eval}, greedy, at most "
            f"{s.max_new_tokens} new tokens ({n} generated in {dt:.2f} s); before training (the base) and after:")
        dec = self.tokenizer.decode
        for k, (row, ref) in enumerate(self.samples):
            prompt = row["prompt"] if "prompt" in row else dec(ids[k], skip_special_tokens=False)
            say(f"  [{k + 1}] prompt:    {_one_line(prompt)}")
            say(f"      reference: {_one_line(ref)}")
            say(f"      before:    {_one_line(dec(outs['base'][k], skip_special_tokens=True))}")
            say(f"      after:     {_one_line(dec(outs['after'][k], skip_special_tokens=True))}")

    def close(self, failed: bool = False, leave_group: bool = False) -> None:
        """Tear down, once: the loggers, then (unless the run failed, or ``leave_group``: stopped
        before its first step) the engine and its process group."""
        if self._closed:
            return
        self._closed = True
        if self.loggers is not None:
            self.loggers.close(failed=failed)  # a failed run is marked so in W&B
        if failed or leave_group:
            # An exception may be this rank's alone while the others wait in a collective: the
            # engine's tear-down starts with a barrier that could then wait forever. The process
            # group is left to the process's exit (torchrun ends the other ranks).
            return
        if self._farewell:
            self.say(self._farewell)  # after the loggers' own closing output (W&B's sync note)
        if self.engine is not None:
            self.engine.close()


def rank_report(engine: Engine, model, params, optimizer, host: str) -> list[dict]:
    """Per rank: where it ran, base bytes it holds, and digests of its adapter and optimizer state."""
    opt_tensors = [v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    dev = engine.info.device
    mine = {"rank": engine.info.rank, "host": host, "base_param_bytes": engine.local_param_bytes(model),
            "gpu_peak_allocated_bytes": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None,
            "host_peak_rss_bytes": _host_peak_rss(),
            "adapter_elems": sum(p.numel() for p in params),
            "optimizer_state_elems": sum(v.numel() for v in opt_tensors)}
    out = engine.all_gather_objects(mine)
    for d, a, o in zip(out, engine.replica_digests(params), engine.replica_digests(opt_tensors)):
        d["adapter_sha256"], d["optimizer_sha256"] = a, o
    return out


def _report_savings(cfg: Config, meta, world: int, ranks: list[dict], measured: dict | None,
                    engine: Engine, loggers, say, **run_setup) -> None:
    """The VRAM LoRA saved in this run: its measured peak per GPU (the largest over ranks) beside the
    estimate for full fine-tuning with Adam of the same model on the same GPUs; printed, and sent to
    W&B as summary values and a table."""
    peaks = [r["gpu_peak_allocated_bytes"] for r in ranks if r.get("gpu_peak_allocated_bytes")]
    # without the CUDA context: allocated bytes, as torch.cuda.max_memory_allocated counts them
    st = setup_for_run(cfg, world, persistence_threshold=engine.persistence_threshold, hpz=engine.hpz_size,
                       include_context=False, **run_setup)
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
def evaluate(model, eval_ds, engine: Engine, cfg: Config, autocast, pad_id: int, vocab: int | None = None,
             multiple: int = 1) -> float:
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
        b = {k: v.to(info.device) for k, v in collate(rows, pad_id, multiple, cfg.data.max_length).items()}
        with autocast():
            ls, c = token_loss_sum(model, b["input_ids"], b["attention_mask"], b["labels"], vocab)
        total += float(ls)
        count += c
    engine.after_backward()
    total, count = engine.all_reduce_scalars([total, count])
    return total / max(count, 1)


def _sample_prompts(cfg: Config) -> list[tuple[dict, str]]:
    """(prompt row, reference) of the first train.sample_prompts examples of data.eval: a
    ``{"prompt"}`` row and its completion, or for conversations a ``{"messages"}`` row up to the last
    assistant turn and that turn; none when there is no eval set or it is text data (no prompt to
    continue). Reads only those first records."""
    n = cfg.train.sample_prompts
    if not (cfg.data.eval and n):
        return []
    records, _ = iter_records(cfg.data.eval, cfg.data.on_bad_line, cfg.data.format)
    out = []
    for rec in itertools.islice(records, n):
        if "prompt" in rec:
            out.append(({"prompt": rec["prompt"]}, rec["completion"]))
        elif "messages" in rec:
            msgs = rec["messages"]
            last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
            if last > 0 and msgs[last].get("content"):
                out.append(({"messages": msgs[:last]}, msgs[last]["content"]))
    return out


def _one_line(text: str) -> str:
    """A sample on one log line: newlines and every other non-printable character escaped."""
    return escape_controls(text.strip(), keep="")


def _check_same_data(engine: Engine, cfg: Config, stats: dict, eval_ds) -> list[int]:
    """Every rank read its own copy of the data (node-local disks, a stale copy on one node...).
    The global sample order assumes they are the same: compare a summary across ranks and, if any
    differs, every rank raises the same error (after also serving as the start-up barrier).
    Returns the ranks that tokenised the training data (the others read the cache they wrote)."""
    mine = {k: stats.get(k) for k in ("examples", "skipped", "rows", "tokens", "target_tokens")}
    mine["eval_rows"] = len(eval_ds) if eval_ds is not None else None
    seen = engine.all_gather_objects((mine, stats.get("cache")))
    built = [r for r, (_, how) in enumerate(seen) if how == "built"]
    seen = [s for s, _ in seen]
    if any(s != seen[0] for s in seen):
        diff = "; ".join(f"rank {r}: " + ", ".join(f"{k} {v}" for k, v in s.items()) for r, s in enumerate(seen))
        raise DataError(f"data.train {cfg.data.train} / data.eval {cfg.data.eval}: the ranks read "
                        f"different data ({diff}); every rank must see the same files")
    return built


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


def _check_rank(r: int, targets: dict) -> None:
    """lora.r above an adapted layer's width: B·A of a d_out × d_in layer has rank at most
    min(d_in, d_out), so the extra rank only costs memory and time (lora.r=100000 on the demo trained,
    slowly, without a word)."""
    name, m = min(targets.items(), key=lambda kv: min(kv[1].weight.shape))
    width = min(m.weight.shape)
    if r > width:
        raise ConfigError(f"lora.r={r} is more than the width of the adapted layer {name} "
                          f"({m.weight.shape[1]} -> {m.weight.shape[0]}): an update B·A of it has rank at most "
                          f"{width}; use lora.r <= {width}")


def _rows_changed(path: Path, saved: dict, rows: str, new_data: bool) -> str | None:
    """A resume continues at the saved position of the saved rows (TrainState.train_rows). When the
    rows now differ (data.train's content, the tokenizer or the data settings), refused in one line
    (it used to continue at that position of the new file, silently), or, with checkpoint.new_data,
    the line that says the new rows start from their first sample. None when nothing changed, or the
    checkpoint recorded no rows (an older one)."""
    old = saved.get("train_rows", "")
    if not old or old == rows:
        return None
    position = saved.get("position", 0)
    if not new_data:
        raise ConfigError(f"{path}: the training rows differ from the ones this run was trained on (data.train's "
                          f"content, the tokenizer, data.max_length, data.pack or data.format changed): a resume "
                          f"would continue at sample {position} of other data. Resume with the same data, or set "
                          f"checkpoint.new_data=true to train on the new rows from their first sample")
    return (f"checkpoint.new_data=true: the training rows changed since {path}; the new rows are read from "
            f"their first sample (a new epoch plan), not from sample {position}")


def _check_stop_after_resume(stop_at_step: int | None, resume_from: Path, saved: dict) -> None:
    """train.stop_at_step at or before the step a resume continues from (``saved``: the checkpoint's
    trainer_state.json) would be passed by and ignored (one run trained on to step 2000): refused
    before the base is built."""
    if stop_at_step is None:
        return
    try:
        step = int(saved["step"])
    except (KeyError, TypeError, ValueError):
        return  # unreadable here: the full verification at the resume itself names the file
    if stop_at_step <= step:
        raise ConfigError(f"train.stop_at_step={stop_at_step} is not after step {step}, which this run resumes "
                          f"from ({resume_from}): set a later step, or null to train to train.max_steps")


def _host_peak_rss() -> int:
    """This process's peak resident memory, bytes (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _mem_available() -> int | None:
    """The host's MemAvailable (/proc/meminfo), bytes; None where there is none."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _check_memory(cfg: Config, meta, engine: Engine, from_checkpoint: bool) -> str:
    """train.check_memory, before the base is built: the estimator's per-GPU peak against this GPU's
    free memory, and its host peak per rank against MemAvailable shared by this host's ranks. Every
    rank checks its own GPU and host; if any does not fit, every rank stops with the same line (one
    rank going on alone would wait for the others forever). Returns the line that says what fits."""
    info, dev = engine.info, engine.info.device
    st = setup_for_run(cfg, info.world_size, persistence_threshold=engine.zero.persistence_threshold)
    shape = model_shape(meta)
    est = estimate(shape, st)
    gpu_need = est["lora"]["per_gpu_total"]
    host_need = host_peak(shape, st, dev.type, from_checkpoint)["total"]
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    avail = _mem_available()
    host_have = avail // local if avail is not None else None
    gpu_free = torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else None
    short = []
    if gpu_free is not None and gpu_need > gpu_free:
        short.append(f"the estimate is {gpu_need / GiB:.1f} GiB per GPU and {dev} has {gpu_free / GiB:.1f} GiB free")
    if host_have is not None and host_need > host_have:
        short.append(f"the estimate is {host_need / GiB:.1f} GiB of host memory per rank and host "
                     f"{socket.gethostname()} has {host_have / GiB:.1f} GiB available per rank "
                     f"(MemAvailable over its {local} rank(s))")
    everyone = engine.all_gather_objects(short)
    bad = next(((r, s) for r, s in enumerate(everyone) if s), None)
    if bad is not None:
        r, s = bad
        fixes = []
        if est["lora"]["fewest_gpus"] and est["lora"]["fewest_gpus"] > info.world_size:
            fixes.append(f"{est['lora']['fewest_gpus']} GPUs (the fewest that fit)")
        if cfg.model.quantize is None:
            fixes.append("model.quantize=nf4")
        if cfg.train.micro_batch_size > 1:
            fixes.append("a smaller train.micro_batch_size")
        if cfg.model.gradient_checkpointing is False or type(cfg.model.gradient_checkpointing) is int:
            fixes.append("model.gradient_checkpointing=true")
        raise ConfigError(f"train.check_memory: this run does not fit on rank {r}: {'; '.join(s)}; use "
                          f"{', or '.join(fixes) or 'a larger GPU'} (bigtrain estimate shows what each needs), "
                          f"or train.check_memory=false to start anyway")
    gpu = (f"{gpu_need / GiB:.1f} GiB per GPU ({gpu_free / GiB:.1f} GiB free) and " if gpu_free is not None
           else "")
    return (f"memory check: the estimate is {gpu}{host_need / GiB:.1f} GiB of host memory per rank"
            + (f" ({host_have / GiB:.1f} GiB available)" if host_have is not None else "") + ": fits")


def _check_output_dir(out: Path, given: str) -> None:
    """train.output_dir must be a directory this process can create or write into: a file there
    (or above it), or a read-only parent, would otherwise fail in mkdir or in the first save, with
    a traceback and, for the save, after the base was built. Nothing is created here."""
    shown = repr(given) if str(out) == given else f"{given!r} ({out})"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.output_dir: {shown} is a file, not a directory; "
                          f"choose another train.output_dir")
    d = out
    while not d.exists():
        d = d.parent
    if not d.is_dir():
        raise ConfigError(f"train.output_dir: {shown} cannot be created: {d} is a file; "
                          f"choose another train.output_dir")
    if not os.access(d, os.W_OK | os.X_OK):
        what = "" if d == out else f": {d} is not writable"
        raise ConfigError(f"train.output_dir: {shown} is not writable{what} (read-only or another user's); "
                          f"choose a directory you can write to")


def _attention(requested: str | None, meta) -> tuple[str, str]:
    """model.attn_implementation for this architecture, asked of transformers (the model class's
    own check, on the meta-device model) before the base is built: null gives sdpa where the class
    supports it, else eager (Bloom, Gemma2, ...); a value it cannot run is a config error. Returns
    the kernel and what to say about the choice."""
    name = type(meta).__name__
    try:
        chosen = meta.get_correct_attn_implementation(requested, is_init_check=True)
    except (ValueError, ImportError) as e:
        why = str(e).split(". ")[0].rstrip(".")  # transformers' first sentence; the rest is its advice
        raise ConfigError(f"model.attn_implementation={requested}: transformers {transformers.__version__} "
                          f"says: {why}; set model.attn_implementation=eager, or null to let bigtrain "
                          f"pick") from None
    if requested is not None:
        return chosen, " (model.attn_implementation)"
    if chosen != "sdpa":
        return chosen, (f" ({name} does not support sdpa in transformers {transformers.__version__}; "
                        f"model.attn_implementation=null picked {chosen})")
    return chosen, " (model.attn_implementation=null: sdpa, which this architecture supports)"


def _check_positions(cfg: Config, hf_config) -> None:
    """data.max_length beyond the model's position table fails deep in the first forward pass
    ("index out of range in self") on every rank: say so before any work, naming both. Rotary
    models (LLaMA, GPT-NeoX) have no table: their max_position_embeddings is the trained context,
    not a limit (MLPerf's llama2_70b_lora trains Llama-2-70B, context 4096, at 8192), so it is not
    enforced for them."""
    limit = position_limit(hf_config)
    if limit and cfg.data.max_length > limit:
        raise ConfigError(f"data.max_length={cfg.data.max_length} exceeds the model's "
                          f"{limit} positions (max_position_embeddings of {cfg.model.local_path or cfg.model.preset}); "
                          f"set data.max_length <= {limit}")


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


def _fmt_bytes(d: dict) -> str:
    return ", ".join(f"{k} {v / 2**20:,.2f} MiB" for k, v in d.items())


def _hf_config(cfg: Config, model_path: str | None, vocab: int):
    if model_path:
        hf_config = transformers.AutoConfig.from_pretrained(model_path)
    else:
        hf_config = hf_config_for(cfg.model.preset, vocab_size=vocab, num_layers=cfg.model.num_layers)
    if vocab > hf_config.vocab_size:
        raise ConfigError(f"model.tokenizer: {vocab} tokens, more than the model's vocab_size "
                          f"{hf_config.vocab_size}; use the model's own tokenizer")
    return hf_config


def _use_bar(cfg: Config) -> bool:
    """logging.progress_bar: true or false as set; null: the bar on a terminal only (a bar redraws
    itself with carriage returns, which a log file keeps, and later lines get glued onto it)."""
    bar = cfg.logging.progress_bar
    return sys.stderr.isatty() if bar is None else bar


def _fmt_time(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class _Lines:
    """Progress as plain lines (``[bigtrain] step 20/300: loss ..., elapsed ..., ETA ...``), one per
    logged step, for logs that are not a terminal; the elapsed time and ETA count from the first step
    of this process (a resumed run's own pace)."""

    def __init__(self, total: int, initial: int):
        self.total, self.initial, self.n = total, initial, initial
        self.t0 = time.perf_counter()

    def update(self, n: int) -> None:
        self.n += n

    def set_postfix(self, loss: str, tok_s: str) -> None:
        elapsed = time.perf_counter() - self.t0
        done = self.n - self.initial
        eta = elapsed / done * (self.total - self.n) if done else 0.0
        print(f"[bigtrain] step {self.n}/{self.total}: loss {loss}, {tok_s} tokens/s, "
              f"elapsed {_fmt_time(elapsed)}, ETA {_fmt_time(eta)}", flush=True)

    def close(self) -> None: ...


def _progress(cfg: Config, initial: int, is_main: bool):
    """Rank 0's progress: a tqdm bar (:func:`_use_bar`), or plain lines printed at every log step."""
    if is_main and _use_bar(cfg):
        return tqdm(total=cfg.train.max_steps, initial=initial, desc="train", unit="step",
                    dynamic_ncols=True, file=sys.stderr)
    if is_main:
        return _Lines(cfg.train.max_steps, initial)

    class _Null:
        def update(self, n): ...
        def set_postfix(self, **k): ...
        def close(self): ...

    return _Null()
