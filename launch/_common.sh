# Sourced by launch/*.sh: NPROC resolution and the `bigtrain train` argument list.
# Sets NPROC (--nproc N / --nproc=N flag, else $NPROC, else the GPU count, else 2 on CPU),
# BT_ARGS ($BT_COMMAND [--config $CONFIG] <remaining args>; BT_COMMAND: train, the default, or
# measure, whose own options such as --steps pass through with the overrides).

_gpu_count() {
  if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi -L 2>/dev/null | wc -l; else echo 0; fi
}

BT_REST=()
while (($#)); do
  case $1 in
    --nproc) NPROC=$2; shift 2 ;;
    --nproc=*) NPROC=${1#--nproc=}; shift ;;
    --hostfile) HOSTFILE=$2; shift 2 ;;
    --hostfile=*) HOSTFILE=${1#--hostfile=}; shift ;;
    *) BT_REST+=("$1"); shift ;;
  esac
done
if [[ -z ${NPROC:-} ]]; then
  NPROC=$(_gpu_count)
  ((NPROC > 0)) || NPROC=2   # CPU: two gloo processes
fi
BT_ARGS=("${BT_COMMAND:-train}")
[[ -n ${CONFIG:-} ]] && BT_ARGS+=(--config "$CONFIG")
BT_ARGS+=("${BT_REST[@]}")
