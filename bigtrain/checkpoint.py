"""Adapter-only checkpoints that a crash at any moment cannot corrupt.

Layout of ``<output_dir>/checkpoints/``::

    step-00000100/
        adapter_model.safetensors   A and B of every adapted module (the only weights saved)
        adapter_config.json         rank, alpha, targets, ... (what is needed to rebuild the adapters)
        optimizer.safetensors       AdamW moments of the adapters
        trainer_state.json          step, data position, scheduler, optimizer hyper-parameters, ...
        rng/rank00000.json          Python / NumPy / torch (/ CUDA) RNG state of each rank
        base.json                   identity of the base model (config hash, weight-file sizes)
        config.yaml                 the resolved run config
        manifest.json               size and sha256 of every file above: written last
    latest                          name of the newest complete checkpoint

A save goes to ``.tmp-step-…``, every file is fsynced, the manifest is written last, the directory is
renamed into place and only then ``latest`` is replaced (write + rename). Loading verifies the
manifest and falls back, with a warning, to the previous good checkpoint. Nothing here unpickles:
tensors are safetensors, everything else JSON/YAML.

Adapters are replicated, so rank 0 writes them; the base model is never gathered. Each rank writes
its own RNG file (the output directory must be shared by all nodes, as it is on clusters).

A run's rules (when to save, what to keep, what to resume from) belong to :class:`CheckpointManager`;
:func:`read_checkpoint` is the read side that ``bigtrain export``, ``bigtrain merge`` and the
adapter bank share.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import faults  # test-only crash points during a save (no-ops unless a test sets them)
from .config import ConfigError
from .lora import AdapterSpec, LoRAModel, lora_scale

LATEST = "latest"
PREFIX = "step-"
TMP_PREFIX = ".tmp-"  # a save in progress: ``.tmp-step-…``, renamed into place when complete
MANIFEST = "manifest.json"
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says which file and why."""


class CheckpointSaveError(CheckpointError):
    """A save that could not be written (disk full, quota, file-size limit, I/O error). Raised on
    every rank with the same one-line message: what failed, what to do, the step a rerun resumes
    from. Nothing already saved was touched; the partial ``.tmp-`` directory is removed. The CLI
    exits with :data:`SAVE_FAILED_EXIT`."""


SAVE_FAILED_EXIT = 3  # `bigtrain train`'s exit status after a CheckpointSaveError (slurm/_common.sh)


class _WriteFailed(Exception):
    """A write of a save failed on this rank: the file and the OS error (errno, text)."""

    def __init__(self, path: Path, err: int | None, text: str):
        super().__init__(f"{path}: {text}")
        self.path, self.errno, self.text = Path(path), err, text


def _write_failure(path: Path, e: Exception) -> _WriteFailed:
    """An OSError, or safetensors' own error (which carries the OS error only in its text, as
    "... (os error 28)"), as a :class:`_WriteFailed` naming ``path``."""
    err = getattr(e, "errno", None)
    if err is None:
        m = re.search(r"\(os error (\d+)\)", str(e))
        err = int(m.group(1)) if m else None
    text = os.strerror(err) if err else str(e)
    return _WriteFailed(Path(getattr(e, "filename", None) or path), err, text)


@contextlib.contextmanager
def _writing(path: Path):
    """Turn a failed write of ``path`` (OSError, SafetensorError) into :class:`_WriteFailed`."""
    try:
        faults.disk_full(path)
        yield
    except _WriteFailed:
        raise
    except (OSError, SafetensorError) as e:
        raise _write_failure(path, e) from None


# -- small durable-write helpers ---------------------------------------------------------------
def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj) -> None:
    with _writing(path):
        path.write_text(json.dumps(obj, indent=1, sort_keys=True))
        _fsync_file(path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> None:
    with _writing(path):
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path),
                  metadata={k: str(v) for k, v in (meta or {}).items()})
        _fsync_file(path)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated/garbled files
        raise CheckpointError(f"{path}: cannot be read as safetensors ({e})") from None


