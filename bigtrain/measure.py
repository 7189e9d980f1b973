"""``bigtrain measure``: the VRAM LoRA saves, measured on the user's own job.

For the job as configured (model, micro-batch, sequence, checkpointing; GPUs and nodes from the
launcher), every rank runs K optimizer steps of each mode in turn:

* ``lora``: bigtrain's own training loop (``run.build_run`` and :class:`~bigtrain.trainer.Trainer`, as ``bigtrain train`` runs them);
* ``full-zero3`` (``full-zero2``, ``full-zero1``): full fine-tuning as its users run it, DeepSpeed
  ZeRO stage 3 (2, 1) with 16-bit mixed precision and DeepSpeed's AdamW (fp32 master weights and
  Adam states in DeepSpeed's optimizer; ``torch_adam``, see :func:`bigtrain.engine.full_ft.full_ft_ds_config`),
  every parameter trainable, the same base build, data order and objective (target-token cross
  entropy summed and divided by the step's global target count).

Clean state per mode: each rank (the *parent*, started by torchrun, the deepspeed launcher or
``srun``) runs each mode in a child process of its own (``python -m bigtrain.measure --child``),
with a fresh rendezvous port that rank 0 picks and publishes through a store the parents share (the
launcher's ``env://`` rendezvous). A CUDA out-of-memory error or a hung collective in one mode
cannot poison the next: a child that runs out of memory writes "out of memory at step N" and exits
with :data:`OOM_EXIT`; every parent publishes its child's outcome in the store, and a parent whose
child is still running after another rank's child failed kills it (its collectives would wait for
the dead rank) after :data:`GRACE_S`. The parents then go on to the next mode together.

Measured per rank, reported per GPU as the maximum over ranks: peak allocated and reserved memory
(``torch.cuda.max_memory_*``; on CPU the host's peak RSS), model-state bytes by kind counted on the
live tensors (LoRA: :func:`bigtrain.memory.measure_states`; full fine-tuning: the DeepSpeed engine's
16-bit weights, gradient partitions, fp32 master and Adam states, :func:`bigtrain.engine.full_ft.full_ft_states`),
activations and buffers (the peak less the model states) and tokens/s per GPU (steps 2..K). Beside
each, ``bigtrain estimate``'s prediction for the same setting (without the CUDA context, which the
allocator's counters do not see) and the error; and the full / LoRA ratio, measured and predicted.

Outputs (rank 0, written by :mod:`bigtrain.measure_report`): a table on the console,
``<out>/measure.json``, ``<out>/measure.png`` (per-GPU memory by kind, modes side by side, the
estimate as outlines), each mode's logs and files under ``<out>/<mode>/``, and, with
``logging.wandb=true``, a W&B run with the table and the chart.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from . import dist as D
from . import faults
from .config import ConfigError, load_config
from .dist import detect_world, exit_after_teardown, unlink_deepspeed_shm, wants_cuda
from .engine import full_ft as Z
from .engine.core import DTYPES
from .engine.ds_config import check_deepspeed_version
from .losses import token_loss_sum_reference
from .measure_report import MODES, GiB, build_report, mode_status, write_outputs
from .memory import measure_states, predict_full_states, shape_from_model
from .preflight import host_peak_rss
from .run import build_run, check_inputs, set_seed
from .sampler import GlobalSampler, count_tokens, step_batches
from .trainer import Trainer

# The parent process never touches CUDA (a CUDA context there would take GPU memory from every mode
# it measures): importing these creates none; each mode's work runs in a child process.

OOM_EXIT = 17  # a child that ran out of memory (CUDA, or the --mem-cap-gib cap) exits with this
GRACE_S = 10.0  # after another rank's child failed: how long a still-running child may take to end

# ------------------------------------------------------------------------------------------------
# The parent: one per rank, started by the launcher.


def measure_job(cfg, args, modes: list[str]) -> int:
    """Run ``modes`` in turn on this rank (``cfg`` and ``args`` checked by the command,
    :mod:`bigtrain.commands.measure`); rank 0 writes the report."""
    rank, world, local_rank = detect_world()
    # a launcher's or Slurm's TERM (or Ctrl-C) ends this rank's child too: it runs in its own session,
    # so nothing else would, and an orphaned child would keep its GPU
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _end_child_and_exit)
    out = Path(os.path.abspath(os.path.expanduser(args.out or os.path.join(cfg.train.output_dir, "measure"))))
    store = _parent_store(rank, world, cfg.zero.timeout_s)
    results = {}
    for i, mode in enumerate(modes):
        results[mode] = _run_mode(store, i, mode, args, out, rank, world, local_rank)
    if rank == 0:
        report = build_report(cfg, args, modes, results, world)
        write_outputs(report, cfg, out)
    # rank 0 may host the store: it leaves last
    store.add("bigtrain-measure/left", 1)
    if rank == 0:
        deadline = time.monotonic() + 60
        while int(store.add("bigtrain-measure/left", 0)) < world and time.monotonic() < deadline:
            time.sleep(0.1)
    return 0


def _parent_store(rank: int, world: int, timeout_s: float):
    """The store the parents share: the launcher's ``env://`` rendezvous (torchrun's agent store, or
    one rank 0 hosts at MASTER_ADDR:MASTER_PORT under the deepspeed launcher and srun)."""
    if world == 1:
        return dist.HashStore()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        raise ConfigError("MASTER_PORT is not set: start multi-process runs with torchrun, the deepspeed "
                          "launcher or the scripts in slurm/")
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world,
                                       timeout=datetime.timedelta(seconds=timeout_s)))
    return dist.PrefixStore("bigtrain-measure-parents", store)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _run_mode(store, i: int, mode: str, args, out: Path, rank: int, world: int, local_rank: int) -> list | None:
    """Run ``mode`` in a child process on this rank, agree on the outcome with the other parents;
    rank 0 returns every rank's result (others None)."""
    key = f"bigtrain-measure/{i}"
    mdir = out / mode
    if rank == 0:
        shutil.rmtree(mdir, ignore_errors=True)  # a fresh run directory: nothing to resume from
        mdir.mkdir(parents=True, exist_ok=True)
        store.set(f"{key}/port", str(_free_port()))
    port = int(store.get(f"{key}/port"))  # waits for rank 0
    mdir.mkdir(parents=True, exist_ok=True)  # another node's file system
    result_path = mdir / f"rank{rank}.json"
    result_path.unlink(missing_ok=True)
    spec_path = mdir / f"spec{rank}.json"
    spec_path.write_text(json.dumps({
        "config": args.config, "overrides": list(args.overrides), "mode": mode, "steps": args.steps,
        "mem_cap_bytes": int(args.mem_cap_gib * GiB) if args.mem_cap_gib else None,
        "dir": str(mdir), "result": str(result_path)}))
    env = {**os.environ, "MASTER_ADDR": os.environ.get("MASTER_ADDR", "127.0.0.1"), "MASTER_PORT": str(port),
           "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local_rank)}
    env.pop("TORCHELASTIC_USE_AGENT_STORE", None)  # the child's rank 0 hosts its own store
    if rank == 0:
        print(f"[bigtrain] measure: {mode}, {args.steps} steps on {world} rank(s); log {mdir}/rank0.log",
              flush=True)
    with open(mdir / f"rank{rank}.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "bigtrain.measure", "--child", str(spec_path)],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    _CHILD[:] = [proc]
    t0, failed_seen, stopped, published = time.monotonic(), None, None, False
    while True:
        rc = proc.poll()
        if rc is not None and not published:
            if rc != 0:
                store.add(f"{key}/failed", 1)
            store.add(f"{key}/done", 1)
            published = True
        if published and int(store.add(f"{key}/done", 0)) >= world:
            break
        if rc is None:
            now = time.monotonic()
            if int(store.add(f"{key}/failed", 0)) > 0:
                failed_seen = failed_seen or now
                if now - failed_seen > GRACE_S:
                    stopped = "stopped: another rank's child failed"
                    _kill(proc)
            if now - t0 > args.mode_timeout_s:
                stopped = f"stopped: still running after --mode-timeout-s {args.mode_timeout_s:g}"
                _kill(proc)
        time.sleep(0.1)
    # the child's DeepSpeed CPU shared-memory buffer (made under the deepspeed launcher), left by a
    # child that ran out of memory or was stopped
    unlink_deepspeed_shm(rank, world, env["MASTER_ADDR"], port)
    if result_path.is_file():
        res = json.loads(result_path.read_text())
    else:
        res = {"status": stopped or f"failed: exit code {proc.returncode}", "rank": rank}
    res["log"] = str(mdir / f"rank{rank}.log")
    store.set(f"{key}/result/{rank}", json.dumps(res))
    if rank != 0:
        return None
    results = [json.loads(store.get(f"{key}/result/{r}")) for r in range(world)]
    print(f"[bigtrain] measure: {mode}: {mode_status(results)}", flush=True)
    return results


_CHILD: list = []  # the child process of the mode running now, for _end_child_and_exit


def _end_child_and_exit(signum, frame) -> None:
    for proc in _CHILD:
        if proc.poll() is None:
            _kill(proc)
    raise SystemExit(128 + signum)


def _kill(proc) -> None:
    """End a child we started (its own session: the child and anything it started), TERM then KILL."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue



# ------------------------------------------------------------------------------------------------
# The child: one mode on one rank.


class Progress:
    """The step in flight (0: setup) and the timing of steps 2..K."""

    def __init__(self):
        self.step, self.tokens, self.seconds, self.last = 0, 0, 0.0, None

    def done(self, tokens: int, sync) -> None:
        sync()
        now = time.perf_counter()
        if self.last is not None and self.step >= 2:
            self.tokens += tokens
            self.seconds += now - self.last
        self.last = now


class MemCap:
    """``--mem-cap-gib``. On GPU the caching allocator's own limit
    (``torch.cuda.set_per_process_memory_fraction``): an allocation past it raises
    ``torch.OutOfMemoryError``. On CPU there is no allocator limit: the model states counted on the
    live tensors after setup and after every step are checked against the cap, and the same error
    is raised. Either way the child leaves through the same clean out-of-memory path."""

    def __init__(self, cap: int | None, device, rank: int):
        self.cap = cap if cap and faults.mem_cap_applies(rank) else None
        self.cpu = device.type != "cuda"
        if self.cap and not self.cpu:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, self.cap / total), device)

    def check(self, step: int, state_bytes: int) -> None:
        if self.cap and self.cpu and state_bytes > self.cap:
            raise torch.OutOfMemoryError(f"model states {state_bytes:,} bytes exceed the memory cap of "
                                         f"{self.cap:,} bytes (--mem-cap-gib) at step {step}")


class PhasePeaks:
    """Full fine-tuning on a GPU: the allocator's peak within each phase (the build, forward and
    backward, the optimizer step: max over steps), so that a peak the estimate misses can be placed.
    The counters are reset between phases; the overall peaks are kept here."""

    def __init__(self, dev):
        self.dev, self.peaks, self.alloc, self.reserved = dev, {}, 0, 0

    def end(self, name: str) -> None:
        if self.dev.type != "cuda":
            return
        a, r = torch.cuda.max_memory_allocated(self.dev), torch.cuda.max_memory_reserved(self.dev)
        self.peaks[name] = max(self.peaks.get(name, 0), a)
        self.alloc, self.reserved = max(self.alloc, a), max(self.reserved, r)
        torch.cuda.reset_peak_memory_stats(self.dev)

    def report(self) -> dict:
        if self.dev.type != "cuda":
            return {}
        return {"phase_peak_allocated_bytes": self.peaks, "peak_allocated_bytes": self.alloc,
                "peak_reserved_bytes": self.reserved}


def _child(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    mode, steps = spec["mode"], spec["steps"]
    overrides = list(spec["overrides"]) + [f"train.output_dir={spec['dir']}/run", f"train.max_steps={steps}",
                                           "data.eval=null", "checkpoint.every=0", "checkpoint.resume=never",
                                           "checkpoint.every_minutes=0", "checkpoint.merge_at_end=false",
                                           "train.stop_at_step=null", "train.log_every=1",
                                           "logging.wandb=false", "logging.tensorboard=false",
                                           "logging.progress_bar=false"]
    cfg = load_config(spec["config"], overrides)
    prog = Progress()
    res = {"mode": mode, "rank": int(os.environ.get("RANK", "0")), "steps": steps}
    code = 0
    try:
        if MODES[mode] is None:
            res.update(_run_lora(cfg, spec, prog))
        else:
            res.update(_run_full(cfg, MODES[mode], spec, prog))
        res["status"] = "ok"
    except torch.OutOfMemoryError as e:
        res.update(status="oom", step=prog.step, error=str(e).strip().splitlines()[0][:500])
        print(f"[bigtrain] measure: {mode}: out of memory at step {prog.step} on rank {res['rank']}: "
              f"{res['error']}", flush=True)
        code = OOM_EXIT
        dev = _device(cfg)
        if dev.type == "cuda":  # for the estimate's fewest GPUs of this size, whatever else ran
            res.update(device=torch.cuda.get_device_name(dev),
                       device_total_bytes=torch.cuda.get_device_properties(dev).total_memory)
    res["host_peak_rss_bytes"] = host_peak_rss()
    tmp = Path(spec["result"] + ".tmp")
    tmp.write_text(json.dumps(res))
    tmp.replace(spec["result"])
    # after an OOM other ranks may still wait in a collective: leave without tearing the group down
    exit_after_teardown(code)
    return code


def _device_info(dev) -> dict:
    if dev.type != "cuda":
        return {"device": "cpu"}
    return {"device": torch.cuda.get_device_name(dev),
            "device_total_bytes": torch.cuda.get_device_properties(dev).total_memory,
            "peak_allocated_bytes": torch.cuda.max_memory_allocated(dev),
            "peak_reserved_bytes": torch.cuda.max_memory_reserved(dev)}


def _device(cfg):
    """This rank's device, as the engine will pick it (before it starts: the cap covers the build)."""
    if not wants_cuda(cfg.train.device) or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", detect_world()[2] % torch.cuda.device_count())


def _sync(dev):
    return (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)


def _run_lora(cfg, spec, prog: Progress) -> dict:
    """bigtrain's own loop, as ``bigtrain train`` runs it (run.build_run, trainer.Trainer), timed
    and capped around each step by a step observer."""
    cap = MemCap(spec["mem_cap_bytes"], _device(cfg), int(os.environ.get("RANK", "0")))
    run = build_run(cfg)
    failed = True
    try:
        def states() -> int:
            return sum(measure_states(run.model, run.lora, run.optimizer).values())

        cap.check(0, states())
        sync = _sync(run.dev)

        class Timed:
            def before_step(self) -> None:
                prog.step += 1

            def after_step(self, result) -> None:
                prog.done(result.tokens, sync)
                cap.check(prog.step, states())

        trainer = Trainer(run, observer=Timed())
        prog.last = time.perf_counter()
        trainer.train()
        failed = False
    finally:
        run.close(failed)
    if trainer.measured is None:  # the loop ended before step K: a preemption signal
        raise RuntimeError(f"the LoRA run stopped at step {run.state.step} of {spec['steps']}")
    world = run.info.world_size
    return {"world_size": world, "base_shards": run.engine.base_shards,  # zero.shard_group as taken
            "states": trainer.measured, "predicted_states": run.predicted,
            "tokens_per_s_per_gpu": prog.tokens / prog.seconds / world if prog.seconds else None,
            **_device_info(run.dev)}


def _run_full(cfg, stage: int, spec, prog: Progress) -> dict:
    """Full fine-tuning under DeepSpeed ZeRO-``stage``: the same base build, data order and objective."""
    t = cfg.train
    inp = check_inputs(cfg)  # the input checks, tokenizer, model config and data of a LoRA run
    check_deepspeed_version()
    cap = MemCap(spec["mem_cap_bytes"], _device(cfg), int(os.environ.get("RANK", "0")))
    info = D.init_distributed(t.device, cfg.zero.backend, cfg.zero.timeout_s, 3)  # DeepSpeed's comm layer
    dev, world = info.device, info.world_size
    dtype = DTYPES[cfg.model.dtype]
    ds = Z.full_ft_ds_config(stage, dtype, t.micro_batch_size, t.grad_accum, world, t.lr, t.betas,
                             t.weight_decay, t.max_grad_norm, cfg.zero.persistence_threshold)
    set_seed(t.seed)
    engine, opt, hf_ds = Z.build_full_ft(inp.build_config, dtype, cfg.model.attn_implementation, ds,
                                         inp.model_path, info.rank, inp.vocab, cfg.model.gradient_checkpointing)
    cap.check(0, sum(Z.full_ft_states(engine, opt).values()))
    phases = PhasePeaks(dev)
    phases.end("build")
    sampler = GlobalSampler(len(inp.train_ds), t.seed)
    global_batch = t.micro_batch_size * t.grad_accum * world
    sync = _sync(dev)
    losses, position, states = [], 0, None
    prog.last = time.perf_counter()
    for k in range(1, spec["steps"] + 1):
        prog.step = k
        faults.hang_due(k, info.rank)
        batches = step_batches(inp.train_ds, sampler, position, t.micro_batch_size, t.grad_accum, info.rank, world,
                               inp.tokenizer.pad_token_id)
        position += global_batch
        g_targets, g_tokens = D.all_reduce_scalars(info, list(count_tokens(batches)))
        total = 0.0
        for j, b in enumerate(batches):
            b = {kk: v.to(dev) for kk, v in b.items()}
            ls, _ = token_loss_sum_reference(engine, b["input_ids"], b["attention_mask"], b["labels"], inp.vocab)
            # DeepSpeed averages gradients over ranks and micro-batches: scaled back, the gradient is
            # that of the LoRA run's objective, the target tokens' loss sum over the global count
            engine.backward(ls * (world * t.grad_accum) / max(g_targets, 1))
            total += float(ls.detach())
            if stage < 3 and k == spec["steps"] and j == len(batches) - 1:
                states = Z.full_ft_states(engine, opt)  # stages 1-2 hold gradients until the step
            phases.end("forward_backward")
            engine.step()
            phases.end("optimizer_step")
        losses.append(D.all_reduce_scalars(info, [total])[0] / max(g_targets, 1))
        prog.done(int(g_tokens), sync)
        cap.check(k, sum(Z.full_ft_states(engine, opt).values()))
    if stage == 3:
        states = Z.full_ft_states(engine, opt)
    predicted = predict_full_states(shape_from_model(inp.meta), world, stage, cfg.model.dtype,
                                    cfg.zero.persistence_threshold)
    out = {"world_size": world, "losses": losses,
           "states": {"trainable_weights": states["weights"], "gradients": states["gradients"],
                      "optimizer_state": states["master_weights"] + states["adam_states"]},
           "states_detail": states, "predicted_states_detail": predicted,
           "tokens_per_s_per_gpu": prog.tokens / prog.seconds / world if prog.seconds else None,
           **_device_info(dev), **phases.report()}
    D.barrier(info)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bigtrain.measure",
                                 description="one mode of bigtrain measure on this rank (started by it)")
    ap.add_argument("--child", required=True, metavar="SPEC.json")
    return _child(ap.parse_args(argv).child)


if __name__ == "__main__":
    sys.exit(main())
