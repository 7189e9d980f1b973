"""The command line itself: every subcommand answers --help, quickly (no torch import)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import ROOT

SUBCOMMANDS = ["train", "presets", "estimate", "measure", "export", "merge", "generate", "eval"]


@pytest.mark.parametrize("cmd", [[], *([c] for c in SUBCOMMANDS)], ids=["top", *SUBCOMMANDS])
def test_help_answers_without_importing_torch(cmd):
    # python -m bigtrain ... --help must not pay for torch (2-6 s on a busy 2-core node)
    code = ("import sys, runpy; sys.argv = ['bigtrain', *sys.argv[1:]]\n"
            "try:\n    runpy.run_module('bigtrain', run_name='__main__')\n"
            "except SystemExit as e:\n    rc = e.code\n"
            "print('TORCH_IMPORTED' if 'torch' in sys.modules else 'NO_TORCH', rc, file=sys.stderr)\n")
    p = subprocess.run([sys.executable, "-c", code, *cmd, "--help"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert p.stderr.strip().endswith("NO_TORCH 0"), p.stderr[-2000:]
    assert "usage: bigtrain" in p.stdout
    if cmd == ["train"]:
        assert "train.output_dir" in p.stdout and "lora.r" in p.stdout   # the config reference


def test_train_overrides_on_both_sides_of_config(tmp_path):
    """`bigtrain train a=1 --config f.yaml b=2`: both overrides are taken, in the order given (the
    last one wins), instead of argparse's "unrecognized arguments: b=2"; a real unknown option is
    still refused. Checked through config errors, so no training runs."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lora:\n  r: 4\n")

    def train(*argv):
        return subprocess.run([sys.executable, "-m", "bigtrain", "train", *argv], capture_output=True, text=True,
                              cwd=ROOT, timeout=120)

    p = train(f"train.output_dir={tmp_path}/x", "--config", str(cfg), "lora.r=0")
    assert p.returncode == 2 and "config error: lora.r must be a positive integer, got 0" in p.stderr, p.stderr
    p = train("lora.r=0", "--config", str(cfg), f"train.output_dir={tmp_path}/x", "lora.r=-3")
    assert p.returncode == 2 and "got -3" in p.stderr and "unrecognized" not in p.stderr, p.stderr
    p = train("lora.r=0", "--config", str(cfg), "lora.r=2", "--nope")
    assert p.returncode == 2 and "unrecognized arguments: --nope" in p.stderr, p.stderr
    assert not (tmp_path / "x").exists()


def test_measure_refuses_bad_arguments_before_any_work(tmp_path):
    """`bigtrain measure`'s own options are checked with the config, before any store, process or
    model: one line naming the option and what to do, exit 2, nothing written."""
    def measure(*argv):
        return subprocess.run([sys.executable, "-m", "bigtrain", "measure", f"train.output_dir={tmp_path}/x", *argv],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)

    p = measure("model.dtype=bfloat16", "--modes", "lora,full-zero4")
    assert p.returncode == 2 and "config error: --modes: full-zero4 is not a mode; choose from lora, " \
        "full-zero3, full-zero2, full-zero1" in p.stderr, p.stderr
    p = measure("model.dtype=bfloat16", "--steps", "1")
    assert p.returncode == 2 and "--steps must be >= 2" in p.stderr, p.stderr
    p = measure("model.dtype=bfloat16", "lora.r=0")
    assert p.returncode == 2 and "lora.r must be a positive integer" in p.stderr, p.stderr
    assert not (tmp_path / "x").exists()


def test_version_config_twice_and_a_closed_pipe(tmp_path, capsys, monkeypatch):
    """Small things users expect (issue 27): --version; a second --config is refused (the first was
    dropped, silently); a reader that closes the pipe early (`bigtrain estimate ... | head`) ends the
    command quietly, exit 0, where Python's 'Exception ignored ... BrokenPipeError' used to follow."""
    import io

    from bigtrain.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("bigtrain ")
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", "a.yaml", "--config", "b.yaml"])
    assert e.value.code == 2
    assert "--config given twice (a.yaml and b.yaml): give one file" in capsys.readouterr().err

    class ClosedPipe(io.StringIO):
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self):
            return sys.__stdout__.fileno()

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    monkeypatch.setattr("os.dup2", lambda a, b: None)  # leave pytest's own stdout alone
    assert main(["estimate", "gpt3-small"]) == 0
    monkeypatch.undo()
    assert capsys.readouterr().err == ""
