#!/usr/bin/env bash
# model.quantize on H200s, one phase per device call (each under 10 minutes), baselines in the same
# call: bigtrain with a bf16 base, an int8 base and an nf4 base (bench/scaling.py contenders
# bigtrain, bigtrain-int8, bigtrain-nf4), GPT-3 6.7B and 13B (random bases), sequence 2048,
# micro-batch 2, LoRA r=8 on q,v, activation checkpointing on.
#   bash bench/quant_h200.sh 2gpu   the dequantization kernels (bench/quant_gpu.py), then on 2 GPUs:
#                                   6.7B for 50 steps (the loss curves), 13B for 15
#   bash bench/quant_h200.sh 1gpu   the same on 1 GPU (two 1-GPU jobs at a time on a 2-GPU machine)
# Every phase writes under $OUT (a clean directory each call) and tars what it wrote.
set -euo pipefail
OUT=${OUT:?set OUT}
export TORCH_CUDA_ARCH_LIST=9.0 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
if [ -d .whl ] && ! python3 -c "import deepspeed" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpus.txt" || true
G=${1:?phase: 1gpu or 2gpu}
C="--contenders bigtrain,bigtrain-int8,bigtrain-nf4 --ckpt on --mb 2 --seq 2048"
case "$G" in
  2gpu) python3 bench/quant_gpu.py --out "$OUT" 2>&1 | tee "$OUT/quant_gpu.txt" || true; N=2 ;;
  1gpu) N=1 ;;
  *) echo "phase: 1gpu | 2gpu" >&2; exit 2 ;;
esac
python3 bench/scaling.py --models gpt3-6.7b $C --gpus $N --steps 47 --job-timeout 150 --out "$OUT/q67_g$N" 2>&1 | tee "$OUT/$G.txt"
python3 bench/scaling.py --models gpt3-13b $C --gpus $N --steps 12 --job-timeout 150 --out "$OUT/q13_g$N" 2>&1 | tee -a "$OUT/$G.txt"
tar czf "$OUT/$G.tgz" -C "$OUT" --exclude='*.safetensors' --exclude='*.tgz' . || true
