"""bigtrain export (PEFT) and bigtrain merge (streaming), checked against real PEFT and
plain transformers on tiny OPT / GPT-2 (Conv1D) / LLaMA models."""
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from bigtrain.inject import inject_lora
from helpers import _env, train_cmd
from helpers import load_model as _load
from helpers import make_ckpt

ROOT = Path(__file__).resolve().parents[2]
TARGETS = {"tiny-opt": ["q_proj", "v_proj"], "tiny-gpt2": ["c_attn"],
           "tiny-llama": ["q_proj", "v_proj", "down_proj"]}


def _ids(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (2, 16), generator=g)


@torch.no_grad()
def adapted_logits(base_dir, ckpt, ids):
    """What bigtrain computes: the base plus hooks (inject_lora + load_adapter_state_dict)."""
    from bigtrain.export import read_checkpoint

    _, cfg, tensors = read_checkpoint(ckpt)
    model = _load(base_dir)
    lora = inject_lora(model, cfg["modules"], cfg["r"], cfg["alpha"], rslora=cfg["rslora"])
    lora.load_adapter_state_dict(tensors)
    lora.eval()
    return model(ids).logits, model


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-gpt2", "tiny-llama"])
def test_peft_export_matches_bigtrain(tiny_models, tmp_path, name):
    from peft import PeftModel
    from safetensors.torch import load_file

    from bigtrain.cli import main

    base = tiny_models[name]
    ckpt, state = make_ckpt(tmp_path / "ck", base, TARGETS[name], seed=7, rslora=(name == "tiny-llama"))
    out = tmp_path / "peft"
    assert main(["export", str(ckpt), "--format", "peft", str(out)]) == 0
    pcfg = json.loads((out / "adapter_config.json").read_text())
    assert pcfg["peft_type"] == "LORA" and pcfg["task_type"] == "CAUSAL_LM"
    assert pcfg["fan_in_fan_out"] is (name == "tiny-gpt2")
    assert pcfg["use_rslora"] is (name == "tiny-llama")
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert len(tensors) == len(state)
    for k, v in state.items():
        module, part = k.rsplit(".", 1)
        assert torch.equal(tensors[f"base_model.model.{module}.{part}.weight"], v)

    ids = _ids(1000)
    ours, _ = adapted_logits(base, ckpt, ids)
    with torch.no_grad():
        plain = _load(base)(ids).logits
        peft_model = PeftModel.from_pretrained(_load(base), str(out)).eval()
        theirs = peft_model(ids).logits
    n_lora = sum(1 for n, _ in peft_model.named_modules() if n.endswith("lora_A.default"))
    assert n_lora == len(state) // 2
    assert (ours - plain).abs().max() > 1e-2  # the adapter really changes the output
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)

    bf = tmp_path / "peft-bf16"
    assert main(["export", str(ckpt), str(bf), "--dtype", "bf16"]) == 0
    assert {t.dtype for t in load_file(str(bf / "adapter_model.safetensors")).values()} == {torch.bfloat16}


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-gpt2", "tiny-llama"])
def test_merge_matches_adapted_model(tiny_models, tmp_path, name):
    import transformers as tf

    from bigtrain.export import merge_checkpoint

    base = tiny_models[name]
    ckpt, _ = make_ckpt(tmp_path / "ck", base, TARGETS[name], seed=11)
    out = tmp_path / "merged"
    st = merge_checkpoint(ckpt, out, max_shard_size="100KB")
    assert len(st["shards"]) > 1 and (out / "model.safetensors.index.json").is_file()
    assert st["merged_weights"] == len(json.loads((ckpt / "adapter_config.json").read_text())["modules"])

    ids = _ids(1000, seed=1)
    ours, _ = adapted_logits(base, ckpt, ids)
    merged = _load(out)
    with torch.no_grad():
        theirs = merged(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)

    base_cfg = json.loads((base / "config.json").read_text())
    assert merged.config.tie_word_embeddings == base_cfg.get("tie_word_embeddings", True)
    if merged.config.tie_word_embeddings:  # still one tensor: lm_head is the embedding
        assert merged.get_output_embeddings().weight.data_ptr() == merged.get_input_embeddings().weight.data_ptr()
    assert merged.dtype == torch.float32
    assert len(tf.AutoTokenizer.from_pretrained(str(out))) == len(tf.AutoTokenizer.from_pretrained(str(base)))


