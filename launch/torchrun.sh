#!/usr/bin/env bash
# Single-node bigtrain with torchrun (one process per GPU, or 2 gloo processes on CPU).
#
#   launch/torchrun.sh [--nproc N] [bigtrain overrides ...]
#   CONFIG=configs/my_run.yaml launch/torchrun.sh train.output_dir=runs/my_run
#   NPROC=2 launch/torchrun.sh model.preset=tiny-opt train.device=cpu train.max_steps=20
#
# Env: CONFIG (YAML file), NPROC (default: GPU count, else 2), PYTHON (default python; runs torchrun
# through launch/_torchrun.py), TORCHRUN (a torchrun command to run as it is instead).
# --standalone runs a local rendezvous on a free port, so several runs can share a machine.
# Every other argument is forwarded to `bigtrain train`. Multi-node: slurm/train_torchrun.sbatch.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
# Stop signals (launch/_torchrun.py): Ctrl-C reaches torchrun alone, which passes it to the workers;
# they save at the next step boundary (Ctrl-C again: at once). `kill` of torchrun is passed on too,
# and either ends in one line, not a traceback. TORCH_ELASTIC_SHUTDOWN_TIMEOUT (default here 1800 s;
# torch's own is 30) is how long torchrun waits for that save before SIGKILL. TORCHRUN=torchrun runs
# the plain command instead.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-1800}
if [[ -n ${TORCHRUN:-} ]]; then
  exec "$TORCHRUN" --standalone --nnodes=1 --nproc_per_node="$NPROC" -m bigtrain "${BT_ARGS[@]}"
fi
exec "${PYTHON:-python}" "$(dirname "${BASH_SOURCE[0]}")/_torchrun.py" --standalone --nnodes=1 \
  --nproc_per_node="$NPROC" -m bigtrain "${BT_ARGS[@]}"
