"""Worker for tests/e2e/test_build_host_memory.py: build one base (a Llama shape of LAYERS decoder
layers, bf16) the way a run builds it, in a fresh process at world size 1, and report the host
memory the build took beyond what stays. Writes ``<out>/rank0.json``.

``transient`` = peak resident memory during the build (VmHWM) - resident memory before it - the
partition bytes that stay (on a CPU run the partitions live on the host). With ``model.path`` the
checkpoint's pages are mapped while a layer's slices are read (file pages, counted in RSS); the peak
of anonymous memory alone (RssAnon, sampled every 2 ms) is reported beside it as ``transient_anon``."""

import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import transformers as tf  # noqa: E402

from bigtrain.config import ZeroConfig  # noqa: E402
from bigtrain.engine.core import Engine  # noqa: E402

SHAPE = dict(vocab_size=4096, hidden_size=3072, intermediate_size=8192, num_attention_heads=24,
             num_key_value_heads=24, max_position_embeddings=512, tie_word_embeddings=False)


def status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def main() -> None:
    out_dir, layers, quantize, path = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    quantize = None if quantize == "none" else quantize
    path = None if path == "none" else path
    eng = Engine(ZeroConfig(stage=3))
    cfg = tf.LlamaConfig(num_hidden_layers=layers, **SHAPE)
    peak_anon, done = [status_bytes("RssAnon")], threading.Event()

    def sample():
        while not done.is_set():
            peak_anon[0] = max(peak_anon[0], status_bytes("RssAnon"))
            time.sleep(0.002)

    t = threading.Thread(target=sample, daemon=True)
    rss_before, anon_before = status_bytes("VmRSS"), status_bytes("RssAnon")
    t.start()
    model = eng.build_base(cfg, path=path, dtype="bfloat16", quantize=quantize)
    done.set()
    t.join()
    hwm = status_bytes("VmHWM")
    stays = eng.local_param_bytes(model)
    json.dump({"layers": layers, "quantize": quantize, "stays": stays, "rss_before": rss_before, "hwm": hwm,
               "transient": hwm - rss_before - stays,
               "transient_anon": peak_anon[0] - anon_before - stays}, open(os.path.join(out_dir, "rank0.json"), "w"))
    eng.close()


if __name__ == "__main__":
    main()
