"""``bigtrain generate`` and ``bigtrain eval``: what an adapter learned, over the base it was trained on.

Both commands open a *session*: the run's own config (the checkpoint's ``config.yaml``), its
recorded base (``adapter_config.json``'s ``base_model``, or ``--base DIR``) built by the training
engine exactly as training builds it (:meth:`bigtrain.engine.core.Engine.build_base`: whole at world
size 1, partitioned by ZeRO-3 under ``torchrun``, the vocabulary padded the same way), and an
:class:`~bigtrain.switch.AdapterBank` holding every adapter given, over that one base. The adapters
are applied unmerged, through the LoRA forward hooks training used, so what is generated or scored
is what was trained.

Generation is Hugging Face ``generate`` over that model. It is a well-kept implementation of what a
generate command needs (a KV cache, greedy and nucleus sampling with temperature, stop strings,
left-padded batches) and it already knows ZeRO-3's one constraint: with ``synced_gpus=True`` every
rank keeps running forwards until all ranks are done, so the collective gathers of the partitioned
base stay matched. The LoRA hooks sit on the base's own modules, so ``generate`` needs nothing of
bigtrain's. Every rank generates the same prompts with the same seed: the greedy tokens at N ranks
are those of one process (``tests/e2e/test_generate_eval.py``). Only the real vocabulary can be
generated when the run pads it (:mod:`bigtrain.vocab`).

``bigtrain eval`` scores a data file with training's own :func:`bigtrain.evaluate.evaluate` and
:func:`bigtrain.data.load_examples` under the run's data settings and ``train.eval_examples``, so
its figure for the run's eval set is the one the run logged.

Nothing here touches DeepSpeed: the engine owns that.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from . import checkpoint as ck
from .compile import eager_layers
from .config import Config, ConfigError, load_config
from .data import ROLES, escape_controls, load_tokenizer, tokenizer_source
from .engine.core import Engine
from .evaluate import evaluate
from .export import base_dir
from .losses import IGNORE_INDEX
from .presets import position_limit
from .run import autocast_for, model_config, set_seed
from .switch import AdapterBank, check_compatible
from .vocab import run_config as pad_vocab

BASE = "base"  # the adapter name that means the bare base model


# -- settings ---------------------------------------------------------------------------------------
@dataclass
class Sampling:
    """How to decode. ``temperature`` 0: greedy (argmax; no random numbers drawn)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ConfigError(f"--temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ConfigError("--stop: an empty stop string would end every generation at once")


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A prompt as training saw it (:mod:`bigtrain.data`): ``[bos] + prompt``, no eos."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """A conversation as chat training saw it: rendered with the tokenizer's chat template, then the
    template's header for the assistant's next turn (``add_generation_prompt``)."""
    if not tokenizer.chat_template:
        raise ConfigError("chat prompts (--chat, or \"messages\" in --prompts) need a chat template, and the "
                          "run's tokenizer has none")
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"])


def row_ids(tokenizer, row: dict) -> list[int]:
    """The prompt ids of a prompts row: its "messages" through the chat template, else its "prompt"."""
    return chat_prompt_ids(tokenizer, row["messages"]) if "messages" in row else prompt_ids(tokenizer, row["prompt"])


def check_positions(hf_config, prompts: list[list[int]], max_new_tokens: int, where: list[str]) -> None:
    """Every prompt plus ``max_new_tokens`` fits the model's positions, or an error naming the first
    that does not (``where``: how to name each prompt)."""
    limit = position_limit(hf_config)
    for p, w in zip(prompts, where):
        if limit and len(p) + max_new_tokens > limit:
            raise ConfigError(f"{w}: {len(p)} prompt tokens plus --max-new-tokens {max_new_tokens} exceed the "
                              f"model's {limit} positions; shorten the prompt or lower --max-new-tokens")


# -- generation -------------------------------------------------------------------------------------
def _real_vocab_processor(vocab: int):
    class RealVocab(LogitsProcessor):
        """Rows from ``vocab`` on are the run's padding (zero weights, :mod:`bigtrain.vocab`): never
        generated, as the loss never scores them."""

        def __call__(self, input_ids, scores):
            scores[:, vocab:] = -float("inf")
            return scores

    return RealVocab()


def generate_ids(model, tokenizer, prompts: list[list[int]], s: Sampling, *, vocab: int | None = None,
                 batch_size: int = 8, synced: bool = False, autocast=None, after=None) -> list[list[int]]:
    """New token ids for each prompt (ids from :func:`prompt_ids`), up to and without eos.

    Batches of ``batch_size`` prompts, left-padded. ``synced``: the base is partitioned over several
    ranks (every rank must call this with the same prompts). ``after``: called after each batch
    (the engine's release of the gathered base). Draws random numbers only when sampling."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    dev = next(iter(model.parameters())).device
    sample = s.temperature > 0
    gc = GenerationConfig(max_new_tokens=s.max_new_tokens, do_sample=sample, num_beams=1, use_cache=True,
                          pad_token_id=pad, eos_token_id=eos, bos_token_id=tokenizer.bos_token_id,
                          stop_strings=list(s.stop) or None,
                          **({"temperature": s.temperature, "top_p": s.top_p, "top_k": 0} if sample else {}))
    processors = LogitsProcessorList()
    model_vocab = model.get_output_embeddings().out_features if hasattr(model.get_output_embeddings(),
                                                                        "out_features") else None
    if vocab is not None and model_vocab is not None and model_vocab > vocab:
        processors.append(_real_vocab_processor(vocab))
    limit = position_limit(model.config)
    out: list[list[int]] = []
    was_training = model.training
    model.eval()  # no dropout; transformers' gradient checkpointing (training mode) would turn the cache off
    try:
        for b0 in range(0, len(prompts), batch_size):
            batch = prompts[b0:b0 + batch_size]
            T = max(len(p) for p in batch)
            if limit and T + s.max_new_tokens > limit:
                raise ValueError(f"a prompt of {T} tokens plus --max-new-tokens {s.max_new_tokens} exceeds the "
                                 f"model's {limit} positions; shorten the prompt or lower --max-new-tokens")
            ids = torch.full((len(batch), T), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), T), dtype=torch.long)
            for i, p in enumerate(batch):  # left padding: every prompt ends where generation starts
                ids[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
                mask[i, T - len(p):] = 1
            with torch.no_grad(), (autocast() if autocast else contextlib.nullcontext()):
                gen = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), generation_config=gc,
                                     logits_processor=processors, synced_gpus=synced,
                                     tokenizer=tokenizer if s.stop else None)
            if after is not None:
                after()
            for row in gen[:, T:].tolist():
                new = []
                for t in row:
                    if t == eos:
                        break
                    new.append(t)
                out.append(new)
    finally:
        model.train(was_training)
    return out


