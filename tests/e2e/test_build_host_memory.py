"""The base is built one decoder layer at a time (``zero3.build_streamed``): the host memory a build
takes beyond the partitions that stay does not grow with the model's depth. Measured in a fresh
process per build (world size 1 on CPU, where the partitions themselves live on the host, so they
are subtracted) at 2 and at 8 layers of one Llama shape (d 3072, FFN 8192: one layer is 113M
parameters, 226 MB in bf16): the two transients differ by less than one layer's bf16 size. (The
build's own temporaries, about 0.5-0.9 GB on a CPU, vary by ±50 MB from run to run with the heap's
state; a layer this wide keeps the bound clear of that noise at the cost of 4 and 16 narrower ones.)

Before, ``model.quantize`` built every unquantized partition in host memory and only then quantized
them, so the transient grew by one layer per layer (GPT-3 175B at one rank: 349 GB through host
memory; the kernel killed the run)."""

import pytest

from helpers import torchrun_workers, ROOT

WORKER = ROOT / "tests" / "dist" / "build_host_worker.py"
D, FFN = 3072, 8192
LAYER_BYTES = 2 * (4 * D * D + 3 * D * FFN + 2 * D)  # bf16: q, k, v, o, gate, up, down, two norms

SMALL, LARGE = 2, 8
pytestmark = pytest.mark.slow


def build(tmp_path_factory, layers: int, quantize: str, path: str = "none") -> dict:
    return torchrun_workers(WORKER, [1], tmp_path_factory, args=(layers, quantize, path), timeout=600,
                            prefix=f"b{layers}{quantize}")[1][0]


@pytest.mark.parametrize("quantize", ["nf4", "none"])
def test_random_base_build_transient_does_not_grow_with_depth(tmp_path_factory, quantize):
    small, large = build(tmp_path_factory, SMALL, quantize), build(tmp_path_factory, LARGE, quantize)
    assert LAYER_BYTES == 226_504_704
    grown = large["transient"] - small["transient"]
    print(f"{quantize}: transient at {SMALL} layers {small['transient'] / 1e6:.1f} MB, at {LARGE} layers "
          f"{large['transient'] / 1e6:.1f} MB (one layer {LAYER_BYTES / 1e6:.1f} MB; partitions that stay "
          f"{small['stays'] / 1e6:.1f} / {large['stays'] / 1e6:.1f} MB)")
    assert abs(grown) < LAYER_BYTES, (small, large)
    # and the partitions that stay are what the scheme stores, per layer
    per_layer = (large["stays"] - small["stays"]) / (LARGE - SMALL)
    assert per_layer == pytest.approx(LAYER_BYTES * (0.2579 if quantize == "nf4" else 1.0), rel=0.01)


def test_checkpoint_build_transient_does_not_grow_with_depth(tmp_path_factory):
    """A checkpoint is read a layer at a time too (its slices into the partitions, then nf4), its files
    mapped only while a layer is read."""
    import torch
    import transformers as tf

    import sys
    sys.path.insert(0, str(ROOT / "tests" / "dist"))
    from build_host_worker import SHAPE

    out = {}
    for layers in (SMALL, LARGE):
        d = tmp_path_factory.mktemp(f"ckpt{layers}")
        torch.manual_seed(0)
        tf.LlamaForCausalLM(tf.LlamaConfig(num_hidden_layers=layers, **SHAPE)).to(torch.bfloat16).save_pretrained(d)
        out[layers] = build(tmp_path_factory, layers, "nf4", str(d))
    grown = out[LARGE]["transient_anon"] - out[SMALL]["transient_anon"]
    print(f"checkpoint, nf4: anonymous transient at {SMALL} layers {out[SMALL]['transient_anon'] / 1e6:.1f} MB, "
          f"at {LARGE} {out[LARGE]['transient_anon'] / 1e6:.1f} MB; peak RSS transient (file pages included) "
          f"{out[SMALL]['transient'] / 1e6:.1f} / {out[LARGE]['transient'] / 1e6:.1f} MB")
    assert abs(grown) < LAYER_BYTES, out
    # the files are unmapped after each layer, so their pages do not pile up in the resident set either
    assert abs(out[LARGE]["transient"] - out[SMALL]["transient"]) < LAYER_BYTES, out
