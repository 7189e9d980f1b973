"""Data: tokenizer loading, examples -> (input_ids, labels) rows, and the batch collator.

Two input formats, detected per file from its first good record:

* prompt/completion: ``{"prompt": str, "completion": str}``. A row is
  ``[bos] + prompt + completion + [eos]`` and only completion + eos carry labels: the conditional
  objective log P(y | x) of the LoRA paper's fine-tuning experiments. Labels are aligned with
  ``input_ids`` (the loss shifts, see :mod:`bigtrain.losses`).
* text: ``{"text": str}`` (or plain-text paragraphs). A row is ``[bos] + text + [eos]`` with labels on
  everything but bos.

Sources: ``builtin:e2e`` / ``builtin:e2e-eval`` (the generated data-to-text set, see
:mod:`bigtrain.datagen`), ``builtin:lora-ko`` (a Korean excerpt of the LoRA paper, one text example
per paragraph), a ``.jsonl`` file, a ``.txt`` file (paragraphs separated by blank lines), or a
directory written by ``datasets.Dataset.save_to_disk``. Order is kept: shuffling is the sampler's job.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import datasets
import torch

from .config import ASSETS, TOKENIZER_FILES, DataConfig
from .losses import IGNORE_INDEX

BUILTIN = {
    "builtin:e2e": ASSETS / "e2e_train.jsonl",
    "builtin:e2e-eval": ASSETS / "e2e_eval.jsonl",
    "builtin:lora-ko": ASSETS / "lora_intro_ko.txt",
}
BUILTIN_TOKENIZER = ASSETS / "tokenizer"
MAX_BAD_LINES_REPORTED = 5


class DataError(ValueError):
    """Bad data input; the message names the file and 1-based line (or row and field)."""


# ---------------------------------------------------------------------------------------------
# Tokenizer


def load_tokenizer(path: str | None = None):
    """A ``transformers`` tokenizer from a local directory; ``None``: the built-in byte-level BPE
    (vocabulary 1024, ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<unk>`` 3). Never touches the Hub.
    A tokenizer without a pad token gets pad = eos."""
    from transformers import AutoTokenizer

    d = Path(path) if path is not None else BUILTIN_TOKENIZER
    if not d.is_dir():
        raise DataError(f"tokenizer {str(d)!r}: not a directory")
    if not any((d / f).is_file() for f in TOKENIZER_FILES):
        raise DataError(f"tokenizer {str(d)!r}: the directory holds no tokenizer "
                        f"(none of {', '.join(TOKENIZER_FILES)})")
    try:
        tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    except Exception as e:  # transformers raises many types here; name the path
        raise DataError(f"tokenizer {str(d)!r}: cannot load it: {type(e).__name__}: {e}") from e
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


# ---------------------------------------------------------------------------------------------
# Reading records (validated, in file order)


class _Reader:
    """Collects good records and bad-line reports under the ``on_bad_line`` policy."""

    def __init__(self, where: str, on_bad_line: str):
        self.where, self.policy = where, on_bad_line
        self.fmt: str | None = None  # "pc" or "text", fixed by the first good record
        self.prompts: list[str] = []
        self.completions: list[str] = []
        self.texts: list[str] = []
        self.skipped = 0
        self.bad: list[str] = []

    def bad_line(self, loc: str, reason: str) -> None:
        msg = f"{self.where}:{loc}: {reason}"
        if self.policy == "error":
            raise DataError(msg)
        self.skipped += 1
        if len(self.bad) < MAX_BAD_LINES_REPORTED:
            self.bad.append(msg)

    def add(self, loc: str, obj: Any) -> None:
        if not isinstance(obj, dict):
            return self.bad_line(loc, f"expected a JSON object, got {type(obj).__name__}")
        if "prompt" in obj or "completion" in obj:
            fmt = "pc"
            for k in ("prompt", "completion"):
                if k not in obj or obj[k] is None:
                    return self.bad_line(loc, f"missing field {k!r}")
                if not isinstance(obj[k], str):
                    return self.bad_line(loc, f"field {k!r} must be a string, got {type(obj[k]).__name__}")
            if not obj["completion"].strip():
                return self.bad_line(loc, "empty completion")
        elif "text" in obj:
            fmt = "text"
            if obj["text"] is None:
                return self.bad_line(loc, "missing field 'text'")
            if not isinstance(obj["text"], str):
                return self.bad_line(loc, f"field 'text' must be a string, got {type(obj['text']).__name__}")
            if not obj["text"].strip():
                return self.bad_line(loc, "empty text")
        else:
            return self.bad_line(loc, "missing fields: need 'prompt' and 'completion', or 'text'")
        if self.fmt is None:
            self.fmt = fmt
        elif fmt != self.fmt:
            want = "prompt/completion" if self.fmt == "pc" else "text"
            return self.bad_line(loc, f"a {'text' if fmt == 'text' else 'prompt/completion'} record "
                                      f"in a {want} dataset")
        if fmt == "pc":
            self.prompts.append(obj["prompt"])
            self.completions.append(obj["completion"])
        else:
            self.texts.append(obj["text"])

    def records(self) -> dict[str, list[str]]:
        if self.fmt == "pc":
            return {"prompt": self.prompts, "completion": self.completions}
        return {"text": self.texts}


# Files are decoded with errors="surrogateescape": a byte that is not valid UTF-8 becomes a lone
# surrogate U+DC80..U+DCFF, which valid UTF-8 never decodes to, so each line can be checked on its
# own (and named) while line splitting stays that of a text-mode read. (errors="replace" trained on
# U+FFFD: a latin-1 file became mojibake and random bytes became examples, silently.)
_NOT_UTF8 = re.compile("[\udc80-\udcff]")


def _not_utf8(line: str) -> str | None:
    """The bad-line reason for a line holding bytes that are not UTF-8, else None."""
    m = _NOT_UTF8.search(line)
    if m is None:
        return None
    return (f"not valid UTF-8 (byte 0x{ord(m.group()) - 0xDC00:02x} at column {m.start() + 1}; "
            f"convert the file to UTF-8)")


def _read_jsonl(path: Path, r: _Reader) -> None:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue  # blank lines are not records
            bad = _not_utf8(line)
            if bad:
                r.bad_line(str(i), bad)
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                r.bad_line(str(i), f"invalid JSON ({e.msg} at column {e.colno})")
                continue
            r.add(str(i), obj)


def _read_paragraphs(path: Path, r: _Reader) -> None:
    """Plain text: one text example per non-empty paragraph (blank-line separated). A paragraph
    with a line that is not UTF-8 is a bad line (named by that line; skipped whole)."""
    para: list[str] = []
    bad: tuple[int, str] | None = None  # the paragraph's first non-UTF-8 line
    lines = path.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
    for i, line in enumerate(lines + [""], 1):
        if line.strip():
            para.append(line)
            if bad is None and (reason := _not_utf8(line)):
                bad = (i, reason)
        elif para:
            if bad:
                r.bad_line(str(bad[0]), bad[1])
            else:
                r.add(str(i - len(para)), {"text": "\n".join(para)})
            para, bad = [], None


def _read_saved(path: Path, r: _Reader) -> None:
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"{path}: not a dataset saved with datasets.save_to_disk: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(f"{path}: holds a DatasetDict with splits {list(ds)}; point at one split's "
                        f"directory")
    cols = set(ds.column_names)
    keys = ["prompt", "completion"] if {"prompt", "completion"} <= cols else ["text"] if "text" in cols else None
    if keys is None:
        raise DataError(f"{path}: columns {sorted(cols)}: need 'prompt' and 'completion', or 'text'")
    columns = [ds[k] for k in keys]
    for i, values in enumerate(zip(*columns), 1):
        r.add(f"row {i}", dict(zip(keys, values)))


def read_records(spec: str, on_bad_line: str = "error") -> tuple[dict[str, list[str]], dict]:
    """Validated records of ``spec`` in source order: ``{"prompt": [...], "completion": [...]}`` or
    ``{"text": [...]}``, plus ``{"skipped": k, "bad_lines": [...]}``."""
    path = BUILTIN.get(spec)
    if path is None:
        if spec.startswith("builtin:"):
            raise DataError(f"unknown built-in dataset {spec!r}; available: {', '.join(BUILTIN)}")
        path = Path(spec)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    r = _Reader(str(path), on_bad_line)
    if path.is_dir():
        _read_saved(path, r)
    elif path.suffix == ".txt":
        _read_paragraphs(path, r)
    else:
        _read_jsonl(path, r)
    if r.fmt is None:
        raise DataError(f"{path}: no usable examples" + (f" ({r.skipped} bad lines skipped)" if r.skipped else ""))
    return r.records(), {"skipped": r.skipped, "bad_lines": r.bad}


# ---------------------------------------------------------------------------------------------
# Tokenisation


def _pc_rows(prompt_ids: list[list[int]], completion_ids: list[list[int]], bos: list[int], eos: int,
             max_length: int) -> dict[str, list]:
    out: dict[str, list] = {"input_ids": [], "labels": [], "_truncated": []}
    for p, c in zip(prompt_ids, completion_ids):
        target = c + [eos]
        room = max_length - len(bos)
        cut = len(target) > room
        if cut:  # the completion alone does not fit: keep its beginning, drop its end (and eos)
            target = target[:room]
        keep = room - len(target)
        if len(p) > keep:  # truncate the prompt from the left: the tokens nearest the answer stay
            p, cut = (p[len(p) - keep:] if keep > 0 else []), True
        out["input_ids"].append(bos + p + target)
        out["labels"].append([IGNORE_INDEX] * (len(bos) + len(p)) + target)
        out["_truncated"].append(int(cut))
    return out


def _text_rows(text_ids: list[list[int]], bos: list[int], eos: int, max_length: int) -> dict[str, list]:
    out: dict[str, list] = {"input_ids": [], "labels": [], "_truncated": []}
    for t in text_ids:
        ids = bos + t + [eos]
        labels = [IGNORE_INDEX] * len(bos) + t + [eos]
        for s in range(0, len(ids), max_length):  # over-length: consecutive chunks, nothing lost
            out["input_ids"].append(ids[s:s + max_length])
            out["labels"].append(labels[s:s + max_length])
            out["_truncated"].append(int(len(ids) > max_length and s == 0))
    return out


class _Tokenize:
    """Batched map function (a class, so ``num_proc`` workers can pickle it)."""

    def __init__(self, tokenizer, max_length: int):
        self.tok, self.max_length = tokenizer, max_length
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.eos = tokenizer.eos_token_id

    def _ids(self, texts: list[str]) -> list[list[int]]:
        return self.tok(texts, add_special_tokens=False, return_attention_mask=False,
                        verbose=False)["input_ids"]

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        if "prompt" in batch:
            return _pc_rows(self._ids(batch["prompt"]), self._ids(batch["completion"]), self.bos,
                            self.eos, self.max_length)
        return _text_rows(self._ids(batch["text"]), self.bos, self.eos, self.max_length)


def _pack(input_ids: list[list[int]], labels: list[list[int]], max_length: int
          ) -> tuple[dict[str, list], dict]:
    flat_ids = [t for row in input_ids for t in row]
    flat_labels = [t for row in labels for t in row]
    starts, pos = set(), 0  # token offsets where an example begins
    for row in input_ids:
        starts.add(pos)
        pos += len(row)
    n_rows = len(flat_ids) // max_length
    rows: dict[str, list] = {"input_ids": [], "labels": []}
    crossing = 0
    for k in range(n_rows):
        a, b = k * max_length, (k + 1) * max_length
        rows["input_ids"].append(flat_ids[a:b])
        rows["labels"].append(flat_labels[a:b])
        crossing += any(s in starts for s in range(a + 1, b))
    return rows, {"packed_rows": n_rows, "dropped_tokens": len(flat_ids) - n_rows * max_length,
                  "rows_crossing_examples": crossing}


def load_examples(spec: str, tokenizer, cfg: DataConfig) -> tuple[datasets.Dataset, dict]:
    """Rows ``{"input_ids": [int], "labels": [int]}`` (equal lengths, at most ``cfg.max_length``) in
    the order of the source, and statistics.

    prompt/completion rows are ``[bos] + prompt + completion + [eos]``, labels -100 on bos and the
    prompt. Too long: the prompt loses tokens from its left; if completion + eos alone exceed
    ``max_length - 1`` the completion keeps its beginning (and loses eos). text rows are
    ``[bos] + text + [eos]``, labels -100 on bos only; too long: split into consecutive chunks of
    ``max_length`` (later chunks start mid-text, without bos; nothing is dropped). A tokenizer
    without a bos token gets no bos.

    ``cfg.pack``: all rows are concatenated (labels with them) and cut into rows of exactly
    ``max_length``; the last partial row is dropped. Attention in a packed row crosses example
    boundaries (no block-diagonal mask, as in most packing recipes); ``rows_crossing_examples``
    counts such rows.

    Bad records (bytes that are not UTF-8, unparseable JSON, not an object, missing or non-string fields, empty completion or
    text, a record of the other format) raise ``DataError("path:LINE: reason")`` with
    ``cfg.on_bad_line == "error"``; with ``"skip"`` they are counted in ``stats["skipped"]`` and the
    first few are listed in ``stats["bad_lines"]``. Blank lines are ignored.

    stats: examples (source records used), rows (len of the dataset), skipped, bad_lines, truncated
    (records cut or split), tokens and target_tokens (labels != -100) over the returned rows, and with
    packing packed_rows, dropped_tokens, rows_crossing_examples.
    """
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos token; rows need one to end each example")
    records, read_stats = read_records(spec, cfg.on_bad_line)
    n = len(next(iter(records.values())))
    ds = datasets.Dataset.from_dict(records)
    columns = ds.column_names
    ds = ds.map(_Tokenize(tokenizer, cfg.max_length), batched=True, remove_columns=columns,
                num_proc=cfg.num_proc if cfg.num_proc > 1 and n >= cfg.num_proc else None,
                desc=f"tokenizing {spec}" if n > 10_000 else None)
    truncated = sum(ds["_truncated"])
    ds = ds.remove_columns("_truncated")
    stats: dict[str, Any] = {"examples": n, "skipped": read_stats["skipped"],
                             "bad_lines": read_stats["bad_lines"], "truncated": truncated}
    if cfg.pack:
        rows, pack_stats = _pack(ds["input_ids"], ds["labels"], cfg.max_length)
        if not rows["input_ids"]:
            raise DataError(f"{spec}: {pack_stats['dropped_tokens']} tokens in all, fewer than one "
                            f"packed row of max_length={cfg.max_length}")
        ds = datasets.Dataset.from_dict(rows)
        stats.update(pack_stats)
    labels = ds["labels"]
    stats["rows"] = len(ds)
    stats["tokens"] = sum(len(x) for x in labels)
    stats["target_tokens"] = sum(t != IGNORE_INDEX for x in labels for t in x)
    return ds, stats


# ---------------------------------------------------------------------------------------------
# Batching


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids with ``pad_id``, labels with -100,
    attention_mask 0 on padding. All int64, shape (B, T)."""
    if not examples:
        raise ValueError("collate: empty batch")
    T = max(len(e["input_ids"]) for e in examples)
    B = len(examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        if len(e["labels"]) != n:
            raise ValueError(f"collate: example {i} has {n} input_ids but {len(e['labels'])} labels")
        input_ids[i, :n] = torch.as_tensor(e["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.as_tensor(e["labels"], dtype=torch.long)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
