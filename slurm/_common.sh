# Sourced by slurm/*.sbatch (after `set -euo pipefail`): what the three batch scripts share.
# Consumes the script's arguments (bigtrain overrides; `--config FILE` works like CONFIG=FILE) and sets
#   PYTHON      default python
#   ARGS        the bigtrain argument list: $BT_COMMAND [--config $CONFIG] <overrides>
#               (BT_COMMAND: train, the default, or measure; BT_MEASURE_ARGS: bigtrain measure's own
#               options, e.g. "--steps 4 --modes lora,full-zero3", added after `measure`)
#               [train.output_dir=$OUTPUT_DIR when OUTPUT_DIR came from the environment]
#   OUTPUT_DIR  env, else resolved from the config file and the overrides exactly as bigtrain does
#   NODES, HEAD_NODE, HEAD_ADDR   the allocation's nodes, the first one, the address its slurmd is reached at
# exports the NCCL defaults, creates logs/, and defines
#   bt_gpus_per_node    sets GPUS_PER_NODE (env, else SLURM_GPUS_ON_NODE, else nvidia-smi, else 1)
#   bt_requeue_or_exit RC   requeue the job after a clean preemption exit; then exit RC

PYTHON=${PYTHON:-python}
mkdir -p logs   # for later jobs: Slurm opens --output before this line runs, so create it at submit too

bt_gpus_per_node() {
  if [[ -z ${GPUS_PER_NODE:-} ]]; then
    if [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then
      GPUS_PER_NODE=$SLURM_GPUS_ON_NODE
    elif command -v nvidia-smi >/dev/null && (( $(nvidia-smi -L 2>/dev/null | wc -l) > 0 )); then
      GPUS_PER_NODE=$(nvidia-smi -L | wc -l)
    else
      GPUS_PER_NODE=1   # CPU node: one gloo worker
    fi
  fi
}

# ---- config and output directory ---------------------------------------------------------------
# `--config FILE` among the arguments works like CONFIG=FILE
OVERRIDES=()
while (($#)); do
  case $1 in
    --config) CONFIG=$2; shift 2 ;;
    --config=*) CONFIG=${1#--config=}; shift ;;
    *) OVERRIDES+=("$1"); shift ;;
  esac
done
set -- "${OVERRIDES[@]}"
BT_COMMAND=${BT_COMMAND:-train}
case $BT_COMMAND in
  train) ARGS=(train) ;;
  measure) read -r -a ARGS <<<"measure ${BT_MEASURE_ARGS:-}" ;;
  *) echo "BT_COMMAND=$BT_COMMAND: use train or measure" >&2; exit 2 ;;
esac
[[ -n ${CONFIG:-} ]] && ARGS+=(--config "$CONFIG")
ARGS+=("$@")
if [[ -n ${OUTPUT_DIR:-} ]]; then
  ARGS+=("train.output_dir=$OUTPUT_DIR")
else
  # the output dir the trainer will use, resolved exactly as bigtrain does (file + overrides)
  # a bad config (a missing file, a typo) stops here in one line, before anything is launched
  OUTPUT_DIR=$("$PYTHON" - "${CONFIG:-}" "$@" <<'PY'
import sys
from bigtrain.config import ConfigError, load_config
try:
    print(load_config(sys.argv[1] or None, sys.argv[2:], validate=False).train.output_dir)
except ConfigError as e:
    sys.exit(f"bigtrain: config error: {e}")
PY
) || exit 2
fi

# The preemption marker bigtrain writes when a signal stops it: which one was there before this run
# (inode and mtime; none: empty), so that a marker this run wrote can be told from an old one.
bt_marker() { stat -c '%i %y' "$OUTPUT_DIR/preempted" 2>/dev/null || true; }
BT_MARKER_BEFORE=$(bt_marker)
# A site's preemption may SIGTERM the batch shell too: survive it, so that the requeue logic below
# runs once the ranks have saved (the trap is reset in the launched processes).
trap 'echo "SIGTERM: waiting for the ranks to save" >&2' TERM

# ---- the allocation's nodes --------------------------------------------------------------------
mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
HEAD_NODE=${NODES[0]}
# NodeAddr is what slurmd itself is reached at (often equal to the node name).
HEAD_ADDR=$(scontrol show node "$HEAD_NODE" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
HEAD_ADDR=${HEAD_ADDR:-$HEAD_NODE}

# ---- NCCL (ignored on CPU / gloo) ---------------------------------------------------------------
# Fail fast instead of hanging forever when one rank dies or a collective times out.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1}   # name used by torch < 2.2
# NVLink SHARP (NVLS) multicast needs fabric-manager/IMEX support that many clusters (and
# partitioned/MIG or container setups) lack; NCCL then errors or hangs at init. Off by default.
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
# Choose the network interface yourself if NCCL picks a wrong one, e.g.:
#   export NCCL_SOCKET_IFNAME=ib0      (or eth0, bond0 ...; GLOO_SOCKET_IFNAME for gloo)
# export NCCL_DEBUG=INFO               # prints the topology and transport NCCL chose

# ---- after training ----------------------------------------------------------------------------
bt_requeue_or_exit() {
  local rc=$1 fresh=0
  # bigtrain measure never writes the marker: a stale one from a training run must not requeue it
  [[ $BT_COMMAND == train ]] || exit "$rc"
  [[ -f $OUTPUT_DIR/preempted && "$(bt_marker)" != "$BT_MARKER_BEFORE" ]] && fresh=1
  # Requeue only a clean preemption exit: a rerun that failed (bad node, OOM, a config or checkpoint
  # error) while an old `preempted` marker was still there must not requeue itself forever. A marker
  # this run wrote is a clean preemption even when the launcher's own exit code is not 0: torchrun
  # and the deepspeed launcher end with an error on SIGTERM, after their ranks have saved.
  if [[ -f $OUTPUT_DIR/preempted && ( $rc -eq 0 || $fresh -eq 1 ) ]]; then
    (( rc == 0 )) || echo "the launcher exited $rc after the ranks saved and marked the run preempted"
    echo "preempted at step $(cat "$OUTPUT_DIR/preempted"); requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"   # the rerun resumes from $OUTPUT_DIR/checkpoints/latest
    exit 0
  elif [[ -f $OUTPUT_DIR/preempted ]]; then
    echo "training exited $rc; not requeueing (fix the cause, then resubmit: it resumes from" \
         "$OUTPUT_DIR/checkpoints/latest)" >&2
  fi
  exit "$rc"
}
