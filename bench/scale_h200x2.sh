#!/usr/bin/env bash
# The scale runs of bench/scale.py on 2 H200s, one phase per device call (each under 10 minutes).
# Every phase writes under $OUT (a clean directory each call) and tars what it wrote.
#   bash bench/scale_h200x2.sh 70b       Llama-2-70B shape, seq 8192, LoRA r=16 q,k,v,o, AC, mb 1:
#                                        bigtrain vs FSDP2 + PEFT (bench/scaling.py)
#   bash bench/scale_h200x2.sh resume    the same bigtrain run: checkpoint at step 2, resume to 3
#   bash bench/scale_h200x2.sh 175b      GPT-3 175B width, as many layers as the estimator fits on
#                                        2 GPUs (r=4 q,v, seq 2048, AC, mb 1): bigtrain
#   bash bench/scale_h200x2.sh 1gpu      one H200: Llama-2-70B's layers cut to 36 (bigtrain vs FSDP2 +
#                                        PEFT) and the 175B width at the depth one GPU holds
set -euo pipefail
OUT=${OUT:?set OUT}
. bench/_device_env.sh  # H200 settings; carried wheels on PYTHONPATH
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpus.txt" || true
LLAMA="--lora-r 16 --lora-targets q_proj,k_proj,v_proj,o_proj --seq 8192 --mb 1"
case "$1" in
  70b)
    python3 bench/scaling.py --models llama2-70b --contenders bigtrain,fsdp2-peft --gpus 2 --ckpt on \
      --steps 3 --job-timeout 280 $LLAMA --out "$OUT/s70b" 2>&1 | tee "$OUT/70b.txt" ;;
  resume)
    python3 bench/scale.py resume llama2-70b --gpus 2 $LLAMA --steps 2 --out "$OUT/resume" 2>&1 | tee "$OUT/resume.txt"
    rm -rf "$OUT/resume/run/checkpoints/"*/optimizer* 2>/dev/null || true ;;
  175b)
    L=$(python3 bench/scale.py fit gpt3-175b --gpus 2 --seq 2048 --lora-r 4 --lora-targets q_proj,v_proj --headroom 0.88)
    echo "layers: $L" | tee "$OUT/175b.txt"
    python3 bench/scaling.py --models gpt3-175b --num-layers "$L" --contenders bigtrain --gpus 2 --ckpt on \
      --steps 3 --mb 1 --seq 2048 --lora-r 4 --lora-targets q_proj,v_proj --job-timeout 500 --out "$OUT/s175b" 2>&1 | tee -a "$OUT/175b.txt" ;;
  1gpu)  # one H200: the 70B layer shape cut to 36 layers (bigtrain vs FSDP2 + PEFT), and the 175B
         # width at the depth one GPU holds
    python3 bench/scaling.py --models llama2-70b --num-layers 36 --contenders bigtrain,fsdp2-peft --gpus 1 --ckpt on \
      --steps 3 --job-timeout 240 $LLAMA --out "$OUT/s70b_l36" 2>&1 | tee "$OUT/1gpu.txt"
    L=$(python3 bench/scale.py fit gpt3-175b --gpus 1 --seq 2048 --lora-r 4 --lora-targets q_proj,v_proj --headroom 0.88)
    python3 bench/scaling.py --models gpt3-175b --num-layers "$L" --contenders bigtrain --gpus 1 --ckpt on \
      --steps 3 --mb 1 --seq 2048 --lora-r 4 --lora-targets q_proj,v_proj --job-timeout 240 --out "$OUT/s175b_g1" 2>&1 | tee -a "$OUT/1gpu.txt" ;;
  *) echo "phase: 70b | resume | 175b | 1gpu" >&2; exit 2 ;;
esac
tar czf "$OUT/$1.tgz" -C "$OUT" --exclude='*.safetensors' --exclude='*.tgz' . || true
