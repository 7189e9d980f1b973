"""The data layer: generated assets, built-in tokenizer, label masking, truncation, packing,
bad-line handling, saved datasets and the collator."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import datasets
import pytest
import torch

from bigtrain import datagen
from bigtrain.config import ConfigError, DataConfig, load_config
from bigtrain.data import (ASSETS, IGNORE_INDEX, DataError, collate, load_examples,
                           load_tokenizer, skipped_summary)

datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def _write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines),
                    encoding="utf-8")
    return path


def _ids(tok, s: str) -> list[int]:
    return tok(s, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------
# Assets


def test_regenerated_assets_are_byte_identical(tmp_path):
    written = datagen.generate(tmp_path)
    rel = sorted(str(p.relative_to(tmp_path)) for p in written)
    assert rel == ["e2e_chat_eval.jsonl", "e2e_chat_train.jsonl", "e2e_eval.jsonl", "e2e_train.jsonl",
                   "lora_intro_ko.txt", "tokenizer/chat_template.jinja", "tokenizer/tokenizer.json",
                   "tokenizer/tokenizer_config.json"]
    for r in rel:
        assert (tmp_path / r).read_bytes() == (ASSETS / r).read_bytes(), r
    assert sum((ASSETS / r).stat().st_size for r in rel) < 2.5e6
    # the shipped tiny model carries the same tokenizer, chat template included
    assert (ASSETS / "tiny-opt" / "chat_template.jinja").read_bytes() == (tmp_path / "tokenizer/chat_template.jinja").read_bytes()


def test_builtin_dataset_shape():
    train = [json.loads(x) for x in (ASSETS / "e2e_train.jsonl").read_text("utf-8").splitlines()]
    evals = [json.loads(x) for x in (ASSETS / "e2e_eval.jsonl").read_text("utf-8").splitlines()]
    assert (len(train), len(evals)) == (4000, 400)
    for ex in train[:200] + evals[:50]:
        assert set(ex) == {"prompt", "completion"}
        assert ex["prompt"].startswith("<mr> name[") and ex["prompt"].endswith("\nDescription:")
        assert ex["completion"].startswith(" ") and ex["completion"].endswith(".")
        name = ex["prompt"].split("name[", 1)[1].split("]", 1)[0]
        assert name in ex["completion"]
    mrs = {ex["prompt"] for ex in train}
    assert not any(ex["prompt"] in mrs for ex in evals)  # eval MRs are unseen
    assert len({ex["completion"] for ex in train}) > 3900  # paraphrases, not a lookup table


# ---------------------------------------------------------------------------------------------
# Tokenizer


def test_builtin_tokenizer(tok):
    from transformers import AutoTokenizer

    assert len(tok) == 1024
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == ["<pad>", "<s>", "</s>", "<unk>"]
    for s in ["The Eagle is a cheap French coffee shop by the riverside.",
              "저차원 적응(LoRA)은 사전 학습된 가중치를 고정합니다.", "emoji 😀 and £20-25\ttabs\n"]:
        ids = _ids(tok, s)
        assert all(0 <= i < 1024 for i in ids) and 3 not in ids  # byte-level: never <unk>
        assert tok.decode(ids) == s
    assert len(_ids(tok, " The Eagle is a coffee shop")) <= 8  # BPE actually merged something
    again = AutoTokenizer.from_pretrained(str(ASSETS / "tokenizer"), local_files_only=True)
    assert again("name[Aromi]")["input_ids"] == tok("name[Aromi]")["input_ids"]


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "nope")):
        load_tokenizer(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no tokenizer"):
        load_tokenizer(str(tmp_path / "empty"))


def test_load_tokenizer_sets_missing_pad(tok, tmp_path):
    tok2 = load_tokenizer(None)
    tok2.pad_token = None
    tok2.save_pretrained(str(tmp_path / "t"))
    t = load_tokenizer(str(tmp_path / "t"))
    assert t.pad_token_id == t.eos_token_id == 2


# ---------------------------------------------------------------------------------------------
# Rows and labels


def test_completion_only_masking_is_exact(tok, tmp_path):
    recs = [{"prompt": "<mr> name[Aromi], food[French]\nDescription:",
             "completion": " Aromi serves French food."},
            {"prompt": "", "completion": " Just an answer."}]
    ds, st = load_examples(str(_write_jsonl(tmp_path / "a.jsonl", recs)), tok, DataConfig())
    assert ds.column_names == ["input_ids", "labels"] and len(ds) == 2
    for row, r in zip(ds, recs):
        p, c = _ids(tok, r["prompt"]), _ids(tok, r["completion"])
        assert row["input_ids"] == [1] + p + c + [2]
        assert row["labels"] == [IGNORE_INDEX] * (1 + len(p)) + c + [2]
    assert st["examples"] == 2 and st["skipped"] == 0 and st["truncated"] == 0
    assert st["tokens"] == sum(len(r["input_ids"]) for r in ds)
    assert st["target_tokens"] == sum(len(_ids(tok, r["completion"])) + 1 for r in recs)


def test_builtin_eval_set_loads_in_order(tok):
    ds, st = load_examples("builtin:e2e-eval", tok, DataConfig())
    assert len(ds) == st["examples"] == 400 and st["truncated"] == 0
    first = json.loads((ASSETS / "e2e_eval.jsonl").read_text("utf-8").splitlines()[0])
    assert ds[0]["input_ids"] == [1] + _ids(tok, first["prompt"]) + _ids(tok, first["completion"]) + [2]
    n_prompt = 1 + len(_ids(tok, first["prompt"]))
    assert ds[0]["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert all(x != IGNORE_INDEX for x in ds[0]["labels"][n_prompt:])


def test_truncation_keeps_the_completion(tok, tmp_path):
    prompt = "<mr> " + ", ".join(f"attr{i}[value {i}]" for i in range(40)) + "\nDescription:"
    comp = " The end is kept."
    path = _write_jsonl(tmp_path / "long.jsonl", [{"prompt": prompt, "completion": comp}])
    ds, st = load_examples(str(path), tok, DataConfig(max_length=32))
    p, c = _ids(tok, prompt), _ids(tok, comp)
    assert len(p) + len(c) + 2 > 32
    row = ds[0]
    keep = 32 - 1 - len(c) - 1
    assert row["input_ids"] == [1] + p[-keep:] + c + [2]  # prompt cut from the left
    assert row["labels"] == [IGNORE_INDEX] * (1 + keep) + c + [2]
    assert st["truncated"] == 1

    # a completion longer than max_length - 1: its beginning stays, no prompt, no eos
    long_c = " " + " ".join(f"word{i}" for i in range(60))
    path = _write_jsonl(tmp_path / "longc.jsonl", [{"prompt": "P:", "completion": long_c}])
    ds, st = load_examples(str(path), tok, DataConfig(max_length=16))
    assert ds[0]["input_ids"] == [1] + _ids(tok, long_c)[:15]
    assert ds[0]["labels"] == [IGNORE_INDEX] + _ids(tok, long_c)[:15]
    assert st["truncated"] == 1


def test_text_format_and_chunking(tok, tmp_path):
    text = "LoRA freezes the pretrained weights. " * 20
    path = _write_jsonl(tmp_path / "t.jsonl", [{"text": "short one"}, {"text": text}])
    ds, st = load_examples(str(path), tok, DataConfig(max_length=16))
    assert ds[0]["input_ids"] == [1] + _ids(tok, "short one") + [2]
    assert ds[0]["labels"] == [IGNORE_INDEX] + _ids(tok, "short one") + [2]
    full = [1] + _ids(tok, text) + [2]
    chunks = ds["input_ids"][1:]
    assert [t for c in chunks for t in c] == full  # consecutive chunks, nothing lost
    assert all(len(c) == 16 for c in chunks[:-1]) and 0 < len(chunks[-1]) <= 16
    assert ds["labels"][1][0] == IGNORE_INDEX and ds["labels"][2][0] == full[16]
    assert st["examples"] == 2 and st["rows"] == len(ds) == 1 + len(chunks) and st["truncated"] == 1


def test_builtin_korean_corpus(tok):
    ds, st = load_examples("builtin:lora-ko", tok, DataConfig(max_length=4096))
    paras = [p for p in (ASSETS / "lora_intro_ko.txt").read_text("utf-8").split("\n\n") if p.strip()]
    assert st["examples"] == len(paras) == len(ds) and st["truncated"] == 0
    assert tok.decode(ds[0]["input_ids"][1:-1]) == paras[0].strip("\n")


def test_packing(tok, tmp_path):
    recs = [{"prompt": f"name[N{i}]:", "completion": f" Example {i}."} for i in range(30)]
    path = str(_write_jsonl(tmp_path / "p.jsonl", recs))
    plain, st0 = load_examples(path, tok, DataConfig(max_length=24))
    packed, st = load_examples(path, tok, DataConfig(max_length=24, pack=True))
    assert st0["truncated"] == 0 and max(len(r) for r in plain["input_ids"]) < 24
    flat_ids = [t for r in plain["input_ids"] for t in r]
    flat_labels = [t for r in plain["labels"] for t in r]
    n_rows = len(flat_ids) // 24
    assert len(packed) == st["packed_rows"] == n_rows > 1
    assert all(len(r) == 24 for r in packed["input_ids"])
    assert st["tokens"] == n_rows * 24 == st0["tokens"] - st["dropped_tokens"]
    assert 0 <= st["dropped_tokens"] < 24
    assert [t for r in packed["input_ids"] for t in r] == flat_ids[:n_rows * 24]
    assert [t for r in packed["labels"] for t in r] == flat_labels[:n_rows * 24]
    assert st["rows_crossing_examples"] == n_rows  # every example is shorter than a row


def test_num_proc_gives_the_same_rows(tok):
    a, _ = load_examples("builtin:e2e-eval", tok, DataConfig())
    b, _ = load_examples("builtin:e2e-eval", tok, DataConfig(num_proc=2))
    assert a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"]


# ---------------------------------------------------------------------------------------------
# Bad input


GOOD = {"prompt": "x:", "completion": " y"}
BAD_CASES = [
    ('{"prompt": "x:", "completion": ', "invalid JSON"),
    ('["a list"]', "expected a JSON object, got list"),
    ({"prompt": "x:"}, "missing field 'completion'"),
    ({"prompt": 3, "completion": " y"}, "field 'prompt' must be a string, got int"),
    ({"prompt": "x:", "completion": "  "}, "empty completion"),
    ({"text": "a text line"}, "a text record in a prompt/completion dataset"),
    ({"other": 1}, "missing fields"),
]


@pytest.mark.parametrize("bad,reason", BAD_CASES)
def test_bad_line_errors_name_file_and_line(tok, tmp_path, bad, reason):
    path = _write_jsonl(tmp_path / "bad.jsonl", [GOOD, "", GOOD, bad, GOOD])  # bad is line 4
    with pytest.raises(DataError) as e:
        load_examples(str(path), tok, DataConfig(on_bad_line="error"))
    assert str(e.value).startswith(f"{path}:4: ")
    assert reason in str(e.value)


def test_bad_lines_skipped_and_counted(tok, tmp_path):
    lines = [GOOD, "   "] + [b for b, _ in BAD_CASES] + [{"prompt": "last:", "completion": " z"}]
    path = _write_jsonl(tmp_path / "bad.jsonl", lines)
    ds, st = load_examples(str(path), tok, DataConfig(on_bad_line="skip"))
    assert st["skipped"] == len(BAD_CASES) and st["examples"] == len(ds) == 2
    assert st["bad_lines"][0].startswith(f"{path}:3: invalid JSON")
    assert st["bad_lines"][1] == f"{path}:4: expected a JSON object, got list"
    assert len(st["bad_lines"]) == 5
    assert ds[1]["input_ids"] == [1] + _ids(tok, "last:") + _ids(tok, " z") + [2]
    # why: a count per reason (the first 5 reasons), said in one line with the first bad line
    path2 = _write_jsonl(tmp_path / "twice.jsonl", lines + [{"prompt": "x:"}, {"prompt": "y:"}])
    _, st2 = load_examples(str(path2), tok, DataConfig(on_bad_line="skip"))
    assert st2["skipped"] == len(BAD_CASES) + 2 and len(st2["skip_reasons"]) == 5
    assert st2["skip_reasons"]["missing field 'completion'"] == 3
    line = skipped_summary(st2)
    assert line.startswith(f"{len(BAD_CASES) + 2} line(s) skipped (data.on_bad_line=skip): ")
    assert "3 x missing field 'completion'" in line and "1 x expected a JSON object, got list" in line
    assert line.endswith(f"; 2 more of other reasons; the first: {st2['bad_lines'][0]}") and "\n" not in line
    assert skipped_summary({"skipped": 0}) is None


def test_non_utf8_lines_are_bad_lines(tok, tmp_path):
    """Bytes that are not UTF-8 used to be replaced by U+FFFD silently: a latin-1 file trained on
    mojibake, random bytes trained as examples. Now they are bad lines like any other."""
    good = json.dumps(GOOD).encode()
    latin1 = json.dumps({"prompt": "café:", "completion": " crème"}, ensure_ascii=False).encode("latin-1")
    noise = b'{"text": "' + bytes([0x9c, 0xff, 0x80, 0x41]) + b'"}'
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b"\n".join([good, b"", latin1, good]) + b"\n")
    with pytest.raises(DataError) as e:
        load_examples(str(path), tok, DataConfig(on_bad_line="error"))
    assert str(e.value) == f"{path}:3: not valid UTF-8 (byte 0xe9 at column 16; convert the file to UTF-8)"
    path.write_bytes(b"\n".join([good, latin1, noise, good]) + b"\n")
    ds, st = load_examples(str(path), tok, DataConfig(on_bad_line="skip"))
    assert st["skipped"] == 2 and st["examples"] == len(ds) == 2
    assert st["bad_lines"] == [f"{path}:2: not valid UTF-8 (byte 0xe9 at column 16; convert the file to UTF-8)",
                               f"{path}:3: not valid UTF-8 (byte 0x9c at column 11; convert the file to UTF-8)"]
    # plain-text paragraphs: the paragraph holding the line is bad, named by that line
    txt = tmp_path / "t.txt"
    txt.write_bytes("first paragraph\n\nsecond, line one\n".encode() + "caf\xe9 line two\n".encode("latin-1")
                    + b"\nthird\n")
    with pytest.raises(DataError, match=f"^{txt}:4: not valid UTF-8 \\(byte 0xe9 at column 4"):
        load_examples(str(txt), tok, DataConfig(on_bad_line="error"))
    ds, st = load_examples(str(txt), tok, DataConfig(on_bad_line="skip"))
    assert st["skipped"] == 1 and len(ds) == 2
    assert ds[1]["input_ids"] == [1] + _ids(tok, "third") + [2]


def test_missing_and_empty_inputs(tok, tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_examples(str(tmp_path / "missing.jsonl"), tok, DataConfig())
    with pytest.raises(DataError, match="unknown built-in"):
        load_examples("builtin:nope", tok, DataConfig())
    path = _write_jsonl(tmp_path / "blank.jsonl", ["", "  "])
    with pytest.raises(DataError, match="no usable examples"):
        load_examples(str(path), tok, DataConfig())
    path = _write_jsonl(tmp_path / "allbad.jsonl", ["{", "{"])
    with pytest.raises(DataError, match="no usable examples"):
        load_examples(str(path), tok, DataConfig(on_bad_line="skip"))
    with pytest.raises(DataError, match="fewer than one packed row"):
        load_examples(str(_write_jsonl(tmp_path / "one.jsonl", [GOOD])), tok,
                      DataConfig(max_length=64, pack=True))


# ---------------------------------------------------------------------------------------------
# Saved datasets


def test_saved_dataset_directory_loads(tok, tmp_path):
    recs = {"prompt": ["a:", "b:"], "completion": [" one", " two"], "extra": [1, 2]}
    datasets.Dataset.from_dict(recs).save_to_disk(str(tmp_path / "pc"))
    ds, st = load_examples(str(tmp_path / "pc"), tok, DataConfig())
    assert ds["input_ids"] == [[1] + _ids(tok, p) + _ids(tok, c) + [2]
                               for p, c in zip(recs["prompt"], recs["completion"])]
    assert st["examples"] == 2

    datasets.Dataset.from_dict({"text": ["hello there", ""]}).save_to_disk(str(tmp_path / "txt"))
    with pytest.raises(DataError, match=r"txt:row 2: empty text"):
        load_examples(str(tmp_path / "txt"), tok, DataConfig())
    ds, st = load_examples(str(tmp_path / "txt"), tok, DataConfig(on_bad_line="skip"))
    assert ds["input_ids"] == [[1] + _ids(tok, "hello there") + [2]] and st["skipped"] == 1

    datasets.Dataset.from_dict({"foo": ["x"]}).save_to_disk(str(tmp_path / "foo"))
    with pytest.raises(DataError, match="need 'prompt' and 'completion', 'text', or 'messages'"):
        load_examples(str(tmp_path / "foo"), tok, DataConfig())


# ---------------------------------------------------------------------------------------------
# Collate


def test_collate_pads_right():
    batch = collate([{"input_ids": [1, 5, 6, 2], "labels": [-100, -100, 6, 2]},
                     {"input_ids": [1, 7], "labels": [-100, 7]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 2], [1, 7, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 6, 2], [-100, 7, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert all(t.dtype == torch.int64 for t in batch.values())
    odd = collate([{"input_ids": [4], "labels": [4]}], pad_id=9)
    assert odd["input_ids"].tolist() == [[4]] and odd["attention_mask"].tolist() == [[1]]


# ---------------------------------------------------------------------------------------------
# Conversations: {"messages": [...]} rendered with the tokenizer's chat template

# A ChatML template (Qwen's layout: system/user/assistant/tool turns, <|im_start|>/<|im_end|> as text)
# with transformers' {% generation %} markers around each assistant turn's words and its end.
CHATML = (
    "{%- for m in messages %}"
    "{%- if m['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ m['content'] }}{{ '<|im_end|>\\n' }}{% endgeneration %}"
    "{%- else %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "name[Aromi], area[riverside]"},
     {"role": "assistant", "content": "Aromi is on the riverside."}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "Describe The Eagle."},
     {"role": "assistant", "content": "A French coffee shop."},
     {"role": "user", "content": "Where?"},
     {"role": "assistant", "content": "In the city centre, near Burger King."}],
    [{"role": "user", "content": "What is the weather?"},
     {"role": "assistant", "content": "I will look it up."},
     {"role": "tool", "content": "{\"temp\": 21}"},
     {"role": "assistant", "content": "It is 21 degrees."}],
]


def _chat_tok(template):
    t = load_tokenizer(None)
    t.chat_template = template
    return t


def _reference(t, conv, max_length=10_000):
    """transformers' own ids and assistant mask (TRL's assistant_only_loss uses this mask)."""
    out = t.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"][:max_length], out["assistant_masks"][:max_length]
    return ids, [i if m else IGNORE_INDEX for i, m in zip(ids, mask)]


@pytest.mark.parametrize("strip_markers", [False, True])
def test_chat_rows_equal_transformers_assistant_mask(tmp_path, strip_markers):
    """Ids and labels equal apply_chat_template(return_assistant_tokens_mask=True) on a real template
    with generation markers; with the markers removed, bigtrain's prefix-by-prefix spans give the
    same mask (the generation blocks here cover the whole assistant turn, as the prefixes do)."""
    ref_tok = _chat_tok(CHATML)
    t = _chat_tok(CHATML.replace("{% generation %}", "").replace("{% endgeneration %}", "")
                  if strip_markers else CHATML)
    path = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVERSATIONS])
    ds, st = load_examples(str(path), t, DataConfig(max_length=512))
    assert st["format"] == "messages" and st["examples"] == len(ds) == 3
    for row, conv in zip(ds, CONVERSATIONS):
        ids, labels = _reference(ref_tok, conv)
        assert row["input_ids"] == ids and row["labels"] == labels
    # what is learnt: exactly the assistant's words and the end of each turn
    got = t.decode([x for x in ds[1]["labels"] if x != IGNORE_INDEX])
    assert got == "A French coffee shop.<|im_end|>\nIn the city centre, near Burger King.<|im_end|>\n"


def test_chat_truncation_keeps_the_start(tmp_path):
    t = _chat_tok(CHATML)
    path = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATIONS[1]}])
    ds, st = load_examples(str(path), t, DataConfig(max_length=40))
    ids, labels = _reference(t, CONVERSATIONS[1], 40)
    assert ds[0]["input_ids"] == ids and ds[0]["labels"] == labels and st["truncated"] == 1


def test_builtin_chat_set_and_template():
    """builtin:e2e-chat through the built-in tokenizer's own template: the labels are the
    assistant's descriptions and eos, nothing of the system or user turns."""
    t = load_tokenizer(None)
    assert t.chat_template is not None
    ds, st = load_examples("builtin:e2e-chat-eval", t, DataConfig(max_length=256))
    assert st["format"] == "messages" and st["examples"] == 200 and st["truncated"] == 0
    records = [json.loads(x) for x in (ASSETS / "e2e_chat_eval.jsonl").read_text("utf-8").splitlines()]
    assert sum(len(r["messages"]) > 3 for r in records) == 50  # multi-turn: every fourth
    for row, rec in zip(ds.select(range(8)), records[:8]):
        answers = [m["content"] for m in rec["messages"] if m["role"] == "assistant"]
        target = [x for x in row["labels"] if x != IGNORE_INDEX]
        assert target == [tok_id for a in answers for tok_id in _ids(t, a) + [t.eos_token_id]]
        assert row["input_ids"] == t.apply_chat_template(rec["messages"], tokenize=True, return_dict=True)["input_ids"]


