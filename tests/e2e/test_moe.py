"""Mixture-of-experts bases (tiny Mixtral, Qwen2-MoE, Qwen3-MoE) under ZeRO-3: loaded from a hub-layout
checkpoint (per-expert tensors, which transformers renames and fuses when it loads) or a fused one,
trained, exported to PEFT and merged, each checked against plain transformers / PEFT."""
import json
import re
import sys

import pytest
import torch

from helpers import free_port, losses, run, run_all, tiny_overrides, train_cmd

pytestmark = pytest.mark.slow
MOE = ["tiny-mixtral", "tiny-qwen2-moe"]


def _load(d):
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()


@pytest.mark.parametrize("name,world", [("tiny-mixtral", 1), ("tiny-mixtral", 2), ("tiny-mixtral-fused", 2),
                                        ("tiny-qwen2-moe", 1), ("tiny-qwen2-moe", 2),
                                        ("tiny-qwen2-moe-fused", 2), ("tiny-qwen3-moe", 2)])
def test_moe_zero3_load_equals_from_pretrained(tmp_path, moe_models, name, world):
    """Every parameter gathered back from the ZeRO-3 partitions equals from_pretrained's of the same
    checkpoint bit for bit (the fused experts included), so do the logits of one batch; a few LoRA
    steps on q,v leave the base unchanged; each rank holds 1/world of every parameter. Before the
    loader applied transformers' conversion mapping, the hub layout stopped with "parameter
    'model.layers.0.mlp.gate.weight' is not in the checkpoint" (Mixtral) or "...mlp.experts.gate_up_proj..."
    (Qwen2-MoE)."""
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
         str(free_port()), "tests/dist/check_load_vs_transformers.py", str(moe_models[name]), str(tmp_path)])
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    for r in res:
        assert r["world"] == world and r["names_match"]
        assert r["fused"] == ["model.layers.0.mlp.experts.down_proj", "model.layers.0.mlp.experts.gate_up_proj",
                              "model.layers.1.mlp.experts.down_proj", "model.layers.1.mlp.experts.gate_up_proj"]
        assert r["mismatch_before"] == [], "gathered weights differ from from_pretrained's"
        assert r["logits_equal"], r["logits_max_diff"]
        assert r["mismatch_after"] == [], "training changed base weights"
        assert r["adapters_moved"]
        assert r["local_bytes"] == r["expected_local_bytes"]


def test_plain_model_load_still_equals_from_pretrained(tmp_path, tiny_models):
    """The loader renames keys through transformers' mapping for every model now (its legacy
    renamings included): GPT-2 (a "transformer." wrapper, Conv1D weights) still loads bit for bit."""
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(free_port()), "tests/dist/check_load_vs_transformers.py", str(tiny_models["tiny-gpt2"]), str(tmp_path),
         "c_attn"])
    for r in (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)):
        assert r["names_match"] and r["fused"] == [] and r["mismatch_before"] == [] and r["logits_equal"]
        assert r["mismatch_after"] == [] and r["adapters_moved"] and r["local_bytes"] == r["expected_local_bytes"]


@pytest.mark.parametrize("name", MOE)
def test_moe_train_export_merge(tmp_path, moe_models, name):
    """bigtrain train on 2 ZeRO-3 ranks with LoRA on q_proj, v_proj (the hub layout base) gives the
    loss curve of the unpartitioned reference (zero.stage=0, one process, the same global batch);
    bigtrain export gives a PEFT adapter that PeftModel.from_pretrained applies with bigtrain's
    logits; bigtrain merge writes a checkpoint (the hub layout again) that from_pretrained loads,
    equal to W0 + s·B·A on the targets and to the base elsewhere; the in-run merge
    (checkpoint.merge_at_end, written from the partitions in the fused layout) loads equal too."""
    from peft import PeftModel

    from bigtrain.cli import main
    from bigtrain.export import read_checkpoint
    from bigtrain.inject import inject_lora

    base = moe_models[name]
    dist_dir, single_dir = tmp_path / "dist", tmp_path / "single"
    p, _ = run_all([train_cmd(2, tiny_overrides(dist_dir, base, 4, 2, **{"checkpoint.merge_at_end": "true"})),
                    train_cmd(1, tiny_overrides(single_dir, base, 4, 4, **{"zero.stage": 0}))])  # independent
    ld, ls = losses(dist_dir), losses(single_dir)
    assert sorted(ld) == [1, 2, 3, 4]
    for s in ld:
        assert ld[s] == pytest.approx(ls[s], rel=1e-5), (s, ld, ls)
    # the run's own memory accounting on an MoE base: predicted model-state bytes equal the measured
    states = re.search(r"model states on rank 0, predicted vs measured: (.*)", p.stdout).group(1)
    pairs = re.findall(r"(\w+) (\d[\d,]*\d)/(\d[\d,]*\d)", states)
    assert len(pairs) == 4 and all(a == b for _, a, b in pairs), states

    _, cfg, tensors = read_checkpoint(dist_dir)
    assert cfg["modules"] == [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]
    ids = torch.randint(3, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours_model = _load(base)
        lora = inject_lora(ours_model, cfg["modules"], cfg["r"], cfg["alpha"], rslora=cfg["rslora"])
        lora.load_adapter_state_dict(tensors)
        lora.eval()
        ours = ours_model(ids).logits
        plain = _load(base)(ids).logits

    peft_dir = tmp_path / "peft"
    assert main(["export", str(dist_dir), "--format", "peft", str(peft_dir)]) == 0
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(_load(base), str(peft_dir)).eval()(ids).logits
    assert (ours - plain).abs().max() > 1e-3  # the adapters change the output
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)

    merged_dir = tmp_path / "merged"
    assert main(["merge", str(dist_dir), str(merged_dir)]) == 0
    merged, ref = _load(merged_dir), _load(base)
    scale = cfg["alpha"] / cfg["r"] if not cfg["rslora"] else cfg["alpha"] / cfg["r"] ** 0.5
    want = {n: q.detach().clone() for n, q in ref.named_parameters()}
    for m in cfg["modules"]:
        w = want[f"{m}.weight"]
        want[f"{m}.weight"] = (w.float() + (tensors[f"{m}.lora_B"].float() @ tensors[f"{m}.lora_A"].float()) * scale)
    got = dict(merged.named_parameters())
    assert got.keys() == want.keys()
    for n in want:
        assert torch.equal(got[n], want[n]), n
    live = _load(dist_dir / "merged")  # the in-run merge, fused layout
    for n, q in live.named_parameters():
        assert torch.equal(q, want[n]), n
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, ours, rtol=0, atol=1e-5)
