"""The vocabulary, padded for speed inside a run and its original size everywhere outside it.

The LM head is one (tokens × d_model) @ (d_model × V) GEMM per micro-batch. With V not a multiple of
64 the GEMM falls off the tensor cores' aligned tiles: GPT-3's V = 50,257 measured 10-11% slower
per whole training step on an H200 than 50,272 or 50,304 (plain PEFT, GPT-3 2.7B, micro-batch 4;
nanoGPT pads to 50,304 for the same reason). So a run builds the model with V rounded up to a
multiple of 64:

* the added embedding and head rows are zeros (a checkpoint is read into the first V rows, the rest
  are zero-filled; a random base has its extra rows zeroed);
* the loss sees only the first V logits (:func:`bigtrain.losses.token_loss_sum` slices them off before
  the softmax), so the loss and every gradient equal the unpadded model's up to float rounding, and
  no token id >= V ever reaches the embedding;
* what leaves the run has the original V: checkpoints hold adapters and the original base
  fingerprint, and the in-run merge writes V rows and ``vocab_size = V``.

Not padded when the head itself carries a LoRA adapter (its B would have padded rows that PEFT and the
merge would have to cut), or when V is already aligned.
"""

from __future__ import annotations

import copy

from torch import nn

ALIGN = 64


def padded_size(vocab: int) -> int:
    return -(-vocab // ALIGN) * ALIGN


def run_config(hf_config, head_is_target: bool):
    """The config the run builds: ``hf_config`` itself when nothing is padded, else a copy with the
    vocabulary rounded up to a multiple of :data:`ALIGN`."""
    vocab = int(hf_config.vocab_size)
    if head_is_target or padded_size(vocab) == vocab:
        return hf_config
    padded = copy.deepcopy(hf_config)
    padded.vocab_size = padded_size(vocab)
    return padded


def vocab_parameters(model: nn.Module, padded: int) -> dict[str, nn.Parameter]:
    """name -> parameter, for the embedding and head parameters whose first dimension is the padded
    vocabulary, each once (a tied head shares the embedding's; ``named_parameters`` names it once).
    Found by module, not by shape: another weight can have as many rows as the padded vocabulary."""
    mods = {id(m) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    owned = {id(p) for m in model.modules() if id(m) in mods for p in m.parameters(recurse=False)}
    return {name: p for name, p in model.named_parameters()
            if id(p) in owned and len(getattr(p, "ds_shape", p.shape)) >= 1
            and getattr(p, "ds_shape", p.shape)[0] == padded}