def cut_at_stop(text: str, stop: list[str]) -> str:
    """The text before the first stop string (generation ends on one; it is not part of the answer)."""
    cut = min((i for i in (text.find(x) for x in stop) if i >= 0), default=-1)
    return text if cut < 0 else text[:cut]


# -- a run's held-out samples, before and after training --------------------------------------
def one_line(text: str) -> str:
    """A sample on one log line: newlines and every other non-printable character escaped."""
    return escape_controls(text.strip(), keep="")


def show_samples(run) -> None:
    """train.sample_prompts held-out prompts, generated greedily with the adapters off (the base)
    and on (what training made), printed with the reference: what LoRA changed. Every rank
    generates (the base's gathers are collective); rank 0 prints. Greedy draws no random
    numbers, and this comes after the last eval and save. ``run``: a :class:`bigtrain.run.Run`."""
    cfg, say, tok = run.cfg, run.say, run.inputs.tokenizer
    samples = run.inputs.samples
    if not samples:
        return
    s = Sampling(max_new_tokens=cfg.train.sample_max_new_tokens)
    ids = [row_ids(tok, row) for row, _ in samples]  # as training rendered them
    limit = position_limit(run.inputs.hf_config)
    if limit:  # a prompt too long for the positions loses its left end, as training's prompts do
        room = limit - s.max_new_tokens
        if room < 2:
            say(f"[bigtrain] samples skipped: train.sample_max_new_tokens={s.max_new_tokens} leaves no room "
                f"for a prompt in the model's {limit} positions")
            return
        nb = int(tok.bos_token_id is not None)  # bos stays, as in training's rows
        ids = [p[:nb] + p[len(p) - room + nb:] if len(p) > room else p for p in ids]
    outs, t0 = {}, time.perf_counter()
    was_training = run.lora.training
    run.lora.eval()  # no adapter dropout
    try:
        for label, enabled in (("base", False), ("after", True)):
            run.lora.enabled = enabled
            with eager_layers(run.model):  # compiled layers would compile again for every length
                outs[label] = generate_ids(run.model, tok, ids, s, vocab=run.inputs.vocab,
                                           synced=run.engine.distributed, autocast=run.autocast,
                                           after=run.engine.after_backward)
    finally:
        run.lora.enabled = True
        run.lora.train(was_training)
    dt = time.perf_counter() - t0
    n = sum(len(o) for out in outs.values() for o in out)
    say(f"[bigtrain] {len(ids)} held-out prompt(s) of {cfg.data.eval}, greedy, at most "
        f"{s.max_new_tokens} new tokens ({n} generated in {dt:.2f} s); before training (the base) and after:")
    dec = tok.decode
    for k, (row, ref) in enumerate(samples):
        prompt = row["prompt"] if "prompt" in row else dec(ids[k], skip_special_tokens=False)
        say(f"  [{k + 1}] prompt:    {one_line(prompt)}")
        say(f"      reference: {one_line(ref)}")
        say(f"      before:    {one_line(dec(outs['base'][k], skip_special_tokens=True))}")
        say(f"      after:     {one_line(dec(outs['after'][k], skip_special_tokens=True))}")


