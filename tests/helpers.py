"""Running bigtrain the way users do (real launchers, real CLI) and reading what it wrote."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def _env(extra=None):
    env = dict(os.environ)
    env.update({"WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONUNBUFFERED": "1"})
    env.pop("BIGTRAIN_CRASH_AT", None)
    env.pop("BIGTRAIN_FAULT_ENOSPC", None)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(k, None)
    env.update(extra or {})
    return env


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_workers(worker, worlds, tmp_path_factory, args=(), timeout=400, prefix="w"):
    """Start ``worker`` (a script in tests/dist writing ``<out>/rank<R>.json``) under torchrun once
    per world size in ``worlds``, all at once (the processes are mostly importing), each with its
    own output directory as its first argument, then ``args``; wait, and return {world: [each
    rank's JSON]}. A failed launch is an assertion naming the world size, with the log's tail."""
    return torchrun_jobs(worker, {n: (n, args) for n in worlds}, tmp_path_factory, timeout, prefix)


def torchrun_jobs(worker, jobs, tmp_path_factory, timeout=400, prefix="w"):
    """:func:`torchrun_workers` for any set of launches: ``jobs`` maps a key to (ranks, args); all
    start at once; returns {key: [each rank's JSON]}."""
    return torchrun_wait(torchrun_start(worker, jobs, tmp_path_factory, prefix), timeout)


def torchrun_start(worker, jobs, tmp_path_factory, prefix="w") -> dict:
    """The start of :func:`torchrun_jobs`: launches every job and returns at once, for
    :func:`torchrun_wait` (other work can run in between)."""
    import shutil

    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = {}
    for key, (n, args) in jobs.items():
        out = tmp_path_factory.mktemp(re.sub(r"[^\w.-]+", "_", f"{prefix}{key}"))  # a key may be a tuple
        cmd = [torchrun, "--nproc_per_node", str(n), "--master_port", str(free_port()), str(worker), str(out),
               *map(str, args)]
        procs[key] = (subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
                      out, n)
    return procs


def torchrun_wait(procs: dict, timeout=400) -> dict:
    """The end of :func:`torchrun_jobs`: wait for :func:`torchrun_start`'s launches; {key: [each
    rank's JSON]}. A failed launch is an assertion naming it, with the log's tail."""
    results = {}
    try:
        for key, (p, out, n) in procs.items():
            log, _ = p.communicate(timeout=timeout)
            assert p.returncode == 0, f"torchrun {key} (N={n}) failed:\n{log[-3000:]}"
            results[key] = [json.loads((out / f"rank{r}.json").read_text()) for r in range(n)]
    finally:
        for p, _, _ in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def start(cmd):
    """Start ``cmd`` (a bigtrain command line) as users do, its output read as text."""
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def read_until(proc, text: str) -> str:
    """Read ``proc``'s output up to and including the first line holding ``text``; an assertion with
    the output's tail if it ends first."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if text in line:
            return "".join(lines)
    raise AssertionError("".join(lines)[-3000:])


def run(cmd, timeout=600, env=None, check=True, preexec_fn=None):
    p = subprocess.run(cmd, cwd=ROOT, env=_env(env), capture_output=True, text=True, timeout=timeout,
                       preexec_fn=preexec_fn)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {p.returncode}\n--- stdout\n{p.stdout[-4000:]}"
                             f"\n--- stderr\n{p.stderr[-6000:]}")
    return p


def run_all(cmds, timeout=600, env=None, check=True):
    """:func:`run` for independent commands, run side by side; returns their results in order.
    ``check`` and ``env`` (extra variables): one for all, or a list of one per command. Each bigtrain
    process runs with OMP_NUM_THREADS=1 (:func:`_env`) and spends its first seconds importing torch,
    transformers and DeepSpeed on one core, so on the 2-core CI machine two of them take about the
    time of one; at most ``max(2, cpu count)`` run at once. Only for commands that do not depend on
    each other's outputs (and not for two runs into one output directory, which its run lock refuses)."""
    from concurrent.futures import ThreadPoolExecutor

    checks = list(check) if isinstance(check, (list, tuple)) else [check] * len(cmds)
    envs = list(env) if isinstance(env, (list, tuple)) else [env] * len(cmds)
    assert len(checks) == len(envs) == len(cmds)
    with ThreadPoolExecutor(max(1, min(len(cmds), max(2, os.cpu_count() or 1)))) as pool:
        futures = [pool.submit(run, cmd, timeout, e, c) for cmd, e, c in zip(cmds, envs, checks)]
        return [f.result() for f in futures]


def train_cmd(nproc, overrides):
    """bigtrain train in one process, or under torchrun with nproc ranks."""
    if nproc == 1:
        return [sys.executable, "-m", "bigtrain", "train", *overrides]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port()), "-m", "bigtrain", "train", *overrides]


def tiny_overrides(out_dir, model_dir, steps, micro, **extra):
    base = {"train.output_dir": str(out_dir), "model.path": str(model_dir), "train.max_steps": steps,
            "train.micro_batch_size": micro, "train.log_every": 1, "train.eval_every": 1000,
            "data.eval": "null", "logging.progress_bar": "false", "train.warmup_steps": 2,
            "train.lr": 5e-3, "checkpoint.every": 0, "zero.persistence_threshold": 0,
            "train.device": "cpu", "data.max_length": 64}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def losses(out_dir):
    rows = [json.loads(line) for line in (Path(out_dir) / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def final_adapters(out_dir):
    latest = (Path(out_dir) / "checkpoints" / "latest").read_text().strip()
    return load_file(str(Path(out_dir) / "checkpoints" / latest / "adapter_model.safetensors"))


def max_adapter_diff(a_dir, b_dir):
    """The largest absolute difference between two runs' final adapters (the same tensors in both)."""
    A, B = final_adapters(a_dir), final_adapters(b_dir)
    assert A.keys() == B.keys()
    return max((A[k] - B[k]).abs().max().item() for k in A)


def ranks(out_dir):
    return json.loads((Path(out_dir) / "ranks.json").read_text())


def load_model(d, dtype=None):
    """A saved Hugging Face model, loaded by plain transformers, in eval mode (fp32 unless ``dtype``)."""
    import torch
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(str(d), dtype=dtype or torch.float32).eval()


def make_ckpt(root, base_dir, targets, seed, r=4, alpha=8.0, rslora=False, base_model=None, base_json=None):
    """A real bigtrain checkpoint (save_checkpoint) with random, non-zero A and B; ``base_json``: the
    base fingerprint it records (base.json). Returns (its directory, its adapter tensors)."""
    import torch

    from bigtrain.checkpoint import save_checkpoint
    from bigtrain.config import ZeroConfig
    from bigtrain.engine.core import Engine
    from bigtrain.inject import inject_lora

    model = load_model(base_dir)
    torch.manual_seed(seed)
    lora = inject_lora(model, targets, r, alpha, rslora=rslora)
    with torch.no_grad():
        for _, ad in lora.named_adapters():
            ad.lora_B.normal_(0, 0.2)
    engine = Engine(ZeroConfig(stage=0), device="cpu")
    opt = torch.optim.AdamW(lora.parameters(), lr=1e-3)
    cfg = {"r": r, "alpha": alpha, "dropout": 0.0, "rslora": rslora, "targets": targets,
           "modules": lora.names(), "base_model": base_model or str(base_dir), "dtype": "float32"}
    path = save_checkpoint(Path(root), 10, engine, lora, opt, {"step": 10}, cfg, base_json or {}, "", keep=2)
    lora.remove_hooks()
    return path, lora.adapter_state_dict()


# -- a tiny frozen base with adapters, in this process (the unit tests of the layer-level mechanisms) --
def tiny_lora_model(arch="tiny-llama", layers=4, hidden=None, ffn=None, dtype=None, targets=("q_proj", "v_proj"),
                    r=4, dropout=0.0):
    """A tiny frozen base (bigtrain.presets) with frozen_linear installed and LoRA adapters (B random,
    so they change the output), in eval mode as the engine leaves it."""
    import torch
    from torch import nn
    import transformers as tf

    from bigtrain import frozen_linear
    from bigtrain.inject import inject_lora
    from bigtrain.presets import hf_config_for

    cfg = hf_config_for(arch, vocab_size=512)
    cfg.num_hidden_layers = layers
    for key in ("dropout", "attention_dropout"):
        setattr(cfg, key, dropout)
    if hidden:
        cfg.hidden_size, cfg.intermediate_size = hidden, ffn
        cfg.num_attention_heads = cfg.num_key_value_heads = hidden // 64
        cfg.head_dim = 64
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype or torch.float32)
    model.requires_grad_(False)
    frozen_linear.install(model)  # as the engine does: frozen maps keep no input
    lora = inject_lora(model, list(targets), r, 2 * r, 0.0, False, torch.float32, "cpu")
    for _, ad in lora.named_adapters():
        nn.init.normal_(ad.lora_B, std=0.05)  # B != 0: the adapters change the output
    model.eval()  # as the engine leaves the frozen base: no dropout
    return model, lora


def lora_loss_and_grads(model, lora, ids):
    import torch
    from bigtrain.losses import token_loss_sum

    lora.zero_grad(set_to_none=True)
    ls, n = token_loss_sum(model, ids, torch.ones_like(ids), ids.clone())
    (ls / n).backward()
    return ls.detach(), {k: p.grad.clone() for k, p in lora.named_parameters()}


class SavedBytes:
    """Bytes autograd keeps for backward from one module's forward: every tensor packed by
    saved_tensors_hooks while it runs, once per storage, parameters (and their views) left out."""

    def __init__(self, model, module):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.params |= {b.untyped_storage().data_ptr() for b in model.buffers()}
        self.inside, self.storages = False, {}
        module.register_forward_pre_hook(lambda *a: setattr(self, "inside", True))
        module.register_forward_hook(lambda *a: setattr(self, "inside", False))

    def pack(self, t):
        import torch

        if self.inside and isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            if st.data_ptr() not in self.params:
                self.storages[st.data_ptr()] = st.nbytes()
        return t

    def total(self):
        return sum(self.storages.values())


def layer_saved_bytes(model, s: int, b: int) -> int:
    """Bytes autograd keeps for backward from the second decoder layer of ``model`` (a
    :func:`tiny_lora_model` in bf16) on a batch of b x s random tokens under bf16 autocast."""
    import torch

    from bigtrain import recompute

    layer = recompute.checkpointable_layers(model)[1]
    saved = SavedBytes(model, layer)
    ids = torch.randint(0, 512, (b, s), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids).logits
    out.float().sum().backward()
    return saved.total()
