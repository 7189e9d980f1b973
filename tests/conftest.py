import os
import signal
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
_OWN_CACHE = None
# The stop-signal tests send SIGINT (Ctrl-C) to the processes they start. A shell without job control
# starts `pytest ... &` with SIGINT ignored, the children inherit that, and a shell that inherits it
# ignored cannot trap it: those tests then fail for the way pytest was started. Handled here, SIGINT
# is back at its default in every child (exec resets handled signals; only ignored ones carry over).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
if "BIGTRAIN_DATA_CACHE" not in os.environ:
    import tempfile

    os.environ["BIGTRAIN_DATA_CACHE"] = _OWN_CACHE = tempfile.mkdtemp(prefix="bigtrain-test-data-")


def pytest_sessionfinish(session, exitstatus):
    """The session's own data cache goes with it (one was left in /tmp per run before)."""
    if _OWN_CACHE:
        import shutil

        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


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


def moe_config(name: str, vocab_size: int):
    """A tiny mixture-of-experts config (4 experts, top-2, 2 layers): Mixtral, Qwen2-MoE (shared
    expert, attention biases) or Qwen3-MoE (q/k norms). Tests only: bigtrain has no MoE presets."""
    import transformers as tf

    if name == "tiny-mixtral":
        return tf.MixtralConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                num_experts_per_tok=2, max_position_embeddings=256, tie_word_embeddings=False,
                                pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if name == "tiny-qwen2-moe":
        return tf.Qwen2MoeConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, moe_intermediate_size=48,
                                 shared_expert_intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                 max_position_embeddings=256, tie_word_embeddings=False,
                                 pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if name == "tiny-qwen3-moe":
        return tf.Qwen3MoeConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, moe_intermediate_size=48,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                 num_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
                                 tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    raise KeyError(name)


@pytest.fixture(scope="session")
def moe_models(tmp_path_factory):
    """Tiny Mixtral, Qwen2-MoE and Qwen3-MoE with the built-in tokenizer, each in two layouts: ``<name>`` as
    ``save_pretrained`` writes it (transformers 5.x reverts its conversions on save: per-expert
    ``experts.N.w1/w2/w3`` under ``block_sparse_moe`` for Mixtral, ``experts.N.gate_proj/...`` for
    Qwen2-MoE, the layout of hub checkpoints), and ``<name>-fused``: the same weights written with
    safetensors straight from the module's state dict (one 3-D ``mlp.experts.gate_up_proj`` and
    ``down_proj`` per layer)."""
    import torch
    import transformers as tf
    from safetensors.torch import save_file

    from bigtrain.data import load_tokenizer

    tok = load_tokenizer(None)
    root = tmp_path_factory.mktemp("moe")
    out = {}
    for name in ("tiny-mixtral", "tiny-qwen2-moe", "tiny-qwen3-moe"):
        torch.manual_seed(1234)
        model = tf.AutoModelForCausalLM.from_config(moe_config(name, len(tok)))
        d, fused = root / name, root / f"{name}-fused"
        model.save_pretrained(d)
        tok.save_pretrained(d)
        fused.mkdir()
        model.config.save_pretrained(fused)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(fused / "model.safetensors"),
                  metadata={"format": "pt"})
        tok.save_pretrained(fused)
        out[name], out[f"{name}-fused"] = d, fused
    return out


@pytest.fixture(scope="session")
def quantized_demos(tmp_path_factory):
    """The demo (builtin tiny-opt and data, 300 steps, 1 process, no progress bar, no sample prompts)
    over its unquantized base ("plain") and with model.quantize=int8 and nf4, the three side by side
    (one core each): {name: (its train.output_dir, its stdout)}. Read by test_quantize_dist (the
    eval losses and load lines in stdout) and test_export (the int8 and nf4 runs' checkpoints and
    train_log.jsonl, which it merges and exports into its own tmp_path), so the demo is trained once
    per scheme; neither test writes into these folders."""
    import subprocess

    from helpers import ROOT, _env, train_cmd

    root = tmp_path_factory.mktemp("quantized-demos")
    common = ["logging.progress_bar=false", "train.sample_prompts=0"]
    procs = {}
    for name, extra in (("plain", []), ("int8", ["model.quantize=int8"]), ("nf4", ["model.quantize=nf4"])):
        cmd = train_cmd(1, [f"train.output_dir={root / name}", *common, *extra])
        procs[name] = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
    out = {}
    for name, p in procs.items():
        so, se = p.communicate(timeout=400)
        assert p.returncode == 0, f"{name}:\n{so[-3000:]}\n{se[-3000:]}"
        out[name] = (root / name, so)
    return out
