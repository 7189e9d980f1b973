"""What a run shows while it trains: rank 0's progress (a tqdm bar on a terminal, plain lines in a
batch log) and the running sums between two log lines (:class:`Window`)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from tqdm import tqdm

from .config import Config


@dataclass
class Window:
    """Running sums between two log lines."""

    loss: float = 0.0
    steps: int = 0
    tokens: int = 0
    t0: float = field(default_factory=time.perf_counter)
    # a step left out of tokens/s (a compiled run's first step, which compiles the layers)
    skip_s: float = 0.0
    skip_tokens: int = 0

    def add(self, loss: float, tokens: int) -> None:
        self.loss += loss
        self.steps += 1
        self.tokens += tokens

    def tokens_per_s(self) -> float | None:
        """Tokens per second over the window's steps but a skipped one; None if it held only that."""
        tokens = self.tokens - self.skip_tokens
        dt = time.perf_counter() - self.t0 - self.skip_s
        return tokens / dt if tokens > 0 and dt > 0 else None


def use_bar(cfg: Config) -> bool:
    """logging.progress_bar: true or false as set; null: the bar on a terminal only (a bar redraws
    itself with carriage returns, which a log file keeps, and later lines get glued onto it)."""
    bar = cfg.logging.progress_bar
    return sys.stderr.isatty() if bar is None else bar


def line_break(bar) -> str:
    """What a line printed while ``bar`` is on screen starts with: a newline after a tqdm bar's."""
    return "\n" if isinstance(bar, tqdm) else ""


def fmt_time(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Lines:
    """Progress as plain lines (``[bigtrain] step 20/300: loss ..., elapsed ..., ETA ...``), one per
    logged step, for logs that are not a terminal; the elapsed time and ETA count from the first step
    of this process (a resumed run's own pace)."""

    def __init__(self, total: int, initial: int):
        self.total, self.initial, self.n = total, initial, initial
        self.t0 = time.perf_counter()

    def update(self, n: int) -> None:
        self.n += n

    def set_postfix(self, loss: str, tok_s: str) -> None:
        elapsed = time.perf_counter() - self.t0
        done = self.n - self.initial
        eta = elapsed / done * (self.total - self.n) if done else 0.0
        print(f"[bigtrain] step {self.n}/{self.total}: loss {loss}, {tok_s} tokens/s, "
              f"elapsed {fmt_time(elapsed)}, ETA {fmt_time(eta)}", flush=True)

    def close(self) -> None: ...


class _Null:
    """Ranks other than 0 show nothing."""

    def update(self, n): ...
    def set_postfix(self, **k): ...
    def close(self): ...


def progress(cfg: Config, initial: int, is_main: bool):
    """Rank 0's progress: a tqdm bar (:func:`use_bar`), or plain lines printed at every log step."""
    if is_main and use_bar(cfg):
        return tqdm(total=cfg.train.max_steps, initial=initial, desc="train", unit="step",
                    dynamic_ncols=True, file=sys.stderr)
    if is_main:
        return Lines(cfg.train.max_steps, initial)
    return _Null()
