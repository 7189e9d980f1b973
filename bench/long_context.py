"""Long context on one GPU: bigtrain (exactly what a user runs, model.tiled_mlp and
model.offload_activations at auto) against FSDP2 + PEFT with plain activation checkpointing.

Jobs run one after another, each in its own process with a fresh output directory and a timeout, in
the order given; a job starts only while its expected seconds fit in what is left of ``--budget-s``
(counted from this script's start), else it is skipped and said so. A job is
``NAME=CONTENDER,SEQ,LAYERS,STEPS,EXPECT_S[,KEY=VALUE...]``:

* ``bigtrain``: ``torchrun -m bigtrain train model.path=null model.preset=MODEL model.dtype=bfloat16
  data.pack=true data.max_length=SEQ train.micro_batch_size=1 lora.r=16 lora.targets=[q,k,v,o]``
  (model.compile=false: at these lengths attention dominates and compiling would cost device time),
  LAYERS > 0 as model.num_layers, extra ``KEY=VALUE`` overrides appended. tokens/s of the last step
  (train_log.jsonl); peak = ranks.json ``gpu_peak_allocated_bytes`` (torch.cuda.max_memory_allocated
  over the run); the run's own line comparing it with the estimate; the plan line it printed.
* ``fsdp2``: bench/scaling.py's FSDP2 + PEFT worker (PEFT LoRA with the same r and targets, bf16
  base, ``fully_shard`` per layer, the model's own loss, HF non-reentrant activation checkpointing),
  1 warm-up step then STEPS timed (``warmup=0`` among the extras: none, the one step timed cold);
  peak = torch.cuda.max_memory_allocated after the build.

Data (bigtrain): random words packed into rows of SEQ tokens (bench/scaling.py's write_data), written
once for the largest job. The baseline draws random token ids.

  OUT=DIR python bench/long_context.py --model llama2-7b --budget-s 560 \\
      bt32k=bigtrain,32768,0,3,70 fs32k=fsdp2,32768,0,2,60
  python bench/long_context.py --cpu --model tiny-llama t=bigtrain,256,0,2,60 f=fsdp2,256,0,1,60   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def parse_job(spec: str) -> dict:
    name, _, rest = spec.partition("=")
    parts = rest.split(",")
    contender, seq, layers, steps, expect = parts[:5]
    return {"name": name, "contender": contender, "seq": int(seq), "layers": int(layers), "steps": int(steps),
            "expect_s": float(expect), "extra": parts[5:]}


def bigtrain_cmd(job: dict, model: str, data: Path, out: Path, cpu: bool, port: int) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(port),
           "-m", "bigtrain", "train", "model.path=null", f"model.preset={model}",
           f"model.dtype={'float32' if cpu else 'bfloat16'}", f"data.train={data}", "data.eval=null",
           "data.pack=true", f"data.max_length={job['seq']}", "train.micro_batch_size=1",
           f"train.max_steps={job['steps']}", "train.warmup_steps=1", "train.log_every=1", "checkpoint.every=0",
           "train.sample_prompts=0", "logging.progress_bar=false", "model.compile=false", "lora.r=16",
           f"lora.targets=[{','.join(TARGETS)}]", f"train.output_dir={out}"]
    if job["layers"]:
        cmd.append(f"model.num_layers={job['layers']}")
    if cpu:
        cmd.append("train.device=cpu")
    return cmd + job["extra"]


def fsdp2_cmd(job: dict, model: str, out: Path, cpu: bool, port: int) -> list[str]:
    warmup = 1
    for kv in job["extra"]:  # warmup=0: one timed step only (a cold one), for a length that may not fit
        key, _, value = kv.partition("=")
        if key != "warmup":
            raise SystemExit(f"fsdp2 job {job['name']}: unknown setting {kv!r} (only warmup=N)")
        warmup = int(value)
    w = {"model": model, "contender": "fsdp2-peft", "gpus": 1, "ckpt": True, "mb": 1, "seq": job["seq"],
         "steps": job["steps"], "warmup": warmup, "cpu": cpu, "r": 16, "targets": TARGETS,
         "layers": job["layers"] or None, "result_file": str(out / "result.json")}
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(port),
            str(ROOT / "bench" / "scaling.py"), "--worker", json.dumps(w)]


def collect_bigtrain(out: Path, log: str) -> dict:
    row = {}
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()] if (
        out / "train_log.jsonl").exists() else []
    steps = [r for r in rows if "tokens_per_s" in r]
    if steps:
        row["tokens_per_s"] = steps[-1]["tokens_per_s"]
        row["tokens_per_s_all"] = [round(r["tokens_per_s"], 1) for r in steps]
        row["loss"] = steps[-1]["loss"]
    if (out / "ranks.json").exists():
        rk = json.loads((out / "ranks.json").read_text())[0]
        row["peak_gib"] = rk["gpu_peak_allocated_bytes"] / 2**30 if rk["gpu_peak_allocated_bytes"] else None
        row["host_peak_rss_gib"] = rk["host_peak_rss_bytes"] / 2**30
        row["adapter_sha256"] = rk["adapter_sha256"]
    m = re.search(r"the estimate for this LoRA run was ([0-9.]+ [KMG]iB) \(([-+0-9.]+%)\)", log)
    if m:
        row["estimate"], row["estimate_vs_measured"] = m.group(1), m.group(2)
    m = re.search(r"\[bigtrain\] (activation checkpointing: .*)", log)
    if m:
        row["plan"] = m.group(1)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("jobs", nargs="+", help="NAME=CONTENDER,SEQ,LAYERS,STEPS,EXPECT_S[,KEY=VALUE...]")
    ap.add_argument("--model", default="llama2-7b")
    ap.add_argument("--budget-s", type=float, default=560.0)
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT") or "bench/results/long_context")
    args = ap.parse_args(argv)
    start = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [parse_job(s) for s in args.jobs]
    data = Path("/tmp/bt_long_data.jsonl")
    need = max((j["seq"] * (j["steps"] + 1) for j in jobs if j["contender"] == "bigtrain"), default=0)
    if need and not data.exists():
        from scaling import write_data

        write_data(data, need)
    from scaling import free_port

    results = out / "results.jsonl"
    for job in jobs:
        left = args.budget_s - (time.monotonic() - start)
        row = {k: job[k] for k in ("name", "contender", "seq", "layers", "steps")}
        row["model"] = args.model
        if left < job["expect_s"]:
            row["status"] = f"skipped: {left:.0f} s left of the budget, expected {job['expect_s']:.0f}"
            print(f"[long_context] {job['name']}: {row['status']}", flush=True)
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            continue
        run_dir = out / job["name"]
        run_dir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        cmd = (bigtrain_cmd(job, args.model, data, Path("/tmp/bt_long_runs") / job["name"], args.cpu, port)
               if job["contender"] == "bigtrain" else fsdp2_cmd(job, args.model, run_dir, args.cpu, port))
        t0 = time.monotonic()
        timeout = max(30.0, left - 5)
        env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
        try:
            p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
                               env=env, cwd=ROOT)
            log, rc = p.stdout, p.returncode
        except subprocess.TimeoutExpired as e:
            log, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
        row["wall_s"] = round(time.monotonic() - t0, 1)
        (run_dir / "log.txt").write_text(log)
        row["rc"] = rc
        oom = "OutOfMemoryError" in log or "CUDA out of memory" in log or "out of memory" in log
        row["status"] = "ok" if rc == 0 else ("OOM" if oom else f"failed ({rc})")
        if job["contender"] == "bigtrain":
            row.update(collect_bigtrain(Path("/tmp/bt_long_runs") / job["name"], log))
            for f in ("train_log.jsonl", "ranks.json"):
                src = Path("/tmp/bt_long_runs") / job["name"] / f
                if src.exists():
                    (run_dir / f).write_text(src.read_text())
        elif (run_dir / "result.json").exists():
            res = json.loads((run_dir / "result.json").read_text())
            row.update({"tokens_per_s": res["tokens_per_s_per_gpu"], "step_ms": res["step_ms"],
                        "peak_gib": res["peak_gib"], "loss": res["losses"][-1]})
        print(f"[long_context] {json.dumps(row)}", flush=True)
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
