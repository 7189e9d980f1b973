#!/usr/bin/env bash
# bigtrain with the `deepspeed` launcher.
#
#   launch/deepspeed.sh [--nproc N] [bigtrain overrides ...]          # this node only
#   launch/deepspeed.sh --hostfile hosts.txt [bigtrain overrides ...]  # hosts from a hostfile
#   CONFIG=configs/my_run.yaml launch/deepspeed.sh train.output_dir=runs/my_run
#
# Without a hostfile: `--num_nodes 1 --num_gpus $NPROC` on a GPU node; on a CPU-only node a
# hostfile `localhost slots=$NPROC` (NPROC default 2) is generated. A hostfile naming only
# localhost runs locally (no ssh: --no_ssh_check, master 127.0.0.1); one with several hosts is
# launched over pdsh/ssh by DeepSpeed as usual (passwordless ssh to every host needed; on Slurm
# prefer slurm/train_deepspeed.sbatch). Env: CONFIG, NPROC, HOSTFILE, MASTER_PORT (default 29500),
# PYTHON (default python), DEEPSPEED (a deepspeed command to run as it is instead). Other arguments
# are forwarded to `bigtrain train`.
#
# Stop signals on one node (launch/_deepspeed.py): Ctrl-C, or `kill` of the launcher, reaches the
# launcher alone, which passes it to each rank once; the ranks save at the next step boundary,
# however long that takes (plain `deepspeed` SIGKILLs them 30 s after Ctrl-C), and the launcher ends
# in one line, exit 130 (SIGTERM: 143). Ctrl-C again: the ranks stop at once.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

LOCAL=1
if [[ -n ${HOSTFILE:-} ]] && grep -Ev '^\s*(#|$)' "$HOSTFILE" | grep -Evq '^\s*(localhost|127\.0\.0\.1)(\s|$)'; then
  LOCAL=0   # other hosts: DeepSpeed's pdsh/ssh launch, its own signal handling
fi
if [[ -n ${DEEPSPEED:-} || $LOCAL == 0 ]]; then
  DS=("${DEEPSPEED:-deepspeed}")
else
  DS=("${PYTHON:-python}" "$(dirname "${BASH_SOURCE[0]}")/_deepspeed.py")
fi
DS+=(--master_port "${MASTER_PORT:-29500}")
if [[ -z ${HOSTFILE:-} && $(_gpu_count) -eq 0 ]]; then
  HOSTFILE=$(mktemp -t bigtrain-hostfile.XXXXXX)
  trap 'rm -f "$HOSTFILE"' EXIT
  echo "localhost slots=$NPROC" >"$HOSTFILE"
fi
if [[ -n ${HOSTFILE:-} ]]; then
  DS+=(--hostfile "$HOSTFILE")
  # only localhost in it: run locally, without the launcher's ssh check / `ssh host hostname -I`
  if ((LOCAL)); then DS+=(--no_ssh_check --master_addr 127.0.0.1); fi
else
  DS+=(--num_nodes 1 --num_gpus "$NPROC")
fi
# --no_local_rank: bigtrain reads LOCAL_RANK from the environment, it takes no --local_rank flag.
# (not exec: the EXIT trap removes a generated hostfile)
"${DS[@]}" --no_local_rank --module bigtrain "${BT_ARGS[@]}"
