#!/usr/bin/env bash
# bigtrain with no flags (model.compile and model.gradient_checkpointing at their default, auto)
# against FSDP2 + PEFT, eager and with each decoder layer compiled (torchtune's recipe), each with
# activation checkpointing off and on: one model per call, all in one lease. Llama shapes (vocabulary
# 32,000, a multiple of 64: no contender pads), sequence 4096, micro-batch 2, LoRA r=16 on q,k,v,o,
# bf16, random preset, one H200. bigtrain runs first: if it fails, the baselines are not run.
#   OUT=DIR bash bench/fast_default_h200.sh llama2-7b [--mb N] [--bigtrain-only] [--baseline-ac off|on|off,on]
set -uo pipefail
OUT=${OUT:?set OUT}
. bench/_device_env.sh  # H200 settings; carried wheels on PYTHONPATH
M=${1:-llama2-7b}; shift || true
MB=2; ONLY=0; BAC=off,on
while [ $# -gt 0 ]; do
  case $1 in --mb) MB=$2; shift 2;; --bigtrain-only) ONLY=1; shift;; --baseline-ac) BAC=$2; shift 2;;
    *) echo "unknown $1"; exit 2;; esac
done
D=$OUT/${M}_mb$MB
COMMON=(--models "$M" --gpus 1 --seq 4096 --mb "$MB" --lora-r 16 --lora-targets q_proj,k_proj,v_proj,o_proj
        --steps 6 --job-timeout 240)
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
python3 bench/scaling.py "${COMMON[@]}" --contenders bigtrain --ckpt auto --out "$D/bigtrain"
if ! grep -q '"status": "ok"' "$D/bigtrain/scaling.jsonl"; then
  echo "bigtrain failed: baselines not run"; tail -40 "$D"/bigtrain/logs/*.txt; exit 1
fi
[ "$ONLY" = 1 ] && exit 0
python3 bench/scaling.py "${COMMON[@]}" --contenders fsdp2-peft,fsdp2-peft-compile --ckpt "$BAC" --out "$D/baselines"
python3 bench/scaling.py --render "$D/bigtrain/scaling.jsonl" "$D/baselines/scaling.jsonl" --out "$D"
