"""Getting trained adapters out of bigtrain: ``bigtrain export`` (PEFT format) and ``bigtrain merge``.

* :func:`export_peft` rewrites a bigtrain checkpoint as a PEFT LoRA adapter directory
  (``adapter_config.json`` + ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained``
  loads. The tensors are the same A (r × d_in) and B (d_out × r); only the key names change.
* :func:`merge_checkpoint` writes a plain Hugging Face checkpoint whose targeted weights are
  W0 + s·B·A. It streams: the base is read tensor by tensor (``safe_open``) and the output shards
  are written as they fill, so the memory it holds is about one output shard plus one tensor, never
  the whole model. GPT-2's Conv1D stores W transposed (d_in × d_out); its delta is transposed too.
  W0 is the base's weight as stored on disk, whatever ``model.quantize`` the run trained over; with
  ``into_quantized`` (``bigtrain merge --into-quantized``) the run's quantized base is written
  instead: each quantized weight is W0 quantized and dequantized as the run's ranks held it
  (:func:`quantized_base`), plus s·B·A where adapted: the weights the adapters were trained against.

Both read the checkpoint's ``adapter_config.json`` (written by ``bigtrain train``) and check the
checkpoint against its ``manifest.json`` first.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import transformers as tf
from safetensors.torch import save_file
from tqdm import tqdm

from . import checkpoint
from .config import DTYPE_BYTES, DTYPE_SHORT_NAMES, TOKENIZER_FILES, load_config, parse_size, resolve_model_path
from .data import load_tokenizer
from .loader import checkpoint_files, open_safetensors, resolve_key
from .lora import AdapterSpec, is_conv1d
from .presets import hf_config_for, meta_model
from .quantize import quantizable_weights, reference_dequantized
from .vocab import vocab_parameters

PEFT_PREFIX = "base_model.model."
FORMATS = ("peft",)
# --dtype names -> torch dtype names
DTYPE_NAMES = {**{n: n for n in DTYPE_BYTES}, **DTYPE_SHORT_NAMES}  # --dtype's names


# -- reading a bigtrain checkpoint -------------------------------------------------------------
def read_checkpoint(path: str | os.PathLike) -> tuple[Path, dict, dict[str, torch.Tensor]]:
    """(dir, adapter_config, {key: tensor}) of a verified checkpoint: the tuple form of
    :func:`bigtrain.checkpoint.read_checkpoint`, for callers that unpack it."""
    c = checkpoint.read_checkpoint(path)
    return c.path, c.spec.to_json(), c.tensors


def base_dir(spec: AdapterSpec, override: str | None, ckpt: Path) -> Path:
    """The base model directory: ``override`` (--base) or the checkpoint's ``base_model``."""
    name = override or spec.base_model
    if name.startswith("preset:"):
        raise FileNotFoundError(f"{ckpt}: base_model is {name!r}, a randomly initialised preset with "
                                f"no weights on disk; pass --base DIR")
    d = Path(resolve_model_path(name))
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"base model {str(d)!r} (from {'--base' if override else ckpt / 'adapter_config.json'}): "
                                "no config.json there; pass --base DIR")
    return d


def conv1d_modules(base: Path | str, modules: list[str]) -> set[str]:
    """Which of ``modules`` are GPT-2 Conv1D layers (weight stored d_in × d_out), found on a model
    built on the meta device from the base's config.json, or a preset's config for ``preset:NAME``
    (no weights are read)."""
    if str(base).startswith("preset:"):
        # a tiny preset's vocabulary is its tokenizer's; any size names the same modules
        model = meta_model(hf_config_for(str(base).split(":", 1)[1], vocab_size=64))
    else:
        model = meta_model(tf.AutoConfig.from_pretrained(str(base)))
    named = dict(model.named_modules())
    absent = [m for m in modules if m not in named]
    if absent:
        raise ValueError(f"{base}: the checkpoint adapts modules this model does not have: {absent[:3]}")
    return {m for m in modules if is_conv1d(named[m])}


# -- PEFT export --------------------------------------------------------------------------------
def peft_config(spec: AdapterSpec, base_name: str, fan_in_fan_out: bool) -> dict:
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "r": spec.r, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
        "use_rslora": bool(spec.rslora),
        # exact dotted names: PEFT matches a target when the module name equals it
        "target_modules": list(spec.modules),
        # PEFT's flag for GPT-2 Conv1D, whose *base* weight is (d_in, d_out); lora_A / lora_B keep
        # the nn.Linear orientation (r, d_in) / (d_out, r) either way
        "fan_in_fan_out": fan_in_fan_out, "bias": "none", "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False,
        "revision": None,
    }