CHAT_GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
CHAT_BAD = [
    ({"messages": "hi"}, "field 'messages' must be a list of {role, content} objects, got str"),
    ({"messages": []}, "field 'messages' is empty"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "message 1: unknown role 'bot' (roles: system, user, assistant, tool)"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]},
     "message 2 (assistant): empty content"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}, "message 1 (user): missing 'content'"),
    ({"messages": ["hi"]}, "message 1: expected an object with 'role' and 'content', got str"),
    ({"prompt": "x:", "completion": " y"}, "a prompt/completion record in a messages dataset"),
]


@pytest.mark.parametrize("bad,reason", CHAT_BAD)
def test_chat_bad_lines_name_file_line_and_role(tok, tmp_path, bad, reason):
    path = _write_jsonl(tmp_path / "bad.jsonl", [CHAT_GOOD, CHAT_GOOD, bad])  # line 3
    with pytest.raises(DataError) as e:
        load_examples(str(path), tok, DataConfig())
    assert str(e.value) == f"{path}:3: {reason}" or str(e.value).startswith(f"{path}:3: {reason}")


def test_chat_without_template_and_unrenderable_conversations(tmp_path):
    no_template = _chat_tok(None)
    path = _write_jsonl(tmp_path / "c.jsonl", [CHAT_GOOD])
    with pytest.raises(DataError, match=r"c.jsonl: messages data needs a chat template .*data.chat_template"):
        load_examples(str(path), no_template, DataConfig())
    # a template that refuses a conversation (as Llama-2's does when roles do not alternate)
    strict = _chat_tok("{%- for m in messages %}{%- if loop.index0 % 2 == 0 and m['role'] != 'user' %}"
                       "{{ raise_exception('roles must alternate user/assistant') }}{%- endif %}"
                       "{{ m['content'] }}{%- endfor %}")
    path = _write_jsonl(tmp_path / "d.jsonl", [CHAT_GOOD, {"messages": [{"role": "assistant", "content": "x"}]}])
    with pytest.raises(DataError, match=r"d.jsonl:2: the chat template cannot render it: .*roles must alternate"):
        load_examples(str(path), strict, DataConfig())
    # data.chat_template: a template file instead of the tokenizer's own
    (tmp_path / "t.jinja").write_text(CHATML)
    ds, _ = load_examples(str(path.with_name("c.jsonl")), no_template,
                          DataConfig(chat_template=str(tmp_path / "t.jinja")))
    assert ds[0]["input_ids"] == _reference(_chat_tok(CHATML), CHAT_GOOD["messages"])[0]