# -- RNG state as JSON -------------------------------------------------------------------------
def rng_state() -> dict:
    py = random.getstate()
    npst = np.random.get_state()
    out = {"python": [py[0], list(py[1]), py[2]],
           "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])],
           "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        out["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(state: dict) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# -- optimizer state ---------------------------------------------------------------------------
def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = v
    for key, v in meta.get("scalars", {}).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


# -- listing and verifying ---------------------------------------------------------------------
def step_of(path: Path) -> int:
    return int(path.name[len(PREFIX):])


def list_checkpoints(root: Path) -> list[Path]:
    """Renamed-into-place checkpoints, newest first (complete or not: verify() decides)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
             and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=step_of, reverse=True)


def verify(path: Path) -> dict:
    """Check every file against the manifest; returns the manifest or raises CheckpointError."""
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST} (the save did not finish)")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{mpath}: unreadable manifest ({e})") from None
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: listed in the manifest but missing")
        size = f.stat().st_size
        if size != want["size"]:
            raise CheckpointError(f"{f}: {size} bytes, the manifest says {want['size']}")
        if _sha256(f) != want["sha256"]:
            raise CheckpointError(f"{f}: checksum differs from the manifest (corrupt)")
    return manifest


def read_latest(root: Path, log=print) -> str | None:
    """The checkpoint name ``root/latest`` holds; None if there is no such file, or (said in one line
    naming it) if its bytes are not a checkpoint name: the directory listing is the truth then."""
    f = root / LATEST
    if not f.is_file():
        return None
    try:
        raw = f.read_bytes()
    except OSError as e:
        log(f"warning: {f}: unreadable ({e.strerror or e}); the newest complete checkpoint is used instead")
        return None
    try:
        name = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        name = ""
    if not re.fullmatch(r"[\w.-]+", name):
        log(f"warning: {f}: {len(raw)} bytes that are not a checkpoint name ({raw[:24]!r}); the newest "
            f"complete checkpoint is used instead")
        return None
    return name


def find_resumable(root: Path, log=print) -> Path | None:
    """The newest checkpoint that verifies. Each newer one skipped is reported with its reason.
    ``latest`` is not trusted over the directory listing: a crash after a checkpoint's rename but
    before ``latest`` moved leaves a complete newer checkpoint, and that one is used."""
    pointed = read_latest(root, log)
    for p in list_checkpoints(root):
        try:
            verify(p)
        except CheckpointError as e:
            log(f"warning: skipping checkpoint {p.name}: {e}; falling back to an older one")
            continue
        if pointed is not None and p.name != pointed:
            log(f"note: {LATEST} names {pointed} but {p.name} is newer and complete: using {p.name}")
        return p
    return None


# -- save --------------------------------------------------------------------------------------
def save_checkpoint(root: Path, step: int, engine, lora: LoRAModel, optimizer, trainer_state: dict,
                    adapter_config: dict, base_fingerprint: dict, config_yaml: str, keep: int) -> Path:
    """One save without a run around it (tests, tools): :meth:`CheckpointManager.write`.
    Collective: every rank calls it. Returns the checkpoint path (on every rank)."""
    return CheckpointManager(root, engine, lora, optimizer, adapter_config=adapter_config,
                             base_fingerprint=base_fingerprint, config_yaml=config_yaml,
                             keep=keep).write(step, trainer_state)


def _prune(root: Path, keep: int, protect: Path) -> None:
    """Keep the newest ``keep`` good checkpoints; remove leftovers of interrupted saves. Never
    removes ``protect`` (the one just written)."""
    clean_partial(root)
    good = 0
    for p in list_checkpoints(root):
        if p == protect:
            good += 1
            continue
        if (p / MANIFEST).is_file() and good < keep:
            good += 1
            continue
        shutil.rmtree(p, ignore_errors=True)


def clean_partial(root: Path) -> list[str]:
    """Remove the ``.tmp-`` directories of saves that died before their rename (rank 0: at start,
    and after each save); returns their names."""
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(TMP_PREFIX) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
    return removed


def _save_failed_message(step: int, fail: tuple, root: Path, partial: str) -> str:
    """The one line a failed save ends the run with: the file, the OS error, what to do, and the
    step a rerun of the same command resumes from (the newest checkpoint that verifies, which may
    be ``step`` itself when only moving ``latest`` failed)."""
    rank, path, err, text = fail
    todo = {errno.ENOSPC: f"free space on the filesystem of {root}",
            errno.EDQUOT: f"free space within your disk quota on {root} (or have it raised)",
            errno.EFBIG: "raise the file-size limit (ulimit -f) or put train.output_dir on a filesystem "
                         "that takes larger files"}.get(err, f"check that {root} is writable and healthy")
    have = find_resumable(root, log=lambda _: None)
    then = (f"rerun the same command to resume from step {step_of(have)}" if have is not None
            else "rerun the same command to start again (no checkpoint was saved yet)")
    who = f" on rank {rank}" if rank else ""
    code = f" (errno {errno.errorcode.get(err, err)})" if err else ""
    if have is not None and step_of(have) == step:  # renamed into place; only `latest` did not move
        return (f"checkpoint of step {step} written, but then writing {path}{who} failed: {text}{code}; "
                f"{todo}, then {then} ({have.name} is complete: a resume takes the newest complete "
                f"checkpoint, whatever {LATEST} names)")
    return (f"checkpoint of step {step} not saved: writing {path}{who} failed: {text}{code}; {todo}, "
            f"then {then} (nothing saved before was touched; {partial} was removed)")


# -- load --------------------------------------------------------------------------------------
def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def load_adapters(path: Path, lora: LoRAModel) -> None:
    try:
        lora.load_adapter_state_dict(_load_tensors(path / ADAPTER_FILE))
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path / ADAPTER_FILE}: {e}") from None


def load_checkpoint(path: Path, lora: LoRAModel, optimizer, rank: int) -> dict:
    """Restore adapters, optimizer and this rank's RNG; return the trainer state."""
    load_adapters(path, lora)
    state = read_json(path / "trainer_state.json")
    opt = optimizer_from_files(_load_tensors(path / "optimizer.safetensors"), state["optimizer"])
    try:
        optimizer.load_state_dict(opt)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{path / 'optimizer.safetensors'}: does not fit the adapters ({e})") from None
    rng_file = path / "rng" / f"rank{rank:05d}.json"
    if rng_file.is_file():
        set_rng_state(read_json(rng_file))
    else:  # resumed with more ranks than saved: new ranks start from rank 0's stream
        warnings.warn(f"{rng_file} missing (resumed at a larger world size); using rank 0's RNG state")
        set_rng_state(read_json(path / "rng" / "rank00000.json"))
    return state


# -- reading adapters (export, merge, the adapter bank) -----------------------------------------
@dataclass(frozen=True)
class AdapterCheckpoint:
    """A checkpoint's adapters, verified against its manifest: what ``bigtrain export``,
    ``bigtrain merge`` and :meth:`bigtrain.switch.AdapterBank.load` read."""

    path: Path  # the checkpoint directory (step-N)
    spec: AdapterSpec  # its adapter_config.json
    tensors: dict[str, torch.Tensor]  # "<module>.lora_A" / "<module>.lora_B", one pair per spec.modules


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory; a run's output dir or its ``checkpoints/`` dir resolves to the
    checkpoint named by ``latest``."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such checkpoint directory")
    if p.is_file():
        what = "" if p.suffix == ".safetensors" else " (bigtrain reads safetensors adapters only, never pickles)"
        raise CheckpointError(f"{p}: a file, not a checkpoint directory{what}; pass the bigtrain checkpoint "
                              f"that holds {ADAPTER_FILE} (<output_dir>/checkpoints/step-N) or the run's output_dir")
    pickled = [f.name for f in (p / "adapter_model.bin", p / "adapter_model.pt") if f.is_file()]
    if pickled and not (p / ADAPTER_FILE).is_file():
        raise CheckpointError(f"{p / pickled[0]}: a pickled adapter, not a bigtrain checkpoint (bigtrain reads "
                              f"safetensors only, never pickles); pass a checkpoint written by bigtrain train "
                              f"(<output_dir>/checkpoints/step-N)")
    if (p / ADAPTER_CONFIG).is_file() or (p / MANIFEST).is_file():
        return p
    for root in (p, p / "checkpoints"):
        if (root / LATEST).is_file():
            def warn(msg):
                print(f"[bigtrain] {msg}", file=sys.stderr, flush=True)
            name = read_latest(root, warn)
            found = root / name if name else find_resumable(root, warn)
            if found is None:
                raise CheckpointError(f"{root / LATEST} names no readable checkpoint and {root} holds no "
                                      f"complete one")
            return found
    raise CheckpointError(f"{p}: not a bigtrain checkpoint (no {ADAPTER_CONFIG}, {MANIFEST} "
                          f"or checkpoints/{LATEST})")