def export_peft(ckpt: str | os.PathLike, out: str | os.PathLike, dtype: str | None = None,
                base: str | None = None) -> Path:
    """Write ``out/adapter_config.json`` and ``out/adapter_model.safetensors`` in PEFT's format."""
    _check_out_dir(Path(out), replaceable=("adapter_model.safetensors", "adapter_config.json", "README.md"))
    c = checkpoint.read_checkpoint(ckpt)
    spec = c.spec
    # a random preset base has no files, but its config is known: the adapter names it as trained
    preset = base is None and spec.base_model.startswith("preset:")
    bdir = spec.base_model if preset else base_dir(spec, base, c.path)
    conv = conv1d_modules(bdir, spec.modules)
    if conv and len(conv) != len(spec.modules):
        raise ValueError(f"{c.path}: mixes Conv1D and Linear targets; PEFT's fan_in_fan_out is one flag")
    tdtype = _dtype(dtype) if dtype else None
    peft_tensors = {}
    for m in spec.modules:
        for part in ("lora_A", "lora_B"):
            t = c.tensors[f"{m}.{part}"]
            peft_tensors[f"{PEFT_PREFIX}{m}.{part}.weight"] = (t.to(tdtype) if tdtype else t).contiguous()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base_name = base or (str(bdir) if spec.base_model.startswith("builtin:") else spec.base_model)
    save_file(peft_tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(peft_config(spec, base_name, bool(conv)), indent=2))
    return out


def _check_out_dir(out: Path, replaceable: tuple[str, ...] = ()) -> None:
    """OUT must be a new or empty directory (or hold only ``replaceable`` files of an earlier
    export, which are overwritten): never write into a file's path or mix with other outputs."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory")
    if out.is_dir():
        others = sorted(f.name for f in out.iterdir() if f.name not in replaceable)
        if others:
            raise ValueError(f"{out}: output directory exists and is not empty (holds "
                             f"{', '.join(others[:5])}{' ...' if len(others) > 5 else ''}); "
                             f"choose a new or empty directory")


# -- streaming merge ----------------------------------------------------------------------------
def _dtype(name: str) -> torch.dtype:
    if name not in DTYPE_NAMES:
        raise ValueError(f"--dtype: {name!r} is not one of {', '.join(DTYPE_NAMES)}")
    return getattr(torch, DTYPE_NAMES[name])


class _ShardWriter:
    """Collects tensors and writes a shard whenever the next tensor would overflow it."""

    def __init__(self, out: Path, max_bytes: int):
        self.out, self.max_bytes = out, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[str, list[str]]] = []  # temporary file name, keys
        self.total_bytes = 0
        self.peak_bytes = 0  # most tensor bytes held at once (pending shard + the tensor in hand)

    def add(self, key: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        self.peak_bytes = max(self.peak_bytes, self.pending_bytes + nbytes)
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self.flush()
        self.pending[key] = t.contiguous()
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        if not self.pending:
            return
        name = f".partial-{len(self.shards):05d}.safetensors"
        save_file(self.pending, str(self.out / name), metadata={"format": "pt"})
        self.shards.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        self.flush()
        n = len(self.shards)
        if n == 1:
            os.replace(self.out / self.shards[0][0], self.out / "model.safetensors")
            return ["model.safetensors"]
        weight_map, names = {}, []
        for i, (tmp, keys) in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.out / tmp, self.out / final)
            names.append(final)
            weight_map.update({k: final for k in keys})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return names


def merged_weight(w: "torch.Tensor", A: "torch.Tensor", B: "torch.Tensor", scale: float, conv1d: bool,
                  to_dtype: "torch.dtype | None" = None, where: str = "") -> "torch.Tensor":
    """W0 + s·B·A, computed the one way both merges use: in fp32 on W0's device, rounded once to the
    output dtype (W0's own unless ``to_dtype``). GPT-2 Conv1D stores W0 as (d_in, d_out)."""
    delta = (B.float().to(w.device) @ A.float().to(w.device)) * scale  # (d_out, d_in)
    if conv1d:
        delta = delta.t()
    if tuple(delta.shape) != tuple(w.shape):
        raise ValueError(f"{where}: shape {tuple(w.shape)}, the adapter gives {tuple(delta.shape)}")
    return (w.float() + delta).to(to_dtype or w.dtype)


def _write_side_files(out: Path, hf_config: dict, tok_dir: Path | None, tokenizer=None) -> list[str]:
    """config.json, generation_config.json and the tokenizer files next to the merged weights."""
    (out / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True))
    if tok_dir is not None and (tok_dir / "generation_config.json").is_file():
        shutil.copy2(tok_dir / "generation_config.json", out / "generation_config.json")
    tok_files = [n for n in TOKENIZER_FILES if tok_dir is not None and (tok_dir / n).is_file()]
    for n in tok_files:
        shutil.copy2(tok_dir / n, out / n)
    if not tok_files:
        label = "(the run's tokenizer)"
        if tokenizer is None:
            tokenizer, label = load_tokenizer(None), "(built-in tokenizer)"
        tokenizer.save_pretrained(str(out))
        tok_files = [label]
    return tok_files


