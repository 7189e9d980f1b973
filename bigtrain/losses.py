"""The training objective: summed token cross-entropy and the number of target tokens.

Summing (not averaging) per micro-batch lets the loop divide by the *global* number of target
tokens of the optimizer step, so N ranks × micro-batch m and one process × micro-batch N·m give the
same gradient (and gradient accumulation is exact), whatever the padding.
Labels are already aligned with ``input_ids``; position t predicts token t+1 (shift inside).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_loss_sum(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum of -log p(label) over target tokens, number of target tokens).

    input_ids, attention_mask, labels: (B, T); labels == -100 where there is no loss (prompt, pad).
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
    shift_logits = logits[:, :-1].float()  # fp32 for the softmax
    shift_labels = labels[:, 1:]
    loss_sum = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)),
                               shift_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, int((shift_labels != IGNORE_INDEX).sum())
