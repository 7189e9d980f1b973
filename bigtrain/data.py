"""Data: tokenizer loading, examples -> (input_ids, labels) rows, the tokenise-once cache, and the
batch collator.

Three input formats, decided per file from its first good record (``data.format=auto``, said in the
run's log) or named by ``data.format``:

* prompt/completion: ``{"prompt": str, "completion": str}``. A row is
  ``[bos] + prompt + completion + [eos]`` and only completion + eos carry labels: the conditional
  objective log P(y | x) of the LoRA paper's fine-tuning experiments. Labels are aligned with
  ``input_ids`` (the loss shifts, see :mod:`bigtrain.losses`).
* text: ``{"text": str}`` (or plain-text paragraphs). A row is ``[bos] + text + [eos]`` with labels on
  everything but bos.
* messages (chat): ``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]}``.
  A row is the conversation rendered by the tokenizer's own ``chat_template`` (transformers'
  ``apply_chat_template``; ``data.chat_template`` overrides it), and only the assistant's turns carry
  labels. Where the template marks them (``{% generation %}`` blocks) the mask is transformers'
  ``return_assistant_tokens_mask`` exactly (the convention TRL's ``assistant_only_loss`` uses). Where
  it does not, each assistant turn is found by rendering the conversation prefix by prefix: the
  characters between ``render(messages[:i], add_generation_prompt=True)`` and
  ``render(messages[:i+1])`` (the turn's text and whatever the template closes it with, e.g. an
  end-of-turn token), mapped to tokens by their offsets as transformers does.

Sources: ``builtin:e2e`` / ``builtin:e2e-eval`` (the generated data-to-text set, see
:mod:`bigtrain.datagen`), ``builtin:e2e-chat`` / ``builtin:e2e-chat-eval`` (the same task as
conversations, some multi-turn), ``builtin:lora-ko`` (a Korean excerpt of the LoRA paper, one text
example per paragraph), a ``.jsonl`` file, a ``.txt`` file (paragraphs separated by blank lines), either
compressed (``.gz``, ``.bz2``, ``.xz``: read through the decompressor, a line at a time), a ``.parquet``
file (read in Arrow batches of its needed columns), or a directory written by
``datasets.Dataset.save_to_disk``. Order is kept: shuffling is the sampler's job.

Tokenise once: the rows of a source are written to an Arrow file under ``data.cache_dir``, keyed by
the source's content hash, the tokenizer and the data settings. The first process to arrive (under an
``fcntl`` lock on the key, which the kernel releases if that process dies) reads the source line by
line and writes the rows batch by batch; every other rank of the node (or of the job, on a shared
filesystem) waits on the lock, then memory-maps the same file. So no rank holds the source or its
rows in Python objects, and a source of many GB streams. A half-written cache never counts: it is
written under a temporary name and renamed when complete. The source's content hash itself is
remembered under ``digests/``, keyed by the file's path, size, inode and times, so a large source is
read whole once, not by every rank at every start.
"""

from __future__ import annotations

import bz2
import contextlib
import errno
import fcntl
import gzip
import hashlib
import json
import lzma
import multiprocessing
import os
import re
import shutil
import socket
import stat
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import datasets
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from transformers import AutoTokenizer

from .config import ASSETS, TOKENIZER_FILES, ConfigError, DataConfig
from .losses import IGNORE_INDEX

BUILTIN = {
    "builtin:e2e": ASSETS / "e2e_train.jsonl",
    "builtin:e2e-eval": ASSETS / "e2e_eval.jsonl",
    "builtin:e2e-chat": ASSETS / "e2e_chat_train.jsonl",
    "builtin:e2e-chat-eval": ASSETS / "e2e_chat_eval.jsonl",
    "builtin:lora-ko": ASSETS / "lora_intro_ko.txt",
}
BUILTIN_TOKENIZER = ASSETS / "tokenizer"
MAX_BAD_LINES_REPORTED = 5
ROLES = ("system", "user", "assistant", "tool")
FORMAT_NAMES = {"pc": "prompt_completion", "text": "text", "messages": "messages"}
FORMAT_KEYS = {v: k for k, v in FORMAT_NAMES.items()}
BATCH = 1000  # records tokenised (and rows written) at a time
CACHE_VERSION = 1  # bump when the rows made from the same input change
_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


class DataError(ValueError):
    """Bad data input; the message names the file and 1-based line (or row and field)."""


# ---------------------------------------------------------------------------------------------
# Tokenizer


