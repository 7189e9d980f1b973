"""Generate bigtrain's built-in assets: a small data-to-text dataset and a byte-level BPE tokenizer.

The dataset follows the E2E NLG challenge (Novikova et al., 2017): a meaning representation (MR)
such as ``name[The Eagle], eatType[coffee shop], food[French], area[riverside]`` is to be realised
as one or two English sentences that mention every attribute. The MRs and their references are
produced here by a small grammar with several paraphrases per attribute and per sentence shape, so
the task is learnable by a tiny model yet not a lookup. Everything is drawn from one
``random.Random(seed)``: ``python -m bigtrain.datagen`` rewrites ``bigtrain/assets/`` byte for byte.

The tokenizer is a byte-level BPE (vocabulary 1024) trained with ``tokenizers`` on the generated
training set plus the Korean LoRA excerpt, so any text, Korean included, round-trips. Special ids
are fixed: ``<pad>`` 0, ``<s>`` 1 (bos), ``</s>`` 2 (eos), ``<unk>`` 3, as the tiny presets expect.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .config import ASSETS

SEED = 20211
N_TRAIN = 4000
N_EVAL = 400
VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0, 1, 2, 3
PROMPT_TEMPLATE = "<mr> {mr}\nDescription:"
N_CHAT_TRAIN, N_CHAT_EVAL = 2000, 200
CHAT_SYSTEM = "You describe a restaurant in one or two sentences, from its attributes."
# The built-in tokenizer's chat template: role headers as plain text (no new tokens: the vocabulary and
# the shipped tiny model stay as they are), each assistant turn closed by eos, and {% generation %}
# markers so transformers' return_assistant_tokens_mask (and bigtrain's loss mask) cover exactly the
# assistant's words and its eos.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ m['content'] }}{{ eos_token }}{% endgeneration %}"
    "{%- else %}"
    "{{ '<|' + m['role'] + '|>\n' + m['content'] + '\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|assistant|>\n' }}{%- endif %}"
)

# ---------------------------------------------------------------------------------------------
# The meaning-representation space (attribute values as in E2E).

NAMES = [
    "The Eagle", "The Golden Curry", "Blue Spice", "Aromi", "The Punter", "Zizzi", "Cotto",
    "Fitzbillies", "The Mill", "Wildwood", "The Cricketers", "Giraffe", "Loch Fyne", "Strada",
    "The Vaults", "Alimentum", "The Phoenix", "Browns Cambridge", "The Wrestlers", "Midsummer House",
    "The Olive Grove", "Green Man", "The Dumpling Tree", "Clowns", "The Waterman", "Bibimbap House",
    "The Twenty Two", "Taste of Cambridge", "The Rice Boat", "The Plough", "The Cambridge Blue",
    "The Golden Palace", "Travellers Rest Beefeater", "The Copper Kettle", "Red Lantern", "Saffron",
]
NEAR = [
    "Café Sicilia", "Burger King", "The Portland Arms", "Crowne Plaza Hotel", "Raja Indian Cuisine",
    "Café Rouge", "Express by Holiday Inn", "Avalon", "Yippee Noodle Bar", "The Bakers",
    "All Bar One", "Café Brazil", "The Sorrento", "Rainbow Vegetarian Café", "Ranch", "Clare Hall",
]
EAT_TYPES = ["restaurant", "coffee shop", "pub"]
FOODS = ["French", "Italian", "Japanese", "Chinese", "Indian", "English", "Fast food"]
PRICES = ["cheap", "moderate", "high", "less than £20", "£20-25", "more than £30"]
RATINGS = ["low", "average", "high", "1 out of 5", "3 out of 5", "5 out of 5"]
AREAS = ["city centre", "riverside"]
FAMILY = ["yes", "no"]
ORDER = ["name", "eatType", "food", "priceRange", "customer rating", "area", "familyFriendly", "near"]


def sample_mr(rng: random.Random) -> dict[str, str]:
    """name plus 2..7 other attributes, in E2E's canonical order."""
    pool = {
        "eatType": EAT_TYPES, "food": FOODS, "priceRange": PRICES, "customer rating": RATINGS,
        "area": AREAS, "familyFriendly": FAMILY, "near": NEAR,
    }
    keys = rng.sample(sorted(pool), rng.randint(2, 6))
    mr = {"name": rng.choice(NAMES)}
    for k in keys:
        mr[k] = rng.choice(pool[k])
    if mr.get("near") == mr["name"]:  # pragma: no cover - the two lists are disjoint
        del mr["near"]
    return {k: mr[k] for k in ORDER if k in mr}


