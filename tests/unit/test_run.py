"""bigtrain.run: the one place a run is built. check_inputs reads and checks everything before any
process group or model exists; build_run gives the loop a run whose adapters, optimizer, state and
lock are ready, the same on every build of the same config (zero.stage=0 at one process: no process
group, so this runs inside the test process)."""

import pytest
import torch

from bigtrain.config import ConfigError, load_config
from bigtrain.run import build_run, check_inputs
from bigtrain.runlock import RunLock, RunLocked
from bigtrain.trainer import Trainer


def _cfg(tmp_path, *extra):
    return load_config(None, [f"train.output_dir={tmp_path}/run", "zero.stage=0", "train.device=cpu",
                              "train.max_steps=3", "logging.progress_bar=false", *extra])


def test_check_inputs_reads_everything_before_any_process_group_or_folder(tmp_path):
    inp = check_inputs(_cfg(tmp_path))
    assert not (tmp_path / "run").exists()  # nothing written
    assert not torch.distributed.is_initialized()
    assert inp.vocab == len(inp.tokenizer) == inp.hf_config.vocab_size
    # the run's vocabulary is padded to a multiple of 64, the model's own is kept for everything outside
    assert inp.build_config.vocab_size % 64 == 0 and inp.build_config.vocab_size >= inp.vocab
    assert inp.train_stats["examples"] == len(inp.train_ds) > 0 and inp.eval_ds is not None
    assert len(inp.samples) == 2  # train.sample_prompts' default: held-out prompt, reference
    assert all(isinstance(ref, str) and ref for _, ref in inp.samples)
    assert inp.base_params == sum(p.numel() for p in inp.meta.parameters()) - (
        inp.build_config.vocab_size - inp.vocab) * inp.hf_config.hidden_size * (
        1 if inp.hf_config.tie_word_embeddings else 2)


@pytest.mark.parametrize("override,starts", [
    ("data.train=/nonexistent/train.jsonl", "data.train: "),
    ("lora.r=100000", "lora.r=100000 is more than the width"),
    ("model.gradient_checkpointing=9", "model.gradient_checkpointing=9"),
    ("data.max_length=100000", "data.max_length=100000 exceeds the model's"),
])
def test_check_inputs_refuses_in_one_line_naming_the_key(tmp_path, override, starts):
    with pytest.raises(ConfigError) as e:
        check_inputs(_cfg(tmp_path, override))
    assert str(e.value).startswith(starts) and "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "run").exists()


def test_build_run_is_ready_for_the_loop_and_the_same_each_time(tmp_path):
    runs = []
    for k in range(2):
        run = build_run(_cfg(tmp_path / str(k)))
        try:
            assert run.state.step == 0 and run.state.position == 0
            assert sum(p.numel() for p in run.params) == run.report["trainable"] > 0
            assert all(p.requires_grad for p in run.params)
            assert not any(p.requires_grad for n, p in run.model.named_parameters() if "lora" not in n)
            for key in ("frozen_weights", "trainable_weights"):  # predicted = measured, exactly
                assert run.predicted[key] == run.at_start[key], key
            assert run.recompute_plan.checkpointed == 0 and not run.compiled  # CPU: auto is off, said why
            assert run.global_batch == run.cfg.train.micro_batch_size * run.cfg.train.grad_accum
            with pytest.raises(RunLocked):  # the folder is this run's until it ends
                RunLock(run.out_dir).acquire()
            trainer = Trainer(run)
            r = trainer.train_step(trainer.step_batches())
            assert torch.isfinite(torch.tensor(r.loss)) and r.tokens > 0 and not r.skipped
            runs.append(([p.detach().clone() for p in run.params], r.loss))
        finally:
            run.close()
    (a, la), (b, lb) = runs
    assert la == lb and all(torch.equal(x, y) for x, y in zip(a, b))  # seeded: bit-identical builds
