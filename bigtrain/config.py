"""The one typed config tree of a bigtrain run.

A run is configured by an optional YAML file plus dotted ``key=value`` overrides from the command
line (``train.max_steps=50 lora.targets=[q_proj,k_proj]``). Every field is declared here with its
type and meaning; unknown keys and values of the wrong type are errors that name the key, raised
before any process group or model is built. The resolved tree is written next to every run's
outputs as ``config.yaml`` (secrets such as a W&B key are never part of it: they come from the
environment).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml


# The dtypes a base or adapter may be stored in, and their bytes per element: one definition, read by
# the config's checks, the estimator (memory.py), the engine (torch dtypes by these names) and
# export's --dtype (which also takes the short names).
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DTYPE_SHORT_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# DeepSpeed's stage3_param_persistence_threshold as bigtrain sets it (zero.persistence_threshold); the
# estimator's default too
DEFAULT_PERSISTENCE = 100000


class ConfigError(ValueError):
    """A bad configuration value; the message names the dotted key."""


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'2GB', '200KB', '5MiB' or a byte count -> bytes (decimal units, as transformers uses).
    Shared by ``bigtrain merge --max-shard-size`` (whose name its errors carry) and
    ``checkpoint.merge_max_shard_size``; it lives here so that this module imports no other."""
    if isinstance(text, int):
        return text
    s = text.strip().upper().replace(" ", "")
    num = s.rstrip("KMGTIB")
    unit = s[len(num):]
    try:
        size = int(float(num) * _SIZE_UNITS[unit])  # float('') and an unknown unit both fail
    except (ValueError, KeyError):
        raise ValueError(f"--max-shard-size: cannot read {text!r} (use e.g. 2GB, 500MB, 200KB)") from None
    if size <= 0:
        raise ValueError(f"--max-shard-size: {text!r} must be more than 0 bytes")
    return size


# model.quantize's schemes (bigtrain.quantize.SCHEMES implements them; named here, where no torch is imported)
QUANTIZE_CHOICES = ("int8", "nf4")