def merge_live(model, lora, engine, out: str | os.PathLike, tokenizer=None, tok_dir: str | None = None,
               max_shard_size: str | int = "2GB", progress: bool = False, vocab: int | None = None) -> dict | None:
    """Write the merged model straight from the live (ZeRO-3-partitioned) base of a run.

    Every rank takes part: parameters are gathered one at a time through ``engine.gather`` (the
    only DeepSpeed call, owned by the engine), rank 0 copies each to CPU, adds s·B·A where adapted
    (:func:`merged_weight`, the arithmetic of the file-based merge) and streams it into shards.
    So no rank holds more than one whole tensor of the base at once plus rank 0's pending shard.
    Written to ``OUT.partial`` and renamed to ``OUT`` when complete: a crash leaves no half model
    under the final name. ``vocab``: the real vocabulary of a run whose model is padded
    (:mod:`bigtrain.vocab`): the embedding and head are written with their first ``vocab`` rows, and
    the config with ``vocab_size = vocab``. Returns stats on rank 0, None elsewhere."""
    is_main = engine.info.is_main
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    modules = dict(model.named_modules())
    # weight name -> (adapter, whether the layer is a GPT-2 Conv1D)
    adapted = {f"{name}.weight": (ad, is_conv1d(modules[name])) for name, ad in lora.named_adapters()}
    named = list(model.named_parameters())  # tied weights appear once, as save_pretrained writes them
    padded = int(model.config.vocab_size)
    vocab = vocab or padded
    padded_rows = set(vocab_parameters(model, padded)) if vocab != padded else set()
    missing = sorted(set(adapted) - {n for n, _ in named})
    if missing:
        raise ValueError(f"cannot merge: adapted weights {missing[:3]} are not parameters of the base "
                         "(a tied output head cannot be merged without untying it)")
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    writer = _ShardWriter(tmp, parse_size(max_shard_size)) if is_main else None
    bar = None
    if is_main and progress:
        bar = tqdm(total=len(named), desc="merge", unit="tensor", dynamic_ncols=True)
    merged = 0
    with torch.no_grad():
        for name, p in named:
            with engine.gather(p):  # collective: every rank, same order
                t = p.detach().to("cpu", copy=True) if is_main else None
            if is_main:
                if name in adapted:
                    ad, conv1d = adapted[name]
                    t = merged_weight(t, ad.lora_A.detach().cpu(), ad.lora_B.detach().cpu(), ad.scale,
                                      conv1d, where=name)
                    merged += 1
                writer.add(name, t[:vocab].clone() if name in padded_rows else t)
                del t
                if bar is not None:
                    bar.update(1)
        if is_main:
            for mname, mod in modules.items():  # persistent buffers (not partitioned)
                for bname, b in mod._buffers.items():
                    if b is not None and bname not in mod._non_persistent_buffers_set:
                        writer.add(f"{mname}.{bname}" if mname else bname, b.detach().to("cpu", copy=True))
    if bar is not None:
        bar.close()
    stats = None
    if is_main:
        shards = writer.finish()
        hf_cfg = json.loads(model.config.to_json_string(use_diff=False))
        hf_cfg["vocab_size"] = vocab
        tok = _write_side_files(tmp, hf_cfg, Path(tok_dir) if tok_dir else None, tokenizer)
        if getattr(model, "generation_config", None) is not None and not (tmp / "generation_config.json").exists():
            model.generation_config.save_pretrained(str(tmp))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        stats = {"out": str(out), "shards": shards, "merged_weights": merged,
                 "total_bytes": writer.total_bytes, "peak_tensor_bytes": writer.peak_bytes, "tokenizer": tok}
    engine.barrier()
    return stats


def _weight_key(module: str, keys: set[str]) -> str | None:
    return resolve_key(module + ".weight", dict.fromkeys(keys))


