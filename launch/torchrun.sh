#!/usr/bin/env bash
# Single-node bigtrain with torchrun (one process per GPU, or 2 gloo processes on CPU).
#
#   launch/torchrun.sh [--nproc N] [bigtrain overrides ...]
#   CONFIG=configs/my_run.yaml launch/torchrun.sh train.output_dir=runs/my_run
#   NPROC=2 launch/torchrun.sh model.preset=tiny-opt train.device=cpu train.max_steps=20
#
# Env: CONFIG (YAML file), NPROC (default: GPU count, else 2), TORCHRUN (default torchrun).
# --standalone runs a local rendezvous on a free port, so several runs can share a machine.
# Every other argument is forwarded to `bigtrain train`. Multi-node: slurm/train_torchrun.sbatch.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
exec "${TORCHRUN:-torchrun}" --standalone --nnodes=1 --nproc_per_node="$NPROC" \
  -m bigtrain "${BT_ARGS[@]}"