def format_mr(mr: dict[str, str]) -> str:
    return ", ".join(f"{k}[{v}]" for k, v in mr.items())


# ---------------------------------------------------------------------------------------------
# Realisation: a noun phrase for sentence one, verb phrases for whatever is left.


def _article(phrase: str) -> str:
    return ("an " if phrase[0].lower() in "aeiou" else "a ") + phrase


def _food_adj(food: str) -> str:
    return "fast food" if food == "Fast food" else food


def _area_pp(area: str, rng: random.Random) -> str:
    if area == "riverside":
        return rng.choice(["by the riverside", "in the riverside area", "on the riverside"])
    return rng.choice(["in the city centre", "in the centre of the city", "in the city centre area"])


def _near_pp(near: str, rng: random.Random) -> str:
    return rng.choice(["near", "close to", "not far from"]) + " " + near


def _vp(attr: str, value: str, rng: random.Random) -> str:
    """A verb phrase with an implicit singular subject ("It ...")."""
    if attr == "food":
        f = _food_adj(value)
        return rng.choice([f"serves {f} food", f"offers {f} cuisine", f"specialises in {f} food",
                           f"provides {f} dishes"])
    if attr == "priceRange":
        if value in ("cheap", "moderate", "high"):
            word = {"cheap": "low", "moderate": "moderate", "high": "high"}[value]
            adj = {"cheap": "cheap", "moderate": "moderately priced", "high": "expensive"}[value]
            return rng.choice([f"has {word} prices", f"is in the {value} price range", f"is {adj}"])
        return rng.choice([f"has a price range of {value}", f"costs {value} per person",
                           f"has prices of {value}"])
    if attr == "customer rating":
        if "out of" in value:
            return rng.choice([f"has a customer rating of {value}", f"is rated {value} by customers",
                               f"is rated {value} stars"])
        return rng.choice([f"has a {value} customer rating", f"is rated {value} by customers",
                           f"has received {value} ratings from customers"])
    if attr == "area":
        return rng.choice(["is located ", "is ", "can be found "]) + _area_pp(value, rng)
    if attr == "near":
        return rng.choice(["is located ", "is ", "can be found "]) + _near_pp(value, rng)
    if attr == "familyFriendly":
        if value == "yes":
            return rng.choice(["is family-friendly", "is kid friendly", "welcomes children",
                               "is a good place for families"])
        return rng.choice(["is not family-friendly", "is not kid friendly", "does not welcome children",
                           "is not suitable for families"])
    raise ValueError(attr)  # pragma: no cover


def _join_vps(vps: list[str]) -> str:
    if len(vps) == 1:
        return vps[0]
    return ", ".join(vps[:-1]) + " and " + vps[-1]


def realise(mr: dict[str, str], rng: random.Random) -> str:
    """One or two sentences mentioning every attribute of ``mr``."""
    name = mr["name"]
    head = mr.get("eatType") or rng.choice(["place", "venue", "establishment"])
    rest = [k for k in mr if k not in ("name", "eatType")]
    rng.shuffle(rest)

    pre: list[str] = []  # premodifiers of the head noun, outermost first
    if "food" in rest and rng.random() < 0.5:
        pre.append(_food_adj(mr["food"]))
        rest.remove("food")
    if "priceRange" in rest and mr["priceRange"] in ("cheap", "moderate", "high") and rng.random() < 0.4:
        pre.insert(0, {"cheap": "cheap", "moderate": "moderately priced",
                       "high": rng.choice(["expensive", "high-priced"])}[mr["priceRange"]])
        rest.remove("priceRange")
    if "familyFriendly" in rest and rng.random() < 0.4:
        pre.insert(0, rng.choice(["family-friendly", "kid friendly"]) if mr["familyFriendly"] == "yes"
                   else rng.choice(["adults-only", "non family-friendly"]))
        rest.remove("familyFriendly")
    locs: list[str] = []
    for attr, pp in (("area", _area_pp), ("near", _near_pp)):
        if attr in rest and rng.random() < 0.6:
            locs.append(pp(mr[attr], rng))
            rest.remove(attr)
    np = _article(" ".join(pre + [head]))
    loc = (" " + " ".join(locs)) if locs else ""

    shape = rng.randrange(4)
    if shape == 0:
        first = f"{name} is {np}{loc}."
    elif shape == 1:
        first = f"There is {np} called {name}{loc}."
    elif shape == 2 and locs:
        first = f"{' '.join(locs)[0].upper()}{' '.join(locs)[1:]}, there is {np} named {name}."
    else:
        first = f"{name} is {np}{loc}." if not rest else f"{name}, {np}{loc},"
    if not rest:
        return first if first.endswith(".") else first[:-1] + "."

    vps = [_vp(a, mr[a], rng) for a in rest]
    if first.endswith(","):  # the apposition shape continues with the verb phrases
        if len(vps) <= 3:
            return f"{first} {_join_vps(vps)}."
        return f"{first} {_join_vps(vps[:2])}. It also {_join_vps(vps[2:])}."
    subject = rng.choice(["It", "The " + head, name])
    if len(vps) <= 3:
        return f"{first} {subject} {_join_vps(vps)}."
    return f"{first} {subject} {_join_vps(vps[:2])}. It also {_join_vps(vps[2:])}."


