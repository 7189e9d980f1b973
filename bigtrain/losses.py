"""The training objective: summed token cross-entropy and the number of target tokens.

Summing (not averaging) per micro-batch lets the loop divide by the *global* number of target
tokens of the optimizer step, so N ranks × micro-batch m and one process × micro-batch N·m give the
same gradient (and gradient accumulation is exact), whatever the padding.
Labels are already aligned with ``input_ids``; position t predicts token t+1 (shift inside), unless
the caller passes ``shift_labels``, shifted before the sequence was split (:mod:`bigtrain.seqpar`).

Memory: the plain recipe materialises the (B, T, V) logits, then an fp32 copy for the softmax, and
autograd keeps both (at GPT-3's vocabulary, B=4, T=2048: ~2.5 GB, more than a whole checkpointed
2.7B model's layer inputs). :func:`token_loss_sum` instead runs the model with no logits
(``logits_to_keep`` = an empty index), takes the final hidden states from the decoder, keeps only
the positions that have a target, and projects them through the LM head in chunks of at most
``chunk_tokens`` rows. Each chunk's logits live only inside a checkpointed function: backward
recomputes that chunk's projection, so at most one chunk's logits exist at any time. The LM head is
always *called as a module* (never through ``.weight``), so ZeRO-3's fetch hooks gather its
partitioned weight, in forward and in the recomputation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

# Rows of one logits chunk: ~2^27 fp32 logits (0.5 GB) at the vocabulary size of the model.
CHUNK_LOGITS = 1 << 27


def token_loss_sum(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   labels: torch.Tensor | None, vocab: int | None = None, *,
                   shift_labels: torch.Tensor | None = None,
                   position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """(sum of -log p(label) over target tokens, number of target tokens).

    input_ids, attention_mask, labels: (B, T); labels == -100 where there is no loss (prompt, pad).
    vocab: the real vocabulary when the model's is padded (:mod:`bigtrain.vocab`): only the first
    ``vocab`` logits enter the softmax, so the padded rows change neither the loss nor a gradient.

    shift_labels: labels already shifted, (B, T): position t's own target (the label of token t+1),
    instead of ``labels`` (then None). A sequence shard (:mod:`bigtrain.seqpar`) needs them: its last
    position's target is the first token of the next shard, which the shard does not hold.
    position_ids: (B, T), passed to the model when given (a shard's positions do not start at 0).
    """
    if (labels is None) == (shift_labels is None):
        raise ValueError("token_loss_sum: give labels or shift_labels, not both")
    hidden = _final_hidden(model, input_ids, attention_mask, position_ids)
    if hidden is None:  # a model this path does not know: the plain recipe
        return token_loss_sum_reference(model, input_ids, attention_mask, labels, vocab,
                                        shift_labels=shift_labels, position_ids=position_ids)
    B, T, d = hidden.shape
    if shift_labels is None:
        # Position t predicts label t+1: shift the labels left, the last position has no target.
        shift = torch.full_like(labels, IGNORE_INDEX)
        shift[:, :-1] = labels[:, 1:]
    else:
        shift = shift_labels
    shift = shift.reshape(-1)
    rows = (shift != IGNORE_INDEX).nonzero().squeeze(1)
    n = int(rows.numel())
    head = model.get_output_embeddings()
    # n == 0 (an all-prompt batch) still goes through the head once, like every other batch: under
    # ZeRO-3 each head call is a collective gather, so every rank must make the same calls
    h = hidden.reshape(B * T, d).index_select(0, rows)
    y = shift.index_select(0, rows)
    vocab_size = getattr(head, "out_features", None) or int(model.config.vocab_size)
    chunk = max(1, CHUNK_LOGITS // max(1, vocab_size))

    return _ChunkedHeadCE.apply(h, y, head, chunk, vocab or vocab_size), n


class _ChunkedHeadCE(torch.autograd.Function):
    """sum CE(head(h), y) with the gradient w.r.t. ``h`` computed chunk by chunk *in forward*: each
    chunk's logits (and their fp32 copy) are freed before the next chunk starts, so only one chunk of
    logits ever exists, and backward is one multiply.

    The head is called as a module exactly **once**, whatever the number of rows (0 included), and
    every chunk is computed inside that call: module hooks (ZeRO-3's gather/release) see one
    ordinary forward. This matters for correctness, not only speed: under ZeRO-3 each module call
    is a collective all-gather, and ranks with different target counts would otherwise make
    different numbers of calls, i.e. mismatched collectives. The weight is differentiated inside
    that call too (recomputing the head in the outer backward would need ZeRO-3 to fetch during a
    checkpoint replay, which it does not); nothing the call returns needs a gradient."""

    @staticmethod
    def forward(ctx, h, y, head, chunk, vocab):
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        need_grad = ctx.needs_input_grad[0]
        grad_h = torch.empty_like(h) if need_grad else None
        inner = head.forward  # the module's own computation, without its hooks

        def all_chunks(_):
            nonlocal total
            for i in range(0, h.shape[0], chunk):
                with torch.enable_grad():
                    h_c = h[i:i + chunk].detach().requires_grad_(need_grad)
                    logits = inner(h_c)[:, :vocab].float()  # fp32 for the softmax, as the plain recipe does
                    loss_c = F.cross_entropy(logits, y[i:i + chunk], ignore_index=IGNORE_INDEX,
                                             reduction="sum")
                    if need_grad:
                        (g,) = torch.autograd.grad(loss_c, h_c)
                        grad_h[i:i + chunk] = g
                total += loss_c.detach().float()
                del logits, loss_c
            return h.new_zeros(0)

        own = head.__dict__.get("forward")  # a wrapper some libraries set on the instance
        head.forward = all_chunks
        try:
            head(h[:0].detach())  # one module call: hooks fire once, all chunks run inside
        finally:
            if own is None:
                del head.forward
            else:
                head.forward = own
        ctx.save_for_backward(grad_h)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), None, None, None, None


def _final_hidden(model, input_ids, attention_mask, position_ids=None):
    """Run ``model`` as a whole (its top-level hooks, ZeRO-3's included, see one ordinary call) but
    with no logits, and return the decoder's final hidden states (B, T, d) or None."""
    get_dec = getattr(model, "get_decoder", None)
    get_head = getattr(model, "get_output_embeddings", None)
    if get_dec is None or get_head is None or get_head() is None:
        return None
    cfg = getattr(model, "config", None)
    if cfg is not None and (getattr(cfg, "final_logit_softcapping", None) or
                            getattr(cfg, "logit_scale", None) not in (None, 1, 1.0)):
        return None  # the head's output is post-processed: keep the model's own path
    try:
        decoder = get_dec()
    except Exception:
        return None
    if decoder is None or decoder is model:
        return None
    box = []

    def grab(module, args, output):
        box.append(output[0] if isinstance(output, (tuple, list)) else
                   getattr(output, "last_hidden_state", None))

    handle = decoder.register_forward_hook(grab)
    try:
        empty = torch.zeros(0, dtype=torch.long, device=input_ids.device)
        extra = {} if position_ids is None else {"position_ids": position_ids}
        model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=empty,
              use_cache=False, **extra)
    except TypeError:
        return None  # no logits_to_keep in this model's forward
    finally:
        handle.remove()
    if len(box) != 1 or box[0] is None:
        return None
    h = box[0]
    d = getattr(get_head(), "in_features", None)
    if h.dim() != 3 or tuple(h.shape[:2]) != tuple(input_ids.shape) or (d and h.shape[-1] != d):
        return None
    return h


def token_loss_sum_reference(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                             labels: torch.Tensor | None, vocab: int | None = None, *,
                             shift_labels: torch.Tensor | None = None,
                             position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """The plain recipe (full (B, T, V) logits, fp32 cross-entropy): what :func:`token_loss_sum`
    must equal, and its fallback for models it does not know. ``shift_labels``, ``position_ids``:
    as :func:`token_loss_sum` takes them."""
    extra = {} if position_ids is None else {"position_ids": position_ids}
    logits = model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits  # (B, T, V)
    if shift_labels is None:
        shift_logits = logits[:, :-1, :vocab].float()  # fp32 for the softmax; the real vocabulary
        shift_labels = labels[:, 1:]
    else:
        shift_logits = logits[:, :, :vocab].float()
    loss_sum = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)),
                               shift_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, int((shift_labels != IGNORE_INDEX).sum())
