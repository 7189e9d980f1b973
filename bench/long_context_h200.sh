#!/usr/bin/env bash
# Long context on one H200 (issue 30): bigtrain (model.tiled_mlp / model.offload_activations at
# auto unless a job sets them) and FSDP2 + PEFT with plain activation checkpointing, Llama-2-7B shape
# (vocabulary 32,000), LoRA r=16 on q,k,v,o, micro-batch 1, random preset; bench/long_context.py runs
# the jobs. One device call per phase, each under ~9.5 minutes:
#   exact  offload on and off at 16k (4 layers, every layer recomputed; sdpa's backward is not
#          deterministic, so their SHA-256 may differ: phase two compares them under eager
#          attention); then bigtrain at 32k and 128k (auto), and 512k on 8 of the 32 layers with the
#          MLP tiled and 4 inputs offloaded (6 on an 80 GB card; the estimate checked there)
#   long   bigtrain at 384k on all 32 layers (auto), then FSDP2 + PEFT at 32k and 128k
#   one    the most of both in one call, by priority: offload on/off at 8k (4 layers), 512k on 8
#          layers, bigtrain and FSDP2 + PEFT at 128k, then at 32k
#   two    eager attention at 4k, plain twice and offloaded (the GPU's own determinism, then the
#          adapters' SHA-256 with offload), 512k on 8 layers, bigtrain 128k (auto), FSDP2 + PEFT at
#          96k and 64k, and at 64k every layer recomputed without and with tiling + offload of all
#   h200   (a 139 GiB card) 512k on 8 of the 32 layers holding on the GPU what the whole model's
#          512k plan holds (7 recomputed, MLP tiled, 1 input offloaded: 6 inputs kept, as 31
#          recomputed with 25 offloaded keep), bigtrain 128k (auto), FSDP2 + PEFT at 96k and 64k,
#          and at 64k every layer recomputed without and with tiling + offload of all
#   h100   (an 80 GB card) bigtrain at 256k on all 32 layers (auto: the estimate says MLP tiled, 25
#          inputs offloaded) and at 128k (auto), FSDP2 + PEFT at 96k and 64k, and at 64k every layer
#          recomputed without and with tiling + offload of all
#   peaks  bench/activation_peaks.py (4 layers at 16k and 32k, each memory setting: the activation
#          peak against the estimate), then at 64k every layer recomputed with tiling + offload of
#          all, and 256k on all 32 layers (auto)
#   verify (after the estimator's moments) the whole-layer moment on 4 layers at 128k, then 256k on
#          all 32 layers (auto) and 128k (auto)
#   max    (a 139 GiB card) bigtrain at 512k on all 32 layers (auto: MLP tiled, 25 of 32 inputs in
#          host memory): a step takes ~11 minutes, over one device command's 10, so the run starts
#          in its own process session (setsid) writing to /tmp/lc_max, this call follows it for
#          ~9.5 minutes, and `maxwait` (the next call, on the same warm machine) follows it to the
#          end; both copy its logs, GPU memory (nvidia-smi) and host memory (free) samples to $OUT;
#          `maxwait` then runs, in what is left of its call, the H200 baselines (H200_BASE, by
#          priority: FSDP2 + PEFT at 128k and at 192k (one cold step: the longest it might fit),
#          both contenders at 32k, bigtrain at 128k)
#   short  (a 139 GiB card) the H200 baselines in a call of their own, then FSDP2 + PEFT at 160k
#   h100max (an 80 GB card) bigtrain at 320k on all 32 layers (auto: the estimate says MLP tiled,
#          30 of 32 inputs offloaded, 78 GiB of host memory), then FSDP2 + PEFT at 80k (between its
#          64k that fits and 96k that does not)
#   OUT=DIR bash bench/long_context_h200.sh one|two|exact|long|h200|h100|peaks|verify|max|maxwait|short|h100max
set -uo pipefail
OUT=${OUT:?set OUT}
. bench/_device_env.sh
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; grep -E "MemTotal|MemAvailable" /proc/meminfo; nproc
  python3 -c "import torch, transformers, deepspeed, peft; print(torch.__version__, transformers.__version__, deepspeed.__version__, peft.__version__)"; } > "$OUT/env.txt" 2>&1
