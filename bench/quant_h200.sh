#!/usr/bin/env bash
# model.quantize on H200s, one phase per device call (each under 10 minutes), baselines in the same
# call: bigtrain with a bf16 base, an int8 base and an nf4 base (bench/scaling.py contenders
# bigtrain, bigtrain-int8, bigtrain-nf4), GPT-3 6.7B and 13B (random bases), sequence 2048,
# micro-batch 2, LoRA r=8 on q,v, activation checkpointing on.
#   bash bench/quant_h200.sh 2gpu   the dequantization kernels (bench/quant_gpu.py; a difference from
#                                   the CPU's values stops the phase), then on 2 GPUs: 6.7B for 50
#                                   steps (the loss curves), 13B for 15
#   bash bench/quant_h200.sh 1gpu   on 1 GPU, 15 steps each (two 1-GPU jobs at a time on 2 GPUs)
#   bash bench/quant_h200.sh all    both (about 8 minutes on 2 H200s)
#   bash bench/quant_h200.sh runs   1 and 2 GPUs, 15 steps each, no kernel check (about 6 minutes)
#   bash bench/quant_h200.sh 70b    Llama-2-70B, nf4 and int8, 2 GPUs: PEFT's ZeRO-3 + QLoRA example's job
# Every phase writes under $OUT (a clean directory each call) and tars what it wrote.
set -euo pipefail
OUT=${OUT:?set OUT}
. bench/_device_env.sh  # H200 settings; carried wheels on PYTHONPATH
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpus.txt" || true
G=${1:?phase: all, 1gpu or 2gpu}
C="--contenders bigtrain,bigtrain-int8,bigtrain-nf4 --ckpt on --mb 2 --seq 2048"
run() {  # GPUs, model, steps after bigtrain's 3 skipped ones
  python3 bench/scaling.py --models "$2" $C --gpus "$1" --steps "$3" --job-timeout 150 --out "$OUT/q_$2_g$1" 2>&1 | tee -a "$OUT/$G.txt"
}
case "$G" in
  all|2gpu)
    # the kernels first: a GPU result that differs from the CPU's stops the phase
    python3 bench/quant_gpu.py --out "$OUT" 2>&1 | tee "$OUT/quant_gpu.txt"
    [ "${PIPESTATUS[0]}" = 0 ] || { echo "dequantization kernels differ from the CPU: stopped" | tee -a "$OUT/$G.txt"; exit 1; }
    run 2 gpt3-6.7b 47; run 2 gpt3-13b 12
    [ "$G" = all ] && { run 1 gpt3-6.7b 12; run 1 gpt3-13b 12; } ;;
  1gpu) run 1 gpt3-6.7b 12; run 1 gpt3-13b 12 ;;
  runs) run 2 gpt3-6.7b 12; run 2 gpt3-13b 12; run 1 gpt3-6.7b 12; run 1 gpt3-13b 12 ;;
  70b)  # PEFT's documented ZeRO-3 + QLoRA job: Llama-2-70B on 2 GPUs, micro-batch 2, sequence 2048,
        # LoRA r=8 on every linear layer, activation checkpointing; nf4 and int8 bases
    python3 bench/scaling.py --models llama2-70b --contenders bigtrain-nf4,bigtrain-int8 --ckpt on --mb 2 --seq 2048 \
      --lora-r 8 --lora-targets all-linear --gpus 2 --steps 3 --job-timeout 270 --out "$OUT/q_70b_g2" 2>&1 | tee -a "$OUT/$G.txt" ;;
  *) echo "phase: all | 1gpu | 2gpu | runs | 70b" >&2; exit 2 ;;
esac
tar czf "$OUT/$G.tgz" -C "$OUT" --exclude='*.safetensors' --exclude='*.tgz' --exclude="$G.txt" . || true
