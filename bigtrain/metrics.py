"""Where metrics go: a JSON-lines file and the console always; W&B and TensorBoard when configured.

One small protocol (``log(metrics, step)``, ``summary(dict)``, ``close()``) fanned out by
:class:`Loggers`. Only rank 0 logs. wandb and tensorboard are imported only when enabled.
Secrets (the W&B key) are read by wandb itself from the environment and never written by us.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Protocol

from .config import LoggingConfig

# Deferred imports: wandb and TensorBoard are optional loggers, imported only when enabled.

# Dense bf16 matmul peak used for MFU, by GPU name (790 TFLOP/s: measured on an H200 with random
# bf16 matrices; the H100 shares its compute).
PEAK_TFLOPS = {"H200": 790.0, "H100": 790.0, "A100": 312.0}


def peak_tflops(device_name: str) -> float | None:
    for k, v in PEAK_TFLOPS.items():
        if k in device_name:
            return v
    return None


def lora_flops_per_token(base_params: int, layers: int, d_model: int, seq: int) -> float:
    """Model FLOPs per token for LoRA training: forward (2·P) + input gradients (2·P) = 4·P, plus
    attention scores and values, 4·L·s·d forward and 4·L·s·d for input gradients (frozen weights get
    no weight gradients; adapter FLOPs are negligible). MFU divides by the chip's bf16 matmul rate."""
    return 4.0 * base_params + 8.0 * layers * seq * d_model


class Logger(Protocol):
    def log(self, metrics: dict, step: int) -> None: ...
    def summary(self, values: dict) -> None: ...
    def table(self, name: str, columns: list[str], rows: list[list]) -> None: ...
    def image(self, name: str, path: str) -> None: ...
    def close(self, failed: bool = False) -> None: ...


class JsonlLogger:
    def __init__(self, path: Path):
        self.f = open(path, "a", buffering=1)

    def log(self, metrics: dict, step: int) -> None:
        self.f.write(json.dumps({"step": step, "time": round(time.time(), 3), **metrics}) + "\n")

    def summary(self, values: dict) -> None:
        self.f.write(json.dumps({"summary": values}) + "\n")

    def table(self, name: str, columns: list[str], rows: list[list]) -> None:
        self.f.write(json.dumps({"table": name, "columns": columns, "rows": rows}) + "\n")

    def image(self, name: str, path: str) -> None:
        self.f.write(json.dumps({"image": name, "path": str(path)}) + "\n")

    def close(self, failed: bool = False) -> None:
        self.f.close()


class WandbLogger:
    def __init__(self, cfg: LoggingConfig, run_dir: Path, config: dict, resume_id: str | None):
        import wandb  # imported only when W&B logging is on

        mode = cfg.wandb_mode
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        self.run = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, tags=cfg.wandb_tags,
                              config=config, dir=str(run_dir), mode=mode, id=resume_id,
                              resume="allow" if resume_id else None)
        self.id = self.run.id

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def summary(self, values: dict) -> None:
        for k, v in values.items():
            self.run.summary[k] = v

    def table(self, name: str, columns: list[str], rows: list[list]) -> None:
        import wandb  # only a W&B run gets here

        self.run.log({name: wandb.Table(columns=columns, data=rows)})

    def image(self, name: str, path: str) -> None:
        import wandb  # only a W&B run gets here

        self.run.log({name: wandb.Image(str(path))})

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else None)  # a run that raised is marked failed


class TensorBoardLogger:
    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.w = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, metrics: dict, step: int) -> None:
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                self.w.add_scalar(k, v, step)

    def summary(self, values: dict) -> None:
        self.w.add_text("summary", json.dumps(values), 0)

    def table(self, name: str, columns: list[str], rows: list[list]) -> None:
        self.w.add_text(name, json.dumps({"columns": columns, "rows": rows}), 0)

    def image(self, name: str, path: str) -> None:
        self.w.add_text(name, str(path), 0)  # the PNG stays a file; TensorBoard gets its path

    def close(self, failed: bool = False) -> None:
        self.w.close()


class Loggers:
    """Fan-out to every configured logger (rank 0 only; other ranks get an empty fan-out)."""

    def __init__(self, loggers: list):
        self.loggers = loggers

    @classmethod
    def build(cls, cfg: LoggingConfig, run_dir: Path, config: dict, is_main: bool,
              wandb_id: str | None = None) -> "Loggers":
        if not is_main:
            return cls([])
        out: list = [JsonlLogger(run_dir / "train_log.jsonl")]
        if cfg.wandb and cfg.wandb_mode != "disabled":
            out.append(WandbLogger(cfg, run_dir, config, wandb_id))
        if cfg.tensorboard:
            out.append(TensorBoardLogger(run_dir))
        return cls(out)

    @property
    def wandb_id(self) -> str | None:
        for lg in self.loggers:
            if isinstance(lg, WandbLogger):
                return lg.id
        return None

    def log(self, metrics: dict, step: int) -> None:
        for lg in self.loggers:
            lg.log(metrics, step)

    def summary(self, values: dict) -> None:
        for lg in self.loggers:
            lg.summary(values)

    def table(self, name: str, columns: list[str], rows: list[list]) -> None:
        for lg in self.loggers:
            lg.table(name, columns, rows)

    def image(self, name: str, path: str) -> None:
        for lg in self.loggers:
            lg.image(name, path)

    def close(self, failed: bool = False) -> None:
        for lg in self.loggers:
            lg.close(failed)