def test_merge_keeps_dtype_and_single_shard(tiny_models, tmp_path, capsys):
    """A bf16 base stays bf16 (in one model.safetensors under the 2GB default); --dtype overrides."""
    from safetensors.torch import load_file

    from bigtrain.cli import main

    src = tiny_models["tiny-llama"]
    bdir = tmp_path / "base-bf16"
    _load(src, torch.bfloat16).save_pretrained(bdir)  # no tokenizer: merge adds the built-in one
    ckpt, _ = make_ckpt(tmp_path / "ck", src, ["q_proj"], seed=3, base_model=str(bdir))
    out = tmp_path / "m"
    from bigtrain.export import merge_checkpoint

    st = merge_checkpoint(ckpt, out, progress=True)   # the progress bar path (a terminal's)
    assert st["merged_weights"] == 2 and "merge" in capsys.readouterr().err
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {torch.bfloat16}
    assert (out / "tokenizer.json").is_file()
    out32 = tmp_path / "m32"
    assert main(["merge", str(ckpt), str(out32), "--dtype", "fp32"]) == 0
    ids = _ids(1000, seed=2)
    m32 = _load(out32)
    assert m32.config.dtype == torch.float32
    with torch.no_grad():
        b32 = _load(bdir)  # bf16 weights upcast to fp32, as the merge does
        lora = inject_lora(b32, ["q_proj"], 4, 8.0)
        from bigtrain.export import read_checkpoint

        lora.load_adapter_state_dict(read_checkpoint(ckpt)[2])
        torch.testing.assert_close(m32(ids).logits, b32(ids).logits, rtol=0, atol=1e-5)


STREAM_SCRIPT = textwrap.dedent("""
    import ctypes, glob, json, re, sys
    from bigtrain.export import merge_checkpoint
    from safetensors.torch import load_file
    small_ckpt, big_ckpt, big_base, out = sys.argv[1:5]

    def kib(field):
        return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))

    def reset_peak():  # give freed heap back to the OS, then (Linux: '5') reset VmHWM to the RSS
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return kib("VmRSS")

    merge_checkpoint(small_ckpt, out + "/warm", max_shard_size="2MB")          # imports, warm caches
    r0 = reset_peak()
    st = merge_checkpoint(big_ckpt, out + "/merged-big", max_shard_size="2MB")
    merge_peak = kib("VmHWM")
    r1 = reset_peak()
    # contrast: holding every weight at once (cloned, so no lazily mapped pages)
    everything = [{k: v.clone() for k, v in load_file(f).items()} for f in glob.glob(big_base + "/*.safetensors")]
    load_peak = kib("VmHWM")
    print(json.dumps({"merge_growth": (merge_peak - r0) * 1024, "load_growth": (load_peak - r1) * 1024,
                      "stats": st}))
""")


