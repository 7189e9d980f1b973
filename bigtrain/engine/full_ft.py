"""Full fine-tuning under DeepSpeed, as its users run it: the comparison ``bigtrain measure`` makes.

Every parameter trainable, handed to ``deepspeed.initialize`` with DeepSpeed's own ZeRO stage 1, 2
or 3 and its AdamW; :func:`full_ft_states` counts the model states it holds. LoRA training never
uses this module.
"""

from __future__ import annotations

import torch
import transformers as tf

from .. import vocab as V
from ..loader import load_partitions
from .build import build_partitioned, local_param_bytes, zero_from_row

# Deferred imports: deepspeed is imported where used: its import takes seconds (its op builders)
# and writes to stdout, and stage-0 runs and the CPU-only tools never need it (engine/__init__.py).


def full_ft_ds_config(stage: int, base_dtype: torch.dtype, micro_batch_size: int, grad_accum: int,
                      world_size: int, lr: float, betas, weight_decay: float, max_grad_norm: float,
                      persistence_threshold: int) -> dict:
    """The DeepSpeed config of full fine-tuning as its users run it: ZeRO ``stage`` with DeepSpeed's
    own defaults (buckets, prefetch, sub-groups), 16-bit mixed precision (fp32 master weights and
    Adam states inside DeepSpeed's optimizer), and DeepSpeed's AdamW from the config. ``torch_adam``:
    DeepSpeed wraps torch's AdamW instead of JIT-building its FusedAdam (a CUDA extension build per
    node, minutes, and none on CPU); the states are the same fp32 m and v either way."""
    ds = {"train_micro_batch_size_per_gpu": micro_batch_size,
          "gradient_accumulation_steps": grad_accum,
          "train_batch_size": micro_batch_size * grad_accum * world_size,
          "bf16": {"enabled": base_dtype == torch.bfloat16},
          "fp16": {"enabled": base_dtype == torch.float16},
          "zero_optimization": {"stage": stage},
          "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": list(betas),
                                                    "weight_decay": weight_decay, "torch_adam": True}},
          "steps_per_print": 1 << 30, "wall_clock_breakdown": False}
    if stage == 3:
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = persistence_threshold
    if max_grad_norm > 0:
        ds["gradient_clipping"] = max_grad_norm
    return ds


def build_full_ft(hf_config, torch_dtype: torch.dtype, attn_implementation: str, ds: dict,
                  path: str | None, rank: int, vocab: int, gradient_checkpointing: bool):
    """Full fine-tuning of the same causal LM: built as the LoRA base is (stage 3: under
    ``zero.Init``, from ``path`` partition by partition or random), every parameter trainable, then
    ``deepspeed.initialize`` with ``ds`` (:func:`full_ft_ds_config`). Rows of a padded vocabulary
    from ``vocab`` on are zeros, as in a LoRA run. Returns (DeepSpeed engine, its ZeRO optimizer,
    the HfDeepSpeedConfig to keep referenced)."""
    import deepspeed
    stage = ds["zero_optimization"]["stage"]
    padded = int(hf_config.vocab_size)
    hf_ds = None
    if stage == 3:
        model, hf_ds = build_partitioned(hf_config, torch_dtype, attn_implementation, ds)
        rows = V.vocab_parameters(model, padded) if padded != vocab else {}
        if path is not None:
            load_partitions(model, path, rank, short_rows=set(rows))
        else:
            for p in rows.values():
                zero_from_row(p, vocab)
    else:
        if path is not None:
            model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype,
                                                            attn_implementation=attn_implementation)
            if padded != vocab:
                model.resize_token_embeddings(padded, mean_resizing=False)
        else:
            model = tf.AutoModelForCausalLM.from_config(hf_config, dtype=torch_dtype,
                                                        attn_implementation=attn_implementation)
        with torch.no_grad():
            for p in V.vocab_parameters(model, padded).values():
                p[vocab:] = 0
    model.requires_grad_(True)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()),
                                                   config=ds)
    return engine, optimizer, hf_ds


def full_ft_states(engine, optimizer) -> dict:
    """This rank's model-state bytes of a full fine-tuning DeepSpeed engine, from the live tensors:
    16-bit weights (stage 3: partitions plus whole persistent tensors; else the whole parameters),
    16-bit gradients (stage 3: the flat gradient partitions; stages 1-2: the gradient tensors and
    partitions the optimizer holds between backward and step), fp32 master weights, and the wrapped
    optimizer's state (Adam's m, v and step). Call after a step (stage 3) or after backward (1-2)."""
    model = engine.module
    tb = lambda t: t.numel() * t.element_size()  # noqa: E731
    master = getattr(optimizer, "fp32_partitioned_groups_flat", None)  # stage 3
    if master is not None:
        weights = local_param_bytes(model)
        grads = tb(optimizer.grad_partitions_flat_buffer)
    else:  # stages 1-2 (DeepSpeedZeroOptimizer) or bf16 stage 1 (BF16_Optimizer)
        master = (getattr(optimizer, "single_partition_of_fp32_groups", None)
                  or getattr(optimizer, "fp32_groups_flat_partition", None) or [])
        weights = sum(tb(p) for p in model.parameters())
        seen, grads = set(), 0
        for p in model.parameters():
            if p.grad is not None:
                grads += tb(p.grad)
        for name in ("averaged_gradients", "fp32_groups_gradients_flat"):
            holder = getattr(optimizer, name, None)
            items = holder.values() if isinstance(holder, dict) else (holder or [])
            for g in items:
                for t in (g if isinstance(g, (list, tuple)) else [g]):
                    if torch.is_tensor(t) and id(t) not in seen:
                        seen.add(id(t))
                        grads += tb(t)
    inner = getattr(optimizer, "optimizer", optimizer)
    adam = sum(tb(v) for st in inner.state.values() for v in st.values() if torch.is_tensor(v))
    return {"weights": weights, "gradients": grads, "master_weights": sum(tb(t) for t in master),
            "adam_states": adam}