MEM=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
OFF8=4; [ "${MEM:-0}" -lt 100000 ] && OFF8=6  # an 80 GB card: 6 of the 8 inputs offloaded at 512k
H200_BASE=(fs128k=fsdp2,131072,0,1,130 fs192k=fsdp2,196608,0,1,140,warmup=0 bt32k=bigtrain,32768,0,3,55
           fs32k=fsdp2,32768,0,2,45 bt128k=bigtrain,131072,0,2,130)
follow_max() {  # $1: seconds to follow the detached max run; then copy what it wrote so far
  local t0=$SECONDS
  while [ $((SECONDS - t0)) -lt "$1" ] && ! grep -q '"bt512k"' /tmp/lc_max/results.jsonl 2>/dev/null; do
    { date +%T; nvidia-smi --query-gpu=memory.used --format=csv,noheader; free -g | sed -n 2p; } | tr '\n' ' ' >> /tmp/lc_max/samples.txt
    echo >> /tmp/lc_max/samples.txt; sleep 15
  done
  mkdir -p "$OUT/max"; cp /tmp/lc_max/*.txt /tmp/lc_max/results.jsonl "$OUT/max/" 2>/dev/null
  cp /tmp/lc_max/bt512k/* /tmp/bt_long_runs/bt512k/train_log.jsonl "$OUT/max/" 2>/dev/null; tail -5 /tmp/lc_max/samples.txt; tail -20 /tmp/lc_max/driver.txt
}
case "${1:-exact}" in
  max)   mkdir -p /tmp/lc_max
         setsid nohup python3 bench/long_context.py --out /tmp/lc_max --budget-s 1500 \
           bt512k=bigtrain,524288,0,1,1200 > /tmp/lc_max/driver.txt 2>&1 < /dev/null &
         follow_max ${FOLLOW_S:-570} ;;
  h100max) python3 bench/long_context.py --out "$OUT/h100max" --budget-s ${BUDGET_S:-540} \
           bt320k=bigtrain,327680,0,1,400 \
           fs80k=fsdp2,81920,0,1,60 ;;
  maxwait) follow_max ${FOLLOW_S:-560}  # then, in what is left of this call, the baselines by priority
         left=$((${CALL_S:-575} - SECONDS))
         [ "$left" -gt 60 ] && python3 bench/long_context.py --out "$OUT/after" --budget-s $left "${H200_BASE[@]}" ;;
  short) python3 bench/long_context.py --out "$OUT/short" --budget-s ${BUDGET_S:-570} "${H200_BASE[@]}" \
           fs160k=fsdp2,163840,0,1,110,warmup=0 ;;
  one)   python3 bench/long_context.py --out "$OUT/one" --budget-s 565 \
           offload8k=bigtrain,8192,4,2,35,model.gradient_checkpointing=true,model.offload_activations=true \
           plain8k=bigtrain,8192,4,2,35,model.gradient_checkpointing=true,model.offload_activations=false \
           bt512k_l8=bigtrain,524288,8,1,190,model.gradient_checkpointing=true,model.tiled_mlp=true,model.offload_activations=$OFF8 \
           bt128k=bigtrain,131072,0,2,140 \
           fs128k=fsdp2,131072,0,1,70 \
           bt32k=bigtrain,32768,0,3,55 \
           fs32k=fsdp2,32768,0,2,40 ;;
  two)   python3 bench/long_context.py --out "$OUT/two" --budget-s ${BUDGET_S:-570} \
           bt512k_l8=bigtrain,524288,8,1,170,model.gradient_checkpointing=true,model.tiled_mlp=true,model.offload_activations=true \
           plain4k_a=bigtrain,4096,4,2,20,model.gradient_checkpointing=true,model.attn_implementation=eager \
           plain4k_b=bigtrain,4096,4,2,20,model.gradient_checkpointing=true,model.attn_implementation=eager \
           offload4k=bigtrain,4096,4,2,20,model.gradient_checkpointing=true,model.attn_implementation=eager,model.offload_activations=true \
           bt128k=bigtrain,131072,0,2,130 \
           fs96k=fsdp2,98304,0,1,55 \
           fs64k=fsdp2,65536,0,2,45 \
           ck64k=bigtrain,65536,0,2,45,model.gradient_checkpointing=true,model.tiled_mlp=false,model.offload_activations=false \
           lc64k=bigtrain,65536,0,2,45,model.gradient_checkpointing=true,model.tiled_mlp=true,model.offload_activations=true ;;
  exact) python3 bench/long_context.py --out "$OUT/exact" --budget-s 550 \
           offload16k=bigtrain,16384,4,2,45,model.gradient_checkpointing=true,model.offload_activations=true \
           plain16k=bigtrain,16384,4,2,45,model.gradient_checkpointing=true,model.offload_activations=false \
           bt32k=bigtrain,32768,0,3,70 \
           bt128k=bigtrain,131072,0,2,150 \
           bt512k_l8=bigtrain,524288,8,1,190,model.gradient_checkpointing=true,model.tiled_mlp=true,model.offload_activations=$OFF8 ;;
  h200)  python3 bench/long_context.py --out "$OUT/h200" --budget-s ${BUDGET_S:-570} \
           bt512k_l8=bigtrain,524288,8,1,200,model.gradient_checkpointing=7,model.tiled_mlp=true,model.offload_activations=1 \
           bt128k=bigtrain,131072,0,2,130 \
           fs96k=fsdp2,98304,0,1,55 \
           fs64k=fsdp2,65536,0,2,45 \
           ck64k=bigtrain,65536,0,2,45,model.gradient_checkpointing=true,model.tiled_mlp=false,model.offload_activations=false \
           lc64k=bigtrain,65536,0,2,45,model.gradient_checkpointing=true,model.tiled_mlp=true,model.offload_activations=true ;;
  h100)  python3 bench/long_context.py --out "$OUT/h100" --budget-s ${BUDGET_S:-570} \
           bt256k=bigtrain,262144,0,1,250 \
           bt128k=bigtrain,131072,0,2,130 \
           fs96k=fsdp2,98304,0,1,55 \
           fs64k=fsdp2,65536,0,2,45 \
           ck64k=bigtrain,65536,0,2,45,model.gradient_checkpointing=true,model.tiled_mlp=false,model.offload_activations=false \
           lc64k=bigtrain,65536,0,2,45,model.gradient_checkpointing=true,model.tiled_mlp=true,model.offload_activations=true ;;
  peaks) python3 bench/activation_peaks.py --model llama2-7b --layers 4 --seq 16384,32768 --out "$OUT/peaks.jsonl" \
           k=4 k=3 k=2 k=4,tile k=3,tile k=4,tile,off=4 k=3,tile,off=3 k=4,off=4 k=3,off=3
         python3 bench/long_context.py --out "$OUT/long" --budget-s ${BUDGET_S:-450} \
           lc64k=bigtrain,65536,0,2,50,model.gradient_checkpointing=true,model.tiled_mlp=true,model.offload_activations=true \
           bt256k=bigtrain,262144,0,1,240 ;;
  verify) python3 bench/activation_peaks.py --model llama2-7b --layers 4 --seq 131072 --out "$OUT/peaks.jsonl" \
           k=3 k=3,tile
         python3 bench/long_context.py --out "$OUT/long" --budget-s ${BUDGET_S:-420} \
           bt256k=bigtrain,262144,0,1,240 \
           bt128k=bigtrain,131072,0,2,150 ;;
  long)  python3 bench/long_context.py --out "$OUT/long" --budget-s 555 \
           bt384k=bigtrain,393216,0,1,420 \
           fs32k=fsdp2,32768,0,2,45 \
           fs128k=fsdp2,131072,0,1,60 ;;
esac
cat "$OUT"/*/results.jsonl 2>/dev/null | cut -c1-900
