"""bigtrain.estimate and the ``bigtrain estimate`` command (bigtrain.commands.estimate): the LoRA
paper's figures, what accelerate's and DeepSpeed's estimators say, the table (and what each row
counts), JSON and plot, the command's errors, --quantize's table and the --paper comparison with the
PEFT ZeRO-3 + QLoRA anchor. The model of memory they print is tested in test_memory.py and
test_memory_quantize.py."""

import argparse
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from bigtrain import estimate as E
from bigtrain.commands import estimate as C
from bigtrain.memory import CATEGORIES, CATEGORY_LABELS, GB, Setup, estimate, model_shape, predict_states

ROOT = Path(__file__).resolve().parents[2]
P175 = 174_604_283_904  # GPT-3 175B shapes on transformers' OPT, built on the meta device, tied once


@pytest.fixture(scope="module")
def big():
    return model_shape("gpt3-175b")


def test_paper_figures():
    f = E.paper_figures("gpt3-175b")
    assert f["lora_params_r1"] == 4_718_592 and f["lora_params_r4"] == 18_874_368
    assert 9_000 < f["param_reduction"] < 10_000  # "10,000 times fewer"
    assert f["checkpoint_lora_bytes_bf16"] == 37_748_736  # 37.7 MB: the paper's "35 MB"
    assert round(f["checkpoint_lora_bytes_bf16"] / 1e6, 1) == 37.7
    assert f["lora_vram_bf16_weights"] == 2 * P175  # "350 GB" = the bf16 weights
    assert abs(f["lora_vram_bf16_weights"] - 350e9) / 350e9 < 0.01
    # "1.2 TB": between 16-bit weights + Adam m,v (6 bytes/param) and + 16-bit grads (8)
    assert f["full_vram_16bit_weights_adam"] < 1.2e12 < f["full_vram_16bit_weights_grads_adam"]
    assert f["full_vram_mixed_precision_adam"] == 16 * P175


def test_tool_estimates(big):
    t = E.tool_estimates("gpt3-175b", num_gpus_per_node=8, num_nodes=8)
    a = t["accelerate"]
    assert a["ran"] and a["model"] == 2 * P175 and a["gradients"] == 3 * P175 and a["optimizer"] == 4 * P175
    d = t["deepspeed_zero3"]
    assert d["ran"]
    assert d["gpu_per_gpu"] == 4 * big.largest_module_params + int(18 * P175 / 64)
    assert d["all_live_params_seen"] < P175  # its data_ptr() de-duplication on meta tensors


def _args(*argv):
    p = argparse.ArgumentParser()
    C.add_parser(p.add_subparsers())
    return p.parse_args(["estimate", *argv])


def test_cmd_estimate_json_and_plot(tmp_path, capsys):
    png = tmp_path / "mem.png"
    rc = C.cmd_estimate(_args("gpt3-175b", "--nodes", "8", "--gpus-per-node", "8", "--json",
                              "--plot", str(png)))
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["total_params"] == P175 and out["lora_params"] == 18_874_368
    assert out["lora"]["per_gpu_total"] < out["full"]["per_gpu_total"]
    assert set(out["full"]["per_gpu"]) == set(CATEGORIES)
    assert png.is_file() and png.stat().st_size > 20_000
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cmd_estimate_table_and_errors(capsys):
    assert C.cmd_estimate(_args("gpt3-large", "--gpus-per-node", "1", "--zero-stage", "0")) == 0
    text = capsys.readouterr().out
    for label in CATEGORY_LABELS.values():
        assert label in text
    assert "fewest GPUs that fit" in text and "whole job" in text
    assert C.cmd_estimate(_args("no-such-model")) == 2
    assert C.cmd_estimate(_args("gpt3-large", "--lora-targets", "nope")) == 2


def test_paper_output(capsys):
    assert C.cmd_estimate(_args("gpt3-175b", "--nodes", "8", "--gpus-per-node", "8", "--paper")) == 0
    out = capsys.readouterr().out
    assert "18,874,368" in out and "4,718,592" in out and "37.7 MB" in out
    assert "1.2 TB" in out and "350 GB" in out
    assert "accelerate" in out and "DeepSpeed" in out


