"""``bigtrain generate`` and ``bigtrain eval``: their parsers and commands. The session they open
(the run's base built as training builds it, a bank of adapters) and the generation and scoring
are :mod:`bigtrain.generate`'s; here are the arguments and what is printed (outputs on stdout,
timings on stderr).

Each command imports the modules that do its work (torch, transformers, datasets, the engine) at its
start: the CLI builds this module's parsers for ``bigtrain --help`` without them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from ..config import ConfigError

GENERATE_EPILOG = """\
examples (after `bigtrain train`, which writes runs/demo):
  bigtrain generate runs/demo --prompt $'<mr> name[The Eagle], food[French]\\nDescription:'
  bigtrain generate runs/demo --use base --use demo --prompt $'<mr> name[Alimentum]\\nDescription:'
  bigtrain generate runs/demo --prompts bigtrain/assets/e2e_eval.jsonl --format jsonl > out.jsonl
  bigtrain generate runs/demo --adapter short=runs/short --prompts mixed.jsonl   # per-prompt "adapter"
  bigtrain generate runs/demo --prompt 'x' --temperature 0.8 --top-p 0.95 --seed 1 --stop '.'
  bigtrain generate runs/chat --chat --prompt 'name[Aromi], area[riverside]'   # trained on builtin:e2e-chat
  torchrun --nproc_per_node 8 -m bigtrain generate runs/big --prompts p.jsonl   # base partitioned (ZeRO-3)

A prompts file holds one JSON object per line: {"prompt": "...", "adapter": "NAME"}, or
{"messages": [{"role": "user", "content": "..."}, ...]} rendered by the chat template (a final
assistant message, as in chat training data, is the reference, not given to the model) ("adapter" is
optional: without it, the --use adapters; "base" is the bare base; a "completion" field, as in
training data, is written out as "reference"). The base is built once; a switch
between adapters copies only the adapter's A and B (its bytes and time are printed). The adapter is
applied unmerged, through the hooks training used. Outputs go to stdout, timings to stderr.
"""

EVAL_EPILOG = """\
examples:
  bigtrain eval runs/demo --data builtin:e2e-eval             # the figure the run logged at its end
  bigtrain eval runs/demo --data my_eval.jsonl --examples 0   # every example of a file
  bigtrain eval runs/demo --adapter other=runs/other --data builtin:e2e-eval --json
  torchrun --nproc_per_node 2 -m bigtrain eval runs/demo --data builtin:e2e-eval
  bigtrain eval runs/nf4 --base out/merged --quantize none --data builtin:e2e-eval   # the "base" row: a merged model

