#!/usr/bin/env bash
# A GPU smoke of the user-facing paths on 2 GPUs (NCCL), then the CPU tests of the paths that lean on
# transformers' internals (MoE key conversion, chat templates, generate) under the machine's own
# transformers version. Writes under $OUT: smoke.txt (console), pytest.txt.
#   OUT=DIR bash bench/smoke_gpu.sh
set -uo pipefail
OUT=${OUT:?set OUT}
. bench/_device_env.sh  # H200 settings; carried wheels on PYTHONPATH
W=$(mktemp -d)
TR=(torchrun --standalone --nnodes=1 --nproc_per_node=2 -m bigtrain)
{
  python3 -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__, 'gpus', torch.cuda.device_count())"
  echo "== chat LoRA on 2 GPUs (builtin tiny OPT), 60 steps"
  "${TR[@]}" train data.train=builtin:e2e-chat data.eval=builtin:e2e-chat-eval data.max_length=256 \
      train.max_steps=60 train.eval_every=30 train.output_dir=$W/chat 2>&1 | grep -v "step [0-9]*/60:"
  P='name[Aromi], eatType[pub], area[riverside]'
  echo "== generate, 1 process";  python3 -m bigtrain generate $W/chat --chat --use base --use chat --prompt "$P" --format jsonl > $W/g1.jsonl
  echo "== generate, 2 ranks";    "${TR[@]}" generate $W/chat --chat --use base --use chat --prompt "$P" --format jsonl > $W/g2.jsonl
  python3 - $W/g1.jsonl $W/g2.jsonl <<'PY'
import json, sys
a, b = ([json.loads(l)["token_ids"] for l in open(f) if l.startswith("{")] for f in sys.argv[1:])
print("generate 1 process vs 2 ranks (NCCL), greedy token ids equal:", a == b, [len(x) for x in a])
PY
  echo "== eval, 2 ranks"; "${TR[@]}" eval $W/chat --data builtin:e2e-chat-eval
} 2>&1 | tee "$OUT/smoke.txt"
timeout 330 python3 -m pytest -q -p no:cacheprovider tests/unit/test_loader.py tests/unit/test_data.py tests/unit/test_generate.py \
    tests/e2e/test_moe.py 2>&1 | tail -25 | tee "$OUT/pytest.txt"
