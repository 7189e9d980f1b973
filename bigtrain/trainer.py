"""The training loop over a built run (:func:`bigtrain.run.build_run`): a ZeRO-3-partitioned (or
whole) frozen base with replicated LoRA adapters.

:func:`train` is the entry point ``bigtrain train`` calls: it builds the run, hands it to a
:class:`Trainer`, and closes it once on every exit path. :meth:`Trainer.train` reads top to bottom:
per optimizer step, :meth:`Trainer.train_step` counts the step's target tokens on all ranks, runs
forward/backward on each micro-batch with loss_sum / global_tokens, sums the adapter gradients
(plus the loss, a preemption flag and a save-due flag) in ONE flat all-reduce, clips and steps (or
skips a non-finite step on every rank together); then the loop logs, evaluates and checkpoints; on
SIGTERM/SIGUSR1/SIGINT it saves at the step boundary and stops cleanly (signals.py). At the end:
the memory report, the per-rank report, the optional merge, the held-out samples.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Protocol

import torch

from . import checkpoint as ckpt
from . import faults, seqpar
from .compile import cache_use, graphs_compiled
from .config import Config
from .data import has_tokenizer
from .engine.core import Engine
from .evaluate import evaluate
from .export import merge_live
from .generate import show_samples
from .memory import GiB, format_savings, measure_states, run_savings, setup_for_run
from .preflight import host_peak_rss
from .progress import Window, line_break, progress, use_bar
from .run import Run, build_run, output_dir
from .sampler import count_tokens, step_batches
from .signals import PreemptedBeforeStep, Preemption


def train(cfg: Config, pending_signals: list[int] | None = None) -> dict:
    """Run training as ``cfg`` says; return the result dict (step, eval_loss, checkpoint, ...; or
    step, preempted, checkpoint after a stop). ``pending_signals``: SIGTERM/SIGUSR1/SIGINT the CLI
    caught while importing: the run then stops before any work, marked preempted. The run is closed
    exactly once, however this ends (:meth:`bigtrain.run.Run.close`)."""
    # from here on a stop signal before the first step ends the run at once, marked preempted so
    # that the Slurm scripts requeue it; from the first step on, at the next step boundary
    preempt = Preemption(pending_signals)
    run = trainer = None
    failed, early = True, False
    try:
        preempt.check()
        run = build_run(cfg)
        trainer = Trainer(run, preempt)
        result = trainer.train()
        failed = False
        return result
    except PreemptedBeforeStep as e:
        failed, early = False, True
        return _preempted_before_step(cfg, run.state.step if run is not None else e.step, e.signum)
    except Exception as e:
        if preempt.peer_stopped_at_once(e):
            preempt.stop_with_peer()  # does not return
        raise
    finally:
        if run is not None:
            run.close(failed, leave_group=early, farewell=trainer.farewell if trainer else None)


def _preempted_before_step(cfg: Config, step: int, signum: int) -> dict:
    """A signal before the first step: nothing new to save. Mark the run dir preempted (at the
    step of the checkpoint it will resume from) so that the Slurm scripts requeue the job, and
    return; the caller exits 0. The process group is left to the process's exit, as after a
    failure: the other ranks may be anywhere in their start-up."""
    if int(os.environ.get("RANK", "0")) == 0:
        out = output_dir(cfg)
        out.mkdir(parents=True, exist_ok=True)
        (out / "preempted").write_text(f"{step}\n")
        print(f"[bigtrain] {signal.Signals(signum).name} before the first step: stopped, nothing new to "
              f"save; rerun the same command to "
              f"{f'resume from step {step}' if step else 'start again'}", file=sys.stderr, flush=True)
    return {"step": step, "preempted": True, "checkpoint": None}


@dataclass
class StepResult:
    """One optimizer step as every rank sees it (all values are after the step's all-reduce)."""

    loss: float  # mean token loss of the step over all ranks
    grad_norm: torch.Tensor  # of the summed adapter gradients, before clipping
    tokens: int  # attended tokens of the step, all ranks
    stop_requested: bool  # a rank was signalled, or train.stop_at_step is reached
    save_due: bool  # rank 0's clock says a time-based checkpoint is due
    skipped: bool  # non-finite loss or gradient: no update was made


class StepObserver(Protocol):
    """Sees each optimizer step of the real loop (``bigtrain measure`` times and caps it)."""

    def before_step(self) -> None: ...
    def after_step(self, result: StepResult) -> None: ...


# Slots of the scalars that ride in the step's one all-reduce after the adapter gradients.
LOSS_SUM, PREEMPTED, SAVE_DUE = range(3)
N_EXTRAS = 3


class Trainer:
    """The loop over a built :class:`~bigtrain.run.Run`; see the module docstring."""

    def __init__(self, run: Run, preempt: Preemption | None = None, observer: StepObserver | None = None):
        self.run = run
        self.preempt = preempt if preempt is not None else Preemption()
        self.observer = observer
        self.bar = None  # progress (progress.py), from the first step
        self.window = Window()  # sums since the last log line
        self.last_eval: float | None = None
        self.measured: dict | None = None  # model states at the last step, when all exist
        # (peak, plan, step) of the first step when the correction after it changed the plan (and
        # restarted the peak), else None
        self.first_step_peak: tuple | None = None
        self.first_peak_unlogged = False
        self.farewell: str | None = None  # the run's last line, printed after the loggers close
        self.recompiles = 0  # layer graphs compiled after the first step (model.compile)
        self.recompiles_said = 0
        self.recompile_expected = False  # the step after a change of checkpointed layers compiles again

    # -- the loop --------------------------------------------------------------------------------
    def train(self) -> dict:
        """Optimizer steps up to train.max_steps (or a stop request); returns the run's summary."""
        run, t, state = self.run, self.run.cfg.train, self.run.state
        if run.inputs.eval_ds is not None and state.step == 0:
            # the base model's own score, the reference the adapters' evals are read against
            base_eval = self._evaluate()
            run.loggers.log({"eval_loss": base_eval}, 0)
            run.say(f"[bigtrain] step 0 (adapters are zero: the base model): eval loss {base_eval:.4f}")
        self.bar = progress(run.cfg, state.step, run.info.is_main)
        self.window = Window()
        run.checkpoints.restart_clock()  # checkpoint.every_minutes counts from the first step
        self.preempt.arm()  # from here a signal saves at the next step boundary
        first = True
        while state.step < t.max_steps:
            started, graphs = time.perf_counter(), graphs_compiled() if run.compiled else 0
            if self.observer:
                self.observer.before_step()
            r = self.train_step(self.step_batches())
            if self.observer:
                self.observer.after_step(r)
            took = time.perf_counter() - started
            # the samples are consumed even by a skipped step: a resume replays the same order
            state.position += run.global_batch
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
            elif run.compiled and graphs_compiled() > graphs and not self.recompile_expected:
                self.recompiles += graphs_compiled() - graphs  # a new shape or mode in steady state
            self.recompile_expected = False

            # the last step always logs, evaluates and saves: the run's result is its final state
            if step % t.log_every == 0 or step == t.max_steps:
                self._log(step, r.grad_norm)
            if run.inputs.eval_ds is not None and ((t.eval_every and step % t.eval_every == 0)
                                                   or step == t.max_steps):
                self.last_eval = self._evaluate()
                run.loggers.log({"eval_loss": self.last_eval}, step)
                run.say(f"{line_break(self.bar)}[bigtrain] step {step}: eval loss {self.last_eval:.4f}")
            # a stop request saves first, so that rerunning the same command resumes from here
            run.checkpoints.maybe_save(step, self._saved_state(), force=r.stop_requested, due=r.save_due)
            if r.stop_requested and step < t.max_steps:  # at the last step the run just ends: done
                return self._stop_early(step)
        self.bar.close()
        return self._finish()

    def step_batches(self) -> list[dict]:
        """This rank's micro-batches of the next optimizer step, cut from the global sample order."""
        run, t, sp = self.run, self.run.cfg.train, self.run.seqpar
        # train.sequence_parallel: a sequence group takes its data-parallel rank's samples, each rank its shard
        rank, world = (sp.layout.dp_rank, sp.layout.dp_world) if sp else (run.info.rank, run.info.world_size)
        batches = step_batches(run.inputs.train_ds, run.sampler, run.state.position, t.micro_batch_size,
                               t.grad_accum, rank, world, run.inputs.tokenizer.pad_token_id,
                               run.pad_multiple, run.cfg.data.max_length)
        return [sp.shard(b) for b in batches] if sp else batches

    def train_step(self, batches: list[dict]) -> StepResult:
        """One optimizer step over this rank's micro-batches: forward/backward, the one all-reduce,
        clip, then step, or skip a non-finite step (on every rank alike: all see the same sums)."""
        run, t = self.run, self.run.cfg.train
        dev, engine = run.dev, run.engine
        next_step = run.state.step + 1
        # every rank divides by the same global count: the summed gradients are of the global mean
        global_targets, global_tokens = engine.all_reduce_scalars(list(count_tokens(batches)))

        loss_sum = torch.zeros((), dtype=torch.float32, device=dev)
        for b in batches:
            b = {k: v.to(dev, non_blocking=True) for k, v in b.items()}
            with run.offload, seqpar.attending(run.seqpar, b):  # forward and backward: checkpointed inputs
                # in host memory if any; a sequence shard's attention (and its recomputation) over its group
                with run.autocast():
                    ls, _ = seqpar.loss_sum(run.model, b, run.inputs.vocab)
                if faults.nan_due(next_step, run.info.rank):
                    ls = ls * float("nan")
                (ls / max(global_targets, 1)).backward()
            engine.after_backward()
            loss_sum += ls.detach().float()

        # One flat all-reduce: adapter gradients, the loss, whether any rank was signalled, and
        # whether rank 0's clock says a time-based checkpoint is due (so every rank agrees).
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in run.params]
        due = run.checkpoints.time_due()
        extras = torch.zeros(N_EXTRAS, dtype=torch.float32, device=dev)
        extras[LOSS_SUM] = loss_sum
        extras[PREEMPTED] = float(self.preempt.signum != 0)
        extras[SAVE_DUE] = float(due)
        engine.all_reduce_sum_(grads + [extras])
        for p, g in zip(run.params, grads):
            p.grad = g
        if next_step == t.max_steps:  # steady state: grads and Adam moments all live
            self.measured = measure_states(run.model, run.lora, run.optimizer)
        loss = extras[LOSS_SUM].item() / max(global_targets, 1)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            run.params, t.max_grad_norm if t.max_grad_norm > 0 else float("inf"))
        skipped = not (math.isfinite(loss) and torch.isfinite(grad_norm))
        if not skipped:
            run.optimizer.step()
            run.scheduler.step()
        if self.measured is not None and next_step == t.max_steps:
            # Adam's moments appear at the optimizer's first step: a run of one step has them only now
            self.measured["optimizer_state"] = measure_states(run.model, run.lora, run.optimizer)["optimizer_state"]
        run.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss=loss, grad_norm=grad_norm, tokens=int(global_tokens),
                          stop_requested=extras[PREEMPTED].item() > 0 or next_step == t.stop_at_step,
                          save_due=extras[SAVE_DUE].item() > 0, skipped=skipped)

    def _after_first_step(self, step: int, took: float, tokens: int, graphs: int) -> None:
        """The first step of this process: a compiled run's compile time, said and left out of
        tokens/s; model.gradient_checkpointing=auto corrected from the measured peak."""
        run = self.run
        self.recompile_expected = False
        if run.compiled:
            self.window.skip_s, self.window.skip_tokens = took, tokens
            hit, miss = cache_use()
            run.say(f"{line_break(self.bar)}[bigtrain] step {step} took {took:.1f} s, compiling "
                    f"{graphs_compiled() - graphs} layer graph(s): inductor compiled {miss} forward/backward "
                    f"graph(s) and took {hit} from its cache (identical layers, earlier runs); tokens/s "
                    f"counts from step {step + 1}")
        if run.dev.type == "cuda":
            peak, before = torch.cuda.max_memory_allocated(run.dev), run.recompute_plan
            if run.correct_recompute():
                self.recompile_expected = True  # the layers whose flag changed compile again at the next step
                # the run's peak (ranks.json, the end-of-run line beside the estimate) is the corrected
                # plan's, from the next step on; step 1's is kept for its log line and for a run that
                # ends at step 1 (its plan's estimate is then the one compared)
                self.first_step_peak = (peak, before, step)
                self.first_peak_unlogged = True
                torch.cuda.reset_peak_memory_stats(run.dev)

    def _count_bad_step(self) -> None:
        run, t, state = self.run, self.run.cfg.train, self.run.state
        state.bad_steps += 1
        run.say(f"[bigtrain] step {state.step + 1}: non-finite loss/gradient, skipped "
                f"({state.bad_steps}/{t.max_bad_steps} allowed)")
        run.loggers.log({"bad_steps": state.bad_steps}, state.step)
        if state.bad_steps > t.max_bad_steps:
            last = run.checkpoints.last if run.checkpoints is not None else None
            raise FloatingPointError(
                f"training diverged: more than train.max_bad_steps={t.max_bad_steps} non-finite steps, the last "
                f"at step {state.step + 1}; " + (f"the last checkpoint is {last}; " if last else "no checkpoint saved; ")
                + "lower train.lr (or raise train.max_grad_norm's clipping) and rerun")

    def _log(self, step: int, grad_norm) -> None:
        """One log line over the window since the last one."""
        run, w, dev = self.run, self.window, self.run.dev
        tps = w.tokens_per_s()
        m = {"loss": w.loss / w.steps, "lr": run.scheduler.get_last_lr()[0],
             "grad_norm": float(grad_norm), "epoch": run.sampler.epoch(run.state.position),
             "samples": run.state.position}
        if tps is not None:
            m["tokens_per_s"] = tps
        if run.compiled:
            m["compile_recompiles"] = self.recompiles
            if self.recompiles > self.recompiles_said:
                self.recompiles_said = self.recompiles
                run.say(f"{line_break(self.bar)}[bigtrain] step {step}: {self.recompiles} layer graph(s) compiled "
                        f"after the first step (a new sequence length or batch shape; data.pack=true gives one)")
        if dev.type == "cuda":
            peak = torch.cuda.max_memory_allocated(dev)
            if self.first_peak_unlogged:  # the window holds the first step, whose peak was restarted
                peak, self.first_peak_unlogged = max(peak, self.first_step_peak[0]), False
            m["gpu_max_allocated_gib"] = peak / 2**30
            m["gpu_max_reserved_gib"] = torch.cuda.max_memory_reserved(dev) / 2**30
            # cudaMalloc retries (the caching allocator freed its cache and synchronised the device
            # to find room): each costs a stall; a climbing count means memory is too tight to be fast
            m["gpu_alloc_retries"] = torch.cuda.memory_stats(dev).get("num_alloc_retries", 0)
            if run.peak_tflops and tps is not None:
                m["mfu"] = tps / run.info.world_size * run.flops_per_token / (run.peak_tflops * 1e12)
        run.loggers.log(m, step)
        self.bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{tps:,.0f}" if tps is not None else "-")
        self.window = Window()

    def _evaluate(self) -> float:
        """The eval loss with the adapters in eval mode: LoRA dropout off, as ``bigtrain eval`` scores
        them (with lora.dropout > 0 a training-mode figure would carry dropout noise and draw from
        the training's dropout stream)."""
        run = self.run
        run.lora.eval()
        try:
            return evaluate(run.model, run.inputs.eval_ds, run.engine, run.cfg, run.autocast,
                            run.inputs.tokenizer.pad_token_id, run.inputs.vocab, run.pad_multiple, run.seqpar)
        finally:
            run.lora.train()

    def _saved_state(self) -> dict:
        """What a checkpoint's trainer_state.json records of the loop: TrainState and the scheduler."""
        return {**dataclasses.asdict(self.run.state), "scheduler": self.run.scheduler.state_dict()}

    def _stop_early(self, step: int) -> dict:
        """A signal or train.stop_at_step: step ``step`` is saved; mark the run dir as preempted."""
        run = self.run
        self.bar.close()
        if run.info.is_main:
            (run.out_dir / "preempted").write_text(f"{step}\n")
        why = signal.Signals(self.preempt.signum).name if self.preempt.signum else "train.stop_at_step"
        run.say(f"[bigtrain] stopped early ({why}): saved step {step}; rerun the same command to resume")
        return {"step": step, "preempted": True, "checkpoint": str(run.checkpoints.last)}

    # -- the end ---------------------------------------------------------------------------------
    def _finish(self) -> dict:
        """After the last step: memory and per-rank reports, the optional merge, the result."""
        run, cfg = self.run, self.run.cfg
        self._report_memory()
        last_save = run.checkpoints.latest()  # resumed at max_steps: nothing new, the checkpoint there
        if cfg.checkpoint.merge_at_end:  # every rank: the base is gathered tensor by tensor
            path = run.inputs.model_path
            st = merge_live(run.model, run.lora, run.engine, run.out_dir / "merged", run.inputs.tokenizer,
                            path if path and has_tokenizer(path) else None, cfg.checkpoint.merge_max_shard_size,
                            progress=use_bar(cfg), vocab=run.inputs.vocab)
            if st is not None:
                run.say(f"[bigtrain] merged model (W0 + s·B·A, {st['merged_weights']} weights) written to "
                        f"{st['out']}: {len(st['shards'])} shard(s), {st['total_bytes']:,} bytes")
        size = (last_save / ckpt.ADAPTER_FILE).stat().st_size if last_save else 0
        result = {"step": run.state.step, "eval_loss": self.last_eval, "checkpoint": str(last_save),
                  "adapter_bytes": size, "trainable_params": run.report["trainable"],
                  "bad_steps": run.state.bad_steps, "checkpointed_layers": run.recompute_plan.checkpointed,
                  "tiled_mlp": run.recompute_plan.tiled, "offloaded_layers": run.recompute_plan.offloaded}
        if run.compiled:
            # deferred: importing torch._dynamo costs start-up time, and only compiled runs need it
            from torch._dynamo.utils import counters

            result["compile_graph_breaks"] = sum(counters["graph_break"].values())
            result["compile_recompiles"] = self.recompiles
            run.say(f"[bigtrain] model.compile: {graphs_compiled()} graphs compiled, "
                    f"{result['compile_graph_breaks']} graph breaks, {self.recompiles} compiled after the first step")
        run.loggers.summary(result)
        show_samples(run)
        self.farewell = (f"[bigtrain] done: {run.state.step} steps; adapter written to "
                         f"{last_save / ckpt.ADAPTER_FILE if last_save else '-'} ({size / 1e6:.3f} MB)")
        return result

    def _report_memory(self) -> None:
        """Model states predicted vs measured, the per-rank report (ranks.json), the VRAM saved."""
        run, measured = self.run, self.measured
        if measured is not None:
            run.say("[bigtrain] model states on rank 0, predicted vs measured: " + ", ".join(
                f"{k} {run.predicted[k]:,}/{measured[k]:,}" for k in measured))
            run.loggers.summary({f"memory/{k}_{w}": d[k] for k in measured
                                 for w, d in (("predicted", run.predicted), ("measured", measured))})
        plan, peak = run.recompute_plan, None
        if self.first_step_peak is not None and self.first_step_peak[2] == run.state.step:
            # the run ended at the step after which its plan was corrected: that step's peak and plan
            peak, plan = self.first_step_peak[0], self.first_step_peak[1]
        ranks = rank_report(run.engine, run.model, run.params, run.optimizer, run.host, peak)
        if run.info.is_main:
            (run.out_dir / "ranks.json").write_text(json.dumps(ranks, indent=1))
        report_savings(run.cfg, run.inputs.meta, run.info.world_size, ranks, measured, run.engine, run.loggers,
                       run.say, checkpoint_layers=plan.checkpointed, checkpointing=plan.checkpointed > 0,
                       compiled=run.compiled, tiled_mlp=plan.tiled, offload_layers=plan.offloaded)


