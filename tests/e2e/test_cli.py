"""The command line itself: every subcommand answers --help, quickly (no torch import)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import ROOT

SUBCOMMANDS = ["train", "presets", "estimate", "export", "merge"]


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