def has_tokenizer(model_dir: str) -> bool:
    """A model folder that ships its tokenizer (what ``AutoTokenizer`` loads from)."""
    return any((Path(model_dir) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))


def tokenizer_source(tokenizer: str | None, model_path: str | None) -> str | None:
    """The tokenizer directory a run loads (None: the built-in one), from ``model.tokenizer`` and
    the model's folder (``model.path`` resolved, None for a random preset). ``model.tokenizer=builtin``
    asks for the built-in tokenizer by name; unset, a model folder's own tokenizer is used, and a
    folder without one is refused: training a real model with a tokenizer it was not trained with
    runs without an error and learns nothing useful (a GPT-2 folder with the built-in 1,024-token
    tokenizer trained at loss 10.87, silently). A random preset uses the built-in tokenizer."""
    if tokenizer == "builtin":
        return None
    if tokenizer is not None:
        return tokenizer
    if model_path is None:
        return None
    if has_tokenizer(model_path):
        return model_path
    raise ConfigError(f"model.path={model_path} holds no tokenizer (no tokenizer.json or tokenizer_config.json): "
                      f"set model.tokenizer=DIR to the model's own tokenizer, or model.tokenizer=builtin to "
                      f"train with bigtrain's built-in 1,024-token tokenizer")


def load_tokenizer(path: str | None = None):
    """A ``transformers`` tokenizer from a local directory; ``None``: the built-in byte-level BPE
    (vocabulary 1024, ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<unk>`` 3, and a small chat template).
    Never touches the Hub. A tokenizer without a pad token gets pad = eos."""
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


