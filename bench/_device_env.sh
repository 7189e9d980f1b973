# Sourced by the device scripts (measure_h200.sh, quant_h200.sh, scale_h200x2.sh, smoke_gpu.sh), from
# the repository root: the H200 settings every run uses, and the wheels the offline GPU host lacks
# (deepspeed, wandb, datasets: a carried .whl/, made by make_wheelhouse) installed into /tmp/site
# when deepspeed is not importable, ahead of this checkout on PYTHONPATH.
export TORCH_CUDA_ARCH_LIST=9.0 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
if [ -d .whl ] && ! python3 -c "import deepspeed" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