@dataclass
class ModelConfig:
    path: Optional[str] = "builtin:tiny-opt"
    """Local Hugging Face checkpoint directory (config.json + safetensors, possibly sharded), or
    builtin:tiny-opt (a tiny OPT the project pretrained, shipped with it). null: build ``preset``
    with random weights (benchmarks, memory tests)."""
    preset: str = "tiny-opt"
    """Built-in architecture (see ``bigtrain presets``), used only when ``path`` is null."""
    num_layers: Optional[int] = None
    """With ``path`` null: the preset's depth instead of its own (e.g. a GPT-3 175B-wide model with
    40 layers, to fit the GPUs at hand); every other shape stays the preset's."""
    dtype: str = "float32"
    """Storage dtype of the frozen base: float32, bfloat16 or float16."""
    attn_implementation: Optional[str] = None
    """transformers attention kernel: sdpa or eager; null: sdpa where the architecture supports it,
    else eager (e.g. Bloom, Gemma2), said at start-up. A value the architecture cannot run is
    refused before start-up."""
    gradient_checkpointing: Union[bool, int, str] = "auto"
    """Activation checkpointing: which decoder layers keep only their input and are recomputed in
    backward (slower by about a third of a forward, far less memory). auto: as few as fit the GPU
    with headroom (train.memory_headroom), chosen before the first step from bigtrain's memory
    estimate and corrected once from the first step's measured peak (none on CPU, where nothing is
    sized); true: every layer; false: none; N: the first N layers (their recomputation comes after
    the other layers' activations are freed). The run says how many it checkpoints and why."""
    tiled_mlp: Union[bool, int, str] = "auto"
    """Long context: compute each decoder layer's MLP this many tokens at a time (DeepSpeed's
    TiledMLP, from Arctic Long Sequence Training), keeping only its input for backward and
    recomputing each tile there: the MLP's ffn-wide tensors (~60% of a Llama layer's activations)
    then exist for one tile, not the whole sequence, for one more MLP forward per step. auto: on
    when the estimate says the run does not fit the GPU (train.memory_headroom) with every layer but
    the last recomputed and no tiling, with tiles of hidden-size tokens; off on CPU. true: tiles of
    hidden-size tokens; N: tiles of N tokens; false: never. Not with model.compile=true (auto then
    turns compiling off, and says so). Dense MLPs only (an MoE block or an MLP-less layer like OPT's
    stays as it is)."""
    offload_activations: Union[bool, int, str] = "auto"
    """Long context: hold the inputs of the first N checkpointed decoder layers in pinned host memory
    from forward to backward (DeepSpeed's checkpoint-input offload: copied out on a side stream as
    the forward passes, back when backward recomputes the layer), so the GPU keeps only the rest.
    auto: the fewest that make the estimate fit the GPU (after model.tiled_mlp), within the host's
    MemAvailable shared by its ranks; none when the run fits without (always on CPU). true: every
    checkpointed layer's input; N: the first N; false: none. Bit-identical results either way."""
    tokenizer: Optional[str] = None
    """Tokenizer directory, or builtin (bigtrain's byte-level BPE, 1,024 tokens). null: the one in
    ``path`` (a model folder without one is refused: name its tokenizer, or builtin), or builtin
    for a random preset (path=null)."""
    compile: Union[bool, str] = "auto"
    """auto: true on a CUDA run (the fast path: measured 1.3x eager tokens/s on an H200), false
    on CPU, where compiling takes longer than it saves, and where it cannot work (no Triton, no
    decoder-layer class, a mixture-of-experts base, zero.stage=3 without zero.leaf_blocks), each
    said in one line. true: torch.compile (inductor, dynamic=False) each decoder layer's forward, with the LoRA adapters
    of its projections inside the compiled graph and ZeRO-3's weight fetch/release outside it, so it
    composes with ZeRO-3 at any world size (needs zero.leaf_blocks=true at stage 3) and with
    gradient_checkpointing. The first steps are slower while each distinct layer graph compiles
    (one per layer, per input shape, per train/eval mode): with unpacked data every new padded
    length compiles again, so prefer data.pack=true (fixed shapes). Adapter dropout > 0 draws
    different random masks than eager."""
    quantize: Optional[str] = None
    """null: the frozen base is stored in model.dtype. int8 or nf4: the 2-D weight of every nn.Linear
    inside the decoder layers is stored on each rank quantized, in blocks of 64 consecutive elements
    of the rank's ZeRO-3 partition, all-gathered as stored and dequantized to model.dtype after the
    gather. int8: symmetric (absmax/127), one fp32 scale per block; 0.53x the bytes of bf16. nf4:
    QLoRA's 4-bit NormalFloat, the block scales double-quantized (int8, one fp32 scale per 256 and
    one offset); 0.26x the bytes of bf16. Embeddings, norms, biases and the LM head stay in
    model.dtype. The partitions are built in host memory and quantized onto the device one weight at
    a time once loaded (the host holds this rank's unquantized partitions meanwhile); the block
    boundaries follow the partitions, so the dequantized values depend on the world size. Measured on
    H200s (docs/quantized.md): int8 0.96-1.0x and nf4 0.88-1.04x the bf16 base's tokens/s at 2 GPUs, peak per
    GPU at or below bigtrain estimate --quantize. Needs zero.stage=3, zero.gather=layers,
    zero.leaf_blocks=true, no hpZ or parameter offload, checkpoint.merge_at_end=false (merge offline
    with bigtrain merge, which reads the unquantized base from disk, or with --into-quantized into the
    quantized base the adapters were trained over)."""

    def validate(self, p: str) -> None:
        _choice(p + ".dtype", self.dtype, tuple(DTYPE_BYTES))
        _choice(p + ".quantize", self.quantize, (None, *QUANTIZE_CHOICES))
        _choice(p + ".attn_implementation", self.attn_implementation, (None, "sdpa", "eager"))
        if self.path is not None:
            d = Path(resolve_model_path(self.path))
            if not d.is_dir():
                raise ConfigError(f"{p}.path: {self.path!r} is not a directory")
            if not (d / "config.json").is_file():
                raise ConfigError(f"{p}.path: {self.path!r} has no config.json (expected a Hugging Face "
                                  f"model directory written by save_pretrained)")
            if not any(d.glob("*.safetensors")):
                raise ConfigError(f"{p}.path: {self.path!r} has no *.safetensors weights (bigtrain loads "
                                  f"safetensors only, never pickled .bin files; re-save the model with "
                                  f"save_pretrained(..., safe_serialization=True))")
        if self.path is None:

            from .presets import PRESETS  # deferred: config is the package's leaf, imported by every module

            _choice(p + ".preset", self.preset, tuple(PRESETS))
        if self.num_layers is not None:
            if self.path is not None:
                raise ConfigError(f"{p}.num_layers={self.num_layers} changes a preset's depth; it needs "
                                  f"{p}.path=null (got {p}.path={self.path!r})")
            if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int) or self.num_layers < 1:
                raise ConfigError(f"{p}.num_layers must be a positive integer, got {self.num_layers!r}")

    @property
    def local_path(self) -> Optional[str]:
        return resolve_model_path(self.path) if self.path is not None else None


