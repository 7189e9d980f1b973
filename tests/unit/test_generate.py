"""Generation with unmerged adapters (bigtrain's hooks) against transformers' own generate on the
merged model, batching, sampling, stop strings and the padded vocabulary."""
from pathlib import Path

import pytest
import torch

from bigtrain.data import load_tokenizer
from bigtrain.generate import Sampling, cut_at_stop, generate_ids, plan, prompt_ids, read_prompts
from bigtrain.switch import AdapterBank
from helpers import load_model, make_ckpt

BUILTIN = Path(__file__).resolve().parents[2] / "bigtrain" / "assets" / "tiny-opt"  # pretrained: real text
TARGETS = {"builtin": ["q_proj", "v_proj"], "tiny-opt": ["q_proj", "v_proj"], "tiny-llama": ["q_proj", "v_proj", "down_proj"],
           "tiny-gpt2": ["c_attn"]}
PROMPTS = ["<mr> name[The Eagle], food[French]\nDescription:", "hello", "a somewhat longer prompt, to pad the others"]


@pytest.mark.parametrize("name", ["builtin", "tiny-llama", "tiny-gpt2"])
def test_greedy_ids_with_an_adapter_equal_transformers_generate_on_the_merged_model(tiny_models, tmp_path, name):
    from bigtrain.export import merge_checkpoint

    base = BUILTIN if name == "builtin" else tiny_models[name]
    ckpt, _ = make_ckpt(tmp_path / "ck", base, TARGETS[name], seed=5)
    merge_checkpoint(ckpt, tmp_path / "merged")
    merged = load_model(tmp_path / "merged")
    tok = load_tokenizer(str(base))
    s = Sampling(max_new_tokens=24)
    model = load_model(base)
    bank = AdapterBank.from_checkpoints(model, {"x": ckpt})
    ids = [prompt_ids(tok, p) for p in PROMPTS]
    bank.use("x")
    ours = generate_ids(model, tok, ids, s, batch_size=1)
    batched = generate_ids(model, tok, ids, s, batch_size=3)  # left-padded together
    bank.use(None)
    bare = generate_ids(model, tok, ids, s, batch_size=1)
    with torch.no_grad():
        theirs = [merged.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                  max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id,
                                  eos_token_id=tok.eos_token_id)[0, len(p):].tolist() for p in ids]
    theirs = [t[:t.index(tok.eos_token_id)] if tok.eos_token_id in t else t for t in theirs]
    print(name, [len(t) for t in ours], ours[0][:8], bare[0][:8])
    assert ours == theirs
    assert batched == ours
    assert sum(len(t) for t in ours) > 30  # real generations, not an immediate eos
    # not one token repeated (the random tiny models do repeat a few; the pretrained one writes text)
    assert len({t for row in ours for t in row}) > (10 if name == "builtin" else 3)
    assert bare != ours  # the adapter changes what is generated


