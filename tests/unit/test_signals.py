"""bigtrain/signals.py: what a stop signal means, and the line a run started straight by an
interactive srun says (srun's double Ctrl-C is a SIGKILL, which no process can save through)."""
import os
import signal

import pytest

from bigtrain.signals import Preemption, PreemptedBeforeStep, interactive_srun_note

SLURM = {"SLURM_JOB_ID": "26", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0"}


@pytest.mark.parametrize("env,says", [
    ({}, False),                                                     # not under srun
    (SLURM, True),                                                   # srun inside salloc
    ({**SLURM, "ENVIRONMENT": "BATCH"}, False),                      # a batch job: no keyboard
    ({**SLURM, "BIGTRAIN_SLURM_SCRIPT": "1"}, False),                # slurm/'s scripts forward Ctrl-C
])
def test_the_interactive_srun_note(monkeypatch, env, says):
    for k in ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_PROCID", "ENVIRONMENT", "BIGTRAIN_SLURM_SCRIPT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    note = interactive_srun_note()
    if not says:
        assert note is None
        return
    assert note == ("started by an interactive srun: srun answers Ctrl-C twice with SIGKILL, which saves nothing; "
                    "to save and stop, run scancel --signal=USR1 26.0 (or start through slurm/train_srun.sbatch "
                    "under salloc, where Ctrl-C saves)")


def test_a_stop_signal_before_the_loop_ends_the_run_and_after_it_is_remembered():
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        p = Preemption()
        with pytest.raises(PreemptedBeforeStep) as e:
            os.kill(os.getpid(), signal.SIGUSR1)
        assert e.value.signum == signal.SIGUSR1
        p = Preemption()
        p.arm()
        os.kill(os.getpid(), signal.SIGTERM)
        assert p.signum == signal.SIGTERM  # saved at the next step boundary
        os.kill(os.getpid(), signal.SIGUSR1)  # a second request (not Ctrl-C): still saving
        assert p.signum == signal.SIGUSR1
    finally:
        for s, h in old.items():
            signal.signal(s, h)
