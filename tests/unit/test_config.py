"""Config: YAML + dotted overrides, typed, unknown keys and bad values named."""
import pytest
import yaml

from bigtrain.config import Config, ConfigError, describe, load_config


def test_defaults_are_the_paper_defaults():
    c = load_config()
    assert c.lora.targets == ["q_proj", "v_proj"] and c.lora.r == 8 and c.zero.stage == 3


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"lora": {"r": 4, "alpha": 8}, "train": {"lr": 1e-4}}))
    c = load_config(f, ["train.lr=3e-4", "lora.targets=[q_proj,k_proj]", "train.max_steps=7",
                        "lora.alpha=2", "model.path=null"])
    assert c.lora.r == 4 and c.lora.alpha == 2.0 and isinstance(c.lora.alpha, float)
    assert c.train.lr == 3e-4 and c.train.max_steps == 7
    assert c.lora.targets == ["q_proj", "k_proj"]


@pytest.mark.parametrize("override,msg", [
    (["lora.rank=4"], "unknown config key 'lora.rank'"),
    (["trian.lr=1"], "unknown config key 'trian'"),
    (["lora.r=four"], "lora.r: expected int, got str 'four'"),
    (["lora.r=2.5"], "lora.r: expected int, got float 2.5"),
    (["lora.r=0"], "lora.r must be a positive integer, got 0"),
    (["lora.alpha=-1"], "lora.alpha must be > 0"),
    (["lora.targets=q_proj"], "lora.targets: expected a list"),
    (["train.micro_batch_size=0"], "train.micro_batch_size must be > 0"),
    (["zero.stage=2"], "zero.stage: 2 is not one of 0, 3"),
    (["checkpoint.keep=1"], "checkpoint.keep must be >= 2"),
    (["train.lr"], "not of the form section.key=value"),
    (["model.path=/does/not/exist"], "model.path: '/does/not/exist' is not a directory"),
    (["train.device=tpu"], "train.device: 'tpu' is not one of"),
    (["train.eval_every=-1"], "train.eval_every must be >= 0"),
    (["train.eval_examples=-5"], "train.eval_examples must be >= 0"),
])
def test_errors_name_the_key(override, msg):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    assert msg in str(e.value)


def test_bad_yaml_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("lora: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml.*not valid YAML"):
        load_config(f)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_dump_roundtrip(tmp_path):
    c = load_config(None, ["lora.r=2", "train.max_steps=3"])
    c.dump(tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == c


def test_describe_covers_every_field():
    keys = [k for k, *_ in describe()]
    assert "lora.r" in keys and "zero.stage" in keys and "checkpoint.keep" in keys
    assert all(doc for k, _, _, doc in describe() if k.startswith("lora."))


def test_model_path_must_hold_config_and_safetensors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="model.path: .*empty' has no config.json"):
        load_config(None, [f"model.path={empty}"])
    (empty / "config.json").write_text("{}")
    (empty / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"model.path: .*has no \*.safetensors weights"):
        load_config(None, [f"model.path={empty}"])
