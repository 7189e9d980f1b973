"""zero3.check_deepspeed_version: one warning line on another minor version, an error naming a missing
private API; and the module split: the config module imports neither export nor engine."""
import subprocess
import sys

import pytest

from bigtrain import zero3


@pytest.fixture
def fresh(monkeypatch):
    import deepspeed

    monkeypatch.setattr(zero3, "_checked", False)  # the check runs once per process
    return deepspeed


def test_pinned_version_is_silent(fresh, monkeypatch, capsys):
    monkeypatch.setattr(fresh, "__version__", "0.19.3")
    zero3.check_deepspeed_version()
    assert capsys.readouterr().err == ""


def test_other_minor_version_warns_once(fresh, monkeypatch, capsys):
    monkeypatch.setattr(fresh, "__version__", "0.20.1")
    zero3.check_deepspeed_version()
    zero3.check_deepspeed_version()  # already checked in this process: no second line
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert "0.20.1" in lines[0] and zero3.DEEPSPEED_VERSION in lines[0]
    assert "DeepSpeedZeRoOffload" in lines[0] and "groups._create_zero_param_parallel_group" in lines[0]
    assert "ds_tensor" in lines[0]


def test_missing_private_api_is_an_error(fresh, monkeypatch):
    from deepspeed.utils import groups

    monkeypatch.setattr(fresh, "__version__", "0.21.0")
    monkeypatch.delattr(groups, "_create_zero_param_parallel_group")
    with pytest.raises(RuntimeError, match=r"_create_zero_param_parallel_group.*") as e:
        zero3.check_deepspeed_version()
    assert "0.21.0" in str(e.value)
    assert zero3._checked is False  # a failed check is not remembered as passed


def test_pinned_version_matches_pyproject():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert f'"deepspeed=={zero3.DEEPSPEED_VERSION}"' in text


def test_config_imports_no_export_or_engine():
    code = ("import sys, bigtrain.config; "
            "print(sorted(m for m in sys.modules if m.startswith('bigtrain')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['bigtrain', 'bigtrain.config']"


def test_nccl_without_cuda_is_one_line():
    """zero.backend=nccl on a CPU run: refused before any process group (a traceback from
    torch.distributed before)."""
    from bigtrain.config import ConfigError, ZeroConfig
    from bigtrain.zero3 import check_world

    with pytest.raises(ConfigError) as e:
        check_world(ZeroConfig(backend="nccl"), "cpu")
    assert str(e.value) == ("zero.backend=nccl needs CUDA GPUs, and this run is on the CPU (train.device=cpu): "
                            "use zero.backend=auto (gloo on CPU) or gloo")
