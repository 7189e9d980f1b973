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
    # silent choices that used to be taken (issue 27): each is now one line naming the key
    (["train.stop_at_step=0"], "train.stop_at_step must be in 1..train.max_steps (300) or null, got 0"),
    (["train.stop_at_step=-3"], "train.stop_at_step must be in 1..train.max_steps (300) or null, got -3"),
    (["train.stop_at_step=301"], "train.stop_at_step must be in 1..train.max_steps (300) or null, got 301"),
    (["train.max_bad_steps=-1"], "train.max_bad_steps must be >= 0 (0: stop at the first non-finite step), got -1"),
    (["zero.timeout_s=0"], "zero.timeout_s must be > 0 (seconds a collective may wait), got 0"),
    (["data.eval="], "data.eval is empty: null for no evaluation"),
    (["data.train= "], "data.train is empty"),
])
def test_errors_name_the_key(override, msg):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    assert msg in str(e.value)


@pytest.mark.parametrize("override,msg", [
    ("lora.alpha=nan", "lora.alpha must be a finite number, got nan"),
    ("lora.alpha=inf", "lora.alpha must be a finite number, got inf"),
    ("lora.alpha=.inf", "lora.alpha must be a finite number, got inf"),
    ("lora.dropout=nan", "lora.dropout must be a finite number, got nan"),
    ("train.lr=nan", "train.lr must be a finite number, got nan"),
    ("train.lr=-inf", "train.lr must be a finite number, got -inf"),
    ("train.weight_decay=nan", "train.weight_decay must be a finite number, got nan"),
    ("train.weight_decay=-0.1", "train.weight_decay must be >= 0, got -0.1"),
    ("train.betas=[0.9,nan]", "train.betas must be finite numbers, got [0.9, nan]"),
    ("train.min_lr_ratio=5", "train.min_lr_ratio must be in [0, 1] (the decay ends at lr * min_lr_ratio), got 5.0"),
    ("train.min_lr_ratio=-0.1", "train.min_lr_ratio must be in [0, 1] (the decay ends at lr * min_lr_ratio), got -0.1"),
    ("train.min_lr_ratio=nan", "train.min_lr_ratio must be a finite number, got nan"),
    ("train.max_grad_norm=-1", "train.max_grad_norm must be >= 0 (0: no clipping), got -1.0"),
    ("train.max_grad_norm=inf", "train.max_grad_norm must be a finite number, got inf"),
    ("checkpoint.every_minutes=inf", "checkpoint.every_minutes must be a finite number, got inf"),
])
def test_float_keys_finite_and_in_range(override, msg):
    """nan passed every ordered check (lr=nan and alpha=nan failed later with tracebacks), a
    min_lr_ratio of 5 made the lr climb to 5x the peak, max_grad_norm=-1 silently disabled clipping:
    each is now one line naming the key and the value."""
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value) == msg


def test_float_keys_documented_edges_still_accepted():
    c = load_config(None, ["train.max_grad_norm=0", "train.min_lr_ratio=0", "train.weight_decay=0",
                           "checkpoint.every_minutes=0", "lora.dropout=0"])
    assert c.train.max_grad_norm == 0.0  # 0: no clipping, as documented
    assert load_config(None, ["train.min_lr_ratio=1"]).train.min_lr_ratio == 1.0


def test_every_float_key_is_checked_finite():
    """A float key added later is covered too: the finite check walks the declared types."""
    floats = [k for k, tp, _, _ in describe() if "float" in tp]
    assert {"lora.alpha", "lora.dropout", "train.lr", "train.min_lr_ratio", "train.max_grad_norm",
            "checkpoint.every_minutes"} <= set(floats)
    for k in floats:
        with pytest.raises(ConfigError, match=f"^{k} must be (a finite number|finite numbers), got"):
            load_config(None, [f"{k}=[nan, nan]" if k == "train.betas" else f"{k}=nan"])


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


def test_a_yaml_key_given_twice_is_refused(tmp_path):
    """PyYAML keeps the last of two equal keys, silently; the config names the key and its line."""
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 0.001\n  max_steps: 10\n  lr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert "is not valid YAML" in str(e.value) and "key 'lr' is given twice (line 4)" in str(e.value)
    assert "\n" not in str(e.value)  # one line: PyYAML's snippet of the file is not appended
    f.write_text("train:\n  lr: 1e-3\n   x: [\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert str(e.value).endswith("is not valid YAML: mapping values are not allowed here (line 3, column 5)")
    f.write_text("train:\n  lr: 0.001\nlora:\n  r: 4\n")  # the same key in two sections is fine
    assert load_config(f).train.lr == 0.001


def test_config_file_that_is_a_directory_or_a_fifo(tmp_path):
    import os

    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    os.mkfifo(tmp_path / "f")
    with pytest.raises(ConfigError, match=r"is not a regular file \(a FIFO or a device\)"):
        load_config(tmp_path / "f")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.yaml")
