"""engine.ds_config: check_deepspeed_version (one warning line on another minor version, an error naming
a missing private API) and check_world (what a configuration refuses before any process group starts)."""
import pytest

from bigtrain.config import ConfigError
from bigtrain.engine import ds_config


@pytest.fixture
def fresh(monkeypatch):
    import deepspeed

    monkeypatch.setattr(ds_config, "_checked", False)  # the check runs once per process
    return deepspeed


def test_pinned_version_is_silent(fresh, monkeypatch, capsys):
    monkeypatch.setattr(fresh, "__version__", "0.19.3")
    ds_config.check_deepspeed_version()
    assert capsys.readouterr().err == ""


def test_other_minor_version_warns_once(fresh, monkeypatch, capsys):
    monkeypatch.setattr(fresh, "__version__", "0.20.1")
    ds_config.check_deepspeed_version()
    ds_config.check_deepspeed_version()  # already checked in this process: no second line
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert "0.20.1" in lines[0] and ds_config.DEEPSPEED_VERSION in lines[0]
    assert "DeepSpeedZeRoOffload" in lines[0] and "groups._create_zero_param_parallel_group" in lines[0]
    assert "ds_tensor" in lines[0]


def test_missing_private_api_is_an_error(fresh, monkeypatch):
    from deepspeed.utils import groups

    monkeypatch.setattr(fresh, "__version__", "0.21.0")
    monkeypatch.delattr(groups, "_create_zero_param_parallel_group")
    with pytest.raises(RuntimeError, match=r"_create_zero_param_parallel_group.*") as e:
        ds_config.check_deepspeed_version()
    assert "0.21.0" in str(e.value)
    assert ds_config._checked is False  # a failed check is not remembered as passed


def test_pinned_version_matches_pyproject():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert f'"deepspeed=={ds_config.DEEPSPEED_VERSION}"' in text


def test_nccl_without_cuda_is_one_line():
    """zero.backend=nccl on a CPU run: refused before any process group (a traceback from
    torch.distributed before)."""
    from bigtrain.config import ZeroConfig
    from bigtrain.engine.ds_config import check_world

    with pytest.raises(ConfigError) as e:
        check_world(ZeroConfig(backend="nccl"), "cpu")
    assert str(e.value) == ("zero.backend=nccl needs CUDA GPUs, and this run is on the CPU (train.device=cpu): "
                            "use zero.backend=auto (gloo on CPU) or gloo")


@pytest.mark.parametrize("zo,key", [({"zero_hpz_partition_size": 2}, "zero_hpz_partition_size"),
                                    ({"offload_param": {"device": "cpu"}}, "offload_param"),
                                    ({"zero_quantized_nontrainable_weights": True},
                                     "zero_quantized_nontrainable_weights")])
def test_ds_configs_a_quantized_base_cannot_use(tmp_path, zo, key):
    import json

    from bigtrain.config import ZeroConfig

    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"zero_optimization": {"stage": 3, **zo}}))
    with pytest.raises(ConfigError, match=f"^model.quantize=int8: zero.ds_config {f} sets {key},"):
        ds_config.check_world(ZeroConfig(ds_config=str(f)), "cpu", "int8")
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_param": {"device": "none"}}}))
    ds_config.check_world(ZeroConfig(ds_config=str(ok)), "cpu", "int8")


def test_shard_group_and_hpz_are_refused_together(tmp_path, monkeypatch):
    """zero.shard_group=node with hpZ in zero.ds_config: both keep the base's all-gathers within a
    group; one line before any process group. auto and world stay allowed (auto then takes world)."""
    import json

    from bigtrain.config import ZeroConfig

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    f = tmp_path / "hpz.json"
    f.write_text(json.dumps({"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 2}}))
    with pytest.raises(ConfigError, match=r"^zero.shard_group=node cannot be combined with hpZ "
                                          rf"\(zero_hpz_partition_size=2 in {f}\)"):
        ds_config.check_world(ZeroConfig(ds_config=str(f), shard_group="node"), "cpu")
    for ok in ("auto", "world", 4):
        ds_config.check_world(ZeroConfig(ds_config=str(f), shard_group=ok), "cpu")
