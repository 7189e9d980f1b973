"""AdapterBank: several adapters over one base; a switch copies one adapter's A and B into the live
adapters, and each adapter then gives exactly its own model's output."""
import pytest
import torch

from bigtrain.inject import inject_lora
from bigtrain.switch import AdapterBank
from helpers import load_model, make_ckpt


def _ids(seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 1000, (2, 16), generator=g)


@torch.no_grad()
def own_logits(base, ckpt, ids):
    """The adapter alone, attached as training attaches it (inject_lora + its tensors)."""
    from bigtrain.checkpoint import read_checkpoint

    c = read_checkpoint(ckpt)
    model = load_model(base)
    lora = inject_lora(model, c.spec.modules, c.spec.r, c.spec.alpha, rslora=c.spec.rslora)
    lora.load_adapter_state_dict(c.tensors)
    lora.eval()
    return model(ids).logits


def test_switching_gives_each_adapter_its_own_output(tiny_models, tmp_path):
    base = tiny_models["tiny-opt"]
    ck_x, sx = make_ckpt(tmp_path / "x", base, ["q_proj", "v_proj"], seed=21)
    ck_y, _ = make_ckpt(tmp_path / "y", base, ["q_proj", "v_proj"], seed=22, alpha=16.0)  # another scale
    ids = _ids()
    with torch.no_grad():
        plain = load_model(base)(ids).logits
        only_x, only_y = own_logits(base, ck_x, ids), own_logits(base, ck_y, ids)
        model = load_model(base)
        bank = AdapterBank.from_checkpoints(model, {"x": ck_x, "y": ck_y})
        assert bank.names() == ["x", "y"]
        nbytes = sum(t.numel() * 4 for t in sx.values())
        assert bank.nbytes("x") == bank.nbytes("y") == nbytes == 4 * 2 * 4 * (128 + 128) * 4
        assert torch.equal(model(ids).logits, plain)  # loaded, none used: the bare base
        for name, want in (("x", only_x), ("y", only_y), ("x", only_x), (None, plain), ("y", only_y)):
            sw = bank.use(name)
            assert torch.equal(model(ids).logits, want), name
            assert sw.bytes == (nbytes if name else 0)  # the switch copies exactly the adapter
        assert bank.use("y").bytes == 0  # already live: nothing to copy
        with bank.using("x"):
            assert torch.equal(model(ids).logits, only_x)
        assert bank.active == "y" and torch.equal(model(ids).logits, only_y)
        assert len(bank.live.adapters) == 8  # one set of live adapters (4 layers x q, v), not one per adapter
        bank.close()
        assert torch.equal(model(ids).logits, plain)
    assert (only_x - only_y).abs().max() > 1e-2 and (only_x - plain).abs().max() > 1e-2
    with pytest.raises(KeyError, match="'z'"):
        bank.use("z")


@pytest.mark.parametrize("what, kwargs, said", [
    ("rank", {"targets": ["q_proj", "v_proj"], "r": 2}, "rank 4 vs 2"),
    ("targets", {"targets": ["all-linear"]}, "targets ['q_proj', 'v_proj'] (8 modules) vs ['all-linear']"),
    ("base", {"targets": ["q_proj", "v_proj"], "base_model": "/elsewhere/opt"}, "base "),
    ("base weights", {"targets": ["q_proj", "v_proj"], "base_json": {"config_sha256": "b"}}, "config_sha256 differ"),
])
def test_adapters_that_cannot_share_a_base_are_refused_naming_the_pair(tiny_models, tmp_path, capsys, what, kwargs,
                                                                      said):
    from bigtrain.cli import main

    base = tiny_models["tiny-opt"]
    ck_x, _ = make_ckpt(tmp_path / "x", base, ["q_proj", "v_proj"], seed=1, base_json={"config_sha256": "a"})
    ck_y, _ = make_ckpt(tmp_path / "y", base, seed=2, **kwargs)
    model = load_model(base)
    bank = AdapterBank(model)
    bank.load("x", ck_x)
    with pytest.raises(ValueError) as e:
        bank.load("y", ck_y)
    msg = str(e.value)
    assert "'x'" in msg and "'y'" in msg and str(ck_x) in msg and str(ck_y) in msg and said in msg, msg
    assert bank.names() == ["x"]
    # the commands refuse the pair the same way, in one line, before any process group or model
    capsys.readouterr()
    assert main(["generate", str(ck_x), "--adapter", f"y={ck_y}", "--prompt", "hello"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'y'" in err and said in err and "cannot share one base" in err, err
