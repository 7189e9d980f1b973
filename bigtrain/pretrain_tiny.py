"""Make the built-in base model ``builtin:tiny-opt``: a tiny OPT pretrained by the project on CPU.

LoRA adapts a *pretrained* model; a randomly initialised base has nothing for low-rank updates of
W_q, W_v to steer (its embeddings and head stay random and frozen), so the demo would show no
learning. This script gives the demo a real base in a few minutes on 2 cores: full training of the
``tiny-opt`` preset as a plain language model on the built-in descriptions (the completions of
``e2e_train.jsonl``, without their meaning representations) and the Korean LoRA excerpt. The
fine-tuning task, description conditioned on the meaning representation, is then new to it: that
is what the LoRA demo learns.

    python -m bigtrain.pretrain_tiny            # rewrites bigtrain/assets/tiny-opt/

Deterministic for a given torch build (seeded; single process). Not part of training: the
checkpoint it writes is shipped, and ``model.path=builtin:tiny-opt`` loads it through the same code
path as any local Hugging Face checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import transformers as tf

from .config import ASSETS
from .data import load_tokenizer
from .presets import hf_config_for



def corpus() -> list[str]:
    texts = [json.loads(line)["completion"].strip()
             for line in (ASSETS / "e2e_train.jsonl").read_text().splitlines() if line.strip()]
    ko = [p.strip() for p in (ASSETS / "lora_intro_ko.txt").read_text().split("\n\n") if p.strip()]
    return texts + ko * 20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ASSETS / "tiny-opt"))
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    torch.set_num_threads(1)  # 2 threads on 2 shared cores ran 3x slower (OpenMP spin-waits)
    tok = load_tokenizer(None)
    ids: list[int] = []
    for t in corpus():
        ids += [tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    data = torch.tensor(ids)
    n_rows = len(data) // args.seq
    rows = data[: n_rows * args.seq].view(n_rows, args.seq)
    model = tf.AutoModelForCausalLM.from_config(hf_config_for("tiny-opt", vocab_size=len(tok)))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = 50
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))))
    g = torch.Generator().manual_seed(0)
    t0 = time.time()
    model.train()
    for step in range(args.steps):
        idx = torch.randint(0, n_rows, (args.batch,), generator=g)
        batch = rows[idx]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    out = Path(args.out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"wrote {out} ({sum(p.stat().st_size for p in out.iterdir()) / 1e6:.2f} MB; {n_rows} rows of {args.seq})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
