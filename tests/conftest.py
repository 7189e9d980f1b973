import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# tests/unit, tests/e2e and tests/cluster share helpers.py and wandb_reader.py from here
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# tokenised data is cached per content hash; the tests' cache is their own (not ~/.cache), shared by
# the session (a test that counts tokenisations gives its run a fresh one)
if "BIGTRAIN_DATA_CACHE" not in os.environ:
    import tempfile

    os.environ["BIGTRAIN_DATA_CACHE"] = tempfile.mkdtemp(prefix="bigtrain-test-data-")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny OPT / LLaMA / GPT-2 / GPT-NeoX saved with save_pretrained (with the built-in tokenizer),
    so tests load them back through the real loading path."""
    import torch
    import transformers as tf

    from bigtrain.data import load_tokenizer
    from bigtrain.presets import hf_config_for

    tok = load_tokenizer(None)
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name in ("tiny-opt", "tiny-llama", "tiny-gpt2", "tiny-neox"):
        torch.manual_seed(1234)
        model = tf.AutoModelForCausalLM.from_config(hf_config_for(name, vocab_size=len(tok)))
        d = root / name
        model.save_pretrained(d)
        tok.save_pretrained(d)
        out[name] = d
    return out