Scores the bare base and every adapter with training's own eval: the run's data settings
(data.max_length, data.pack, ...), its micro-batch, and its train.eval_examples first examples
(--examples to change). Data: any form training takes (prompt/completion or text jsonl, .txt, a
saved datasets directory, builtin:NAME).
"""


def _common(p) -> None:
    p.add_argument("checkpoint", metavar="RUN_OR_CKPT",
                   help="a run's output_dir (its latest checkpoint) or a checkpoint dir (step-N); its name is "
                        "the run directory's")
    p.add_argument("--adapter", action="append", metavar="NAME=PATH", default=[],
                   help="another adapter (checkpoint or run dir) over the same base; repeatable")
    p.add_argument("--base", metavar="DIR", default=None,
                   help="base model dir (default: the checkpoint's recorded base_model)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                   help="default: the run's train.device")
    p.add_argument("--quantize", choices=("none", "int8", "nf4"), default=None,
                   help="the base's model.quantize (default: the run's; none: the unquantized base, e.g. "
                        "to score a merged model given as --base, or the adapter as a PEFT export runs it)")


def add_parser(subparsers) -> None:
    g = subparsers.add_parser("generate", help="generate text with one or several adapters over one base",
                              description="Generate continuations of prompts with trained LoRA adapters "
                                          "over their base (greedy or sampled, KV cache, batched).",
                              epilog=GENERATE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(g)
    g.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt; repeatable")
    g.add_argument("--chat", action="store_true",
                   help="each --prompt is a user's message, rendered with the tokenizer's chat template "
                        "(for adapters trained on messages data)")
    g.add_argument("--prompts", metavar="FILE.jsonl", help='prompts file: {"prompt": ..., "adapter": ...} per line')
    g.add_argument("--use", action="append", metavar="NAME",
                   help="adapter(s) for prompts that name none ('base': the bare base); repeatable; "
                        "default: RUN_OR_CKPT's")
    g.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="default 64")
    g.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 (default): greedy; > 0: sampling")
    g.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (default 1: off)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0; the same on every rank)")
    g.add_argument("--stop", action="append", metavar="STR", help="end a generation at this string; repeatable")
    g.add_argument("--batch-size", type=int, default=8, metavar="N", help="prompts per generate call (default 8)")
    g.add_argument("--format", choices=("text", "jsonl"), default="text", help="output format (default text)")
    g.set_defaults(func=cmd_generate)
    e = subparsers.add_parser("eval", help="loss and perplexity of the base and each adapter on a data file",
                              description="Score a data file with training's eval: the bare base and every "
                                          "adapter given.",
                              epilog=EVAL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(e)
    e.add_argument("--data", required=True, metavar="FILE", help="jsonl, .txt, saved datasets dir or builtin:NAME")
    e.add_argument("--examples", type=int, default=None, metavar="N",
                   help="score the first N examples (0: all; default: the run's train.eval_examples)")
    e.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    e.set_defaults(func=cmd_eval)


def cmd_generate(args) -> int:
    from ..data import escape_controls
    from ..dist import exit_after_teardown
    from ..generate import (Sampling, check_positions, open_session, parse_adapters, plan, prepare, read_prompts,
                            row_ids, run_generate)

    s = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed, list(args.stop or []))
    s.check()
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if bool(args.prompt) == bool(args.prompts):
        raise ConfigError("give --prompt TEXT (repeatable) or --prompts FILE.jsonl, one of the two")
    if args.prompts:
        rows = read_prompts(args.prompts)
    elif args.chat:  # each --prompt is the user's turn of a new conversation
        rows = [{"messages": [{"role": "user", "content": p}]} for p in args.prompt]
    else:
        rows = [{"prompt": p} for p in args.prompt]
    prep = prepare(args.checkpoint, parse_adapters(args.adapter), args.base, args.device, args.quantize)
    jobs = plan(rows, args.use or [prep.names[0]], prep.names, args.prompts or "--prompt")
    check_positions(prep.hf_config, [row_ids(prep.tokenizer, row) for row in rows], s.max_new_tokens,
                    [f"{args.prompts}:{row['_line']}" if args.prompts else f"--prompt {i + 1}" for i, row in enumerate(rows)])
    sess = open_session(prep, say=_err)
    # on an error from here on the process group is left to the process's exit, as training does
    out = run_generate(sess, jobs, s, args.batch_size)
    if sess.is_main:
        for r in out["results"]:
            if args.format == "jsonl":
                print(json.dumps(r, ensure_ascii=False), flush=True)
            else:
                print(f"--- [{r['adapter']}] {r['new_tokens']} new tokens\n"
                      f"{escape_controls(r['prompt'] + r['completion'])}",
                      flush=True)
        _err(f"[bigtrain] generated {out['new_tokens']:,} tokens for {len(jobs)} prompt(s) in "
             f"{out['seconds']:.2f} s: {out['new_tokens'] / max(out['seconds'], 1e-9):,.1f} tokens/s "
             f"({'greedy' if s.temperature == 0 else f'temperature {s.temperature:g}, top-p {s.top_p:g}, seed {s.seed}'}"
             f", batch {args.batch_size}, {sess.engine.info.world_size} rank(s)); "
             f"{_format_switches(out['switches'])}")
    sess.close()
    exit_after_teardown(0)  # as `bigtrain train` ends: no interpreter finalisation after a process group
    return 0


def cmd_eval(args) -> int:
    import datasets

    from ..data import load_examples
    from ..dist import exit_after_teardown
    from ..generate import open_session, parse_adapters, prepare, run_eval

    prep = prepare(args.checkpoint, parse_adapters(args.adapter), args.base, args.device, args.quantize)
    if args.examples is not None:
        if args.examples < 0:
            raise ConfigError(f"--examples must be >= 0 (0: all), got {args.examples}")
        prep.cfg.train.eval_examples = args.examples
    if not sys.stderr.isatty():  # datasets' tokenisation bar would put carriage returns into a log
        datasets.disable_progress_bars()
    ds = load_examples(args.data, prep.tokenizer, prep.cfg.data)[0]  # a bad line is named before any work
    sess = open_session(prep, say=_err)
    # on an error from here on the process group is left to the process's exit, as training does
    t0 = time.perf_counter()
    rows = run_eval(sess, ds, [None] + sess.bank.names())
    dt = time.perf_counter() - t0
    if sess.is_main:
        if args.json:
            print(json.dumps({"data": args.data, "results": rows}), flush=True)
        else:
            print(f"{'adapter':<20} {'loss':>8} {'perplexity':>10}   ({rows[0]['examples']} examples of "
                  f"{args.data}, {rows[0]['target_tokens']:,} target tokens)")
            for r in rows:
                print(f"{r['adapter']:<20} {r['loss']:>8.4f} {r['perplexity']:>10.4f}")
        _err(f"[bigtrain] eval of {len(rows)} model(s) in {dt:.2f} s at {sess.engine.info.world_size} rank(s)")
    sess.close()
    exit_after_teardown(0)  # as `bigtrain train` ends: no interpreter finalisation after a process group
    return 0


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _format_switches(switches) -> str:
    copies = [sw for sw in switches if sw.bytes]
    if not copies:
        return "no adapter weights copied"
    ms = sorted(sw.seconds * 1e3 for sw in copies)
    return (f"{len(copies)} adapter switch(es), {copies[0].bytes:,} bytes copied each, "
            f"{ms[len(ms) // 2]:.3f} ms median (max {ms[-1]:.3f} ms); the base was built once")
