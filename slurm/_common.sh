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
#   bt_run_step srun ...    run the training step (own process group; stop signals to the batch
#                           shell are forwarded to it as USR1); sets rc
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

# ---- signals to the batch shell ----------------------------------------------------------------
# A site's preemption may signal the batch shell too: `scancel --signal=TERM --full` (or -f with
# USR1/INT) signals the batch shell's process group, `--batch` (and `--signal=B:...`) the shell
# alone; neither signals the training step's ranks. Untrapped, USR1 and INT kill the shell (the job
# ends FAILED 0:10 / 0:2 and is not requeued), and srun, in the shell's process group, turns a
# TERM into a SIGKILL of its step ("srun: forcing job termination": nothing saved, FAILED 137:0).
# So bt_run_step starts srun in its own process group (setsid: out of reach of --full), and the shell
# traps TERM, USR1 and INT and forwards each as USR1 to srun, which passes it to every task: the
# ranks save at the next step boundary and exit 0 (the launchers in between ignore USR1), and
# bt_requeue_or_exit requeues. USR1, never the signal itself: srun would kill the step on TERM, and
# bigtrain takes a second INT as "stop at once". (The traps are reset in the launched processes.)
#
# Run interactively (`salloc ... bash slurm/train_srun.sbatch ...`: not a batch job, so Ctrl-C is a
# person's), the first Ctrl-C is forwarded the same way (the ranks save and stop; the job is not
# requeued: rerun the command to resume) and a second one stops the step at once: srun's own double
# Ctrl-C, whose SIGINT bigtrain takes as "stop at once". A Ctrl-C straight to an interactive srun
# cannot save: srun answers a double Ctrl-C with SIGINT and at once SIGKILL (docs/cluster.md).
BT_STEP_PID=''     # the srun of bt_run_step while it runs
BT_PENDING=''      # a signal that came while no step ran (before it started)
BT_SIGNALLED=0
BT_STOP_SIG=''     # the first stop signal forwarded to the step
BT_INTERACTIVE=0
[[ ${ENVIRONMENT:-} == BATCH ]] || BT_INTERACTIVE=1
export BIGTRAIN_SLURM_SCRIPT=1   # the ranks know a script forwards their stop signals
bt_on_signal() {
  BT_SIGNALLED=1
  if [[ -n $BT_STEP_PID ]] && kill -0 "$BT_STEP_PID" 2>/dev/null && (( BT_INTERACTIVE )) \
      && [[ $1 == INT && -n $BT_STOP_SIG ]]; then
    echo "bigtrain: second Ctrl-C: stopping the training step at once (the last checkpoint stays)" >&2
    kill -s INT "$BT_STEP_PID" 2>/dev/null || true   # srun: a double Ctrl-C within a second
    sleep 0.2
    kill -s INT "$BT_STEP_PID" 2>/dev/null || true
  elif [[ -n $BT_STEP_PID ]] && kill -0 "$BT_STEP_PID" 2>/dev/null; then
    BT_STOP_SIG=${BT_STOP_SIG:-$1}
    if (( BT_INTERACTIVE )); then
      echo "bigtrain: SIG$1: forwarded to the training step as SIGUSR1 (the ranks save at the next step" \
           "boundary and stop; Ctrl-C again to stop at once)" >&2
    else
      echo "bigtrain: the batch shell got SIG$1: forwarded to the training step as SIGUSR1 (the ranks" \
           "save at the next step boundary, then the job is requeued)" >&2
    fi
    kill -s USR1 "$BT_STEP_PID" 2>/dev/null || true
  else
    echo "bigtrain: the batch shell got SIG$1 while no training step runs" >&2
    BT_PENDING=$1
  fi
}
for _sig in TERM USR1 INT; do trap "bt_on_signal $_sig" "$_sig"; done
unset _sig

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

# ---- the training step --------------------------------------------------------------------------
# bt_run_step srun ARGS...   runs the step in its own process group and waits for it, staying
# responsive to the traps above; sets rc to its exit status. A stop signal that came before it
# started (nothing launched, nothing to save): the step is not started, and a training job is
# requeued as after a preemption (it resumes from checkpoints/latest, if any).
bt_run_step() {
  local r=0 r2
  if [[ -n $BT_PENDING ]]; then
    echo "bigtrain: SIG$BT_PENDING before the training step started: not starting it" >&2
    if [[ $BT_COMMAND == train ]]; then
      echo "preempted before training started; requeueing job $SLURM_JOB_ID"
      scontrol requeue "$SLURM_JOB_ID"
      exit 0
    fi
    exit $((128 + $(kill -l "$BT_PENDING")))
  fi
  BT_SIGNALLED=0
  setsid "$@" &   # not a process-group leader here (no job control), so setsid execs srun: $! is srun
  BT_STEP_PID=$!
  wait "$BT_STEP_PID" || r=$?
  # `wait` returns early (> 128) when a trapped signal arrives: wait again for the step's own status;
  # 127 (no such child): the step had ended just before the signal, and r was its status
  while (( r > 128 && BT_SIGNALLED )); do
    BT_SIGNALLED=0 r2=0
    wait "$BT_STEP_PID" 2>/dev/null || r2=$?
    (( r2 == 127 )) && break
    r=$r2
  done
  BT_STEP_PID=''
  rc=$r
}

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
  if (( BT_INTERACTIVE )); then
    # not a batch job (salloc, plain bash): nothing to requeue; a stop is a person's, or the
    # allocation's end
    local how=${BT_STOP_SIG:+ by SIG$BT_STOP_SIG}
    if (( fresh )); then
      echo "bigtrain: stopped$how at step $(cat "$OUTPUT_DIR/preempted"), saved; run the same command" \
           "again to resume from $OUTPUT_DIR/checkpoints/latest" >&2
    elif [[ -n $BT_STOP_SIG ]]; then
      echo "bigtrain: stopped$how; nothing new saved ($OUTPUT_DIR/checkpoints/latest, if any, is intact)" >&2
    fi
    [[ -n $BT_STOP_SIG ]] && exit $((128 + $(kill -l "$BT_STOP_SIG")))
    exit "$rc"
  fi
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