def read_checkpoint(path: str | os.PathLike) -> AdapterCheckpoint:
    """Resolve ``path`` (:func:`resolve_checkpoint`), verify it against its manifest, read its
    adapter config and tensors, and check that the two agree."""
    p = resolve_checkpoint(path)
    verify(p)
    cfg = read_json(p / ADAPTER_CONFIG)
    missing = [k for k in ("r", "alpha", "modules", "base_model") if k not in cfg]
    if missing:
        raise CheckpointError(f"{p / ADAPTER_CONFIG}: missing {', '.join(missing)}")
    tensors = _load_tensors(p / ADAPTER_FILE)
    want = {f"{m}.{part}" for m in cfg["modules"] for part in ("lora_A", "lora_B")}
    if set(tensors) != want:
        extra, lack = sorted(set(tensors) - want), sorted(want - set(tensors))
        raise CheckpointError(f"{p / ADAPTER_FILE}: keys do not match {ADAPTER_CONFIG} modules "
                              f"(missing {lack[:3]}, unexpected {extra[:3]})")
    return AdapterCheckpoint(p, AdapterSpec.from_json(cfg), tensors)


def newest_adapter_config(root: Path) -> Path | None:
    """Before any process group, cheaply: the newest checkpoint under ``root`` whose manifest lists
    an adapter_config.json that matches it (size and sha256). It is the checkpoint an ``auto``
    resume continues unless its large files turn out corrupt, and the adapter config is the same
    in every checkpoint of a run (a resume refuses a change), so checking this one's refuses a
    changed lora.r / alpha / rslora / targets before the base is built. Rank 0's full
    verification (:func:`find_resumable`) still decides what is resumed."""
    for p in list_checkpoints(root):
        try:
            want = json.loads((p / MANIFEST).read_text())["files"][ADAPTER_CONFIG]
            f = p / ADAPTER_CONFIG
            if f.stat().st_size == want["size"] and _sha256(f) == want["sha256"]:
                return p
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def check_base(path: Path, current: dict, force: bool) -> None:
    saved = read_json(path / "base.json")
    diffs = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)
             and not (k in LATER_BASE_KEYS and k not in saved)]  # an older checkpoint: not recorded
    if diffs:
        what = ("a different tokenizer (model.tokenizer)" if diffs == ["tokenizer_sha256"] else
                "a different base model" + (" and tokenizer" if "tokenizer_sha256" in diffs else ""))
        msg = (f"{path}: was trained on {what} ({', '.join(diffs)} differ: "
               f"checkpoint {[saved.get(k) for k in diffs]!r} vs now {[current.get(k) for k in diffs]!r})")
        if not force:
            raise CheckpointError(msg + "; set checkpoint.force_base_mismatch=true to resume anyway")
        warnings.warn(msg + " (forced)")


