"""Where a step's GPU time goes: bigtrain's training step against FSDP2 + PEFT's, kernel by kernel.

Runs one contender per process under torchrun (1 GPU is enough to compare the compute paths),
warms up, profiles one optimizer step with ``torch.profiler`` and writes the CUDA kernels by total
time (``<out>/<contender>.txt``) and the step's wall time.

  torchrun --nproc_per_node 1 bench/profile_step.py bigtrain   --preset llama2-70b --num-layers 4 --out DIR
  torchrun --nproc_per_node 1 bench/profile_step.py fsdp2-peft --preset llama2-70b --num-layers 4 --out DIR

Both: bf16 base, random weights, sdpa, sequence --seq, micro-batch 1, activation checkpointing, LoRA
--lora-r on --lora-targets; bigtrain is the Trainer that ``bigtrain train`` runs (its own data,
packed), FSDP2 + PEFT is bench/scaling.py's worker recipe.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402


CUDA = torch.cuda.is_available()
sync = torch.cuda.synchronize if CUDA else (lambda: None)


def profile(step, out: Path, name: str, warmup: int = 2) -> None:
    for _ in range(warmup):
        step()
    sync()
    t0 = time.perf_counter()
    step()
    sync()
    wall = time.perf_counter() - t0
    # CPU too: the aten ops (with their input shapes) own the kernels they launch
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if CUDA else [])
    with torch.profiler.profile(activities=acts, record_shapes=True) as prof:
        step()
        sync()
    key = "cuda_time_total" if CUDA else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=90)
    total_us = sum((e.self_device_time_total if CUDA else e.self_cpu_time_total) for e in prof.key_averages())
    # the matrix products by operand shapes: which call runs slow
    mm = [e for e in prof.key_averages(group_by_input_shape=True) if e.key in ("aten::mm", "aten::bmm", "aten::addmm")]
    mm.sort(key=lambda e: -(e.device_time_total if CUDA else e.cpu_time_total))
    lines = [f"{e.key} {e.input_shapes} x{e.count}: {(e.device_time_total if CUDA else e.cpu_time_total) / 1000:.2f} ms"
             for e in mm[:30]]
    (out / f"{name}.txt").write_text(f"{name}: step wall {wall * 1000:.1f} ms; GPU kernel time {total_us / 1000:.1f} ms\n\n"
                                     + "\n".join(lines) + f"\n\n{table}\n")
    print(f"{name}: step wall {wall * 1000:.1f} ms; GPU kernel time {total_us / 1000:.1f} ms", flush=True)


def run_bigtrain(args, out: Path) -> None:
    from scaling import write_data

    from bigtrain.config import load_config
    from bigtrain.run import build_run
    from bigtrain.trainer import Trainer

    data = out / "train.jsonl"
    if int(os.environ.get("RANK", 0)) == 0:
        write_data(data, args.seq * 8)
    cfg = load_config(None, [
        "model.path=null", f"model.preset={args.preset}", f"model.num_layers={args.num_layers}",
        "model.dtype=bfloat16", "model.gradient_checkpointing=true", f"data.train={data}", "data.eval=null",
        "data.pack=true", f"data.max_length={args.seq}", "train.micro_batch_size=1", "train.max_steps=100",
        "checkpoint.every=0", "logging.progress_bar=false", f"lora.r={args.lora_r}",
        f"lora.targets=[{args.lora_targets}]", f"train.output_dir={out / 'run'}"]
        + ([] if CUDA else ["train.device=cpu"]))
    trainer = Trainer(build_run(cfg))
    batches = trainer.step_batches()
    profile(lambda: trainer.train_step(batches), out, "bigtrain")


def run_fsdp2(args, out: Path) -> None:
    import torch.distributed as dist
    from scaling import build_fsdp2_peft, model_config

    if CUDA:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", device_id=dev)
    else:
        dev = torch.device("cpu")
        dist.init_process_group("gloo")
    cfg = model_config(args.preset, args.num_layers)
    model = build_fsdp2_peft(cfg, True, args.lora_r, args.lora_targets.split(","), dev)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=CUDA)
    ids = torch.randint(3, cfg.vocab_size, (1, args.seq), device=dev)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    profile(step, out, "fsdp2-peft")
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("contender", choices=("bigtrain", "fsdp2-peft"))
    ap.add_argument("--preset", default="llama2-70b")
    ap.add_argument("--num-layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/profile"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (run_bigtrain if args.contender == "bigtrain" else run_fsdp2)(args, out)
    from bigtrain.dist import exit_after_teardown

    exit_after_teardown(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