def test_format_auto_and_named(tok, tmp_path):
    pc = _write_jsonl(tmp_path / "pc.jsonl", [GOOD, GOOD])
    assert load_examples(str(pc), tok, DataConfig())[1]["format"] == "prompt_completion"
    txt = _write_jsonl(tmp_path / "t.jsonl", [{"text": "abc"}])
    assert load_examples(str(txt), tok, DataConfig())[1]["format"] == "text"
    with pytest.raises(DataError) as e:
        load_examples(str(pc), tok, DataConfig(format="messages"))
    assert str(e.value) == f"{pc}:1: a prompt/completion record in a messages dataset (data.format=messages)"
    with pytest.raises(ConfigError, match=r"data.format: 'chat' is not one of 'auto', 'prompt_completion', 'text', 'messages'"):
        load_config(None, ["data.format=chat"])


# ---------------------------------------------------------------------------------------------
# The cache: tokenise once, memory-map everywhere


def test_cache_hit_is_the_same_rows_and_a_changed_file_is_retokenised(tok, tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"), max_length=32)
    path = _write_jsonl(tmp_path / "a.jsonl", [GOOD, {"prompt": "p:", "completion": " q"}])
    a, sa = load_examples(str(path), tok, cfg)
    b, sb = load_examples(str(path), tok, cfg)
    assert (sa["cache"], sb["cache"]) == ("built", "hit") and sa["cache_dir"] == sb["cache_dir"]
    assert a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"]
    assert b.cache_files and b.cache_files[0]["filename"].endswith("rows.arrow")  # memory-mapped, not copied
    _write_jsonl(path, [GOOD])  # same path, new content: new key
    c, sc = load_examples(str(path), tok, cfg)
    assert sc["cache"] == "built" and len(c) == 1
    assert load_examples(str(path), tok, DataConfig(cache_dir=cfg.cache_dir, max_length=16))[1]["cache"] == "built"


def test_cache_dir_not_writable_is_one_line(tok, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match=r"data.cache_dir: cannot write the tokenised-data cache at .*file/sub"):
        load_examples("builtin:e2e-eval", tok, DataConfig(cache_dir=str(tmp_path / "file" / "sub")))


def test_killed_build_leaves_no_cache_and_the_next_run_builds(tok, tmp_path):
    """A build that fails half way (here: a bad line past the first batch) leaves no rows.arrow that
    a later run could take for complete; the lock is free again."""
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"))
    recs = [GOOD] * 2500 + ["{broken"]
    path = _write_jsonl(tmp_path / "big.jsonl", recs)
    with pytest.raises(DataError, match=r"big.jsonl:2501: invalid JSON"):
        load_examples(str(path), tok, cfg)
    assert not list((tmp_path / "cache").glob("*/rows.arrow")) and not list((tmp_path / "cache").glob(".*"))
    # a build killed with -9 leaves its temporary directory: the next build on the host removes it
    # (its pid is gone), and never one of a live process (another node's, on a shared filesystem)
    import socket

    from bigtrain.data import cache_key

    skip = DataConfig(cache_dir=cfg.cache_dir, on_bad_line="skip")
    key = cache_key(str(path), tok, skip, None)
    dead = tmp_path / "cache" / f".{key}.{socket.gethostname()}.999999999"
    live = tmp_path / "cache" / f".{key}.other-node.{os.getpid()}"
    dead.mkdir()
    live.mkdir()
    ds, st = load_examples(str(path), tok, skip)
    assert st["cache"] == "built" and len(ds) == 2500 and st["skipped"] == 1
    assert not dead.exists() and live.exists()


def test_source_hash_is_read_once_then_remembered_by_file_identity(tmp_path, monkeypatch):
    """Every rank of every run keys the cache on the source's content hash. It is remembered under
    the cache's digests/ by the file's path, size, inode and times: the second lookup reads none of
    the data; a rewrite (same size even) changes the change time and so is read and hashed again."""
    import hashlib

    from bigtrain import data as D

    reads = []
    real = D._file_digest
    monkeypatch.setattr(D, "_file_digest", lambda p, h: (reads.append(p), real(p, h))[1])
    path = _write_jsonl(tmp_path / "src.jsonl", [GOOD] * 50)
    memo = tmp_path / "cache" / "digests"
    want = hashlib.sha256(path.read_bytes()).hexdigest()
    assert D.source_fingerprint(path, memo) == want and len(reads) == 1
    assert D.source_fingerprint(path, memo) == want and len(reads) == 1  # remembered: not read
    assert [f.read_text() for f in memo.iterdir()] == [want]
    time.sleep(0.01)
    path.write_bytes(path.read_bytes().replace(b"x:", b"z:", 1))  # same size, new content
    new = hashlib.sha256(path.read_bytes()).hexdigest()
    assert new != want and D.source_fingerprint(path, memo) == new and len(reads) == 2
    assert D.source_fingerprint(path) == new and len(reads) == 3  # no memo: always read
    # through load_examples: the second load (a cache hit) reads the source for nothing
    tok = D.load_tokenizer(None)
    cfg = DataConfig(cache_dir=str(tmp_path / "cache2"), max_length=64)
    reads.clear()
    _, st1 = D.load_examples(str(path), tok, cfg)
    n_first = len(reads)
    _, st2 = D.load_examples(str(path), tok, cfg)
    assert (st1["cache"], st2["cache"]) == ("built", "hit") and n_first == 1 and len(reads) == 1


def test_tokenizer_source_refuses_a_model_folder_without_one(tmp_path):
    """A model folder with no tokenizer is refused (it used to train silently with the built-in
    1,024-token tokenizer: a GPT-2 folder at loss 10.87); builtin by name, a folder's own, a named
    directory and a random preset's built-in one are taken."""
    from bigtrain.config import ConfigError
    from bigtrain.data import tokenizer_source

    bare = tmp_path / "gpt2"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    with pytest.raises(ConfigError) as e:
        tokenizer_source(None, str(bare))
    assert str(e.value) == (f"model.path={bare} holds no tokenizer (no tokenizer.json or tokenizer_config.json): "
                            f"set model.tokenizer=DIR to the model's own tokenizer, "
                            f"or model.tokenizer=builtin to train with bigtrain's built-in 1,024-token tokenizer")
    assert tokenizer_source("builtin", str(bare)) is None  # asked for by name
    assert tokenizer_source("/some/tok", str(bare)) == "/some/tok"
    assert tokenizer_source(None, None) is None  # a random preset
    load_tokenizer(None).save_pretrained(str(bare))
    assert tokenizer_source(None, str(bare)) == str(bare)


def test_a_fifo_or_a_link_loop_as_data_is_one_line(tmp_path):
    """A FIFO as data.train used to hang forever (its content was hashed for the cache); a link loop
    gave a traceback."""
    import os

    from bigtrain.data import DataError, source_path

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(DataError) as e:
        source_path(str(fifo))
    assert str(e.value) == (f"{fifo}: not a regular file or a directory (a FIFO or a device); give a data file "
                            f"or a saved datasets directory")
    a, b = tmp_path / "a", tmp_path / "b"
    a.symlink_to(b)
    b.symlink_to(a)
    with pytest.raises(DataError) as e:
        source_path(str(a))
    assert str(e.value) == f"{a}: cannot be read: Too many levels of symbolic links"
    with pytest.raises(DataError, match="no such file or directory"):
        source_path(str(tmp_path / "nope.jsonl"))


@pytest.mark.parametrize("name,content,msg", [
    ("d.jsonl.gz", b"\x1f\x8b\x08\x00", "d.jsonl.gz: cannot be decompressed (Compressed file ended before the "
                                       "end-of-stream marker was reached); is it really .gz?"),
    ("d.jsonl.zst", b"\x28\xb5\x2f\xfd", ".zst files are not read; bigtrain reads JSON Lines (.jsonl, .json: one "
                                         "object per line), plain text (.txt), either of them compressed (.gz, .bz2, "
                                         ".xz), Parquet (.parquet) and directories saved with datasets' save_to_disk: "
                                         "decompress it first"),
    ("d.parquet", b"PAR1", "d.parquet: not a readable Parquet file:"),
    ("d.json", b'[\n  {"text": "a"},\n  {"text": "b"}\n]\n', "d.json:1: a JSON array; bigtrain reads JSON Lines, one "
                                                            "JSON object per line (convert it: jq -c '.[]' d.json > d.jsonl)"),
    ("d.txt", b'{"prompt": "a", "completion": "b"}\n', "d.txt:1: a JSON object: this looks like JSON Lines, but a "
                                                      ".txt file is read as plain text"),
])
def test_files_bigtrain_would_misread_are_one_line(tmp_path, name, content, msg):
    """Each used to train on garbage or fail late: gzip and parquet as "not valid UTF-8 ... convert the
    file to UTF-8", a JSON array as a bad line per line, JSON Lines named .txt as one raw text example."""
    from bigtrain.data import DataError, source_path

    from bigtrain.data import iter_records

    f = tmp_path / name
    f.write_bytes(content)
    with pytest.raises(DataError) as e:
        list(iter_records(str(source_path(str(f))))[0])
    assert msg in str(e.value)
    (tmp_path / "ok.txt").write_text("{not json} is fine as text\n\nsecond paragraph\n")
    assert source_path(str(tmp_path / "ok.txt")) == tmp_path / "ok.txt"


def test_compressed_and_parquet_files_give_the_records_of_their_jsonl(tmp_path):
    """.jsonl.gz, .jsonl.bz2, .jsonl.xz, .txt.gz and .parquet are read (they were refused, and before
    that failed as "not valid UTF-8"): the same records, in the same order, as the plain file; a bad
    line in a compressed file is named by its line, a Parquet file by its row."""
    import bz2
    import gzip
    import lzma

    import pyarrow as pa
    import pyarrow.parquet as pq

    from bigtrain.data import DataError, iter_records

    recs = [{"prompt": f"p{i} é", "completion": f"c{i}"} for i in range(300)]
    plain = tmp_path / "d.jsonl"
    plain.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    want = [(r["prompt"], r["completion"]) for r in iter_records(str(plain))[0]]
    assert len(want) == 300
    for name, opener in (("d.jsonl.gz", gzip.open), ("d.jsonl.bz2", bz2.open), ("d.jsonl.xz", lzma.open)):
        with opener(tmp_path / name, "wb") as f:
            f.write(plain.read_bytes())
        assert [(r["prompt"], r["completion"]) for r in iter_records(str(tmp_path / name))[0]] == want, name
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "d.parquet", row_group_size=64)
    assert [(r["prompt"], r["completion"]) for r in iter_records(str(tmp_path / "d.parquet"))[0]] == want
    with gzip.open(tmp_path / "t.txt.gz", "wt") as f:
        f.write("one\nparagraph\n\nsecond\n")
    assert [r["text"] for r in iter_records(str(tmp_path / "t.txt.gz"))[0]] == ["one\nparagraph", "second"]
    with gzip.open(tmp_path / "bad.jsonl.gz", "wt") as f:
        f.write('{"text": "a"}\n{"text": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl\.gz.*2"):
        list(iter_records(str(tmp_path / "bad.jsonl.gz"))[0])
    pq.write_table(pa.Table.from_pylist([{"body": "x"}]), tmp_path / "cols.parquet")
    with pytest.raises(DataError, match=r"cols\.parquet: columns \['body'\]: need 'prompt' and 'completion'"):
        list(iter_records(str(tmp_path / "cols.parquet"))[0])


def test_printed_text_escapes_control_characters():
    """Samples printed by a run and by bigtrain generate's text output: a NUL made grep call the
    batch log binary, an escape sequence repainted the terminal. Written as escapes; newlines and
    tabs kept where the text keeps its lines (generate), escaped where it is one log line (the run)."""
    from bigtrain.data import escape_controls
    from bigtrain.generate import one_line as _one_line

    raw = "a\x00b\x1b[2Jc\u200bd\ne\tf é"
    assert escape_controls(raw) == "a\\x00b\\x1b[2Jc\\u200bd\ne\tf é"
    assert _one_line(" " + raw + "\n") == "a\\x00b\\x1b[2Jc\\u200bd\\ne\\tf é"
    assert escape_controls("plain text, ünïcode") == "plain text, ünïcode"


def test_tool_calls_the_template_drops_are_refused(tmp_path):
    """An assistant turn that carries only tool_calls, under a template that never renders them,
    was trained as an empty answer (the turn's end token alone). Refused naming the file, line and
    message; a template that renders tool calls trains on them."""
    conv = [{"role": "user", "content": "What is the weather?"},
            {"role": "assistant", "content": None,
             "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Seoul"}}}]},
            {"role": "tool", "content": "{\"temp\": 21}"},
            {"role": "assistant", "content": "It is 21 degrees."}]
    path = _write_jsonl(tmp_path / "tools.jsonl", [{"messages": CONVERSATIONS[0]}, {"messages": conv}])
    with pytest.raises(DataError) as e:
        load_examples(str(path), _chat_tok(CHATML), DataConfig(max_length=512))
    assert str(e.value).startswith(f"{path}:2: message 2 (assistant) has tool_calls, which this chat template "
                                   f"does not render"), str(e.value)
    renders = CHATML.replace("{{ m['content'] }}",
                             "{{ m['content'] if m['content'] else m['tool_calls'][0]['function']['name'] }}")
    assert "tool_calls" in renders
    ds, st = load_examples(str(path), _chat_tok(renders), DataConfig(max_length=512))
    t = _chat_tok(renders)
    assert st["examples"] == 2 and "weather<|im_end|>" in t.decode([x for x in ds[1]["labels"] if x != IGNORE_INDEX])