def test_merge_streams_with_bounded_memory(tiny_models, tmp_path):
    """Peak RSS growth of a merge of a ~42 MB model stored in small shards stays a fraction of the
    model; loading the same weights at once grows RSS by about the model (the measurement works)."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=1024, hidden_size=256, num_hidden_layers=12, intermediate_size=768,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    big = tf.LlamaForCausalLM(cfg)
    bdir = tmp_path / "big"
    big.save_pretrained(bdir, max_shard_size="200KB")
    for f in tiny_models["tiny-llama"].glob("tokenizer*"):  # a real base ships its tokenizer
        shutil.copy(f, bdir / f.name)
    model_bytes = sum(p.numel() * 4 for p in big.parameters())
    del big
    big_ckpt, _ = make_ckpt(tmp_path / "ck-big", bdir, ["q_proj", "v_proj"], seed=5)
    small_ckpt, _ = make_ckpt(tmp_path / "ck-small", tiny_models["tiny-llama"], ["q_proj"], seed=6)
    p = subprocess.run([sys.executable, "-c", STREAM_SCRIPT, str(small_ckpt), str(big_ckpt), str(bdir),
                        str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads(p.stdout.strip().splitlines()[-1])
    merge_growth, load_growth = m["merge_growth"], m["load_growth"]
    print(f"model {model_bytes / 1e6:.1f} MB in {len(list(bdir.glob('*.safetensors')))} files; merge peak RSS "
          f"growth {merge_growth / 1e6:.1f} MB; peak tensor bytes held {m['stats']['peak_tensor_bytes'] / 1e6:.2f} MB;"
          f" load-all growth {load_growth / 1e6:.1f} MB")
    assert model_bytes > 40e6
    assert m["stats"]["total_bytes"] == model_bytes and len(m["stats"]["shards"]) >= 20
    assert m["stats"]["peak_tensor_bytes"] <= 2e6 + 1024 * 256 * 4  # one shard + the largest tensor
    assert merge_growth < model_bytes / 4
    assert load_growth > model_bytes * 0.7


def test_cli_errors_are_one_line_and_name_the_path(tiny_models, tmp_path, capsys):
    from bigtrain.cli import main

    base = tiny_models["tiny-opt"]
    ckpt, _ = make_ckpt(tmp_path / "ck", base, ["q_proj"], seed=1)
    capsys.readouterr()

    def err(argv):
        assert main(argv) == 1
        e = capsys.readouterr().err.strip()
        assert len(e.splitlines()) == 1, e
        return e

    e = err(["export", str(ckpt), str(tmp_path / "o1"), "--format", "onnx"])
    assert "'onnx'" in e and "peft" in e
    e = err(["merge", str(ckpt), str(tmp_path / "o2"), "--base", str(tmp_path / "nowhere")])
    assert str(tmp_path / "nowhere") in e
    e = err(["merge", str(tmp_path / "missing"), str(tmp_path / "o3")])
    assert str(tmp_path / "missing") in e
    # a checkpoints/ root (or run dir) means its latest checkpoint
    assert main(["export", str(tmp_path / "ck"), str(tmp_path / "o0")]) == 0
    assert (tmp_path / "o0" / "adapter_model.safetensors").is_file()
    capsys.readouterr()
    bad = ckpt / "adapter_model.safetensors"
    data = bytearray(bad.read_bytes())
    data[-1] ^= 0xFF
    bad.write_bytes(bytes(data))
    e = err(["export", str(ckpt), str(tmp_path / "o4")])
    assert str(bad) in e and "checksum" in e
    # output paths: a file, a non-empty directory, a size that is not one: refused, named
    good, _ = make_ckpt(tmp_path / "ck2", base, ["q_proj"], seed=2)
    capsys.readouterr()
    afile = tmp_path / "afile"
    afile.write_text("x")
    for cmd in ("export", "merge"):
        e = err([cmd, str(good), str(afile)])
        assert str(afile) in e and "not a directory" in e
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    for cmd in ("export", "merge"):
        e = err([cmd, str(good), str(busy)])
        assert str(busy) in e and "not empty" in e and "notes.txt" in e
    assert (busy / "notes.txt").read_text() == "mine" and len(list(busy.iterdir())) == 1
    assert main(["export", str(good), str(tmp_path / "o0")]) == 0   # re-export over an export: fine
    capsys.readouterr()
    for size in ("lots", "0"):
        e = err(["merge", str(good), str(tmp_path / f"m-{size}"), "--max-shard-size", size])
        assert "--max-shard-size" in e and repr(size) in e
    for cmd in ("export", "merge"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert f"bigtrain {cmd} " in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("name,targets", [("tiny-opt", "[q_proj,v_proj]"), ("tiny-gpt2", "[c_attn]")])
def test_merge_at_end_from_zero3_partitions_equals_file_merge(tiny_models, tmp_path, name, targets):
    """checkpoint.merge_at_end: 2 ranks under torchrun gather the partitioned base one tensor at a
    time and rank 0 writes W0 + s·B·A. Bit-identical to `bigtrain merge` of the final checkpoint
    (which streams the base from disk), tensor by tensor; plain transformers loads it."""
    from safetensors.torch import load_file

    from helpers import run, tiny_overrides, train_cmd
    from bigtrain.export import merge_checkpoint

    out = tmp_path / "run"
    run(train_cmd(2, tiny_overrides(out, tiny_models[name], 4, 2, **{
        "lora.targets": targets, "checkpoint.merge_at_end": "true",
        "checkpoint.merge_max_shard_size": "60KB"})))
    live = out / "merged"
    assert live.is_dir() and not (out / "merged.partial").exists()
    offline = tmp_path / "offline"
    merge_checkpoint(out, offline, max_shard_size="60KB")

    def tensors(d):
        files = sorted(p.name for p in d.glob("*.safetensors"))
        return files, {k: v for f in files for k, v in load_file(str(d / f)).items()}

    files_live, t_live = tensors(live)
    files_off, t_off = tensors(offline)
    assert len(files_live) > 1 and len(files_off) > 1
    assert t_live.keys() == t_off.keys()
    for k in t_live:
        assert t_live[k].dtype == t_off[k].dtype and torch.equal(t_live[k], t_off[k]), k
    index = lambda d: json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]  # noqa: E731
    # same tensors; the layout may differ (live: module order, offline: the base files' order)
    assert index(live).keys() == index(offline).keys() == t_live.keys()
    # the adapters moved, so the merged targets differ from the base
    _, t_base = tensors(tiny_models[name])
    changed = [k for k in t_live if k in t_base and not torch.equal(t_live[k], t_base[k])]
    assert changed and all(any(t in k for t in targets.strip("[]").split(",")) for k in changed), changed
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(_load(live)(ids).logits, _load(offline)(ids).logits)


def test_merge_of_a_truncated_base_names_the_file(tiny_models, tmp_path, capsys):
    """A base whose model.safetensors is truncated or not safetensors: one line naming the file and
    what to do (safetensors' own error names none), before OUT is created."""
    from bigtrain.cli import main

    base = tmp_path / "base"
    shutil.copytree(tiny_models["tiny-opt"], base)
    ckpt, _ = make_ckpt(tmp_path / "ck", base, ["q_proj"], seed=1)
    weights = base / "model.safetensors"
    whole = weights.read_bytes()
    for broken in (whole[:len(whole) - 100], b"\x00" * 64):
        weights.write_bytes(broken)
        capsys.readouterr()
        assert main(["merge", str(ckpt), str(tmp_path / "m")]) == 1
        e = capsys.readouterr().err.strip()
        assert len(e.splitlines()) == 1, e
        assert e.startswith(f"bigtrain: error: {weights}: cannot be read as safetensors") and "truncated" in e
        assert not (tmp_path / "m").exists()


def test_export_of_an_adapter_file_or_a_pickled_adapter_says_what_to_pass(tiny_models, tmp_path, capsys):
    """export/merge given an adapter *file* (a .bin or the .safetensors itself) or a directory holding
    a pickled adapter_model.bin: one line naming it, saying bigtrain reads safetensors checkpoints
    only and what to pass instead; nothing is written."""
    from bigtrain.cli import main

    ckpt, _ = make_ckpt(tmp_path / "ck", tiny_models["tiny-opt"], ["q_proj"], seed=1)
    pickled = tmp_path / "peft"
    pickled.mkdir()
    torch.save({"w": torch.zeros(2)}, pickled / "adapter_model.bin")
    (pickled / "adapter_config.json").write_text("{}")
    for cmd in ("export", "merge"):
        for given, named, said in ((pickled / "adapter_model.bin", pickled / "adapter_model.bin", "a file"),
                                   (ckpt / "adapter_model.safetensors", ckpt / "adapter_model.safetensors", "a file"),
                                   (pickled, pickled / "adapter_model.bin", "a pickled adapter")):
            capsys.readouterr()
            assert main([cmd, str(given), str(tmp_path / "o")]) == 1
            e = capsys.readouterr().err.strip()
            assert len(e.splitlines()) == 1, e
            assert e.startswith(f"bigtrain: error: {named}: {said}") and "checkpoints/step-N" in e, e
            assert not (tmp_path / "o").exists()
    assert "never pickles" in e



def test_merge_into_quantized_of_an_unquantized_run_is_refused(tiny_models, tmp_path, capsys):
    """--into-quantized needs a run trained with model.quantize: otherwise one line naming the
    checkpoint's config.yaml and what to do, and no output directory."""
    from bigtrain.cli import main

    ckpt, _ = make_ckpt(tmp_path / "ck", tiny_models["tiny-opt"], ["q_proj"], seed=2)
    capsys.readouterr()  # make_ckpt's loading bar
    assert main(["merge", str(ckpt), str(tmp_path / "m"), "--into-quantized"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"bigtrain: error: {ckpt / 'config.yaml'}: model.quantize is null (the run trained over the "
                   f"unquantized base); merge without --into-quantized"], err
    assert not (tmp_path / "m").exists()

def _eval_base(run, model_dir):
    """`bigtrain eval RUN --base DIR --quantize none`, started: its "base" row scores DIR itself, unquantized."""
    return subprocess.Popen([sys.executable, "-m", "bigtrain", "eval", str(run), "--base", str(model_dir), "--quantize",
                             "none", "--data", "builtin:e2e-eval", "--json"], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _base_loss(p) -> float:
    so, se = p.communicate(timeout=300)
    assert p.returncode == 0, se[-3000:]
    return {r["adapter"]: r["loss"] for r in json.loads(so.strip().splitlines()[-1])["results"]}["base"]


@pytest.mark.slow
def test_merge_and_export_of_quantized_runs(tmp_path, capsys, quantized_demos):
    """The demo trained over an nf4 and an int8 base (in parallel, 1 process each: tests/conftest.py's
    quantized_demos, the runs test_quantize_dist reads too). `bigtrain merge`
    writes W0 + s·B·A with W0 the unquantized weight on disk, bit for bit (every other tensor is the
    disk's, quantized or not); `--into-quantized` writes the run's dequantized base + s·B·A instead.
    PEFT loads `bigtrain export` on the unquantized base with the merged model's logits. Eval losses
    on builtin:e2e-eval (`bigtrain eval RUN --base MERGED --quantize none`): the merge into the
    quantized base scores the run's own final eval (the weights it was trained against); the merge
    into the unquantized base scores worse, by the README's measured amounts (nf4 1.0516 -> 1.0539,
    int8 1.0492 -> 1.0493)."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from bigtrain.cli import main
    from bigtrain.config import resolve_model_path
    from bigtrain.quantize import quantizable_weights, reference_dequantized

    runs = {q: quantized_demos[q][0] for q in ("nf4", "int8")}  # the demo's train.output_dir over each base
    base = Path(resolve_model_path("builtin:tiny-opt"))
    w0 = load_file(str(base / "model.safetensors"))
    quantized = set(quantizable_weights(_load(base)).values())
    assert len(quantized) == 24
    evals = {}
    for q in ("nf4", "int8"):
        run = runs[q]
        capsys.readouterr()
        assert main(["merge", str(run), str(tmp_path / f"{q}-merged")]) == 0
        assert main(["merge", str(run), str(tmp_path / f"{q}-merged-q"), "--into-quantized"]) == 0
        assert f"(its 24 quantized weights as model.quantize={q} held them at 1 rank(s))" in capsys.readouterr().out
        evals[q] = [_eval_base(run, tmp_path / f"{q}-merged"), _eval_base(run, tmp_path / f"{q}-merged-q")]
        ck = (run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip())
        ad = load_file(str(ck / "adapter_model.safetensors"))
        spec = json.loads((ck / "adapter_config.json").read_text())
        s = spec["alpha"] / spec["r"]
        merged = load_file(str(tmp_path / f"{q}-merged" / "model.safetensors"))
        into_q = load_file(str(tmp_path / f"{q}-merged-q" / "model.safetensors"))
        assert set(merged) == set(into_q) == set(w0)
        adapted = {f"{m}.weight": m for m in spec["modules"]}
        assert len(adapted) == 8
        for k, w in w0.items():
            deq = reference_dequantized(w, 1, scheme=q) if k in quantized else w
            if k in adapted:
                delta = (ad[f"{adapted[k]}.lora_B"] @ ad[f"{adapted[k]}.lora_A"]) * s
                assert torch.equal(merged[k], w + delta), k  # W0 from disk, unquantized
                assert torch.equal(into_q[k], deq + delta), k
            else:
                assert torch.equal(merged[k], w), k
                assert torch.equal(into_q[k], deq), k
            assert torch.equal(merged[k], into_q[k]) is (k not in quantized), k  # the two merges differ

    # (c) PEFT on the unquantized base: the merge into it
    out = tmp_path / "peft"
    assert main(["export", str(runs["nf4"]), str(out)]) == 0
    ids = _ids(1000, seed=4)
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(_load(base), str(out)).eval()(ids).logits
        ours = _load(tmp_path / "nf4-merged")(ids).logits
        on_q = _load(tmp_path / "nf4-merged-q")(ids).logits
    print(f"nf4 run: PEFT on the unquantized base vs the merged model: max |logit difference| "
          f"{(theirs - ours).abs().max():.2e}; vs the --into-quantized merge {(theirs - on_q).abs().max():.2e}")
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    assert (theirs - on_q).abs().max() > 1e-2  # the quantized base's model is another model

    figures = {}
    for q in ("nf4", "int8"):
        log = [json.loads(l) for l in (runs[q] / "train_log.jsonl").read_text().splitlines()]
        own = [r["eval_loss"] for r in log if "eval_loss" in r][-1]  # (a) over the quantized base
        merged_loss, into_q_loss = (_base_loss(p) for p in evals[q])  # (b), (d)
        figures[q] = (own, merged_loss)
        print(f"{q}: eval loss over the {q} base {own:.4f}; merged into the unquantized base {merged_loss:.4f} "
              f"({merged_loss - own:+.4f}); merged into the {q} base (--into-quantized) {into_q_loss:.4f}")
        assert into_q_loss == pytest.approx(own, abs=2e-6)  # the weights it was trained against
    # the measured differences (README): merging into the unquantized base costs nf4 ~0.0023, int8 ~0.0001
    (a4, b4), (a8, b8) = figures["nf4"], figures["int8"]
    assert (round(a4, 4), round(b4, 4)) == (1.0516, 1.0539), figures
    assert (round(a8, 4), round(b8, 4)) == (1.0492, 1.0493), figures
    assert 0.0015 < b4 - a4 < 0.0035 and 0 < b8 - a8 < 0.0005 and b8 - a8 < (b4 - a4) / 5, figures


@pytest.mark.slow
def test_merge_into_quantized_at_the_runs_world_size(tmp_path, capsys):
    """A 2-rank nf4 run (torchrun, gloo): nf4's block scales are quantized in groups that follow each
    rank's partition, so tiny-opt's nf4 base at 2 ranks is another base than at 1 (step-0 eval 1.9210
    against 1.9146). `bigtrain merge --into-quantized` dequantizes at the checkpoint's world size: its
    weights are the 2-rank dequantized base + s·B·A, bit for bit, and one process scoring the merged
    model gets the run's own 2-rank eval loss."""
    from safetensors.torch import load_file

    from bigtrain.cli import main
    from bigtrain.config import resolve_model_path
    from bigtrain.quantize import quantizable_weights, reference_dequantized

    run = tmp_path / "run"
    p = subprocess.run(train_cmd(2, [f"train.output_dir={run}", "logging.progress_bar=false", "train.sample_prompts=0",
                                     "model.quantize=nf4", "train.max_steps=20", "train.eval_every=20",
                                     "train.device=cpu"]),
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    log = [json.loads(l) for l in (run / "train_log.jsonl").read_text().splitlines()]
    own = [r["eval_loss"] for r in log if "eval_loss" in r]
    assert round(own[0], 4) == 1.9210 and len(own) == 2, own
    out = tmp_path / "merged-q"
    capsys.readouterr()
    assert main(["merge", str(run), str(out), "--into-quantized"]) == 0
    assert "as model.quantize=nf4 held them at 2 rank(s)" in capsys.readouterr().out
    scored = _eval_base(run, out)
    rebuilt = subprocess.Popen([sys.executable, "-m", "bigtrain", "eval", str(run), "--data", "builtin:e2e-eval",
                                "--json"], cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = Path(resolve_model_path("builtin:tiny-opt"))
    w0 = load_file(str(base / "model.safetensors"))
    merged = load_file(str(out / "model.safetensors"))
    ck = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    ad = load_file(str(ck / "adapter_model.safetensors"))
    spec = json.loads((ck / "adapter_config.json").read_text())
    differ = 0
    for k in quantizable_weights(_load(base)).values():
        deq2, deq1 = reference_dequantized(w0[k], 2, scheme="nf4"), reference_dequantized(w0[k], 1, scheme="nf4")
        differ += not torch.equal(deq2, deq1)
        m = k.removesuffix(".weight")
        if m in spec["modules"]:
            deq2 = deq2 + (ad[f"{m}.lora_B"] @ ad[f"{m}.lora_A"]) * (spec["alpha"] / spec["r"])
        assert torch.equal(merged[k], deq2), k
    assert differ > 0  # the 2-rank base is not the 1-process one: the world size matters
    loss = _base_loss(scored)
    so, se = rebuilt.communicate(timeout=300)
    assert rebuilt.returncode == 0, se[-3000:]
    one = {r["adapter"]: r["loss"] for r in json.loads(so.strip().splitlines()[-1])["results"]}["run"]
    print(f"2-rank nf4 run: own eval {own[-1]:.6f}, its --into-quantized merge scored in one process {loss:.6f}; "
          f"{differ} of 24 weights differ from the 1-process nf4 base; `bigtrain eval RUN` in one process (the "
          f"1-process nf4 base) {one:.6f}")
    assert loss == pytest.approx(own[-1], abs=2e-6)
    assert abs(one - own[-1]) > 1e-4  # bigtrain eval at another world size scores another base


def test_export_of_a_random_preset_run_needs_no_base_dir(tmp_path):
    """A run on a random preset (model.path=null, as the 175B benchmark runs) exports without --base:
    its config is the preset's. PEFT loads the adapter onto that architecture, every tensor in place."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from bigtrain.cli import main
    from bigtrain.export import read_checkpoint
    from bigtrain.presets import hf_config_for
    from helpers import run, tiny_overrides

    import transformers as tf

    run_dir = tmp_path / "run"
    run(train_cmd(1, tiny_overrides(run_dir, "null", 2, 2, **{"model.preset": "tiny-llama",
                                                               "checkpoint.every": 2})))
    out = tmp_path / "peft"
    assert main(["export", str(run_dir), "--format", "peft", str(out)]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "preset:tiny-llama"
    _, _, state = read_checkpoint(run_dir / "checkpoints" / "step-00000002")
    peft_model = PeftModel.from_pretrained(
        tf.AutoModelForCausalLM.from_config(hf_config_for("tiny-llama", vocab_size=1024)), str(out))
    named = dict(peft_model.named_parameters())
    for k, v in state.items():
        module, part = k.rsplit(".", 1)
        assert torch.equal(named[f"base_model.model.{module}.{part}.default.weight"], v)
    assert len(load_file(str(out / "adapter_model.safetensors"))) == len(state)