def test_estimate_through_python_m_bigtrain():
    r = subprocess.run([sys.executable, "-m", "bigtrain", "estimate", "tiny-opt", "--gpus-per-node", "2",
                        "--seq-len", "128", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["total_params"] == 891904 and out["lora"]["fits"]


def test_help_teaches():
    p = argparse.ArgumentParser(prog="bigtrain")
    sub = C.add_parser(p.add_subparsers())
    text = sub.format_help()
    assert "examples:" in text and "--paper" in text and "16 bytes/param" in text
    assert "bigtrain estimate gpt3-175b" in text


def test_torch_amp_command():
    assert C.cmd_estimate(_args("gpt3-6.7b", "--gpus-per-node", "1", "--zero-stage", "0",
                                "--full-recipe", "torch-amp", "--no-checkpointing", "--micro-batch", "2")) == 0


def test_estimate_command_hpz(capsys):
    """--hpz N: the setup line says so; sizes DeepSpeed would refuse are refused."""
    assert C.cmd_estimate(_args("gpt3-175b", "--nodes", "4", "--gpus-per-node", "8", "--hpz", "8")) == 0
    assert "hpZ over 8 GPUs" in capsys.readouterr().out
    assert C.cmd_estimate(_args("gpt3-175b", "--nodes", "4", "--gpus-per-node", "8", "--hpz", "5")) == 2
    assert "--hpz 5 must be >= 1 and divide the GPU count 32" in capsys.readouterr().err
    assert C.cmd_estimate(_args("gpt3-175b", "--gpus-per-node", "8", "--hpz", "8", "--zero-stage", "2")) == 2
    assert "needs --zero-stage 3" in capsys.readouterr().err


def test_estimate_num_layers(capsys):
    assert C.cmd_estimate(_args("gpt3-175b", "--num-layers", "40", "--gpus-per-node", "2", "--json")) == 0
    est = json.loads(capsys.readouterr().out)
    per_layer = 12 * 12288 ** 2 + 13 * 12288
    assert est["total_params"] == 174_604_283_904 - 56 * per_layer
    assert est["model"] == "gpt3-175b (40 layers)"
    assert C.cmd_estimate(_args("gpt3-175b", "--num-layers", "0")) == 2
    assert "--num-layers must be > 0" in capsys.readouterr().err


def test_table_says_what_each_row_counts(capsys):
    """Every row of the table is explained under it; the two allowances that are no tensor of the
    model (the CUDA context + fragmentation, LoRA's buffer of gathered layers) say what they hold,
    and the LoRA buffer line follows the world size."""
    assert C.cmd_estimate(_args("gpt3-2.7b", "--gpus-per-node", "2")) == 0
    text = capsys.readouterr().out
    legend = text.split("what the rows count (per GPU):\n", 1)[1]
    for label in ("frozen weights", "trainable weights", "gradients", "optimizer state", "activations",
                  "logits + loss", "ZeRO/comm buffers", "CUDA context"):
        assert f"\n  {label}" in "\n" + legend, label
    assert "0.5 GiB CUDA context + 5% of every other row" in legend
    assert "3 decoder layers gathered" in legend and "embeddings and head" in legend
    assert C.cmd_estimate(_args("gpt3-2.7b", "--gpus-per-node", "1")) == 0
    one = capsys.readouterr().out
    assert "3 decoder layers gathered" not in one and "nothing is gathered" in one


def test_estimate_seq_len_beyond_the_position_table_is_refused(capsys):
    from bigtrain.cli import main

    assert main(["estimate", "gpt3-small", "--seq-len", "100000"]) == 2
    assert ("error: --seq-len 100000 exceeds gpt3-small's 2048 positions (its learned position table; training "
            "refuses data.max_length above it too)") in capsys.readouterr().err
    assert main(["estimate", "llama2-7b", "--seq-len", "100000"]) == 0  # rotary: no table, no limit


ANCHOR = ("llama2-70b", "--gpus-per-node", "2", "--micro-batch", "2", "--seq-len", "2048", "--lora-r", "8",
          "--lora-targets", "all-linear", "--quantize", "nf4", "--gpu-mem-gib", "40")


def test_cli_quantize_table_json_and_errors(capsys):
    assert C.cmd_estimate(_args(*ANCHOR)) == 0
    text = capsys.readouterr().out
    assert "LoRA's base quantized nf4" in text and "LoRA (ZeRO-3, nf4 base)" in text
    rows = {line[:32].strip(): line[32:].split() for line in text.splitlines() if line[:32].strip() in
            ("frozen weights", "ZeRO/comm buffers + casts", "peak per GPU", "fits the GPU")}
    assert rows["frozen weights"] == ["0.00", "18.18"] and rows["ZeRO/comm buffers + casts"][1] == "7.07"
    assert rows["peak per GPU"][1] == "36.98" and rows["fits the GPU"] == ["NO", "yes"]
    assert "3 decoder layers dequantized to bfloat16" in text and "packed nf4 all-gather output" in text
    assert C.cmd_estimate(_args(*ANCHOR, "--json")) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["setup"]["quantize"] == "nf4" and out["lora"]["quantize"] == "nf4" and "quantize" not in out["full"]
    shape = model_shape("llama2-70b")
    assert out["lora"]["per_gpu"]["frozen_weights"] == predict_states(
        shape, ["all-linear"], 8, 2, "bfloat16", quantize="nf4")["frozen_weights"]
    assert C.cmd_estimate(_args(*ANCHOR[:-4], "--gpu-mem-gib", "40", "--json")) == 0  # no --quantize
    plain = json.loads(capsys.readouterr().out)
    assert plain["setup"]["quantize"] is None and plain["lora"]["quantize"] is None and plain["full"] == out["full"]
    assert plain["lora"]["per_gpu"]["frozen_weights"] > 3.5 * out["lora"]["per_gpu"]["frozen_weights"]
    for extra, flag in ((("--zero-stage", "0"), "--zero-stage 0"), (("--hpz", "2"), "--hpz 2"),
                        (("--offload-param",), "--offload-param")):
        assert C.cmd_estimate(_args(*ANCHOR, *extra)) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --quantize nf4 needs LoRA's ZeRO-3 base") and flag in err and err.count("\n") == 1
    with pytest.raises(SystemExit):
        _args("gpt3-2.7b", "--quantize", "int4")
    assert "invalid choice: 'int4'" in capsys.readouterr().err
    p = argparse.ArgumentParser(prog="bigtrain")
    raw_help = C.add_parser(p.add_subparsers()).format_help()
    help_text = " ".join(raw_help.split())
    assert "--quantize {int8,nf4}" in help_text and "Needs ZeRO stage 3" in help_text
    assert "--lora-targets all-linear \\\n      --quantize nf4 --gpu-mem-gib 40" in raw_help  # the example
    print(text)


def test_paper_shows_quantized_bases_and_the_qlora_anchor(capsys):
    assert C.cmd_estimate(_args("gpt3-175b", "--nodes", "8", "--gpus-per-node", "8", "--paper", "--json")) == 0
    raw = capsys.readouterr().out
    out = json.loads(raw)  # only the JSON: DeepSpeed's import-time log line is kept off stdout
    qc = out["paper"]["quantized"]
    assert qc["world_size"] == 64 and [r["base"] for r in qc["rows"]] == ["bfloat16", "int8", "nf4"]
    big = model_shape("gpt3-175b")
    for r in qc["rows"]:
        e = estimate(big, Setup(world_size=64, quantize=r["quantize"]))["lora"]
        assert (r["frozen_weights"], r["per_gpu_total"], r["job_total"]) == (
            e["per_gpu"]["frozen_weights"], e["per_gpu_total"], e["job_total"])
    bf16, int8, nf4 = qc["rows"]
    assert bf16["per_gpu_total"] == out["lora"]["per_gpu_total"]  # the setup above is 8 x 8 already
    assert nf4["frozen_weights"] < int8["frozen_weights"] < bf16["frozen_weights"]
    # at 64 GPUs the gather buffers are most of the saving's size: int8 saves 0.62 GB per GPU, nf4 3.18
    assert bf16["per_gpu_total"] > int8["per_gpu_total"] > nf4["per_gpu_total"]
    assert round((bf16["per_gpu_total"] - int8["per_gpu_total"]) / GB, 2) == 0.62
    assert round((bf16["per_gpu_total"] - nf4["per_gpu_total"]) / GB, 2) == 3.18
    a = out["paper"]["qlora_anchor"]
    assert a["reported_gb_per_gpu"] == 36.6 and a["quantize"] == "nf4" and a["gpus"] == 2
    assert round(a["per_gpu_total"] / GB, 2) == 36.98 and round(a["per_gpu_allocated"] / GB, 2) == 34.71
    assert round(a["per_gpu_total"] / (36.6 * GB) - 1, 3) == 0.010 and a["fits"]
    assert C.cmd_estimate(_args("gpt3-175b", "--nodes", "8", "--gpus-per-node", "8", "--paper")) == 0
    text = capsys.readouterr().out
    assert "What model.quantize changes for LoRA, gpt3-175b on 64 GPUs" in text
    assert "reported 36.6 GB per GPU" in text and "36.98 GB per GPU (34.44 GiB; +1.0% against 36.6 GB)" in text
    # the docs note states the same figures
    note = (ROOT / "docs" / "quantized_estimate.md").read_text()
    for fig in ("36.98", "34.71", "+1.0%", "18.18", "7.07", "5.13", "1.05", "5.37", "2.43", "1.66", "89.82"):
        assert fig in note, fig
    print(text[text.index("What model.quantize changes"):text.index("What the usual estimators")])


# ---------------------------------------------------------------------------------------------
# The step-time model per layout of the frozen base (zero.shard_group): bigtrain/steptime.py.


def test_step_time_hand_computed_tiny_opt():
    """tiny-opt (891,904 parameters; 4 layers of 198,272, width 128; root 98,816; LoRA q,v r=4: 8,192)
    on 2 nodes x 2 GPUs, seq 64, micro-batch 2, every layer recomputed, every parameter gathered
    (threshold 0), 1 TFLOP/s at 0.5, NVLink 2 GB/s, network 0.5 GB/s, 2 micro-steps per step."""
    from bigtrain import steptime as T

    shape = model_shape("tiny-opt")
    st = Setup(seq_len=64, micro_batch=2, persistence_threshold=0)
    rates = T.Rates(gpu_tflops=1.0, mfu=0.5, intra_node_gbps=2.0, inter_node_gbps=0.5)
    fpt = T.flops_per_token(shape, st)
    assert fpt == {"model": 4 * 891_904 + 8 * 4 * 64 * 128,  # 3,829,760: what a run's MFU counts
                   "recompute": 4 * (2 * 198_272 + 4 * 64 * 128),  # 1,717,248: the forward again
                   "total": 5_547_008}
    compute = 128 * 5_547_008 / 5e11
    allreduce = 2 * 4 * 8192 * 3 / 4 / 0.5e9  # 49,152 bytes over the network
    node = T.step_time(shape, st, 2, 2, "node", grad_accum=2, rates=rates)
    # groups of 2: each GPU receives the other's half of each layer 3 times (forward, backward,
    # recomputation), 198,272 bytes each, and of the root once, 98,816 bytes
    assert node["gather"] == {"layer": 198_272, "passes": 3.0, "root": 98_816, "total": 2_478_080}
    assert node["gather_link"] == "intra-node" and node["gather_s"] == pytest.approx(2_478_080 / 2e9)
    assert node["compute_s"] == pytest.approx(compute) and node["bound"] == "compute"
    assert node["allreduce_s"] == pytest.approx(allreduce)
    assert node["step_s"] == pytest.approx(2 * compute + allreduce) == pytest.approx(2.938372096e-3)
    assert node["tokens_per_s_per_gpu"] == pytest.approx(256 / 2.938372096e-3)
    world = T.step_time(shape, st, 2, 2, "world", grad_accum=2, rates=rates)
    # the world's group of 4 spans both nodes: 3/4 of every tensor over the network
    assert world["gather"]["total"] == 12 * 3 * 2 * 198_272 // 4 + 3 * 2 * 98_816 // 4 == 3_717_120
    assert world["gather_link"] == "inter-node" and world["bound"] == "gathers"
    assert world["step_s"] == pytest.approx(2 * 3_717_120 / 0.5e9 + allreduce) == pytest.approx(1.4966784e-2)
    one = T.step_time(shape, st, 2, 2, 1, grad_accum=2, rates=rates)
    assert one["gather_bytes"] == 0 and one["gather_link"] == "none" and one["step_s"] == node["step_s"]
    # checkpointing off: two passes, no recomputed FLOPs
    off = T.step_time(shape, replace(st, checkpointing=False), 2, 2, "node", rates=rates)
    assert off["gather"]["passes"] == 2.0 and off["flops_per_token"]["recompute"] == 0
    half = T.step_time(shape, replace(st, checkpoint_layers=2), 2, 2, "node", rates=rates)
    assert half["gather"]["passes"] == 2.5 and half["flops_per_token"]["recompute"] == 1_717_248 / 2
    with pytest.raises(ValueError, match="shard_group=3 must be a positive divisor of the world size 4"):
        T.step_time(shape, st, 2, 2, 3, rates=rates)
    with pytest.raises(ValueError, match="mfu"):
        T.step_time(shape, st, 2, 2, "node", rates=T.Rates(mfu=1.5))


def test_step_time_llama2_70b_anchor():
    """The issue's anchor: Llama-2-70B, seq 8192, checkpointing, the base over the world of 2 nodes x 8:
    about 3 x 138 GB received per GPU per micro-step (386 GB: 15/16 of it), 7.7 s at 50 GB/s against
    6.6 s of compute (478 GFLOP per token at 0.6 x 989 TFLOP/s); within a node the same gathers take
    0.8 s on NVLink and the step is compute-bound."""
    from bigtrain import steptime as T

    shape = model_shape("llama2-70b")
    st = Setup(seq_len=8192, lora_r=16, lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    world = T.step_time(shape, st, 2, 8, "world")
    assert 3 * 138e9 * 0.9 < world["gather_bytes"] < 3 * 138e9
    assert round(world["gather_bytes"] / GB, 1) == 386.0
    assert 7.0 < world["gather_s"] < 8.5 and 6.0 < world["compute_s"] < 7.5
    assert round(world["gather_s"], 2) == 7.72 and round(world["compute_s"], 2) == 6.59
    assert world["bound"] == "gathers"
    node = T.step_time(shape, st, 2, 8, "node")
    assert node["gather_link"] == "intra-node" and round(node["gather_s"], 2) == 0.80 and node["bound"] == "compute"
    assert round(node["tokens_per_s_per_gpu"]) == 1242 and round(world["tokens_per_s_per_gpu"]) == 1060
    # the measured 2-H200 run (docs/results.md, 1,145 tokens/s per GPU, every layer recomputed) is
    # 0.55 of 989 TFLOP/s by this count: the default 0.6 is of that order
    assert round(1145 * world["flops_per_token"]["total"] / 989e12, 2) == 0.55


def test_compare_layouts_recommends_node_for_70b_and_world_when_a_node_is_too_small():
    from bigtrain import steptime as T

    shape = model_shape("llama2-70b")
    st = Setup(seq_len=8192, lora_r=16, lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    c = T.compare_layouts(shape, st, 2, 8)
    assert [r["layout"] for r in c["rows"]] == ["world", "node", "1"]
    assert [r["shard_group"] for r in c["rows"]] == [16, 8, 1]
    assert [r["fits"] for r in c["rows"]] == [True, True, False]
    assert c["recommended"] == "node"
    assert c["why"].startswith("node: gathers stay on NVLink; the base at 1/8 per GPU fits with 41 GiB to spare")
    assert "world is 1.17x slower (7.72 s of gathers per micro-step over 50 GB/s against 6.59 s of compute)" in c["why"]
    assert T.auto_layout(shape, st, 2, 8) == "node" and T.auto_layout(shape, st, 1, 8) == "world"
    assert T.lora_peak_per_gpu(shape, replace(st, world_size=16), 8) == c["rows"][1]["per_gpu_total"]
    # GPT-3 175B in bf16 on nodes of 2 GPUs with 80 GiB: half the base (175 GB) cannot fit a GPU, so the
    # base goes over the world, gathers crossing nodes and all
    big = model_shape("gpt3-175b")
    c2 = T.compare_layouts(big, Setup(gpu_mem_bytes=80 * 2 ** 30), 4, 2)
    assert [(r["layout"], r["fits"]) for r in c2["rows"]] == [("world", True), ("node", False), ("1", False)]
    assert c2["recommended"] == "world" and T.auto_layout(big, Setup(), 4, 2) == "world"
    assert "node does not fit (190.1 GiB per GPU)" in c2["why"]
    # nothing fits: no recommendation, and why
    c3 = T.compare_layouts(big, Setup(), 1, 2)
    assert c3["recommended"] is None and c3["why"].startswith("none fits 80 GiB")


L70 = ("llama2-70b", "--nodes", "2", "--gpus-per-node", "8", "--seq-len", "8192", "--lora-r", "16",
       "--lora-targets", "q_proj,k_proj,v_proj,o_proj")


def test_cli_layouts_table_and_recommendation(capsys):
    """--nodes > 1: the layouts of the base under the memory table, predicted step time, and the
    recommendation; one node prints no such table (the memory table is unchanged)."""
    assert C.cmd_estimate(_args(*L70)) == 0
    text = capsys.readouterr().out
    tail = text[text.index("Layouts of LoRA's frozen base over 16 GPUs (2 nodes x 8), zero.shard_group; "
                           "step time PREDICTED, not measured:"):]
    assert ("micro-batch 1 x 8192 tokens, grad-accum 1, 989 TFLOP/s x 0.6, NVLink 450 GB/s, network 50 GB/s "
            "per GPU") in tail
    rows = {ln.split()[0]: ln.split()[1:] for ln in tail.splitlines()[3:6]}
    assert rows["world"] == ["16", "8.62", "33.10", "yes", "386.0", "network", "7.72", "6.59", "7.73", "1,060"]
    assert rows["node"] == ["8", "17.25", "42.16", "yes", "360.3", "NVLink", "0.80", "6.59", "6.60", "1,242"]
    assert rows["1"][:4] == ["1", "137.95", "162.41", "NO"]
    assert ("recommended: zero.shard_group=node: gathers stay on NVLink; the base at 1/8 per GPU fits with 41 GiB "
            "to spare; 1,242 tokens/s per GPU; world is 1.17x slower") in tail
    # docs/cluster.md pastes this output (Choosing a layout)
    doc = (ROOT / "docs" / "cluster.md").read_text()
    assert "\n".join(tail.splitlines()[:6]) in doc and tail.splitlines()[-1] in doc
    # a slower network and 4 micro-steps per step: world falls further behind, node does not move
    assert C.cmd_estimate(_args(*L70, "--inter-node-bw", "25", "--grad-accum", "4", "--json")) == 0
    lay = json.loads(capsys.readouterr().out)["layouts"]
    world, node = lay["rows"][0], lay["rows"][1]
    assert lay["recommended"] == "node" and lay["grad_accum"] == 4 and lay["rates"]["inter_node_gbps"] == 25
    assert round(world["gather_s"], 2) == 15.44 and world["step_s"] == pytest.approx(4 * world["gather_s"] + world["allreduce_s"])
    assert round(node["tokens_per_s_per_gpu"]) == 1242
    # one node: no layouts table
    assert C.cmd_estimate(_args("gpt3-2.7b", "--gpus-per-node", "8")) == 0
    assert "Layouts of LoRA's frozen base" not in capsys.readouterr().out
    # GPT-3 175B on nodes of 2 GPUs: half the base does not fit 80 GiB, the world is recommended
    assert C.cmd_estimate(_args("gpt3-175b", "--nodes", "4", "--gpus-per-node", "2")) == 0
    text = capsys.readouterr().out
    assert "recommended: zero.shard_group=world: gathers cross nodes at 50 GB/s; the base at 1/8 per GPU fits" in text
    assert "node does not fit (190.1 GiB per GPU)" in text


def test_cli_shard_group_column_and_errors(capsys):
    assert C.cmd_estimate(_args(*L70, "--shard-group", "node", "--json")) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["setup"]["shard_group"] == 8 and out["lora"]["per_gpu"]["frozen_weights"] == 17_246_799_872
    assert C.cmd_estimate(_args(*L70, "--shard-group", "node")) == 0
    assert "LoRA's base partitioned over groups of 8 GPUs (zero.shard_group)" in capsys.readouterr().out
    for extra, msg in ((("--shard-group", "3"), "error: shard_group=3 must be a positive divisor of the world size 16"),
                       (("--shard-group", "node", "--hpz", "8"), "error: shard_group=8 cannot be combined with hpZ"),
                       (("--shard-group", "rack"), "error: shard_group='rack' is not world, node or an integer"),
                       (("--mfu", "1.5"), "error: --mfu is the fraction of --gpu-tflops achieved, at most 1"),
                       (("--inter-node-bw", "0"), "error: --inter-node-bw must be > 0, got 0.0"),
                       (("--grad-accum", "0"), "error: --grad-accum must be > 0, got 0")):
        assert C.cmd_estimate(_args(*L70, *extra)) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith(msg) and err.count("\n") == 1, err
    p = argparse.ArgumentParser(prog="bigtrain")
    text = " ".join(C.add_parser(p.add_subparsers()).format_help().split())
    for flag in ("--shard-group", "--grad-accum", "--gpu-tflops", "--mfu", "--intra-node-bw", "--inter-node-bw"):
        assert flag in text, flag
    assert "--inter-node-bw 25 # which zero.shard_group" in text