def make_examples(n_train: int = N_TRAIN, n_eval: int = N_EVAL, seed: int = SEED
                  ) -> tuple[list[dict], list[dict]]:
    """Train and eval examples; no MR of the eval set occurs in the train set."""
    rng = random.Random(seed)
    train: list[dict] = []
    seen: set[str] = set()
    while len(train) < n_train:
        mr = sample_mr(rng)
        key = format_mr(mr)
        seen.add(key)
        train.append({"prompt": PROMPT_TEMPLATE.format(mr=key), "completion": " " + realise(mr, rng)})
    evals: list[dict] = []
    while len(evals) < n_eval:
        mr = sample_mr(rng)
        key = format_mr(mr)
        if key in seen:
            continue
        seen.add(key)
        evals.append({"prompt": PROMPT_TEMPLATE.format(mr=key), "completion": " " + realise(mr, rng)})
    return train, evals


def chat_examples(rows: list[dict], n: int) -> list[dict]:
    """The first ``n`` examples as conversations: the MR as the user's turn, the description as the
    assistant's; every other one opens with a system message, and every fourth goes on to a second
    turn (the next example's MR and description), so multi-turn masking is exercised. Derived from
    the prompt/completion set, so no draw of the generator changes."""
    def mr(r: dict) -> str:
        return r["prompt"].removeprefix("<mr> ").removesuffix("\nDescription:")

    out = []
    for i, r in enumerate(rows[:n]):
        messages = [{"role": "system", "content": CHAT_SYSTEM}] if i % 2 == 0 else []
        messages += [{"role": "user", "content": mr(r)}, {"role": "assistant", "content": r["completion"].strip()}]
        if i % 4 == 1 and i + 1 < len(rows):
            nxt = rows[i + 1]
            messages += [{"role": "user", "content": "And this one: " + mr(nxt)},
                         {"role": "assistant", "content": nxt["completion"].strip()}]
        out.append({"messages": messages})
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE with the fixed special ids, wrapped as a transformers fast tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        model_max_length=1_000_000, clean_up_tokenization_spaces=False)


# ---------------------------------------------------------------------------------------------


def generate(out_dir: str | Path = ASSETS, korean_source: str | Path | None = None) -> list[Path]:
    """Write every asset into ``out_dir``; returns the paths written. Deterministic.

    The Korean excerpt is copied from ``korean_source`` (default: the shipped asset,
    ``assets/lora_intro_ko.txt``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, evals = make_examples()
    _write_jsonl(out / "e2e_train.jsonl", train)
    _write_jsonl(out / "e2e_eval.jsonl", evals)
    _write_jsonl(out / "e2e_chat_train.jsonl", chat_examples(train, N_CHAT_TRAIN))
    _write_jsonl(out / "e2e_chat_eval.jsonl", chat_examples(evals, N_CHAT_EVAL))

    src = Path(korean_source) if korean_source else ASSETS / "lora_intro_ko.txt"
    if not src.is_file():
        raise FileNotFoundError(f"{src}: the Korean source text is missing (pass korean_source=PATH)")
    ko = out / "lora_intro_ko.txt"
    if src.resolve() != ko.resolve():
        shutil.copyfile(src, ko)
    korean = ko.read_text(encoding="utf-8")

    texts = [r["prompt"] + r["completion"] for r in train]
    texts += [p for p in korean.split("\n\n") if p.strip()]
    tok = train_tokenizer(texts)
    tok.chat_template = CHAT_TEMPLATE
    tok_dir = out / "tokenizer"
    if tok_dir.exists():
        shutil.rmtree(tok_dir)
    tok.save_pretrained(str(tok_dir))
    return sorted(p for p in out.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bigtrain.datagen", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ASSETS), help="output directory (default: the package assets)")
    args = ap.parse_args(argv)
    for p in generate(args.out):
        print(f"{p.stat().st_size:>9,d}  {p}")


if __name__ == "__main__":
    main()