def tokenizer_fingerprint(tok) -> str:
    """A digest of everything of the tokenizer that decides the rows: its vocabulary and rules, the
    special tokens and the chat template. The same on every rank and in every process."""
    h = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # a slow tokenizer: its vocabulary
        h.update(json.dumps(sorted(tok.get_vocab().items())).encode())
    h.update(json.dumps([type(tok).__name__, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id,
                         tok.chat_template]).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Reading records (validated, in file order, one at a time)


class _Reader:
    """Validates records one by one under the ``on_bad_line`` policy and the file's format."""

    def __init__(self, where: str, on_bad_line: str, fmt: str = "auto"):
        self.where, self.policy = where, on_bad_line
        self.fmt: str | None = None if fmt == "auto" else FORMAT_KEYS[fmt]
        self.named = fmt != "auto"
        self.skipped = 0
        self.bad: list[str] = []
        self.reasons: dict[str, int] = {}  # skipped lines per reason, in order of first appearance

    def bad_line(self, loc: str, reason: str) -> None:
        msg = f"{self.where}:{loc}: {reason}"
        if self.policy == "error":
            raise DataError(msg)
        self.skipped += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        if len(self.bad) < MAX_BAD_LINES_REPORTED:
            self.bad.append(msg)

    def check(self, loc: str, obj: Any) -> dict | None:
        """The record to keep (with its location), or None after reporting a bad line."""
        if not isinstance(obj, dict):
            return self.bad_line(loc, f"expected a JSON object, got {type(obj).__name__}")
        if "messages" in obj:
            fmt, reason = "messages", _check_messages(obj["messages"])
        elif "prompt" in obj or "completion" in obj:
            fmt, reason = "pc", _check_fields(obj, ("prompt", "completion"))
            if reason is None and not obj["completion"].strip():
                reason = "empty completion"
        elif "text" in obj:
            fmt, reason = "text", _check_fields(obj, ("text",))
            if reason is None and not obj["text"].strip():
                reason = "empty text"
        else:
            return self.bad_line(loc, "missing fields: need 'prompt' and 'completion', 'text', or 'messages'")
        if reason is not None:
            return self.bad_line(loc, reason)
        if self.fmt is None:
            self.fmt = fmt
        elif fmt != self.fmt:
            names = {"pc": "prompt/completion", "text": "text", "messages": "messages"}
            how = f" (data.format={FORMAT_NAMES[self.fmt]})" if self.named else ""
            return self.bad_line(loc, f"a {names[fmt]} record in a {names[self.fmt]} dataset{how}")
        if fmt == "messages":
            return {"messages": obj["messages"], "_loc": loc}
        if fmt == "pc":
            return {"prompt": obj["prompt"], "completion": obj["completion"], "_loc": loc}
        return {"text": obj["text"], "_loc": loc}


def _check_fields(obj: dict, keys: tuple[str, ...]) -> str | None:
    for k in keys:
        if k not in obj or obj[k] is None:
            return f"missing field {k!r}"
        if not isinstance(obj[k], str):
            return f"field {k!r} must be a string, got {type(obj[k]).__name__}"
    return None


def _check_messages(messages: Any) -> str | None:
    """The bad-line reason for a ``messages`` value, else None. Roles are checked by name; each
    message needs non-empty string content (an assistant message may carry ``tool_calls`` instead)."""
    if not isinstance(messages, list):
        return f"field 'messages' must be a list of {{role, content}} objects, got {type(messages).__name__}"
    if not messages:
        return "field 'messages' is empty"
    for j, m in enumerate(messages, 1):
        if not isinstance(m, dict):
            return f"message {j}: expected an object with 'role' and 'content', got {type(m).__name__}"
        role = m.get("role")
        if role not in ROLES:
            return f"message {j}: unknown role {role!r} (roles: {', '.join(ROLES)})"
        content = m.get("content")
        if content is None and role == "assistant" and m.get("tool_calls"):
            continue
        if not isinstance(content, str):
            return (f"message {j} ({role}): 'content' must be a string, got {type(content).__name__}"
                    if content is not None else f"message {j} ({role}): missing 'content'")
        if not content.strip():
            return f"message {j} ({role}): empty content"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant message: nothing to learn from (the loss is on the assistant's turns)"
    return None


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


# compressed files, read through Python's own decompressors (a line at a time, never whole)
COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


def _inner_suffix(path: Path) -> str:
    """The suffix that says the format: ``.jsonl`` for ``train.jsonl.gz``, ``.txt`` for ``a.txt``."""
    suffixes = [x.lower() for x in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def _open_text(path: Path):
    """``path`` as text, decompressed when its name ends in .gz, .bz2 or .xz."""
    opener = COMPRESSED.get(path.suffix.lower(), open)
    return opener(path, "rt", encoding="utf-8", errors="surrogateescape")


def _read_jsonl(path: Path, r: _Reader) -> Iterator[dict]:
    with _open_text(path) as f:
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
            rec = r.check(str(i), obj)
            if rec is not None:
                yield rec


def _json_object(line: str) -> bool:
    if not line.lstrip().startswith("{"):
        return False
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _read_paragraphs(path: Path, r: _Reader) -> Iterator[dict]:
    """Plain text: one text example per non-empty paragraph (blank-line separated). A paragraph
    with a line that is not UTF-8 is a bad line (named by that line; skipped whole)."""
    para: list[str] = []
    bad: tuple[int, str] | None = None  # the paragraph's first non-UTF-8 line
    with _open_text(path) as f:
        i = 0
        for i, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if line.strip():
                para.append(line)
                if bad is None and (reason := _not_utf8(line)):
                    bad = (i, reason)
                continue
            if para:
                rec = _paragraph(r, para, bad, i)
                if rec is not None:
                    yield rec
                para, bad = [], None
        if para:
            rec = _paragraph(r, para, bad, i + 1)
            if rec is not None:
                yield rec


def _paragraph(r: _Reader, para: list[str], bad: tuple[int, str] | None, end: int) -> dict | None:
    if bad:
        return r.bad_line(str(bad[0]), bad[1])
    return r.check(str(end - len(para)), {"text": "\n".join(para)})


def _open_saved(path: Path) -> datasets.Dataset:
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"{path}: not a dataset saved with datasets.save_to_disk: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(f"{path}: holds a DatasetDict with splits {list(ds)}; point at one split's "
                        f"directory")
    return ds


def _columns(path: Path, cols: set[str]) -> list[str]:
    keys = (["messages"] if "messages" in cols else ["prompt", "completion"] if {"prompt", "completion"} <= cols
            else ["text"] if "text" in cols else None)
    if keys is None:
        raise DataError(f"{path}: columns {sorted(cols)}: need 'prompt' and 'completion', 'text', or 'messages'")
    return keys


def _rows(batches: Iterable[dict], keys: list[str], r: _Reader) -> Iterator[dict]:
    i = 0
    for batch in batches:  # Arrow batches: never all rows at once
        for values in zip(*(batch[k] for k in keys)):
            i += 1
            rec = r.check(f"row {i}", dict(zip(keys, values)))
            if rec is not None:
                yield rec


def _read_saved(path: Path, r: _Reader) -> Iterator[dict]:
    ds = _open_saved(path)
    keys = _columns(path, set(ds.column_names))
    yield from _rows(ds.select_columns(keys).iter(batch_size=BATCH), keys, r)


def _read_parquet(path: Path, r: _Reader) -> Iterator[dict]:
    try:
        f = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file: {e}") from None
    keys = _columns(path, set(f.schema_arrow.names))
    yield from _rows((b.to_pydict() for b in f.iter_batches(batch_size=BATCH, columns=keys)), keys, r)


READ_FORMATS = ("bigtrain reads JSON Lines (.jsonl, .json: one object per line), plain text (.txt), either "
                "of them compressed (.gz, .bz2, .xz), Parquet (.parquet) and directories saved with "
                "datasets' save_to_disk")
# data files that are not read, and what to do with them
UNREAD_SUFFIXES = {
    ".zst": "decompress it first (or recompress it with gzip, bzip2 or xz)", ".zip": "unpack it first",
    ".arrow": "load it with datasets and save_to_disk(DIR), then data.train=DIR",
    ".csv": "datasets.load_dataset('csv', data_files=...).save_to_disk(DIR), then data.train=DIR",
}


def source_path(spec: str) -> Path:
    """The file or directory behind ``spec`` (``builtin:NAME`` or a path); a one-line error if none."""
    path = BUILTIN.get(spec)
    if path is None:
        if spec.startswith("builtin:"):
            raise DataError(f"unknown built-in dataset {spec!r}; available: {', '.join(BUILTIN)}")
        path = Path(spec)
    try:
        st = path.stat()  # follows links; a link loop raises ELOOP here, named as such
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise DataError(f"{path}: no such file or directory") from None
        raise DataError(f"{path}: cannot be read: {e.strerror}") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        # a FIFO or a device: hashing it for the cache would wait forever for an end that never comes
        raise DataError(f"{path}: not a regular file or a directory (a FIFO or a device); give a data file "
                        f"or a saved datasets directory")
    if stat.S_ISREG(st.st_mode):
        _check_format(path)
    return path


def _check_format(path: Path) -> None:
    """A file bigtrain would misread, refused in one line by its name and first line (cheap: checked
    at every load, the cached ones too): a format that is not read (.zst, .zip, .arrow, .csv: they
    used to be read as text and fail as "not UTF-8"), a compressed file that does not decompress, a
    JSON array (every line a bad line), JSON Lines named .txt (trained as one raw text example,
    braces and keys included)."""
    if path.suffix.lower() in UNREAD_SUFFIXES:
        raise DataError(f"{path}: {path.suffix} files are not read; {READ_FORMATS}: "
                        f"{UNREAD_SUFFIXES[path.suffix.lower()]}")
    suffix = _inner_suffix(path)
    if suffix == ".parquet":
        return  # columnar: its columns are checked when it is opened
    try:
        with _open_text(path) as f:
            first = f.readline(1 << 16).strip()
    except (OSError, EOFError, lzma.LZMAError) as e:  # a .gz that is not gzip, a truncated .xz
        raise DataError(f"{path}: cannot be decompressed ({e}); is it really {path.suffix}?") from None
    if suffix == ".txt" and _json_object(first):
        raise DataError(f"{path}:1: a JSON object: this looks like JSON Lines, but a .txt file is read as plain text "
                        f"(each paragraph one example, braces and keys included); rename it .jsonl")
    if suffix != ".txt" and (first == "[" or first.startswith("[{")):
        raise DataError(f"{path}:1: a JSON array; bigtrain reads JSON Lines, one JSON object per line "
                        f"(convert it: jq -c '.[]' {path.name} > {path.stem}.jsonl)")


def iter_records(spec: str, on_bad_line: str = "error", fmt: str = "auto") -> tuple[Iterator[dict], _Reader]:
    """Validated records of ``spec`` in source order, one at a time (each with its ``_loc``), and the
    reader that counts bad lines and knows the format once the first good record is read."""
    path = source_path(spec)
    r = _Reader(str(path), on_bad_line, fmt)
    if path.is_dir():
        return _read_saved(path, r), r
    suffix = _inner_suffix(path)
    if suffix == ".parquet":
        return _read_parquet(path, r), r
    if suffix == ".txt":
        return _read_paragraphs(path, r), r
    return _read_jsonl(path, r), r


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


def has_generation_markers(template: str | None) -> bool:
    return bool(template) and _GENERATION_BLOCK.search(template) is not None


def chat_tokens(tok, messages: list[dict], chat_template: str | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, assistant mask) of one conversation rendered with the chat template (the
    tokenizer's own unless given): transformers' ``return_assistant_tokens_mask`` where the template
    has generation markers, else the prefix-by-prefix spans described in the module docstring."""
    template = chat_template or tok.chat_template
    if has_generation_markers(template):
        out = tok.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
        return list(out["input_ids"]), list(out["assistant_masks"])
    render = lambda msgs, gen=False: tok.apply_chat_template(  # noqa: E731
        msgs, chat_template=template, tokenize=False, add_generation_prompt=gen)
    text = render(messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start, end = render(messages[:i], True) if i else "", render(messages[:i + 1])
        if not (end.startswith(start) and text.startswith(end)):
            raise ValueError("the chat template does not render a conversation's prefix as a prefix of "
                             "the whole; give it {% generation %} markers around the assistant's turns")
        spans.append((len(start), len(end)))
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [0] * len(enc["input_ids"])
    k = 0
    for t, (a, b) in enumerate(enc["offset_mapping"]):  # tokens overlapping a span, as transformers
        while k < len(spans) and a >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if b > spans[k][0]:
            mask[t] = 1
    return list(enc["input_ids"]), mask


class _Tokenize:
    """Records -> rows (a class, so ``num_proc`` workers can pickle it)."""

    def __init__(self, tokenizer, max_length: int, where: str, chat_template: str | None = None):
        self.tok, self.max_length, self.where = tokenizer, max_length, where
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.eos = tokenizer.eos_token_id
        self.chat_template = chat_template

    def _ids(self, texts: list[str]) -> list[list[int]]:
        return self.tok(texts, add_special_tokens=False, return_attention_mask=False,
                        verbose=False)["input_ids"]

    def __call__(self, records: list[dict]) -> dict[str, Any]:
        first = records[0]
        if "messages" in first:
            out = self._chat(records)
        elif "prompt" in first:
            out = _pc_rows(self._ids([r["prompt"] for r in records]),
                           self._ids([r["completion"] for r in records]), self.bos, self.eos, self.max_length)
        else:
            out = _text_rows(self._ids([r["text"] for r in records]), self.bos, self.eos, self.max_length)
        out["_examples"] = len(records)
        return out

    def _chat(self, records: list[dict]) -> dict[str, Any]:
        if not (self.chat_template or self.tok.chat_template):
            raise DataError(f"{self.where}: messages data needs a chat template and the tokenizer has "
                            "none; give one with data.chat_template=FILE.jinja")
        out: dict[str, Any] = {"input_ids": [], "labels": [], "_truncated": [], "_no_target": 0}
        template = self.chat_template or self.tok.chat_template
        for r in records:
            calls = next((j for j, m in enumerate(r["messages"], 1) if m.get("tool_calls")), None)
            if calls is not None and "tool_calls" not in template:
                # the template would render the turn as nothing: trained as an empty answer
                raise DataError(f"{self.where}:{r['_loc']}: message {calls} (assistant) has tool_calls, which this "
                                f"chat template does not render (the turn would be trained as an empty answer); "
                                f"give a template that renders tool calls with data.chat_template=FILE.jinja")
            try:
                ids, mask = chat_tokens(self.tok, r["messages"], self.chat_template)
            except Exception as e:  # jinja's TemplateError (e.g. roles must alternate) and the like
                raise DataError(f"{self.where}:{r['_loc']}: the chat template cannot render it: "
                                f"{type(e).__name__}: {e}") from None
            cut = len(ids) > self.max_length  # keep the start: the first turns, as TRL's keep_start
            ids, mask = ids[:self.max_length], mask[:self.max_length]
            out["input_ids"].append(ids)
            out["labels"].append([t if m else IGNORE_INDEX for t, m in zip(ids, mask)])
            out["_truncated"].append(int(cut))
            out["_no_target"] += not any(mask)  # cut before its first assistant token: no loss
        return out


# ---------------------------------------------------------------------------------------------
# Writing rows (Arrow, batch by batch) and packing


SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))])


class _RowWriter:
    """Rows appended batch by batch to an Arrow stream file (the format ``datasets`` memory-maps)."""

    def __init__(self, path: Path):
        self.sink = pa.OSFile(str(path), "wb")
        self.writer = pa.ipc.new_stream(self.sink, SCHEMA)
        self.rows = self.tokens = self.target_tokens = 0

    def write(self, input_ids: list[list[int]], labels: list[list[int]]) -> None:
        if not input_ids:
            return
        lab = pa.array(labels, pa.list_(pa.int32()))
        self.writer.write_batch(pa.record_batch([pa.array(input_ids, pa.list_(pa.int32())), lab], schema=SCHEMA))
        flat = lab.flatten()
        self.rows += len(input_ids)
        self.tokens += len(flat)
        self.target_tokens += pc.sum(pc.not_equal(flat, IGNORE_INDEX)).as_py() or 0

    def close(self) -> None:
        self.writer.close()
        self.sink.close()


class _Packer:
    """Concatenates rows (labels with them) and cuts rows of exactly ``max_length``; what is left at
    the end (less than one row) is dropped. Streams: holds less than one row between batches."""

    def __init__(self, max_length: int):
        self.n = max_length
        self.ids: list[int] = []
        self.labels: list[int] = []
        self.starts: list[int] = []  # offsets in the buffer where an example begins
        self.rows = self.crossing = 0

    def add(self, input_ids: list[list[int]], labels: list[list[int]]) -> tuple[list, list]:
        for a, b in zip(input_ids, labels):
            self.starts.append(len(self.ids))
            self.ids.extend(a)
            self.labels.extend(b)
        out_ids, out_labels = [], []
        n_rows = len(self.ids) // self.n
        for k in range(n_rows):
            a, b = k * self.n, (k + 1) * self.n
            out_ids.append(self.ids[a:b])
            out_labels.append(self.labels[a:b])
            self.crossing += any(a < s < b for s in self.starts)
        cut = n_rows * self.n
        if cut:
            self.ids, self.labels = self.ids[cut:], self.labels[cut:]
            self.starts = [s - cut for s in self.starts if s >= cut]
        self.rows += n_rows
        return out_ids, out_labels

    def stats(self) -> dict:
        return {"packed_rows": self.rows, "dropped_tokens": len(self.ids),
                "rows_crossing_examples": self.crossing}


def _batches(it: Iterable[dict], n: int) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for rec in it:
        batch.append(rec)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _tokenise_to(path: Path, spec: str, tokenizer, cfg: DataConfig, chat_template: str | None) -> dict:
    """Read ``spec``, tokenise it and write its rows to the Arrow file ``path``; returns the stats."""
    records, r = iter_records(spec, cfg.on_bad_line, cfg.format)
    fn = _Tokenize(tokenizer, cfg.max_length, r.where, chat_template)
    writer = _RowWriter(path)
    packer = _Packer(cfg.max_length) if cfg.pack else None
    n = truncated = no_target = 0
    t0 = time.perf_counter()
    pool = multiprocessing.get_context("spawn").Pool(cfg.num_proc) if cfg.num_proc > 1 else None
    try:
        batches = _batches(records, BATCH)
        results = pool.imap(fn, batches) if pool else map(fn, batches)  # imap keeps the order
        for rows in results:
            truncated += sum(rows["_truncated"])
            n += rows["_examples"]
            no_target += rows.get("_no_target", 0)
            ids, labels = rows["input_ids"], rows["labels"]
            if packer is not None:
                ids, labels = packer.add(ids, labels)
            writer.write(ids, labels)
    finally:
        if pool is not None:
            pool.terminate()
        writer.close()
    if r.fmt is None:
        raise DataError(f"{r.where}: no usable examples" + (f" ({r.skipped} bad lines skipped)" if r.skipped else ""))
    stats: dict[str, Any] = {"format": FORMAT_NAMES[r.fmt], "examples": n, "skipped": r.skipped,
                             "bad_lines": r.bad, "skip_reasons": dict(list(r.reasons.items())[:MAX_BAD_LINES_REPORTED]),
                             "truncated": truncated, "seconds": time.perf_counter() - t0}
    if r.fmt == "messages":
        stats["rows_without_target"] = no_target
    if packer is not None:
        stats.update(packer.stats())
        if packer.rows == 0:
            raise DataError(f"{spec}: {packer.stats()['dropped_tokens']} tokens in all, fewer than one "
                            f"packed row of max_length={cfg.max_length}")
    stats.update(rows=writer.rows, tokens=writer.tokens, target_tokens=writer.target_tokens)
    return stats


# ---------------------------------------------------------------------------------------------
# The cache: tokenise once, memory-map everywhere


def cache_root(cfg: DataConfig) -> Path:
    d = cfg.cache_dir or os.environ.get("BIGTRAIN_DATA_CACHE") or Path.home() / ".cache" / "bigtrain" / "data"
    return Path(d).expanduser()


def _file_digest(path: Path, h) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)


def _stat_key(path: Path) -> str:
    """What identifies a file's (or a directory's files') content without reading it: path, size,
    inode, device, and the modification and change times in ns (a write changes the change time,
    which no tool can set back), as git's index and ccache use."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stats = []
    for f in files:
        st = f.stat()
        stats.append([str(f.resolve()), st.st_size, st.st_ino, st.st_dev, st.st_mtime_ns, st.st_ctime_ns])
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:32]


def source_fingerprint(path: Path, memo: Path | None = None) -> str:
    """The content hash of a data file (or of a saved dataset's files). With ``memo`` (a directory),
    a hash computed before for the same :func:`_stat_key` is read from there instead of reading the
    data again: every rank of every run computes the key, and the first whole read of a large file
    takes minutes (measured: 1 GB/s per rank)."""
    if memo is not None:
        known = memo / f"{_stat_key(path)}.sha256"
        with contextlib.suppress(OSError):
            h = known.read_text().strip()
            if len(h) == 64:
                return h
    h = hashlib.sha256()
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(str(f.relative_to(path)).encode() + b"\0")
            _file_digest(f, h)
    else:
        _file_digest(path, h)
    digest = h.hexdigest()
    if memo is not None:
        with contextlib.suppress(OSError):  # a memo that cannot be written only costs a re-read
            memo.mkdir(parents=True, exist_ok=True)
            tmp = memo / f".{known.name}.{socket.gethostname()}.{os.getpid()}"
            tmp.write_text(digest)
            os.replace(tmp, known)
    return digest


def _row_parts(path: Path, tokenizer, cfg: DataConfig, chat_template: str | None) -> list:
    """Everything that decides the rows made from ``path``: its content, the tokenizer, the template
    and the data settings (not where the file lies)."""
    return [source_fingerprint(path, cache_root(cfg) / "digests"), tokenizer_fingerprint(tokenizer), chat_template,
            cfg.max_length, cfg.pack, cfg.on_bad_line, cfg.format]


def _digest(parts: list) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


def data_keys(spec: str, tokenizer, cfg: DataConfig, chat_template: str | None) -> tuple[str, str]:
    """(the cache key, the rows key) of ``spec``, from one reading of what decides its rows. The
    cache key adds the path (the stats' bad-line reports name it); the rows key, what a resume
    compares (``TrainState.train_rows``), is the same rows wherever the file lies."""
    path = source_path(spec)
    parts = _row_parts(path, tokenizer, cfg, chat_template)
    return _digest([CACHE_VERSION, str(path.resolve()), *parts]), _digest(parts)


def cache_key(spec: str, tokenizer, cfg: DataConfig, chat_template: str | None) -> str:
    return data_keys(spec, tokenizer, cfg, chat_template)[0]


@contextlib.contextmanager
def _locked(path: Path, say: Callable[[str], None]):
    """An exclusive ``flock`` on ``path`` (released by the kernel if this process dies, so it can
    never be left stale). Says once that it waits, naming the lock, if another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            say(f"[bigtrain] waiting for another process tokenising the same data (lock {path})")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _open_rows(d: Path) -> tuple[datasets.Dataset, dict]:
    stats = json.loads((d / "stats.json").read_text())
    return datasets.Dataset.from_file(str(d / "rows.arrow"), in_memory=False), stats


def load_examples(spec: str, tokenizer, cfg: DataConfig, say: Callable[[str], None] = lambda s: None
                  ) -> tuple[datasets.Dataset, dict]:
    """Rows ``{"input_ids": [int], "labels": [int]}`` (equal lengths, at most ``cfg.max_length``) in
    the order of the source, and statistics.

    prompt/completion rows are ``[bos] + prompt + completion + [eos]``, labels -100 on bos and the
    prompt. Too long: the prompt loses tokens from its left; if completion + eos alone exceed
    ``max_length - 1`` the completion keeps its beginning (and loses eos). text rows are
    ``[bos] + text + [eos]``, labels -100 on bos only; too long: split into consecutive chunks of
    ``max_length`` (later chunks start mid-text, without bos; nothing is dropped). A tokenizer
    without a bos token gets no bos. messages rows are the rendered conversation, labels on the
    assistant's turns only; too long: its first ``max_length`` tokens are kept.

    ``cfg.pack``: all rows are concatenated (labels with them) and cut into rows of exactly
    ``max_length``; the last partial row is dropped. Attention in a packed row crosses example
    boundaries (no block-diagonal mask, as in most packing recipes); ``rows_crossing_examples``
    counts such rows.

    Bad records (bytes that are not UTF-8, unparseable JSON, not an object, missing or non-string
    fields, empty completion or text, a malformed conversation, a record of another format) raise
    ``DataError("path:LINE: reason")`` with ``cfg.on_bad_line == "error"``; with ``"skip"`` they are
    counted in ``stats["skipped"]`` and the first few are listed in ``stats["bad_lines"]``. Blank
    lines are ignored.

    The rows are memory-mapped from the cache (see the module docstring); ``stats["cache"]`` is
    ``"built"`` in the process that tokenised, ``"hit"`` in the others.

    stats: format, examples (source records used), rows (len of the dataset), skipped, bad_lines,
    truncated (records cut or split), tokens and target_tokens (labels != -100) over the returned
    rows, and with packing packed_rows, dropped_tokens, rows_crossing_examples; cache and cache_dir.
    """
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos token; rows need one to end each example")
    chat_template = Path(cfg.chat_template).read_text(encoding="utf-8") if cfg.chat_template else None
    key, rows = data_keys(spec, tokenizer, cfg, chat_template)
    root = cache_root(cfg)
    final = root / key
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = root / f"{key}.lock"
        lock.touch(exist_ok=True)
    except OSError as e:
        raise DataError(f"data.cache_dir: cannot write the tokenised-data cache at {root} "
                        f"({e.strerror}); set data.cache_dir to a writable directory") from None
    how = "hit"
    if not (final / "stats.json").is_file():
        with _locked(lock, say):
            if not (final / "stats.json").is_file():
                host = socket.gethostname()
                for old in root.glob(f".{key}.{host}.*"):  # left by a build on this host that was killed
                    if not _alive(old.name.rsplit(".", 1)[-1]):
                        shutil.rmtree(old, ignore_errors=True)
                tmp = root / f".{key}.{host}.{os.getpid()}"
                tmp.mkdir()
                try:
                    stats = _tokenise_to(tmp / "rows.arrow", spec, tokenizer, cfg, chat_template)
                    (tmp / "stats.json").write_text(json.dumps(stats))
                    try:
                        os.replace(tmp, final)
                    except OSError:  # another node finished first (a filesystem that ignores flock)
                        if not (final / "stats.json").is_file():
                            raise
                        shutil.rmtree(tmp, ignore_errors=True)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
                how = "built"
    ds, stats = _open_rows(final)
    stats.update(cache=how, cache_dir=str(final), rows_key=rows)
    return ds, stats


# ---------------------------------------------------------------------------------------------
# Batching


def escape_controls(text: str, keep: str = "\n\t") -> str:
    """``text`` for a terminal or a batch log: control and other non-printable characters (a NUL
    makes grep call the whole log binary; an escape sequence repaints the terminal) written as
    Python escapes (\\x00, \\x1b, \\u200b), except those in ``keep``."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in keep else repr(c)[1:-1] for c in text)


def skipped_summary(stats: dict) -> str | None:
    """data.on_bad_line=skip: one line of why lines were skipped (a count per reason, the first
    few reasons) and where the first was; None if none was."""
    n = stats.get("skipped", 0)
    if not n:
        return None
    reasons = stats.get("skip_reasons") or {}
    why = "; ".join(f"{c} x {r}" for r, c in reasons.items())
    more = n - sum(reasons.values())
    first = (stats.get("bad_lines") or [None])[0]
    return (f"{n} line(s) skipped (data.on_bad_line=skip): {why or 'reasons not recorded'}"
            + (f"; {more} more of other reasons" if more > 0 else "")
            + (f"; the first: {first}" if first else ""))


def collate(examples: list[dict], pad_id: int, multiple: int = 1, cap: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example, rounded up to ``multiple`` but not past ``cap`` (a compiled
    run's few sequence lengths: compile.pad_multiple): input_ids with ``pad_id``, labels with -100,
    attention_mask 0 on padding. All int64, shape (B, T)."""
    if not examples:
        raise ValueError("collate: empty batch")
    T = max(len(e["input_ids"]) for e in examples)
    if multiple > 1:
        T = max(T, min(-(-T // multiple) * multiple, cap if cap is not None else T))
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
