"""Long context through the real CLI (bigtrain.longctx): model.tiled_mlp and
model.offload_activations in a 2-rank ZeRO-3 run (the base partitioned, gathered layer by layer,
the MLP tiles computed inside the gathered layer) train as the plain run does, and bad values are one
line before any work."""
import torch

from helpers import final_adapters, losses, run, tiny_overrides, train_cmd


def test_tiled_and_offloaded_two_ranks_train_as_the_plain_run(tmp_path, tiny_models):
    model, steps = tiny_models["tiny-llama"], 3
    common = {"model.gradient_checkpointing": "true", "lora.targets": "[q_proj,v_proj,gate_proj,down_proj]"}
    plain, long = tmp_path / "plain", tmp_path / "long"
    run(train_cmd(2, tiny_overrides(plain, model, steps, 2, **common)))
    p = run(train_cmd(2, tiny_overrides(long, model, steps, 2, **common, **{
        "model.tiled_mlp": 16, "model.offload_activations": "true"})))
    assert ("activation checkpointing: 2 of 2 decoder layers recomputed in backward "
            "(model.gradient_checkpointing=true); MLP in tiles of 16 tokens and the inputs of the first 2 in "
            "host memory (as set)") in p.stdout, p.stdout
    lp, ll = losses(plain), losses(long)
    assert lp.keys() == ll.keys() == {1, 2, 3}
    for k in lp:  # the MLP's tiles sum the adapters' gradients in another order: fp32 rounding only
        assert abs(lp[k] - ll[k]) <= 1e-6 * abs(lp[k]), (k, lp[k], ll[k])
    ap, al = final_adapters(plain), final_adapters(long)
    for k in ap:
        assert torch.allclose(ap[k], al[k], rtol=1e-4, atol=1e-7), (k, (ap[k] - al[k]).abs().max())


def test_bad_long_context_values_are_one_line_before_any_work(tmp_path, tiny_models):
    for key, value, said in (
            ("model.tiled_mlp", "0", "model.tiled_mlp: expected auto, true, false or a number >= 1 of tokens "
                                     "per tile, got 0"),
            ("model.offload_activations", "some", "model.offload_activations: expected auto, true, false or a "
                                                  "number >= 1 of layers, got 'some'")):
        out = tmp_path / key
        p = run(train_cmd(1, tiny_overrides(out, tiny_models["tiny-llama"], 1, 2, **{key: value})), check=False)
        assert p.returncode != 0 and said in p.stderr, p.stderr[-2000:]
        assert not out.exists()
    out = tmp_path / "both"
    p = run(train_cmd(1, tiny_overrides(out, tiny_models["tiny-llama"], 1, 2, **{
        "model.tiled_mlp": "true", "model.compile": "true"})), check=False)
    assert p.returncode != 0 and ("model.tiled_mlp=true cannot run inside a compiled decoder layer "
                                  "(model.compile=true)") in p.stderr, p.stderr[-2000:]
