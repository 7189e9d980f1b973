"""The base is built one decoder layer at a time (``engine.build.build_streamed``): the host memory a build
takes beyond the partitions that stay does not grow with the model's depth. Measured in a fresh
process per build (world size 1 on CPU, where the partitions themselves live on the host, so they
are subtracted) at 2 and at 6 layers of one Llama shape (d 3072, FFN 8192: one layer is 113M
parameters, 226 MB in bf16): the two transients differ by less than one layer's bf16 size. (The
build's own temporaries, about 0.5-0.9 GB on a CPU, vary by ±50 MB from run to run with the heap's
state; a layer this wide keeps the bound clear of that noise at the cost of 4 and 12 narrower ones.)

Before, ``model.quantize`` built every unquantized partition in host memory and only then quantized
them, so the transient grew by one layer per layer (GPT-3 175B at one rank: 349 GB through host
memory; the kernel killed the run)."""

import pytest

from helpers import ROOT, torchrun_start, torchrun_wait

WORKER = ROOT / "tests" / "dist" / "build_host_worker.py"
D, FFN = 3072, 8192
LAYER_BYTES = 2 * (4 * D * D + 3 * D * FFN + 2 * D)  # bf16: q, k, v, o, gate, up, down, two norms

SMALL, LARGE = 2, 6  # a build that grew by a layer per layer would be 4 layers (906 MB) over the 1-layer bound
pytestmark = pytest.mark.slow


def write_checkpoints(tmp_path_factory) -> dict:
    """{layers: a bf16 Llama checkpoint of SMALL and of LARGE decoder layers (SHAPE), random weights}."""
    import sys

    import torch
    import transformers as tf

    sys.path.insert(0, str(ROOT / "tests" / "dist"))
    from build_host_worker import SHAPE

    paths = {}
    for layers in (SMALL, LARGE):
        paths[layers] = d = tmp_path_factory.mktemp(f"ckpt{layers}")
        torch.manual_seed(0)
        with torch.device("meta"):  # saved in bf16 without an fp32 copy first
            m = tf.LlamaForCausalLM(tf.LlamaConfig(num_hidden_layers=layers, **SHAPE))
        m = m.to_empty(device="cpu").to(torch.bfloat16)
        for p in m.parameters():
            torch.nn.init.normal_(p, 0, 0.02)
        m.save_pretrained(d)
        del m
    return paths


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict:
    """{(source, layers): the worker's report} for every build the tests below read: a random base
    (source "nf4" or "none", its model.quantize) and a checkpoint with nf4 ("ckpt-nf4"), each at SMALL
    and at LARGE layers. Each build is its own process (so each one's peak is its own), one core
    each (OMP_NUM_THREADS=1), and they all run at once: a process's VmHWM and RssAnon count only its
    own pages, so the others running beside it do not enter its figures. The random-base builds start
    first and run while this process writes the two checkpoints; then the checkpoint builds start."""
    random = torchrun_start(WORKER, {(q, n): (1, (n, q, "none")) for q in ("nf4", "none") for n in (LARGE, SMALL)},
                            tmp_path_factory, prefix="b")
    try:
        paths = write_checkpoints(tmp_path_factory)
    except BaseException:
        torchrun_wait(random, timeout=600)
        raise
    ckpt = torchrun_start(WORKER, {("ckpt-nf4", n): (1, (n, "nf4", paths[n])) for n in (LARGE, SMALL)},
                          tmp_path_factory, prefix="c")
    done = torchrun_wait(random, timeout=600)
    done.update(torchrun_wait(ckpt, timeout=600))
    return {key: ranks[0] for key, ranks in done.items()}


@pytest.mark.parametrize("quantize", ["nf4", "none"])
def test_random_base_build_transient_does_not_grow_with_depth(builds, quantize):
    small, large = builds[quantize, SMALL], builds[quantize, LARGE]
    assert LAYER_BYTES == 226_504_704
    grown = large["transient"] - small["transient"]
    print(f"{quantize}: transient at {SMALL} layers {small['transient'] / 1e6:.1f} MB, at {LARGE} layers "
          f"{large['transient'] / 1e6:.1f} MB (one layer {LAYER_BYTES / 1e6:.1f} MB; partitions that stay "
          f"{small['stays'] / 1e6:.1f} / {large['stays'] / 1e6:.1f} MB)")
    assert abs(grown) < LAYER_BYTES, (small, large)
    # and the partitions that stay are what the scheme stores, per layer
    per_layer = (large["stays"] - small["stays"]) / (LARGE - SMALL)
    assert per_layer == pytest.approx(LAYER_BYTES * (0.2579 if quantize == "nf4" else 1.0), rel=0.01)


def test_checkpoint_build_transient_does_not_grow_with_depth(builds):
    """A checkpoint is read a layer at a time too (its slices into the partitions, then nf4), its files
    mapped only while a layer is read."""
    out = {n: builds["ckpt-nf4", n] for n in (SMALL, LARGE)}
    grown = out[LARGE]["transient_anon"] - out[SMALL]["transient_anon"]
    print(f"checkpoint, nf4: anonymous transient at {SMALL} layers {out[SMALL]['transient_anon'] / 1e6:.1f} MB, "
          f"at {LARGE} {out[LARGE]['transient_anon'] / 1e6:.1f} MB; peak RSS transient (file pages included) "
          f"{out[SMALL]['transient'] / 1e6:.1f} / {out[LARGE]['transient'] / 1e6:.1f} MB")
    assert abs(grown) < LAYER_BYTES, out
    # the files are unmapped after each layer, so their pages do not pile up in the resident set either
    assert abs(out[LARGE]["transient"] - out[SMALL]["transient"]) < LAYER_BYTES, out