@dataclass
class LoRAConfig:
    r: int = 8
    """Rank of the update BA (paper: 1..8; GPT-3 175B used 4)."""
    alpha: float = 16.0
    """Scale numerator: the update is multiplied by alpha/r (alpha/sqrt(r) with rslora). Fixed for a
    run, like r, rslora and targets: a resume with another value is refused."""
    dropout: float = 0.0
    """Dropout on the adapter input (not on the frozen path). Changed on resume, the new value is used."""
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Module-name suffixes to adapt (paper: W_q, W_v), or ["all-linear"]."""
    rslora: bool = False
    """Rank-stabilised scaling alpha/sqrt(r) (Kalajdzievski 2023)."""
    dtype: str = "float32"
    """Adapter weights and their Adam state; kept fp32 while the base may be bf16."""

    def validate(self, p: str) -> None:
        if self.r <= 0:
            raise ConfigError(f"{p}.r must be a positive integer, got {self.r}")
        if self.alpha <= 0:
            raise ConfigError(f"{p}.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{p}.dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ConfigError(f"{p}.targets is empty: name at least one module, or all-linear")
        _choice(p + ".dtype", self.dtype, ("float32", "bfloat16"))


@dataclass
class DataConfig:
    train: str = "builtin:e2e"
    """jsonl file ({prompt, completion}, {text} or {messages}), a .txt file, a saved `datasets`
    directory, or builtin:e2e / builtin:e2e-chat."""
    eval: Optional[str] = "builtin:e2e-eval"
    """Held-out set in the same forms; null disables eval."""
    max_length: int = 128
    """Tokens per example (or per packed row); longer examples are truncated from the left of
    the prompt, keeping the completion."""
    pack: bool = False
    """Concatenate examples into rows of exactly max_length tokens."""
    on_bad_line: str = "error"
    """error: stop naming file and line; skip: drop it and count it."""
    num_proc: int = 1
    """Processes for tokenisation."""
    format: str = "auto"
    """auto (decided per file from its first good record, and said), prompt_completion, text or
    messages (chat: {"messages": [{"role", "content"}, ...]}, rendered with the tokenizer's
    chat_template, loss on the assistant's turns only)."""
    chat_template: Optional[str] = None
    """A Jinja chat template file for messages data; null: the tokenizer's own."""
    cache_dir: Optional[str] = None
    """Where tokenised data is cached (Arrow files, memory-mapped by every rank; the first rank to
    arrive tokenises, the others wait and read it). null: $BIGTRAIN_DATA_CACHE, else
    ~/.cache/bigtrain/data. On a filesystem all nodes share, a job tokenises once."""

    def validate(self, p: str) -> None:
        if self.max_length < 8:
            raise ConfigError(f"{p}.max_length must be >= 8, got {self.max_length}")
        _choice(p + ".on_bad_line", self.on_bad_line, ("error", "skip"))
        _choice(p + ".format", self.format, ("auto", "prompt_completion", "text", "messages"))
        if self.num_proc < 1:
            raise ConfigError(f"{p}.num_proc must be >= 1, got {self.num_proc}")
        for k in ("train", "eval"):
            v = getattr(self, k)
            if isinstance(v, str) and not v.strip():
                raise ConfigError(f"{p}.{k} is empty" + (": null for no evaluation" if k == "eval" else ""))
        if self.chat_template is not None and not Path(self.chat_template).is_file():
            raise ConfigError(f"{p}.chat_template: {self.chat_template}: no such file")


@dataclass
class TrainConfig:
    output_dir: str = "runs/demo"
    """Everything of the run goes here: config.yaml, checkpoints/, logs."""
    seed: int = 0
    """Seeds the adapters' init, the data order and dropout (the same on every rank)."""
    max_steps: int = 300
    """Optimizer steps."""
    micro_batch_size: int = 8
    """Examples per rank per forward/backward."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; global batch = micro_batch_size * grad_accum * world."""
    lr: float = 2e-3
    """AdamW peak learning rate (after warm-up). Changed on resume, the new value is used."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay on the adapters. Changed on resume, the new value is used."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW (beta1, beta2)."""
    warmup_steps: int = 20
    """Linear warm-up from lr/warmup_steps to lr over this many optimizer steps."""
    schedule: str = "cosine"
    """cosine, linear or constant decay after warm-up."""
    min_lr_ratio: float = 0.1
    """The decay ends at lr * min_lr_ratio at max_steps (0 to 1)."""
    max_grad_norm: float = 1.0
    """Clip the global adapter gradient norm to this (>= 0); 0 disables."""
    precision: str = "auto"
    """auto (bf16 autocast on a bf16-capable GPU, fp32 on CPU), bf16 or fp32."""
    device: str = "auto"
    """auto, cpu or cuda."""
    eval_every: int = 100
    """Eval loss on data.eval every this many steps, at step 0 and at the end; 0: only at step 0 and
    at the end."""
    eval_examples: int = 64
    """Eval scores the first eval_examples examples of data.eval (0 or more than it has: all of
    them), each once: the same figure whatever the micro-batch size and the world size."""
    log_every: int = 10
    """Console/W&B/TensorBoard metrics every this many steps (averaged over them)."""
    stop_at_step: Optional[int] = None
    """Save and stop after this step as a preemption would, keeping the schedule of max_steps
    (time-boxed jobs; a rerun resumes)."""
    max_bad_steps: int = 10
    """Non-finite loss/grad steps skipped (on every rank together) before the run stops."""
    memory_headroom: float = 0.1
    """The share of each GPU's memory that model.gradient_checkpointing=auto leaves free (for the
    allocator's fragmentation, NCCL's buffers and the estimate's error): it checkpoints the fewest
    layers whose estimated peak is within (1 - memory_headroom) of the GPU's memory. zero.shard_group=auto
    takes node only when the base over a node fits within the same share."""
    check_memory: bool = True
    """Before the base is built, compare the estimator's per-GPU peak with each GPU's free memory and
    its host peak per rank with the host's MemAvailable, and stop in one line naming both figures when
    either does not fit (instead of an out-of-memory error, or the kernel killing the rank without a
    word, minutes into the build). false: start anyway."""
    sample_prompts: int = 2
    """At the end of a run, greedy generations for the first sample_prompts prompts of data.eval
    (prompt/completion data), with the adapters off (the base) and on, printed beside the reference
    completion: what LoRA changed. 0: none. After the last eval and save: the run's figures are
    unchanged. Compiled layers generate eager (each new length would compile them again)."""
    sample_max_new_tokens: int = 48
    """Tokens generated per sample at most (fewer when eos comes first)."""
    sequence_parallel: int = 1
    """Ulysses sequence parallelism (bigtrain/seqpar.py): each sequence is split over this many
    consecutive ranks, which exchange attention heads by all-to-all so that each computes the whole
    sequence's attention for 1/N of the heads; activations per GPU are ~1/N. 1: off. Must divide the
    world size (data-parallel ranks = world / N; global batch = micro_batch_size * grad_accum * world
    / N); the model's attention heads must be divisible by it, and its KV heads divisible by it or it
    by them; data.max_length must be a multiple of it (batches are right-padded to a multiple of N);
    needs zero.stage=3 and sdpa attention; model.compile is off under it. Tested on CPU gloo ranks
    (losses and adapters equal the single-process run's); GPU speed not yet measured."""

    def validate(self, p: str) -> None:
        for k in ("max_steps", "micro_batch_size", "grad_accum", "log_every"):
            if getattr(self, k) <= 0:
                raise ConfigError(f"{p}.{k} must be > 0, got {getattr(self, k)}")
        if self.eval_examples < 0:
            raise ConfigError(f"{p}.eval_examples must be >= 0 (0: all), got {self.eval_examples}")
        if self.eval_every < 0:
            raise ConfigError(f"{p}.eval_every must be >= 0 (0: only at step 0 and the end), "
                              f"got {self.eval_every}")
        if self.sample_prompts < 0:
            raise ConfigError(f"{p}.sample_prompts must be >= 0 (0: none), got {self.sample_prompts}")
        if self.sample_max_new_tokens < 1:
            raise ConfigError(f"{p}.sample_max_new_tokens must be >= 1, got {self.sample_max_new_tokens}")
        if self.lr <= 0:
            raise ConfigError(f"{p}.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"{p}.weight_decay must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"{p}.min_lr_ratio must be in [0, 1] (the decay ends at lr * min_lr_ratio), "
                              f"got {self.min_lr_ratio}")
        if self.max_grad_norm < 0:
            raise ConfigError(f"{p}.max_grad_norm must be >= 0 (0: no clipping), got {self.max_grad_norm}")
        if self.warmup_steps < 0:
            raise ConfigError(f"{p}.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.stop_at_step is not None and not 0 < self.stop_at_step <= self.max_steps:
            raise ConfigError(f"{p}.stop_at_step must be in 1..{p}.max_steps ({self.max_steps}) or null, "
                              f"got {self.stop_at_step}")
        if not 0.0 <= self.memory_headroom < 1.0:
            raise ConfigError(f"{p}.memory_headroom must be in [0, 1) (the share of GPU memory left free), "
                              f"got {self.memory_headroom}")
        if isinstance(self.sequence_parallel, bool) or self.sequence_parallel < 1:
            raise ConfigError(f"{p}.sequence_parallel must be an integer >= 1 (1: off), got {self.sequence_parallel!r}")
        if self.max_bad_steps < 0:
            raise ConfigError(f"{p}.max_bad_steps must be >= 0 (0: stop at the first non-finite step), "
                              f"got {self.max_bad_steps}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"{p}.betas must be two numbers in [0, 1), got {self.betas}")
        _choice(p + ".schedule", self.schedule, ("cosine", "linear", "constant"))
        _choice(p + ".precision", self.precision, ("auto", "bf16", "fp32"))
        _choice(p + ".device", self.device, ("auto", "cpu", "cuda"))


@dataclass
class ZeroConfig:
    stage: int = 3
    """3: the frozen base is partitioned with DeepSpeed ZeRO-3 over all ranks; 0: every rank holds
    the whole base (plain PyTorch, no DeepSpeed). Adapters are replicated either way."""
    ds_config: Optional[str] = None
    """A DeepSpeed JSON config of your own (see ds_configs/); bigtrain fills in what it owns."""
    gather: str = "layers"
    """Who gathers the partitioned base at world size > 1. layers: bigtrain's own hooks, one flat
    all-gather per decoder layer with the next layer's in flight while this one computes, each
    layer released right after its forward or backward. deepspeed: DeepSpeed's fetch hooks
    (``DeepSpeedZeRoOffload``), which hpZ, parameter offload and quantized weights need (they are
    used for those whatever this says)."""
    leaf_blocks: bool = True
    """Gather whole decoder layers as one ZeRO-3 fetch unit (fewer, larger all-gathers)."""
    backend: str = "auto"
    """Process-group backend: auto (nccl on GPU, gloo on CPU), nccl or gloo."""
    timeout_s: int = 600
    """Collective timeout: a dead rank makes the others fail after this, never hang."""
    persistence_threshold: int = DEFAULT_PERSISTENCE
    """Base parameters of at most this many elements stay gathered on every rank (DeepSpeed's
    stage3_param_persistence_threshold): fewer tiny all-gathers, a little more memory. A value in
    zero.ds_config's zero_optimization wins (the run says so at start)."""
    shard_group: Union[int, str] = "auto"
    """Over which ranks the frozen base is partitioned (it is replicated across such groups). world:
    all ranks, every layer all-gathered from every rank; node: the ranks of each node, so the base's
    all-gathers stay inside a node and only the adapters' gradients cross nodes (a GPU holds the base
    over its node's GPUs, not over the job's); K: groups of K consecutive ranks; auto: node when the
    job spans nodes and the base fits a node's GPUs with headroom, else world (the run says which it
    took and why). Checkpoints hold adapters only, so a run resumes under any layout. bigtrain
    estimate --nodes N predicts each layout's memory and step time."""
    single_rank_plain: bool = True
    """At world size 1 (nothing to partition) alias every ZeRO-3 partition to its parameter and run
    the base without DeepSpeed's fetch hooks: same values, one copy of the weights, no hook overhead
    (on one H200 at GPT-3 2.7B the hooks cost 8% of the step). false keeps ZeRO-3's hooks at world
    size 1 too (the code path of every rank at world size > 1)."""

    def validate(self, p: str) -> None:
        _choice(p + ".stage", self.stage, (0, 3))
        _choice(p + ".backend", self.backend, ("auto", "nccl", "gloo"))
        _choice(p + ".gather", self.gather, ("layers", "deepspeed"))
        sg = self.shard_group
        if isinstance(sg, str) and sg not in ("auto", "world", "node") or isinstance(sg, int) and sg < 1:
            raise ConfigError(f"{p}.shard_group: expected auto, world, node or a number of ranks >= 1, got {sg!r}")
        if self.timeout_s <= 0:
            raise ConfigError(f"{p}.timeout_s must be > 0 (seconds a collective may wait), got {self.timeout_s}")
        if self.ds_config is not None and not Path(self.ds_config).is_file():
            raise ConfigError(f"{p}.ds_config: no such file {self.ds_config!r}")


@dataclass
class CheckpointConfig:
    every: int = 100
    """Save every N optimizer steps (and always at the end); 0 saves only at the end."""
    every_minutes: float = 0.0
    """Also save when this many minutes have passed since the last save (0: off). Bounds the work a
    crash can lose in wall time, whatever the step time; rank 0's clock decides for every rank."""
    keep: int = 2
    """Checkpoints kept (>= 2, so one good checkpoint survives a crash during a save)."""
    resume: str = "auto"
    """auto: resume from output_dir's latest good checkpoint if any; never: start fresh (refused if
    output_dir already holds checkpoints); or a checkpoint directory, or a run directory (its
    latest), which must verify: no silent fallback."""
    force_base_mismatch: bool = False
    """Resume even if the base model's fingerprint (config, weight files and sampled bytes of every
    tensor) or the tokenizer differs from the checkpoint's."""
    new_data: bool = False
    """Resume onto training rows that differ from the checkpoint's (other data.train content, or its
    tokenisation changed): the new rows are read from their first sample. Without it such a resume
    is refused (it would continue at the old position of other data)."""
    merge_at_end: bool = False
    """After the last step, also write the merged model (W0 + s·B·A; a plain Hugging Face checkpoint) to
    output_dir/merged, gathered from the live ZeRO-3 partitions one tensor at a time. Offline
    alternative: bigtrain merge CKPT OUT (streams the base from disk)."""
    merge_max_shard_size: str = "2GB"
    """Largest safetensors shard of the merged model (e.g. 5GB, 500MB)."""

    def validate(self, p: str) -> None:
        if self.every < 0:
            raise ConfigError(f"{p}.every must be >= 0, got {self.every}")
        if not self.every_minutes >= 0:
            raise ConfigError(f"{p}.every_minutes must be >= 0, got {self.every_minutes}")
        if self.merge_at_end:
            try:
                if parse_size(self.merge_max_shard_size) <= 0:
                    raise ValueError
            except ValueError:
                raise ConfigError(f"{p}.merge_max_shard_size: cannot read {self.merge_max_shard_size!r} "
                                  "as a size (use e.g. 2GB, 500MB)") from None
        if self.keep < 2:
            raise ConfigError(f"{p}.keep must be >= 2 (one good checkpoint must survive a crash "
                              f"during a save), got {self.keep}")


@dataclass
class LoggingConfig:
    wandb: bool = False
    """Log to Weights & Biases (online if WANDB_API_KEY is set, else offline into output_dir)."""
    wandb_project: str = "bigtrain"
    """W&B project (WANDB_ENTITY in the environment picks the team)."""
    wandb_run_name: Optional[str] = None
    """W&B run name; default: W&B's own. A resumed run keeps its W&B run id."""
    wandb_tags: list[str] = field(default_factory=list)
    """W&B tags, e.g. [lora, opt-6.7b]."""
    wandb_mode: str = "auto"
    """auto (online if WANDB_API_KEY is set, else offline), online, offline or disabled."""
    tensorboard: bool = False
    """Also write TensorBoard events to output_dir/tensorboard."""
    progress_bar: Optional[bool] = None
    """null (auto): a tqdm bar on rank 0 with loss and tokens/s (stderr) when stderr is a terminal;
    otherwise (Slurm logs, a pipe) one plain line per train.log_every steps (step/max_steps, loss,
    tokens/s, elapsed and ETA), with no carriage returns. true: the bar always; false: the lines
    always."""

    def validate(self, p: str) -> None:
        _choice(p + ".wandb_mode", self.wandb_mode, ("auto", "online", "offline", "disabled"))


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> "Config":
        for f in dataclasses.fields(self):
            _check_finite(getattr(self, f.name), f.name)
            getattr(self, f.name).validate(f.name)
        q = self.model.quantize
        if q is not None:
            if self.zero.stage != 3:
                raise ConfigError(f"model.quantize={q} quantizes the ZeRO-3 partitions of the base; it needs "
                                  f"zero.stage=3 (got zero.stage={self.zero.stage})")
            if self.zero.gather != "layers" or not self.zero.leaf_blocks:
                raise ConfigError(f"model.quantize={q} needs bigtrain's layer gatherer to dequantize after the "
                                  f"gather: set zero.gather=layers and zero.leaf_blocks=true (got zero.gather="
                                  f"{self.zero.gather}, zero.leaf_blocks={str(self.zero.leaf_blocks).lower()})")
            if self.checkpoint.merge_at_end:
                raise ConfigError(f"checkpoint.merge_at_end=true cannot merge into a model.quantize={q} base "
                                  f"(its live weights are quantized); set it to false and merge offline with "
                                  f"bigtrain merge CKPT OUT, which reads the unquantized base from disk "
                                  f"(--into-quantized: into the quantized base the adapters were trained over)")
        sp = self.train.sequence_parallel
        if sp > 1:  # what needs the model or the world size: seqpar.check, before the process group
            if self.zero.stage != 3:
                raise ConfigError(f"train.sequence_parallel={sp} runs under the ZeRO-3 base (DeepSpeed's comm layer "
                                  f"carries its all-to-all): set zero.stage=3 (got zero.stage={self.zero.stage})")
            if self.data.max_length % sp:
                raise ConfigError(f"train.sequence_parallel={sp} splits each sequence into {sp} equal shards: "
                                  f"data.max_length={self.data.max_length} must be a multiple of {sp} "
                                  f"(e.g. {-(-self.data.max_length // sp) * sp})")
            if self.model.compile is True:
                raise ConfigError(f"model.compile=true is not verified with train.sequence_parallel={sp}: set "
                                  f"model.compile=false or auto (auto turns it off under sequence parallelism)")
            if self.model.attn_implementation == "eager":
                raise ConfigError(f"train.sequence_parallel={sp} needs model.attn_implementation=sdpa (or null): "
                                  f"eager attention needs the whole sequence's 4-D mask, which the shards do not have")
        gc = self.model.gradient_checkpointing
        if isinstance(gc, str) and gc != "auto" or isinstance(gc, int) and not isinstance(gc, bool) and gc < 0:
            raise ConfigError(f"model.gradient_checkpointing: expected auto, true, false or a number of "
                              f"layers >= 0, got {gc!r}")
        for key in ("tiled_mlp", "offload_activations"):
            v = getattr(self.model, key)
            if isinstance(v, str) and v != "auto" or (type(v) is int and v < 1) or isinstance(v, float):
                raise ConfigError(f"model.{key}: expected auto, true, false or a number >= 1"
                                  f"{' of tokens per tile' if key == 'tiled_mlp' else ' of layers'}, got {v!r}")
        if self.model.compile is True and self.model.tiled_mlp not in ("auto", False):
            raise ConfigError(f"model.tiled_mlp={str(self.model.tiled_mlp).lower()} cannot run inside a compiled "
                              f"decoder layer (model.compile=true): set one of them to false (or auto)")
        if isinstance(self.model.compile, str) and self.model.compile != "auto":
            raise ConfigError(f"model.compile: expected auto, true or false, got {self.model.compile!r}")
        if self.model.compile is True and self.zero.stage == 3 and not self.zero.leaf_blocks:
            raise ConfigError("model.compile needs zero.leaf_blocks=true at zero.stage=3: ZeRO-3's "
                              "fetch hooks must sit on the compiled decoder layer, not inside it")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def dump(self, path: str | os.PathLike) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


ASSETS = Path(__file__).resolve().parent / "assets"
# Files a tokenizer directory may hold: their presence marks one, and export/merge copy them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "spiece.model", "vocab.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")


def resolve_model_path(path: str) -> str:
    """``builtin:NAME`` -> the shipped checkpoint directory; anything else unchanged."""
    if path.startswith("builtin:"):
        return str(ASSETS / path[len("builtin:"):])
    return path


def _check_finite(section: Any, p: str) -> None:
    """Every float of a section (float, optional float, list of floats) is finite: nan passes every
    ``<`` and ``>`` check of the validate() methods (they are written to fail on it, but a new key
    might not be), and inf is no setting of any key. Runs before the section's validate()."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        tp, value = hints[f.name], getattr(section, f.name)
        if float not in (tp, *typing.get_args(tp)):
            continue
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise ConfigError(f"{p}.{f.name} must be {'finite numbers' if isinstance(value, list) else 'a finite number'}, "
                              f"got {value}")


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of "
                          f"{', '.join('null' if a is None else repr(a) for a in allowed)}")


# ---------------------------------------------------------------------------------------------
# Building a Config from a dict, a YAML file and dotted overrides, with typed checks.


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; ints widen to floats. Names ``key`` on error."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, a, value)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_tname(tp)}, got {type(value).__name__} {value!r}")
    if origin is list:
        (elem,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(f"{key}[{i}]", elem, v) for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - only the types above are declared
        raise TypeError(f"unsupported annotation {tp} for {key}")
    raise ConfigError(f"{key}: expected {_tname(tp)}, got {type(value).__name__} {value!r}")


def _tname(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_tname(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list of {_tname(typing.get_args(tp)[0])}"
    return "null" if tp is type(None) else tp.__name__


def _build(cls: type, data: dict, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else k
            raise ConfigError(f"unknown config key {where!r}; valid keys here: {', '.join(sorted(names))}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, data[f.name], key)
        else:
            kwargs[f.name] = _coerce(key, tp, data[f.name])
    return cls(**kwargs)


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {p!r} is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> ("a.b", value) with value parsed as YAML (so 3, 1e-4, true, [a,b], null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {e}") from None
    return key, value


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last one,
    silently: a config's second ``lr:`` replaced the first without a word)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(  # the message names the line: no mark
                    None, None, f"key {key!r} is given twice (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = (),
                validate: bool = True) -> Config:
    """YAML file (optional) + ``key=value`` overrides -> validated Config."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            what = ("is a directory" if p.is_dir() else "is not a regular file (a FIFO or a device)"
                    if p.exists() else "does not exist")
            raise ConfigError(f"config file {str(p)!r} {what}")
        try:
            tree = yaml.load(p.read_text(), Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as e:
            # one line: the problem and where (PyYAML appends the offending snippet on more lines)
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            what = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {what}{where}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping at top level")
    for o in overrides:
        k, v = parse_override(o)
        _set_dotted(tree, k, v)
    cfg = _build(Config, tree, "")
    return cfg.validate() if validate else cfg


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, doc) for every leaf field: ``bigtrain train --help``'s config reference
    is generated from this, so it cannot drift from the code."""

    docs: dict[str, str] = {}
    try:  # attribute docstrings: a string literal right after the field
        tree = ast.parse(inspect.getsource(cls))
        body = tree.body[0].body
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
                docs[a.target.id] = " ".join(str(b.value.value).split())
    except (OSError, TypeError):
        pass
    rows = []
    hints = typing.get_type_hints(cls)
    inst = cls()
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += describe(tp, key)
        else:
            rows.append((key, _tname(tp), repr(getattr(inst, f.name)), docs.get(f.name, "")))
    return rows
