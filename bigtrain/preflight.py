"""Checks made before a run does any work, each failing in one line that names the key, file or
value (a :class:`~bigtrain.config.ConfigError`, exit 2): the adapters' rank, the positions, the
output folder, the attention kernel, a resume's stop step and rows, and whether the run fits the
GPU and host memory. ``bigtrain.run.build_run`` calls them in order; the memory and same-data
checks are collective (every rank checks its own GPU, host or files and all stop together)."""

from __future__ import annotations

import os
import resource
import socket
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import transformers

from .config import Config, ConfigError
from .data import DataError
from .dist import node_key
from .engine.ds_config import read_user_ds_config
from .layout import Layout, choose
from .memory import (GiB, checkpointed_layers, estimate, host_offload_budget, host_peak, layer_input_bytes,
                     model_shape, setup_for_run)
from .presets import position_limit
from .recompute import fixed_offload, fixed_tile
from .steptime import lora_peak_per_gpu

if TYPE_CHECKING:
    from .engine.core import Engine


def check_rank(r: int, targets: dict) -> None:
    """lora.r above an adapted layer's width: B·A of a d_out × d_in layer has rank at most
    min(d_in, d_out), so the extra rank only costs memory and time (lora.r=100000 on the demo trained,
    slowly, without a word)."""
    name, m = min(targets.items(), key=lambda kv: min(kv[1].weight.shape))
    width = min(m.weight.shape)
    if r > width:
        raise ConfigError(f"lora.r={r} is more than the width of the adapted layer {name} "
                          f"({m.weight.shape[1]} -> {m.weight.shape[0]}): an update B·A of it has rank at most "
                          f"{width}; use lora.r <= {width}")


def check_stop_after_resume(stop_at_step: int | None, resume_from: Path, saved: dict) -> None:
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


def rows_changed(path: Path, saved: dict, rows: str, new_data: bool) -> str | None:
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


def check_output_dir(out: Path, given: str) -> None:
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


def check_positions(cfg: Config, hf_config) -> None:
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


def attention(requested: str | None, meta) -> tuple[str, str]:
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


def check_same_data(engine: Engine, cfg: Config, stats: dict, eval_ds) -> list[int]:
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


def host_peak_rss() -> int:
    """This process's peak resident memory, bytes (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def mem_available() -> int | None:
    """The host's MemAvailable (/proc/meminfo), bytes; None where there is none."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def local_ranks() -> int:
    """Ranks on this host, as the launcher says (torchrun, the deepspeed launcher, srun); 1 if none does."""
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE", "SLURM_STEP_TASKS_PER_NODE"):
        first = os.environ.get(name, "").split("(")[0].split(",")[0]  # Slurm's "2(x2)" or "3,1"
        if first.isdigit():
            return max(1, int(first))
    return 1


def choose_layout(cfg: Config, meta, engine: Engine, from_checkpoint: bool) -> Layout:
    """zero.shard_group: which ranks partition the base (:mod:`bigtrain.layout`). Every rank's node
    is gathered (one small collective); ``auto`` asks the estimator whether the base over one node's
    ranks fits each GPU (or, on CPU, the host shared by its ranks) within
    ``1 - train.memory_headroom`` of its memory."""
    keys = engine.all_gather_objects(node_key())
    if read_user_ds_config(cfg.zero).get("zero_optimization", {}).get("zero_hpz_partition_size", 1) > 1:
        return choose("world", keys)  # hpZ keeps its own within-node copy (engine.ds_config.check_world)
    dev = engine.info.device

    def fits(k: int) -> tuple[bool, str]:
        st = setup_for_run(cfg, engine.info.world_size, shard_group=k,
                           persistence_threshold=engine.zero.persistence_threshold)
        shape, share = model_shape(meta), 1 - cfg.train.memory_headroom
        if dev.type == "cuda":
            need, have = lora_peak_per_gpu(shape, st, k), torch.cuda.mem_get_info(dev)[1]
            what = f"estimated {need / GiB:.1f} GiB per GPU of {have / GiB:.1f} GiB"
        else:
            ranks, avail = k, mem_available()  # a node's k ranks share its host
            need = ranks * host_peak(shape, st, "cpu", from_checkpoint)["total"]
            have = avail if avail is not None else need
            what = f"estimated {need / GiB:.2f} GiB of host memory for this host's {ranks} rank(s), " \
                   f"{have / GiB:.1f} GiB available"
        ok = engine.all_reduce_scalars([float(need > share * have)], "max")[0] == 0
        return ok, what

    return choose(cfg.zero.shard_group, [tuple(k) for k in keys], fits)


def least_gpu_memory(cfg: Config, shape, st, device_type: str, host_bytes: int | None, ranks: int = 1):
    """``st`` (every layer recomputed where model.gradient_checkpointing is auto) with the long-context
    settings that hold the least on the GPU, as the run may choose them: the MLP tiled where
    model.tiled_mlp is auto on a GPU (or set), and under model.offload_activations=auto as many
    checkpointed inputs in host memory as one of the host's ``ranks`` may pin of ``host_bytes``
    (:func:`bigtrain.memory.host_offload_budget`)."""
    gpu = device_type == "cuda"
    tile = fixed_tile(cfg.model.tiled_mlp, shape.hidden)
    if tile is None:
        tile = shape.hidden if gpu and cfg.model.compile is not True else 0
    k = checkpointed_layers(shape, st)
    off = fixed_offload(cfg.model.offload_activations, k)
    if off is None:
        room = host_offload_budget(host_bytes or 0, ranks, cfg.train.memory_headroom)
        off = min(k, room // max(1, layer_input_bytes(shape, st))) if gpu else 0
    return replace(st, tiled_mlp=tile, offload_layers=off)


def check_memory(cfg: Config, meta, engine: Engine, from_checkpoint: bool) -> str:
    """train.check_memory, before the base is built: the estimator's per-GPU peak against this GPU's
    free memory, and its host peak per rank against MemAvailable shared by this host's ranks. Every
    rank checks its own GPU and host; if any does not fit, every rank stops with the same line (one
    rank going on alone would wait for the others forever). Returns the line that says what fits."""
    info, dev = engine.info, engine.info.device
    st = setup_for_run(cfg, info.world_size, persistence_threshold=engine.zero.persistence_threshold,
                       shard_group=engine.base_shards)
    shape = model_shape(meta)
    local = local_ranks()
    avail = mem_available()
    host_have = avail // local if avail is not None else None
    st = least_gpu_memory(cfg, shape, st, dev.type, avail, local)
    est = estimate(shape, st)
    gpu_need = est["lora"]["per_gpu_total"]
    host_need = host_peak(shape, st, dev.type, from_checkpoint)["total"]
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