# -- a session: the run's base, built as training builds it, and a bank of adapters ----------------
@dataclass
class Session:
    cfg: object  # bigtrain.config.Config of the run
    engine: object
    model: object
    tokenizer: object
    bank: object  # AdapterBank
    vocab: int
    autocast: object
    default: str  # the name of the adapter given as RUN_OR_CKPT

    @property
    def is_main(self) -> bool:
        return self.engine.info.is_main

    @property
    def synced(self) -> bool:
        return self.engine.distributed

    def close(self) -> None:
        self.engine.close()


def default_name(ckpt: Path) -> str:
    """The adapter name of a checkpoint: its run's directory name (runs/demo/checkpoints/step-N:
    demo), else the checkpoint directory's own."""
    return ckpt.parent.parent.name if ckpt.parent.name == "checkpoints" else ckpt.name


def parse_adapters(items: list[str]) -> list[tuple[str, str]]:
    out, seen = [], set()
    for it in items or []:
        name, sep, path = it.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter {it!r}: expected NAME=PATH (a checkpoint or a run directory)")
        if name == BASE:
            raise ConfigError(f"--adapter {it!r}: the name {BASE!r} means the bare base model; choose another")
        if name in seen:
            raise ConfigError(f"--adapter {it!r}: the name {name!r} is given twice")
        seen.add(name)
        out.append((name, path))
    return out


def run_config(c, base: str | None, device: str | None, quantize: str | None = None):
    """The run's config (the checkpoint's config.yaml; the defaults if it has none), with the base
    at ``--base`` or the recorded one, the device asked for, and ``--quantize`` (None: the run's
    model.quantize; ``none``: the unquantized base, e.g. a merged model or the base a PEFT export
    is loaded on)."""
    bdir = base_dir(c.spec, base, c.path)  # a preset base (random weights) has no files: --base needed
    saved = c.path / "config.yaml"
    overrides = [f"model.path={bdir}"] + ([f"train.device={device}"] if device else [])
    if quantize is not None:
        overrides.append(f"model.quantize={'null' if quantize == 'none' else quantize}")
    if saved.is_file() and saved.read_text().strip():
        return load_config(saved, overrides)
    cfg = Config()
    cfg.model.path = str(bdir)
    if device:
        cfg.train.device = device
    if quantize is not None:
        cfg.model.quantize = None if quantize == "none" else quantize
    return cfg.validate()


@dataclass
class Prepared:
    """Everything of a session that needs no process group: read and checked first."""

    cfg: object
    named: list  # (name, AdapterCheckpoint), RUN_OR_CKPT's first
    tokenizer: object
    hf_config: object

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.named]


