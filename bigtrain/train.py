"""The training loop: one loop for a ZeRO-3-partitioned (or whole) frozen base with replicated adapters.

:func:`train` is the entry point (``bigtrain train``, the tests); the run itself is a
:class:`~bigtrain.trainer.Trainer` (trainer.py), which reads top to bottom:
  1. start the process group and build the frozen base (engine.py, over dist.py, zero3.py and loader.py);
  2. attach LoRA adapters beside it, make them identical on every rank, AdamW over them;
  3. load data; resume from the last good checkpoint if there is one;
  4. per optimizer step: count the step's target tokens on all ranks, forward/backward each
     micro-batch with loss_sum / global_tokens, one flat all-reduce of the adapter gradients (plus
     the loss and a preemption flag), clip, step (or skip a non-finite step on every rank together);
  5. log, evaluate, checkpoint; on SIGTERM/SIGUSR1/SIGINT save at the step boundary and exit cleanly.
Every exit path (the end, a preemption stop, an exception) closes the run once (``Trainer.close``).
"""

from __future__ import annotations

from .config import Config
# re-exported: the CLI, the tests and tools import these from bigtrain.train
from .trainer import (
    Preemption,
    StepResult,
    Trainer,
    TrainState,
    adapter_config,
    evaluate,
    lr_lambda,
    rank_report,
    set_seed,
)

__all__ = ["Preemption", "StepResult", "TrainState", "Trainer", "adapter_config", "evaluate", "lr_lambda",
           "rank_report", "set_seed", "train"]


def train(cfg: Config, pending_signals: list[int] | None = None) -> dict:
    """Run training as ``cfg`` says; return the result dict (step, eval_loss, checkpoint, ...; or
    step, preempted, checkpoint after a stop). ``pending_signals``: SIGTERM/SIGUSR1 the CLI caught
    while importing: the run then stops before any work, marked preempted."""
    return Trainer(cfg, pending_signals).run()