def check_adapter(path: Path, current: dict) -> list[str]:
    """A resume must continue the same adapters: a changed lora.r, lora.alpha, lora.rslora or set of
    adapted modules (lora.targets) is refused, naming the key, the checkpoint's value and the new
    one (a changed alpha or rslora would make the effective scale s jump, and the new
    adapter_config.json would claim a scale the adapters were not trained at). A changed
    lora.dropout only regularises what follows: it is used, and returned as a note to say. Keys an
    older checkpoint lacks are not compared."""
    saved = read_json(path / ADAPTER_CONFIG)
    for key in ("r", "alpha", "rslora", "modules"):
        if key not in saved or key not in current or saved[key] == current[key]:
            continue
        if key == "modules" and saved.get("targets") == current.get("targets"):
            # the same lora.targets matched other modules: the base is another model (depth, names)
            extra = sorted(set(current["modules"]) - set(saved["modules"]))
            gone = sorted(set(saved["modules"]) - set(current["modules"]))
            raise ConfigError(f"{path}: the base changed on resume: lora.targets {saved.get('targets')} match "
                              f"{len(saved['modules'])} modules in the checkpoint's base "
                              f"({saved.get('base_model', '?')}) but {len(current['modules'])} in this one "
                              f"({current.get('base_model', '?')})"
                              + (f", e.g. {gone[0]} is missing" if gone else f", e.g. {extra[0]} is new" if extra else "")
                              + "; resume on the checkpoint's base (model.path / model.preset, model.num_layers), "
                              "or start a fresh run in another train.output_dir")
        if key == "modules":
            raise ConfigError(f"{path}: lora.targets changed on resume: the checkpoint adapts "
                              f"{len(saved['modules'])} modules ({saved.get('targets')}), now "
                              f"{len(current['modules'])} ({current.get('targets')}); resume with the "
                              f"checkpoint's lora.targets, or start a fresh run in another train.output_dir")
        why = ""
        if key in ("alpha", "rslora"):
            old = {k: saved.get(k, current.get(k)) for k in ("r", "alpha", "rslora")}
            why = (f" (the adapters' scale would jump from {lora_scale(old['alpha'], old['r'], old['rslora']):g} "
                   f"to {lora_scale(current['alpha'], current['r'], current.get('rslora', False)):g})")
        was, now = (json.dumps(v) if isinstance(v, bool) else v for v in (saved[key], current[key]))
        raise ConfigError(f"{path}: lora.{key} changed on resume: checkpoint {was}, now {now}{why}; "
                          f"resume with lora.{key}={was}, or start a fresh run in another train.output_dir")
    notes = []
    if "dropout" in saved and "dropout" in current and saved["dropout"] != current["dropout"]:
        notes.append(f"lora.dropout changed on resume: {saved['dropout']} -> {current['dropout']} "
                     f"(the config's value is used)")
    return notes