def prepare(ckpt: str, adapters: list[tuple[str, str]] = (), base: str | None = None,
            device: str | None = None, quantize: str | None = None) -> Prepared:
    """Read and verify every checkpoint, check that they can share one bank, read the run's config
    and tokenizer: every error of bad input, before any process group starts."""
    first = ck.read_checkpoint(ckpt)
    name = default_name(first.path)
    if name == BASE:  # a run folder named "base": the name already means the bare base model
        name = f"{BASE}-adapter"
        print(f"[bigtrain] {ckpt}: its run folder is named {BASE!r}, which here means the bare base model; "
              f"its adapter is named {name!r} (--use {name})", file=sys.stderr, flush=True)
    named = [(name, first)]
    for name, path in adapters:
        if name == named[0][0]:
            raise ConfigError(f"--adapter {name}={path}: {name!r} is already the name of {ckpt} "
                              f"(RUN_OR_CKPT); choose another")
        named.append((name, ck.read_checkpoint(path)))
    check_compatible([(n, c.path, c.spec, _base_json(c.path)) for n, c in named])
    cfg = run_config(first, base, device, quantize)
    tokenizer = load_tokenizer(tokenizer_source(cfg.model.tokenizer, cfg.model.local_path))
    return Prepared(cfg, named, tokenizer, model_config(cfg, cfg.model.local_path, len(tokenizer)))


def open_session(prep: Prepared, say=print) -> Session:
    """Start the process group, build the base as the run did, load the adapters into one bank.
    What DeepSpeed prints while it starts (its logger writes to stdout) goes to stderr: stdout is
    the commands' output (jsonl)."""
    with contextlib.redirect_stdout(sys.stderr):
        return _open_session(prep, say)


def _open_session(prep: Prepared, say) -> Session:
    cfg, hf_config = prep.cfg, prep.hf_config
    model_path = cfg.model.local_path
    build = pad_vocab(hf_config, head_is_target=False)  # the head is never a LoRA target (inject.py)
    engine = Engine(cfg.zero, cfg.train.device, cfg.train.micro_batch_size, 1)
    set_seed(cfg.train.seed)
    model = engine.build_base(build, model_path, cfg.model.dtype, cfg.model.attn_implementation,
                              int(hf_config.vocab_size), cfg.model.quantize)  # the base as trained
    bank = AdapterBank(model, engine.info.device)
    for name, c in prep.named:
        bank.add(name, c.spec, c.tensors, str(c.path), _base_json(c.path))
    if engine.info.is_main:
        where = f"partitioned over {engine.info.world_size} ranks" if engine.distributed else "one process"
        q = f", linear weights model.quantize={cfg.model.quantize}" if cfg.model.quantize else ""
        say(f"[bigtrain] base {model_path} ({where}, {cfg.model.dtype}{q}); adapters: " + ", ".join(
            f"{n} ({c.path}, r={c.spec.r}, {len(c.spec.modules)} modules, {bank.nbytes(n):,} bytes)"
            for n, c in prep.named))
    return Session(cfg, engine, model, prep.tokenizer, bank, int(hf_config.vocab_size),
                   autocast_for(cfg.train.precision, engine.info.device), prep.names[0])


def _base_json(path: Path) -> dict:
    return ck.read_json(path / "base.json") if (path / "base.json").is_file() else {}