def rank_report(engine: Engine, model, params, optimizer, host: str, gpu_peak: int | None = None) -> list[dict]:
    """Per rank: where it ran, base bytes it holds, its GPU peak (``gpu_peak``, else the allocator's),
    and digests of its adapter and optimizer state."""
    opt_tensors = [v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    dev = engine.info.device
    if gpu_peak is None and dev.type == "cuda":
        gpu_peak = torch.cuda.max_memory_allocated(dev)
    mine = {"rank": engine.info.rank, "host": host, "base_param_bytes": engine.local_param_bytes(model),
            "gpu_peak_allocated_bytes": gpu_peak,
            "host_peak_rss_bytes": host_peak_rss(),
            "adapter_elems": sum(p.numel() for p in params),
            "optimizer_state_elems": sum(v.numel() for v in opt_tensors)}
    out = engine.all_gather_objects(mine)
    for d, a, o in zip(out, engine.replica_digests(params), engine.replica_digests(opt_tensors)):
        d["adapter_sha256"], d["optimizer_sha256"] = a, o
    return out


def report_savings(cfg: Config, meta, world: int, ranks: list[dict], measured: dict | None,
                   engine: Engine, loggers, say, **run_setup) -> None:
    """The VRAM LoRA saved in this run: its measured peak per GPU (the largest over ranks) beside the
    estimate for full fine-tuning with Adam of the same model on the same GPUs; printed, and sent to
    W&B as summary values and a table."""
    peaks = [r["gpu_peak_allocated_bytes"] for r in ranks if r.get("gpu_peak_allocated_bytes")]
    # without the CUDA context: allocated bytes, as torch.cuda.max_memory_allocated counts them
    st = setup_for_run(cfg, world, persistence_threshold=engine.persistence_threshold, hpz=engine.hpz_size,
                       shard_group=engine.base_shards, include_context=False, **run_setup)
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