# base.json keys newer than some checkpoints: not compared when the checkpoint lacks them
LATER_BASE_KEYS = ("weights_sampled_sha256", "tokenizer_sha256")
SAMPLE_BYTES = 4096


def sampled_weights_digest(model_dir: Path) -> str:
    """A content fingerprint of a safetensors checkpoint that reads a few KiB per tensor: each file's
    name and header (every tensor's name, dtype, shape and offsets), and the first, middle and last
    4 KiB of every tensor's bytes. Two checkpoints of one architecture (a model and its chat variant,
    or one weight changed) differ in it; names and sizes alone did not tell them apart. Cost:
    3 x 4 KiB per tensor (Llama-2-70B: 723 tensors, 8.9 MB of reads, against 138 GB to hash it whole)."""
    h = hashlib.sha256()
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = fh.read(n)
            h.update(f.name.encode() + b"\0" + header)
            meta = json.loads(header)
            for name in sorted(k for k in meta if k != "__metadata__"):
                a, b = meta[name]["data_offsets"]
                for off in sorted({a, max(a, (a + b) // 2 - SAMPLE_BYTES // 2), max(a, b - SAMPLE_BYTES)}):
                    fh.seek(8 + n + off)
                    h.update(fh.read(min(SAMPLE_BYTES, b - off)))
    return h.hexdigest()


def base_fingerprint(hf_config, model_path: str | None, preset: str, seed: int,
                     quantize: str | None = None, tokenizer_sha256: str | None = None) -> dict:
    """What identifies the frozen base: its config (hash) and, for a checkpoint on disk, its weight
    files and sizes and a content fingerprint (:func:`sampled_weights_digest`); for a
    random-initialised preset, the seed that built it; ``model.quantize`` when set (an int8 base is
    another base; absent when null, so older fingerprints still match); the tokenizer's digest
    (``data.tokenizer_fingerprint``): adapters trained on one tokenizer's ids mean nothing on another's."""
    cfg = {k: v for k, v in hf_config.to_dict().items()
           if k not in ("transformers_version", "_name_or_path", "torch_dtype", "dtype", "architectures")}
    fp = {"config_sha256": hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()}
    if model_path:
        d = Path(model_path)
        fp["source"] = "path"
        fp["weights"] = {p.name: p.stat().st_size for p in sorted(d.glob("*.safetensors"))}
        fp["weights_sampled_sha256"] = sampled_weights_digest(d)
    else:
        fp["source"] = f"preset:{preset}"
        fp["init_seed"] = seed
    if quantize is not None:
        fp["quantize"] = quantize
    if tokenizer_sha256 is not None:
        fp["tokenizer_sha256"] = tokenizer_sha256
    return fp


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# -- a run's checkpoints -----------------------------------------------------------------------
def check_resume(mode: str, root: Path) -> Path | None:
    """checkpoint.resume, checked before any process group: an explicit checkpoint (or a run dir:
    its latest) must exist and verify, with no silent fallback, and is returned; ``never`` refuses
    a ``root`` that already holds another run's checkpoints (pruning and a later auto-resume would
    mix the two); ``auto`` and ``never`` return None (``auto`` is decided by rank 0 later:
    :meth:`CheckpointManager.resume`)."""
    if mode == "never":
        old = list_checkpoints(root) if root.is_dir() else []
        if old:
            raise ConfigError(
                f"checkpoint.resume=never, but {root} already holds checkpoints of an earlier run "
                f"(newest {old[0].name}): a fresh run there would prune them together with its own "
                f"and a later checkpoint.resume=auto could pick theirs up. Use another "
                f"train.output_dir, remove {root}, or checkpoint.resume=auto to continue that run")
        return None
    if mode == "auto":
        return None
    try:
        p = resolve_checkpoint(mode)  # a checkpoint dir, a run dir or its checkpoints/ dir
        verify(p)
    except (OSError, CheckpointError) as e:
        raise ConfigError(f"checkpoint.resume={mode}: {e}") from None
    return p


@dataclass(frozen=True)
class ResumeResult:
    """What :meth:`CheckpointManager.resume` did. ``path`` None: a fresh start, nothing restored.
    Otherwise adapters, optimizer and this rank's RNG were restored from ``path``, and ``state`` is
    its trainer_state.json: what the trainer saved, plus ``optimizer`` and ``world_size``."""

    path: Path | None = None
    state: dict = field(default_factory=dict)

    @property
    def world_size(self) -> int | None:
        """The world size the checkpoint was saved with."""
        return self.state.get("world_size")


class CheckpointManager:
    """A run's checkpoints under ``root``: when to save (:meth:`maybe_save`), the save itself
    (:meth:`save`, :meth:`write`) and where to resume from (:meth:`resume`).

    It holds what stays fixed over a run (the engine, the adapters and their optimizer, the adapter
    config, the base's fingerprint, the run's config as YAML, the rules), so a save passes only the
    step and the trainer state. Every rank builds one and calls the same methods with the same
    arguments in the same order: a save and the ``auto`` resume choice are collectives, and a rank
    that decided differently would leave the others waiting in them."""

    def __init__(self, root: str | os.PathLike, engine, lora: LoRAModel, optimizer, *,
                 adapter_config: dict, base_fingerprint: dict, config_yaml: str, keep: int,
                 every: int = 0, every_minutes: float = 0.0, last_step: int | None = None,
                 force_base_mismatch: bool = False, log: Callable[[str], None] = print):
        self.root = Path(root)
        self.engine, self.lora, self.optimizer = engine, lora, optimizer
        self.adapter_config, self.base_fingerprint, self.config_yaml = adapter_config, base_fingerprint, config_yaml
        self.keep = keep
        self.every = every  # save every N steps (0: off)
        self.every_minutes = every_minutes  # save when rank 0's clock says so (0: off)
        self.last_step = last_step  # always saved: the run's result is its final state
        self.force_base_mismatch = force_base_mismatch
        self.log = log
        self.last: Path | None = None  # what this run saved last
        self._clock = time.monotonic()

    # -- when ------------------------------------------------------------------------------------
    def restart_clock(self) -> None:
        """checkpoint.every_minutes counts from now (the loop's start; each save restarts it)."""
        self._clock = time.monotonic()

    def time_due(self) -> bool:
        """Whether rank 0's clock says a time-based save is due; False on every other rank. This
        rank's view only: the trainer sends it in the step's all-reduce (slot SAVE_DUE), and every
        rank passes the summed flag to :meth:`maybe_save` as ``due``."""
        return (self.engine.info.is_main and self.every_minutes > 0
                and time.monotonic() - self._clock >= 60 * self.every_minutes)

    def is_due(self, step: int, *, force: bool = False, due: bool = False) -> bool:
        """A save at ``step``: forced (a stop request: rerunning then resumes from here), ``due``
        (time-based, agreed on by every rank), every ``every`` steps, or the last step."""
        return bool(force or due or (self.every and step % self.every == 0) or step == self.last_step)

    def maybe_save(self, step: int, trainer_state: dict, *, force: bool = False,
                   due: bool = False) -> Path | None:
        """Save ``step`` if :meth:`is_due`; returns the checkpoint, or None. Every rank must pass
        the same ``force`` and ``due`` (the values after the step's all-reduce)."""
        return self.save(step, trainer_state) if self.is_due(step, force=force, due=due) else None

    # -- saving ----------------------------------------------------------------------------------
    def save(self, step: int, trainer_state: dict) -> Path:
        """Checkpoint ``step``: only adapters that are finite and identical on every rank."""
        params = list(self.lora.parameters())
        assert all(torch.isfinite(p).all() for p in params), "non-finite adapter weights: not saved"
        digests = self.engine.replica_digests(params)
        if len(set(digests)) != 1:  # replicas drifted: a bug or a hardware fault; never save that
            raise RuntimeError(f"adapters differ across ranks at step {step}: sha256 per rank {digests}")
        path = self.write(step, trainer_state)
        size = (path / ADAPTER_FILE).stat().st_size
        self.log(f"[bigtrain] checkpoint {path} (adapter {size / 1e6:.3f} MB, whole {dir_size(path) / 1e6:.3f} MB)")
        self.last = path
        self.restart_clock()
        return path

    def write(self, step: int, trainer_state: dict) -> Path:
        """Write checkpoint ``step`` (the files in the module docstring, atomically), move
        ``latest`` to it and prune to ``keep``. Collective: every rank calls it. Returns the
        checkpoint path (on every rank). A write that fails (disk full, ...) on any rank raises
        :class:`CheckpointSaveError` on every rank (:meth:`_together`): nothing saved before is
        touched and the partial directory is removed."""
        engine, root = self.engine, self.root
        rank, world = engine.info.rank, engine.info.world_size
        final = root / f"{PREFIX}{step:08d}"
        tmp = root / (TMP_PREFIX + final.name)

        def prepare():
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            (tmp / "rng").mkdir(parents=True)

        def files():  # rank 0: the adapters are replicated
            faults.crash_point("save:start", step)
            _save_tensors(tmp / ADAPTER_FILE, self.lora.adapter_state_dict(), {"format": "bigtrain-lora"})
            _write_json(tmp / ADAPTER_CONFIG, self.adapter_config)
            faults.crash_point("save:after_weights", step)
            opt_tensors, opt_meta = optimizer_to_files(self.optimizer)
            _save_tensors(tmp / "optimizer.safetensors", opt_tensors)
            _write_json(tmp / "trainer_state.json", {**trainer_state, "optimizer": opt_meta, "world_size": world})
            _write_json(tmp / "base.json", self.base_fingerprint)
            with _writing(tmp / "config.yaml"):
                (tmp / "config.yaml").write_text(self.config_yaml)
                _fsync_file(tmp / "config.yaml")
            faults.crash_point("save:before_manifest", step)
            names = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
            manifest = {"step": step, "files": {f: {"size": (tmp / f).stat().st_size,
                                                    "sha256": _sha256(tmp / f)} for f in names}}
            _write_json(tmp / MANIFEST, manifest)
            _fsync_dir(tmp / "rng")
            _fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(root)
            faults.crash_point("save:before_latest", step)
            ptr = root / (LATEST + ".tmp")
            with _writing(ptr):
                ptr.write_text(final.name + "\n")
                _fsync_file(ptr)
            os.replace(ptr, root / LATEST)
            _fsync_dir(root)
            _prune(root, self.keep, protect=final)

        rng_file = tmp / "rng" / f"rank{rank:05d}.json"
        self._together(step, tmp, prepare if rank == 0 else None)
        self._together(step, tmp, lambda: _write_json(rng_file, rng_state()))
        self._together(step, tmp, files if rank == 0 else None)
        return final

    def _together(self, step: int, tmp: Path, work: Callable[[], None] | None) -> None:
        """One phase of a save: this rank's ``work`` (None: nothing to write), then every rank learns
        whether any rank's write failed (an all-gather, which is also the phase's barrier). If one
        did, rank 0 removes the partial ``tmp`` and every rank raises the same
        :class:`CheckpointSaveError`: rank 0 failing alone while the others wait in the next
        collective would hang the job (until the collective timeout, or forever under srun)."""
        failed = None
        if work is not None:
            try:
                work()
            except _WriteFailed as e:
                failed = (self.engine.info.rank, str(e.path), e.errno, e.text)
            except OSError as e:  # a directory: mkdir, rename, fsync
                f = _write_failure(Path(e.filename or tmp), e)
                failed = (self.engine.info.rank, str(f.path), f.errno, f.text)
        fails = [f for f in self.engine.all_gather_objects(failed) if f]
        if not fails:
            return
        msg = None
        if self.engine.info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # frees what it held; clean_partial would at the next start
            (self.root / (LATEST + ".tmp")).unlink(missing_ok=True)
            msg = _save_failed_message(step, fails[0], self.root, tmp.name)
        raise CheckpointSaveError(self.engine.all_gather_objects(msg)[0])

    def latest(self) -> Path | None:
        """What this run saved last; when it saved nothing (resumed at its last step), the newest
        checkpoint under ``root`` that verifies."""
        if self.last is None:
            self.last = find_resumable(self.root, self.log)
        return self.last

    # -- resuming --------------------------------------------------------------------------------
    def resume(self, mode: str) -> ResumeResult:
        """checkpoint.resume ``mode``: ``auto``, the newest checkpoint under ``root`` that verifies
        as rank 0 sees it (a collective: every rank takes rank 0's choice); ``never``, none; else
        the explicit checkpoint or run dir (:func:`check_resume`). A checkpoint's base must match
        this run's (unless force_base_mismatch), and its adapters this run's (:func:`check_adapter`);
        then adapters, optimizer and this rank's RNG are restored from it."""
        path = self._latest_resumable() if mode == "auto" else check_resume(mode, self.root)
        if path is None:
            return ResumeResult()
        check_base(path, self.base_fingerprint, self.force_base_mismatch)
        for note in check_adapter(path, self.adapter_config):
            self.log(f"[bigtrain] {note}")
        state = load_checkpoint(path, self.lora, self.optimizer, self.engine.info.rank)
        return ResumeResult(path, state)

    def _latest_resumable(self) -> Path | None:
        choice = find_resumable(self.root, self.log) if self.engine.info.is_main else None
        choice = self.engine.all_gather_objects(str(choice) if choice else None)[0]  # rank 0 decides
        return Path(choice) if choice else None