def test_sampling_is_reproducible_by_seed_and_stops_at_stop_strings(tiny_models, tmp_path):
    base = tiny_models["tiny-opt"]
    tok = load_tokenizer(str(base))
    model = load_model(base)
    ids = [prompt_ids(tok, p) for p in PROMPTS[:2]]

    def sample(seed, **kw):
        torch.manual_seed(seed)
        return generate_ids(model, tok, ids, Sampling(max_new_tokens=16, temperature=0.9, top_p=0.9, seed=seed, **kw))

    a, b, c = sample(1), sample(1), sample(2)
    assert a == b and a != c
    greedy = generate_ids(model, tok, ids, Sampling(max_new_tokens=16))
    assert greedy != a
    # a stop string taken from the greedy text ends the generation there; the text is cut before it
    text = tok.decode(greedy[0], skip_special_tokens=True)
    stop = text[len(text) // 2:len(text) // 2 + 2]
    stopped = generate_ids(model, tok, ids[:1], Sampling(max_new_tokens=16, stop=[stop]))[0]
    assert len(stopped) < len(greedy[0]) and greedy[0][:len(stopped)] == stopped
    assert stop in tok.decode(stopped, skip_special_tokens=True)
    assert cut_at_stop(text, [stop]) == text[:text.find(stop)]


def test_padded_vocabulary_rows_are_never_generated():
    import transformers as tf

    from bigtrain.presets import hf_config_for
    from bigtrain.vocab import run_config

    tok = load_tokenizer(None)
    cfg = hf_config_for("tiny-opt", vocab_size=1030)
    padded = run_config(cfg, head_is_target=False)
    assert padded.vocab_size == 1088
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(padded).eval()
    # the padded rows are zeros in a run; here their logits are made to win every argmax, as a zero
    # row does whenever the real logits are all negative
    model.get_output_embeddings().register_forward_hook(
        lambda m, i, o: torch.cat([o[..., :1030], o[..., 1030:] + 100.0], -1))
    ids = [prompt_ids(tok, "hello")]
    unmasked = generate_ids(model, tok, ids, Sampling(max_new_tokens=8))
    masked = generate_ids(model, tok, ids, Sampling(max_new_tokens=8), vocab=1030)
    assert all(t >= 1030 for t in unmasked[0]) and len(unmasked[0]) == 8
    assert all(t < 1030 for t in masked[0]) and len(masked[0]) >= 1


def test_prompts_file_and_plan_name_the_line(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a", "adapter": "x"}\n\n{"prompt": "b"}\n{"prompt": "c", "adapter": "base"}\n')
    rows = read_prompts(str(f))
    jobs = plan(rows, ["y"], ["x", "y"], str(f))
    assert [(i, n, r["prompt"]) for i, n, r in jobs] == [(0, "x", "a"), (1, "y", "b"), (2, "base", "c")]
    f.write_text('{"prompt": "a"}\n{"prompt": "b", "adapter": "nope"}\n')
    with pytest.raises(ValueError, match=f"{f}:2: no adapter named 'nope'"):
        plan(read_prompts(str(f)), ["x"], ["x"], str(f))
    f.write_text('{"prompt": "a"}\n{"text": 1}\n')
    with pytest.raises(ValueError, match=f"{f}:2: expected an object with a string field 'prompt'"):
        read_prompts(str(f))


def test_a_prompt_too_long_for_the_positions_is_named_before_any_work(tmp_path, capsys):
    from bigtrain.cli import main
    from bigtrain.generate import check_positions
    from bigtrain.presets import position_limit
    from bigtrain.presets import hf_config_for

    opt, llama = hf_config_for("tiny-opt", vocab_size=1024), hf_config_for("tiny-llama", vocab_size=1024)
    assert position_limit(opt) == opt.max_position_embeddings and position_limit(llama) is None  # rotary: no table
    n = opt.max_position_embeddings
    check_positions(opt, [[1] * (n - 10)], 10, ["p"])
    with pytest.raises(ValueError, match=f"^p: {n - 9} prompt tokens plus --max-new-tokens 10 exceed the model's {n}"):
        check_positions(opt, [[1] * (n - 9)], 10, ["p"])
    check_positions(llama, [[1] * 10_000], 10, ["p"])
    # through the command, on a real checkpoint of the shipped base: one line, before any process group
    ckpt, _ = make_ckpt(tmp_path / "ck", BUILTIN, ["q_proj"], seed=1)
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "short"}\n' + '{"prompt": "%s"}\n' % ("x " * 300))
    capsys.readouterr()
    assert main(["generate", str(ckpt), "--prompts", str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{f}:2: " in err and "exceed the model's 256 positions" in err, err


def test_chat_prompts_are_the_template_with_the_assistant_header(tmp_path):
    """A "messages" row (and --chat) gives the model the conversation as chat training rendered it,
    ending with the assistant's header: the ids equal transformers' apply_chat_template with
    add_generation_prompt, and the row's final assistant turn is the reference, not the input."""
    import json

    from bigtrain.generate import row_ids

    tok = load_tokenizer(None)  # the built-in tokenizer and its chat template
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "name[Aromi], area[riverside]"}]
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"messages": conv + [{"role": "assistant", "content": "Aromi is by the river."}]}) + "\n"
                    + json.dumps({"messages": [{"role": "assistant", "content": "x"}]}) + "\n")
    with pytest.raises(ValueError, match=r"p.jsonl:2: 'messages' holds only an assistant turn"):
        read_prompts(str(path))
    path.write_text(path.read_text().splitlines()[0] + "\n")
    (row,) = read_prompts(str(path))
    assert row["messages"] == conv and row["completion"] == "Aromi is by the river."
    ids = row_ids(tok, row)
    assert ids == tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert tok.decode(ids) == "<s><|system|>\nBe brief.\n<|user|>\nname[Aromi], area[riverside]\n<|assistant|>\n"
    tok.chat_template = None
    with pytest.raises(Exception, match="need a chat template"):
        row_ids(tok, row)
