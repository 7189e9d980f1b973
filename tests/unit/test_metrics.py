"""bigtrain/metrics.py: the FLOPs-per-token formula behind every MFU figure, against a FLOP count."""

import torch
import transformers as tf
from torch.utils.flop_counter import FlopCounterMode

from bigtrain import frozen_linear
from bigtrain.lora import linear_shape
from bigtrain.metrics import lora_flops_per_token, peak_tflops
from bigtrain.presets import hf_config_for


def test_lora_flops_formula_against_torch_flop_counter():
    """A frozen-base step counted by torch (forward + input gradients, no weight gradients) is exactly
    4 FLOPs per matmul weight per token plus 12·L·s·d per token of attention (QKᵀ and AV: 4·s·d
    forward, 8·s·d for the gradients of Q, K, A and V). The formula bigtrain reports MFU with,
    4·P + 8·L·s·d (the convention the benchmarks share), differs from that count by exactly two
    known terms: it counts every parameter (embeddings, LayerNorms, biases) as a matmul weight, and
    attention's backward as 4·s·d instead of 8·s·d. At GPT-3 6.7B, s=2048, the second is 3.7% of
    the total."""
    cfg = hf_config_for("tiny-opt", vocab_size=512)
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").requires_grad_(False)
    frozen_linear.install(model)
    b, s, L, d = 2, 64, cfg.num_hidden_layers, cfg.hidden_size
    emb = model.get_input_embeddings()(torch.randint(0, 512, (b, s))).detach().requires_grad_(True)
    with FlopCounterMode(display=False) as fc:
        model(inputs_embeds=emb).logits.float().sum().backward()
    counted = fc.get_total_flops()
    tokens = b * s
    matmul_weights = sum(i * o for i, o in (linear_shape(m) for m in model.modules()
                                              if isinstance(m, torch.nn.Linear)))
    assert counted == 4 * matmul_weights * tokens + 12 * L * s * d * tokens
    P = sum(p.numel() for p in model.parameters())  # tied head counted once, as the runs count it
    formula = lora_flops_per_token(P, L, d, s) * tokens
    assert formula - counted == 4 * (P - matmul_weights) * tokens - 4 * L * s * d * tokens
    # the attention term's share at GPT-3 6.7B, sequence 2048
    P67, L67, d67 = 6_658_412_544, 32, 4096  # count_parameters of the gpt3-6.7b preset
    assert round(4 * L67 * 2048 * d67 / lora_flops_per_token(P67, L67, d67, 2048), 3) == 0.037


def test_peak_by_device_name():
    assert peak_tflops("NVIDIA H200") == 790.0 and peak_tflops("NVIDIA H100 80GB HBM3") == 790.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0 and peak_tflops("Tesla T4") is None