def quantized_base(ckpt: Path, base: Path, keys: set[str]) -> tuple[str, int, str, set[str]]:
    """What ``bigtrain merge --into-quantized`` needs to rebuild the quantized base a run trained
    over: (model.quantize, the world size its checkpoint was saved at, model.dtype, the base-file
    keys of the quantized weights). The run's config.yaml and trainer_state.json say the first
    three; the weights are :func:`bigtrain.quantize.quantizable_weights` of the base's architecture
    (built on the meta device)."""
    saved = ckpt / "config.yaml"
    if not saved.is_file():
        raise FileNotFoundError(f"{saved}: missing; --into-quantized reads the run's model.quantize and model.dtype "
                                f"from it (merge without --into-quantized)")
    cfg = load_config(saved, validate=False)
    q = cfg.model.quantize
    if q is None:
        raise ValueError(f"{saved}: model.quantize is null (the run trained over the unquantized base); "
                         f"merge without --into-quantized")
    state = ckpt / "trainer_state.json"
    try:
        world = int(json.loads(state.read_text())["world_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{state}: no world_size ({e}); --into-quantized needs the world size the run's "
                         f"quantized partitions had") from None
    model = meta_model(tf.AutoConfig.from_pretrained(str(base)))
    quant = set()
    for name in quantizable_weights(model).values():
        key = _weight_key(name.removesuffix(".weight"), keys)
        if key is None:
            raise ValueError(f"{base}: no weight for quantized parameter {name!r} in the checkpoint files")
        quant.add(key)
    return q, world, cfg.model.dtype, quant


def merge_checkpoint(ckpt: str | os.PathLike, out: str | os.PathLike, base: str | None = None,
                     max_shard_size: str | int = "2GB", dtype: str | None = None,
                     progress: bool = False, into_quantized: bool = False) -> dict:
    """Write a merged Hugging Face checkpoint to ``out``; return stats (files, bytes, peak).
    ``into_quantized``: merge into the run's quantized base (:func:`quantized_base`), written in the
    run's model.dtype unless ``dtype``."""
    c = checkpoint.read_checkpoint(ckpt)
    tensors = c.tensors
    bdir = base_dir(c.spec, base, c.path)
    files = checkpoint_files(bdir, check=True)  # a truncated shard is named before OUT is created
    modules = list(c.spec.modules)
    conv = conv1d_modules(bdir, modules)
    scale = c.spec.scale
    targets: dict[str, str] = {}  # weight key in the base files -> module
    for m in modules:
        key = _weight_key(m, set(files))
        if key is None:
            raise ValueError(f"{bdir}: no weight for adapted module {m!r} in the checkpoint files "
                             "(a tied output head cannot be merged without untying it)")
        targets[key] = m
    quantized: dict = {}
    if into_quantized:
        scheme, world, run_dtype, qkeys = quantized_base(c.path, bdir, set(files))
        dtype = dtype or run_dtype
        quantized = {"scheme": scheme, "world": world, "dtype": _dtype(run_dtype), "keys": qkeys}
    out = Path(out)
    _check_out_dir(out)
    to_dtype = _dtype(dtype) if dtype else None
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        writer = _ShardWriter(out, parse_size(max_shard_size))
        by_file: dict[Path, list[str]] = {}
        for k, f in files.items():
            by_file.setdefault(f, []).append(k)
        merged = 0
        bar = None
        if progress:
            bar = tqdm(total=sum(f.stat().st_size for f in by_file), desc="merge", unit="B",
                       unit_scale=True, dynamic_ncols=True)
        for f, keys in by_file.items():  # one input file open at a time
            with open_safetensors(f) as h:
                for k in keys:
                    t = h.get_tensor(k)
                    if k in quantized.get("keys", ()):  # as the run's ranks held it after each gather
                        t = reference_dequantized(t.to(quantized["dtype"]), quantized["world"],
                                                  scheme=quantized["scheme"])
                    if k in targets:
                        m = targets[k]
                        t = merged_weight(t, tensors[f"{m}.lora_A"], tensors[f"{m}.lora_B"], scale,
                                          m in conv, to_dtype, where=f"{f.name}: {k}")
                        merged += 1
                    elif to_dtype is not None and t.is_floating_point():
                        t = t.to(to_dtype)
                    writer.add(k, t)
                    del t
            if bar is not None:
                bar.update(f.stat().st_size)
        if bar is not None:
            bar.close()
        shards = writer.finish()
        hf_cfg = json.loads((bdir / "config.json").read_text())
        if to_dtype is not None:
            for key in ("dtype", "torch_dtype"):
                if key in hf_cfg or key == "dtype":
                    hf_cfg[key] = str(to_dtype).removeprefix("torch.")
        tok_files = _write_side_files(out, hf_cfg, bdir)
    except BaseException:
        # leave no half-written checkpoint that from_pretrained could mistake for a good one
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    stats = {"out": str(out), "base": str(bdir), "shards": shards, "merged_weights": merged,
             "total_bytes": writer.total_bytes, "peak_tensor_bytes": writer.peak_bytes,
             "tokenizer": tok_files}
    if quantized:
        stats["quantized"] = {"scheme": quantized["scheme"], "world_size": quantized["world"],
                              "weights": len(quantized["keys"])}
    return stats
