#!/usr/bin/env bash
# `bigtrain measure` on H200s: LoRA against full fine-tuning with DeepSpeed ZeRO-3 (bf16, DeepSpeed's
# AdamW), GPT-3 6.7B and 13B, micro-batch 2, sequence 2048, with and without activation
# checkpointing; the "what LoRA saves" table in docs/results.md (bench/measure_table.py renders it).
# One phase per device call, each under 10 minutes:
#   OUT=DIR bash bench/measure_h200.sh 1gpu    one H200 (python -m bigtrain measure)
#   OUT=DIR bash bench/measure_h200.sh 2gpu    two H200s (torchrun --nproc_per_node 2)
# Wheels in a carried .whl/ are installed into /tmp/site first. Every job appends its measure.json to
# $OUT/measure_<phase>.jsonl and re-renders $OUT/measure_<phase>.md as soon as it ends, so a phase cut
# short keeps what finished; a job starts only if JOB_S seconds (default 150, about one job) remain
# before BUDGET_S (default 540) since the script started; the others are skipped and said so. The rest (each job's logs, per-rank JSON, charts) goes into $OUT/measure_<phase>.tgz.
# Files back: gpus.txt, <phase>.txt (console), measure_<phase>.{jsonl,md,tgz}, measure_<phase>.png.
set -uo pipefail
PHASE=${1:?usage: OUT=DIR bash bench/measure_h200.sh 1gpu|2gpu}
OUT=${OUT:?set OUT}
T0=$SECONDS
BUDGET_S=${BUDGET_S:-540}
JOB_S=${JOB_S:-150}
STEPS=${STEPS:-4}
MODE_TIMEOUT_S=${MODE_TIMEOUT_S:-150}
. bench/_device_env.sh  # H200 settings; carried wheels on PYTHONPATH
case $PHASE in
  1gpu) NPROC=1 ;;
  2gpu) NPROC=2 ;;
  *) echo "phase: 1gpu | 2gpu" >&2; exit 2 ;;
esac
WORK=$(mktemp -d)
LOG=$OUT/$PHASE.txt
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpus.txt" 2>&1 || true
echo "phase $PHASE: $NPROC GPU(s), $STEPS steps per mode, budget ${BUDGET_S}s" | tee "$LOG"

# data: random words that pack into rows of 2048 tokens (bench/scaling.py's generator), enough for
# STEPS steps at micro-batch 2 on every rank with 4x to spare
DATA=$WORK/train.jsonl
python3 - "$DATA" <<'PY' 2>&1 | tee -a "$LOG"
import sys
from pathlib import Path
sys.path.insert(0, "bench")
from scaling import write_data
write_data(Path(sys.argv[1]), 4 * 8 * 2 * 2 * 2048)
PY

# (preset, act. ckpt) in the order they matter: if the budget runs out, the tail is skipped.
# MODELS and EXTRA (overrides after the others) exist for a CPU dry run of this script:
#   MODELS=tiny-opt EXTRA="train.device=cpu data.max_length=64" STEPS=2 OUT=/tmp/m bash bench/measure_h200.sh 1gpu
JOBS=()
for preset in ${MODELS:-gpt3-6.7b gpt3-13b}; do
  JOBS+=("$preset true" "$preset false")
done
for job in "${JOBS[@]}"; do
  read -r preset ckpt <<<"$job"
  name=${preset#gpt3-}_$([ "$ckpt" = true ] && echo ckpt || echo nockpt)
  if (( SECONDS - T0 + JOB_S > BUDGET_S )); then
    echo "[$((SECONDS - T0))s] $name: skipped (less than ${JOB_S}s left of the ${BUDGET_S}s budget)" | tee -a "$LOG"
    continue
  fi
  echo "[$((SECONDS - T0))s] $name: $preset, act. ckpt $ckpt" | tee -a "$LOG"
  if (( NPROC == 1 )); then
    LAUNCH=(python3 -m bigtrain)
  else
    LAUNCH=(torchrun --standalone --nnodes=1 --nproc_per_node="$NPROC" -m bigtrain)
  fi
  "${LAUNCH[@]}" measure model.path=null "model.preset=$preset" model.dtype=bfloat16 \
      "data.train=$DATA" data.eval=null data.pack=true data.max_length=2048 \
      train.micro_batch_size=2 "model.gradient_checkpointing=$ckpt" "train.output_dir=$WORK/$name" \
      --steps "$STEPS" --modes lora,full-zero3 --mode-timeout-s "$MODE_TIMEOUT_S" \
      --out "$WORK/$name/measure" ${EXTRA:-} 2>&1 | tee -a "$LOG"
  if [ -f "$WORK/$name/measure/measure.json" ]; then
    python3 -c "import json,sys; print(json.dumps(json.load(open(sys.argv[1]))))" \
      "$WORK/$name/measure/measure.json" >> "$OUT/measure_$PHASE.jsonl"
    python3 bench/measure_table.py "$OUT/measure_$PHASE.jsonl" > "$OUT/measure_$PHASE.md"
    [ -f "$OUT/measure_$PHASE.png" ] || cp "$WORK/$name/measure/measure.png" "$OUT/measure_$PHASE.png"
  else
    echo "$name: no measure.json (see the log above)" | tee -a "$LOG"
    for f in "$WORK/$name"/measure/*/rank*.log; do
      [ -f "$f" ] && { echo "--- tail of $f"; tail -n 30 "$f"; } >> "$LOG"
    done
  fi
done
echo "[$((SECONDS - T0))s] done" | tee -a "$LOG"
[ -f "$OUT/measure_$PHASE.md" ] && cat "$OUT/measure_$PHASE.md"
tar czf "$OUT/measure_$PHASE.tgz" -C "$WORK" --exclude='*.safetensors' --exclude='*.pt' --exclude='train.jsonl' . || true