# -- bigtrain generate --------------------------------------------------------------------------
def read_prompts(path: str) -> list[dict]:
    """A prompts file: one JSON object per line with "prompt" (a string) or "messages" (a
    conversation, as chat training data; a final assistant message is taken as the reference, not
    given to the model) and optionally "adapter" (a name given to --adapter or RUN_OR_CKPT, or
    "base"); other fields (a "completion": the reference) are kept. Errors name the file and line."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--prompts {path}: no such file")
    rows = []
    with open(p, encoding="utf-8", errors="surrogateescape") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: invalid JSON ({e.msg} at column {e.colno})") from None
            if isinstance(obj, dict) and "messages" in obj:
                obj = _chat_row(obj, f"{path}:{i}")
            elif not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise ValueError(f"{path}:{i}: expected an object with a string field 'prompt' or a "
                                 f"list 'messages'")
            if "adapter" in obj and obj["adapter"] is not None and not isinstance(obj["adapter"], str):
                raise ValueError(f"{path}:{i}: field 'adapter' must be a name (a string)")
            rows.append({**obj, "_line": i})
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows


def _chat_row(obj: dict, where: str) -> dict:
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs or not all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in msgs):
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects with "
                         f"roles among {', '.join(ROLES)}")
    row = dict(obj)
    if msgs[-1]["role"] == "assistant":  # a chat training record: its last answer is the reference
        row["messages"], row["completion"] = msgs[:-1], msgs[-1]["content"]
        if not row["messages"]:
            raise ValueError(f"{where}: 'messages' holds only an assistant turn: nothing to answer")
    return row


def plan(rows: list[dict], use: list[str], names: list[str], where: str) -> list[tuple[int, str, dict]]:
    """(index, adapter, row) for every generation to make: a row's own "adapter", else each of
    ``use``. Unknown names are errors naming the row."""
    known = set(names) | {BASE}
    out = []
    for row in rows:
        chosen = [row["adapter"]] if row.get("adapter") else use
        for name in chosen:
            if name not in known:
                loc = f"{where}:{row['_line']}" if "_line" in row else "--use"
                raise ValueError(f"{loc}: no adapter named {name!r}; loaded: {', '.join(names)} (and {BASE!r}: "
                                 f"the bare base)")
            out.append((len(out), name, row))
    return out


def run_generate(sess: Session, jobs: list[tuple[int, str, dict]], s: Sampling, batch_size: int) -> dict:
    """Generate every job, grouped by adapter (one switch per adapter, in order of first use);
    results in the jobs' order, with timings."""
    torch.manual_seed(s.seed)  # the same on every rank: the same samples everywhere
    order: dict[str, list] = {}
    for job in jobs:
        order.setdefault(job[1], []).append(job)
    results: dict[int, dict] = {}
    switches, gen_s, new_tokens = [], 0.0, 0
    for name, group in order.items():
        sw = sess.bank.use(None if name == BASE else name)
        switches.append(sw)
        ids = [row_ids(sess.tokenizer, row) for _, _, row in group]
        t0 = time.perf_counter()
        outs = generate_ids(sess.model, sess.tokenizer, ids, s, vocab=sess.vocab, batch_size=batch_size,
                            synced=sess.synced, autocast=sess.autocast, after=sess.engine.after_backward)
        gen_s += time.perf_counter() - t0
        for (i, _, row), new, given in zip(group, outs, ids):
            text = sess.tokenizer.decode(new, skip_special_tokens=True)
            r = {k: v for k, v in row.items() if k not in ("_line", "adapter", "completion")}
            if "messages" in row:  # what the model was given, rendered by the chat template
                r["prompt"] = sess.tokenizer.decode(given, skip_special_tokens=False)
            if "completion" in row:  # a training-format file: its completion is the reference
                r["reference"] = row["completion"]
            r.update(adapter=name, completion=cut_at_stop(text, s.stop) if s.stop else text,
                     new_tokens=len(new), token_ids=new)
            results[i] = r
            new_tokens += len(new)
    return {"results": [results[i] for i in range(len(jobs))], "switches": switches, "seconds": gen_s,
            "new_tokens": new_tokens}


# -- bigtrain eval ------------------------------------------------------------------------------
def run_eval(sess: Session, ds, names: list[str | None]) -> list[dict]:
    """Loss and perplexity of each of ``names`` (None: the bare base) on ``ds`` (rows of
    :func:`bigtrain.data.load_examples` under the run's data settings) with training's evaluate():
    the first ``train.eval_examples`` rows (0: all), each scored once."""
    cfg = sess.cfg
    n = len(ds) if cfg.train.eval_examples == 0 else min(cfg.train.eval_examples, len(ds))
    targets = sum(int(t != IGNORE_INDEX) for row in ds.select(range(n))["labels"] for t in row[1:])
    out = []
    for name in names:
        sess.bank.use(name)
        loss = evaluate(sess.model, ds, sess.engine, cfg, sess.autocast, sess.tokenizer.pad_token_id, sess.vocab)
        out.append({"adapter": name or BASE, "loss": loss, "perplexity": math.exp(loss), "examples": n,
                    "target_tokens": targets})
    sess.bank.use(None)
    return out
