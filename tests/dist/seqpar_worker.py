"""Worker for tests/e2e/test_seqpar.py: sequence-parallel attention (bigtrain/seqpar.py) against the
whole sequence, per architecture, on CPU gloo ranks. Writes ``<out>/rank<R>.json``.

Every rank builds the same small model (fp32, sdpa, the same seed: identical weights), and the same
right-padded batch with prompt tokens masked out of the loss. Reference: the whole batch on this
rank alone (``token_loss_sum``, attention mask given). Sequence-parallel: the rank's shard through
``seqpar.loss_sum`` inside ``SequenceParallel.attending``, its loss and every parameter's gradient
summed over the group (the trainer's all-reduce). Reported per case: the loss sums, the largest
gradient difference and the largest gradient; and whether the plain whole-sequence path still gives
the reference afterwards (the wrapper is inactive outside ``attending``, and restores what
DeepSpeed changes on the attention module)."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import transformers as tf  # noqa: E402

from bigtrain import seqpar  # noqa: E402
from bigtrain.config import ZeroConfig  # noqa: E402
from bigtrain.dist import new_groups  # noqa: E402
from bigtrain.engine.core import Engine  # noqa: E402
from bigtrain.losses import token_loss_sum  # noqa: E402

V = 96


def configs(world: int) -> dict:
    common = dict(vocab_size=V, max_position_embeddings=64)
    llama = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 tie_word_embeddings=False, **common)
    return {
        "llama": tf.LlamaConfig(num_key_value_heads=4, **llama),
        # GQA: 2 KV heads, and 1 (replicated to each of the world's ranks)
        "llama-gqa2": tf.LlamaConfig(num_key_value_heads=2, **llama),
        "llama-mqa": tf.LlamaConfig(num_key_value_heads=1, **llama),
        "opt": tf.OPTConfig(hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
                            word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0, **common),
        "gpt2": tf.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                              embd_pdrop=0.0, attn_pdrop=0.0),
        "neox": tf.GPTNeoXConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                 hidden_dropout=0.0, attention_dropout=0.0, tie_word_embeddings=False, **common),
    }


def batch(B: int, T: int) -> dict:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    labels = ids.clone()
    for i, n in enumerate([T, T - 5, T - 9][:B]):  # right padding of 0, 5, 9 tokens
        ids[i, n:], mask[i, n:], labels[i, n:] = 0, 0, -100
        labels[i, :3 + i] = -100  # a prompt
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def main() -> None:
    out_dir = sys.argv[1]
    eng = Engine(ZeroConfig(stage=3), device="cpu")
    rank, world = eng.info.rank, eng.info.world_size
    lay = seqpar.Layout.of(rank, world, world)
    group = new_groups(seqpar.Layout.groups(world, world), rank, 120)
    full = batch(3, 8 * world)
    mine = seqpar.shard(full, world, lay.rank)
    res = {}
    for name, cfg in configs(world).items():
        for ckpt in (False, True):
            torch.manual_seed(0)
            model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
            if ckpt:  # recomputation in backward runs the all-to-all again
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                model.train()
            else:
                model.eval()
            ref, n_ref = token_loss_sum(model, full["input_ids"], full["attention_mask"], full["labels"])
            ref.backward()
            g_ref = grads(model)
            model.zero_grad(set_to_none=True)
            sp = seqpar.SequenceParallel(lay, group, cfg, micro_batch_size=3)
            try:
                with sp.attending(mine):
                    ls, n = seqpar.loss_sum(model, mine, None)
                    ls.backward()
                g = grads(model)
                flat = torch.cat([ls.detach().reshape(1), torch.tensor([float(n)])] + [g[k].reshape(-1) for k in g_ref])
                dist.all_reduce(flat)
                total, count = flat[0].item(), int(flat[1].item())
                off, worst, biggest = 2, 0.0, 0.0
                for k, v in g_ref.items():
                    got = flat[off:off + v.numel()].view_as(v)
                    off += v.numel()
                    worst, biggest = max(worst, (got - v).abs().max().item()), max(biggest, v.abs().max().item())
                model.zero_grad(set_to_none=True)
                with torch.no_grad():  # the wrapper inactive: the whole sequence, the plain kernel
                    after, _ = token_loss_sum(model, full["input_ids"], full["attention_mask"], full["labels"])
            finally:
                sp.close()
            res[f"{name}{'-ckpt' if ckpt else ''}"] = {
                "ref": ref.item(), "sp": total, "n_ref": n_ref, "n_sp": count, "grad_diff": worst,
                "grad_max": biggest, "after": after.item()}
    json.dump(res, open(os.path.join(out_dir, f"rank{rank}.json"), "w"), indent=1)
    eng.close()


if __name__ == "__main__":
    main()
