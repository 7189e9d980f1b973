#!/usr/bin/env bash
# The LoRA paper's own job on one H200: GPT-3 175B (96 layers, d_model 12,288; a random base built
# straight into partitions), its nf4-quantized base (model.quantize=nf4), LoRA r=4 on q_proj and
# v_proj, activation checkpointing, sequence 2048, micro-batch 1, bf16 compute; exactly what a user
# runs (torchrun -m bigtrain train). Phases, each with its own log under $OUT:
#   estimate   bigtrain estimate for this job (GPU and host rows) and for full fine-tuning
#   train      steps 1-20, saved at step 20 as a time-boxed job stops (train.stop_at_step=20)
#   resume     the same command again: resumes from step 20, trains to 30, saves
#   export     bigtrain export --format peft of the last checkpoint
#   ckpt       a saved checkpoint read the same way: a random Llama-2-7B written with save_pretrained
#              (13.5 GB, bf16), then 5 steps with model.path=it and model.quantize=nf4 (build time and
#              host peak RSS of a checkpoint read slice by slice, layer by layer)
# Host memory is the rank's own peak RSS, printed by the run ("base built ...") and in ranks.json.
#   OUT=DIR bash bench/gpt3_175b_h200.sh [phases...]   (default: all four, about 6 minutes)
# A CPU dry run of the same flow: PRESET=gpt3-small EXTRA="model.num_layers=2 data.max_length=128
# train.device=cpu" OUT=/tmp/o bash bench/gpt3_175b_h200.sh
set -uo pipefail
OUT=${OUT:?set OUT}
. bench/_device_env.sh
PHASES=${*:-estimate train resume export ckpt}
RUN=/tmp/gpt3-175b-run  # the checkpoints stay on the device's disk; logs and JSON go to $OUT
{ nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader; grep -E "MemTotal|MemAvailable" /proc/meminfo
  nproc; python3 -c "import torch, transformers, deepspeed; print(torch.__version__, transformers.__version__, deepspeed.__version__)"; } > "$OUT/env.txt" 2>&1
PRESET=${PRESET:-gpt3-175b}
JOB=(model.path=null "model.preset=$PRESET" model.dtype=bfloat16 model.quantize=nf4 model.gradient_checkpointing=true
     lora.r=4 'lora.targets=[q_proj,v_proj]' data.pack=true data.max_length=2048 data.eval=null
     train.micro_batch_size=1 train.max_steps=30 train.warmup_steps=5 train.lr=${LR:-2e-4} train.log_every=1 train.sample_prompts=0
     checkpoint.every=10 logging.progress_bar=false "train.output_dir=$RUN" ${EXTRA:-})
for ph in $PHASES; do
  case "$ph" in
    estimate) python3 -m bigtrain estimate "$PRESET" --gpus-per-node 1 --quantize nf4 --gpu-mem-gib 139 > "$OUT/estimate.txt" 2>&1
              python3 -m bigtrain estimate "$PRESET" --gpus-per-node 1 --quantize nf4 --gpu-mem-gib 139 --json > "$OUT/estimate.json" 2>/dev/null ;;
    train)    rm -rf "$RUN"
              timeout 420 torchrun --nproc_per_node 1 -m bigtrain train "${JOB[@]}" train.stop_at_step=20 > "$OUT/train.txt" 2>&1
              echo "rc $?" >> "$OUT/train.txt" ;;
    resume)   timeout 300 torchrun --nproc_per_node 1 -m bigtrain train "${JOB[@]}" > "$OUT/resume.txt" 2>&1
              echo "rc $?" >> "$OUT/resume.txt" ;;
    export)   python3 -m bigtrain export "$RUN" --format peft "$RUN/peft" > "$OUT/export.txt" 2>&1; ls -la "$RUN/peft" "$RUN"/checkpoints/* >> "$OUT/export.txt" 2>&1
              cat "$RUN/peft/adapter_config.json" >> "$OUT/export.txt" 2>&1 ;;
    ckpt)     python3 - > "$OUT/ckpt.txt" 2>&1 <<'PY'
import time, torch, transformers as tf
from bigtrain.presets import hf_config_for
t = time.time()
with torch.device("cuda"):
    m = tf.AutoModelForCausalLM.from_config(hf_config_for("llama2-7b"), dtype=torch.bfloat16)
m.save_pretrained("/tmp/llama2-7b-random")
print(f"checkpoint written in {time.time() - t:.0f} s")
PY
              timeout 240 torchrun --nproc_per_node 1 -m bigtrain train model.path=/tmp/llama2-7b-random model.tokenizer=builtin \
                model.dtype=bfloat16 model.quantize=nf4 model.gradient_checkpointing=true \
                data.pack=true data.max_length=4096 data.eval=null train.micro_batch_size=2 train.max_steps=5 \
                train.log_every=1 train.sample_prompts=0 checkpoint.every=0 logging.progress_bar=false \
                train.output_dir=/tmp/llama-ckpt-run 'lora.targets=[q_proj,k_proj,v_proj,o_proj]' lora.r=16 >> "$OUT/ckpt.txt" 2>&1
              echo "rc $?" >> "$OUT/ckpt.txt"; cp /tmp/llama-ckpt-run/ranks.json "$OUT/ckpt_ranks.json" 2>/dev/null ;;
  esac
done
cp "$RUN/train_log.jsonl" "$RUN/ranks.json" "$OUT/" 2>/dev/null
tail -n 3 "$OUT"/*.txt
