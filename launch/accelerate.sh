#!/usr/bin/env bash
# Single-node bigtrain with `accelerate launch` and launch/accelerate_deepspeed.yaml (DeepSpeed,
# ZeRO-3). accelerate exports RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT, which bigtrain reads.
#
#   launch/accelerate.sh [--nproc N] [bigtrain overrides ...]
#   CONFIG=configs/my_run.yaml launch/accelerate.sh train.output_dir=runs/my_run
#
# Env: CONFIG, NPROC (default: GPU count, else 2), ACCELERATE_CONFIG (default the yaml next to this
# script), MASTER_PORT (default 29500). Other arguments are forwarded to `bigtrain train`.
set -euo pipefail
HERE=$(dirname "${BASH_SOURCE[0]}")
source "$HERE/_common.sh"
exec accelerate launch --config_file "${ACCELERATE_CONFIG:-$HERE/accelerate_deepspeed.yaml}" \
  --num_processes "$NPROC" --main_process_port "${MASTER_PORT:-29500}" \
  -m bigtrain "${BT_ARGS[@]}"
