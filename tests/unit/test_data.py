"""Data layer: template, loaders and their errors, splits, synthetic data, tokenizer, collate."""

from __future__ import annotations

import json
import logging
import os
import sys
import types

import pytest
import torch
from transformers import AutoTokenizer

from promptkd.data import (
    FAMILIES,
    DataError,
    Example,
    ListDataset,
    TokenizedExample,
    build_prompt,
    collate_full,
    collate_prompts,
    generate_synthetic,
    load_examples,
    load_tokenizer,
    make_synthetic_splits,
    split_train_dev,
    tokenize_examples,
    train_tokenizer,
    write_jsonl,
)
from promptkd.data.synthetic import FACTS

HEADER = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
)


def _write_lines(path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


# --- template ---------------------------------------------------------------


def test_template_without_context_is_exact():
    assert build_prompt("Name a fruit.") == (
        HEADER + "### Instruction:\nName a fruit.\n\n### Response:\n"
    )


def test_template_with_context_is_exact():
    """A prompt with an input has its own first sentence (Alpaca's and MiniLLM's process_data_dolly.py)."""
    assert build_prompt("Sum them.", "1 2") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSum them.\n\n### Input:\n1 2\n\n### Response:\n"
    )
    assert build_prompt("Sum them.", "  ") == build_prompt("Sum them.")  # an empty input is no input


def test_template_blank_context_means_no_input_block():
    assert build_prompt("x", "") == build_prompt("x", "  \n") == build_prompt("x", None)
    assert "### Input:" not in build_prompt("x", " ")


# --- loading ----------------------------------------------------------------


def test_load_dolly_fields_ids_and_blank_lines(tmp_path):
    path = _write_lines(tmp_path / "d.jsonl", [
        json.dumps({"instruction": "Say hi.", "context": "", "response": "hi", "category": "chat"}),
        "",
        json.dumps({"instruction": "Sum.", "context": "1 2", "response": "3", "id": 42}),
        json.dumps({"instruction": "Nothing.", "response": "ok", "context": None}),
    ])
    exs = load_examples(path)
    assert [e.id for e in exs] == ["d.jsonl:1", "42", "d.jsonl:4"]
    assert exs[0] == Example("d.jsonl:1", build_prompt("Say hi."), ["hi"], "chat")
    assert exs[1].prompt == build_prompt("Sum.", "1 2") and exs[1].references == ["3"]
    assert exs[2].category == "" and "### Input:" not in exs[2].prompt


def test_load_prompt_output_raw_templated_and_lists(tmp_path):
    templated = build_prompt("Already done.", "ctx")
    path = _write_lines(tmp_path / "po.jsonl", [
        json.dumps({"prompt": "Name a color.", "output": "red"}),
        json.dumps({"prompt": templated, "output": ["a", "b"], "id": "x7"}),
    ])
    exs = load_examples(path, fmt="prompt_output")
    assert exs[0].prompt == build_prompt("Name a color.") and exs[0].references == ["red"]
    assert exs[0].id == "po.jsonl:1"
    assert exs[1].prompt == templated and exs[1].references == ["a", "b"] and exs[1].id == "x7"


GOOD = json.dumps({"instruction": "i", "response": "r"})


@pytest.mark.parametrize(
    ("fmt", "lines", "line_no", "phrase"),
    [
        ("dolly", [GOOD, "{not json"], 2, "malformed JSON"),
        ("dolly", [GOOD, "", json.dumps({"instruction": "i"})], 3, "missing field 'response'"),
        ("dolly", [json.dumps({"instruction": 5, "response": "r"})], 1, "'instruction' must be a string"),
        ("dolly", [GOOD, json.dumps({"instruction": "i", "response": "r", "context": 3})], 2, "'context'"),
        ("dolly", [json.dumps(["instruction", "response"])], 1, "expected a JSON object"),
        ("prompt_output", [json.dumps({"prompt": "p"})], 1, "missing field 'output'"),
        ("prompt_output", [json.dumps({"prompt": "p", "output": []})], 1, "'output'"),
        ("prompt_output", [json.dumps({"prompt": "p", "output": ["a", 1]})], 1, "'output'"),
        ("prompt_output", [json.dumps({"output": "o"})], 1, "missing field 'prompt'"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path, fmt, lines, line_no, phrase):
    path = _write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as info:
        load_examples(path, fmt=fmt)
    message = str(info.value)
    assert message.startswith(f"{path}:{line_no}: ")
    assert phrase in message and "\n" not in message


def test_missing_and_empty_files_are_data_errors(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=rf"^{missing}:0: file not found"):
        load_examples(missing)
    empty = _write_lines(tmp_path / "empty.jsonl", ["", "   "])
    with pytest.raises(DataError, match=rf"^{empty}:0: no examples"):
        load_examples(empty)


def test_unknown_format_is_rejected(tmp_path):
    path = _write_lines(tmp_path / "d.jsonl", [GOOD])
    with pytest.raises(ValueError, match="unknown data format 'alpaca'"):
        load_examples(path, fmt="alpaca")


def _fake_datasets(monkeypatch, load_dataset) -> None:
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))


def test_hub_id_loads_through_datasets(monkeypatch):
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        return [
            {"instruction": "Hi?", "context": "", "response": "Hello.", "category": "qa"},
            {"instruction": "Sum.", "context": "1 1", "response": "2", "category": "math"},
        ]

    _fake_datasets(monkeypatch, load_dataset)
    exs = load_examples("someone/dolly-like", split="validation")
    assert calls == [("someone/dolly-like", "validation")]
    assert [e.id for e in exs] == ["someone/dolly-like/validation:0", "someone/dolly-like/validation:1"]
    assert exs[1].prompt == build_prompt("Sum.", "1 1") and exs[1].category == "math"


def test_hub_errors_name_source_and_row(monkeypatch):
    rows = [{"instruction": "i", "response": "r"}, {"instruction": "i"}]
    _fake_datasets(monkeypatch, lambda name, split: rows)
    with pytest.raises(DataError, match=r"^org/ds\[train\]:1: missing field 'response'"):
        load_examples("org/ds")

    def offline(name, split):
        raise ConnectionError("no network\nsecond line")

    _fake_datasets(monkeypatch, offline)
    with pytest.raises(DataError, match=r"^org/ds\[train\]:0: cannot load dataset: ConnectionError: no network$"):
        load_examples("org/ds")


def test_local_looking_paths_never_hit_the_hub(monkeypatch, tmp_path):
    def forbidden(name, split):
        raise AssertionError("hub must not be queried")

    _fake_datasets(monkeypatch, forbidden)
    for source in ("./data/missing", "data/sub/missing", "org/missing.jsonl", str(tmp_path / "x")):
        with pytest.raises(DataError, match="file not found"):
            load_examples(source)


# --- splitting --------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_order_stable():
    items = list(range(50))
    train, dev = split_train_dev(items, dev_size=10, seed=3)
    assert (train, dev) == split_train_dev(items, dev_size=10, seed=3)
    assert split_train_dev(items, dev_size=10, seed=4)[1] != dev
    assert len(dev) == 10 and sorted(train + dev) == items
    assert not set(train) & set(dev)
    assert train == sorted(train) and dev == sorted(dev)


def test_split_rejects_too_large_dev():
    with pytest.raises(ValueError, match="dev_size=5"):
        split_train_dev([1, 2, 3, 4, 5], dev_size=5, seed=0)
    assert split_train_dev([1, 2], dev_size=0, seed=0) == ([1, 2], [])


# --- synthetic data ---------------------------------------------------------


def test_synthetic_is_deterministic_balanced_and_dolly_shaped():
    recs = generate_synthetic(160, seed=7)
    assert recs == generate_synthetic(160, seed=7)
    assert recs != generate_synthetic(160, seed=8)
    assert len(FAMILIES) >= 6
    counts = {f: sum(r["category"] == f for r in recs) for f in FAMILIES}
    assert set(counts.values()) == {160 // len(FAMILIES)}
    for r in recs:
        assert set(r) == {"instruction", "context", "response", "category"}
        assert all(isinstance(v, str) for v in r.values())
        assert 0 < len(r["response"].split()) <= 20
    assert any(r["context"] for r in recs) and any(not r["context"] for r in recs)


def test_synthetic_level_two_is_harder_and_level_one_unchanged():
    from promptkd.data.synthetic import LEVELS

    one, default = generate_synthetic(200, seed=4, level=1), generate_synthetic(200, seed=4)
    assert one == default  # level 1 is the suite the quickstart has always used
    two = generate_synthetic(400, seed=4, level=2)

    def sizes(rows, family):
        return [len(r["context"].split()) for r in rows if r["category"] == family]

    for family in ("sort", "reverse"):
        lo, hi = LEVELS[2][family]
        assert min(sizes(two, family)) >= lo and max(sizes(two, family)) <= hi
        assert max(sizes(one, family)) <= LEVELS[1][family][1] < max(sizes(two, family))
    sums = [int(r["response"].rstrip(".").split()[-1]) for r in two if r["category"] == "add"]
    assert min(sums) >= 20 and max(sums) > 99  # two-digit operands, three-digit sums appear
    assert {r["category"] for r in two} == set(FAMILIES)
    with pytest.raises(ValueError, match="level=3"):
        generate_synthetic(5, seed=1, level=3)


def test_synthetic_facts_are_fixed_and_fully_covered():
    fact_answers: dict[str, set[str]] = {}
    for seed in (1, 2):
        for r in generate_synthetic(8 * len(FACTS), seed):
            if r["category"] == "fact":
                fact_answers.setdefault(r["instruction"], set()).add(r["response"])
    # every fact appears, and the answer never depends on the caller's seed
    assert len(FACTS) == 150 and len(fact_answers) == 150
    assert all(len(answers) == 1 for answers in fact_answers.values())


def test_synthetic_vocabulary_is_small():
    words = set()
    for r in generate_synthetic(2000, seed=0):
        text = " ".join((r["instruction"], r["context"], r["response"]))
        words.update(text.replace(",", " ").replace(".", " ").replace("?", " ").split())
    assert 100 < len(words) < 400


def test_synthetic_splits_load_and_avoid_train_prompts(tmp_path):
    paths = make_synthetic_splits(str(tmp_path / "syn"), n_train=400, n_dev=40, n_test=80, seed=5)
    assert set(paths) == {"train", "dev", "test"}
    loaded = {name: load_examples(path) for name, path in paths.items()}
    assert [len(loaded[k]) for k in ("train", "dev", "test")] == [400, 40, 80]
    train_prompts = {e.prompt for e in loaded["train"]}
    for name in ("dev", "test"):
        fresh = [e for e in loaded[name] if e.category != "fact"]
        assert fresh and not any(e.prompt in train_prompts for e in fresh)
    assert paths == make_synthetic_splits(str(tmp_path / "syn"), 400, 40, 80, 5)


def test_write_jsonl_is_atomic(tmp_path):
    path = str(tmp_path / "out.jsonl")
    write_jsonl(path, [{"a": 1}, {"b": "é"}])
    with open(path, encoding="utf-8") as f:
        assert [json.loads(line) for line in f] == [{"a": 1}, {"b": "é"}]
    with pytest.raises(TypeError):
        write_jsonl(path, [{"ok": 1}, {"bad": object()}])
    with open(path, encoding="utf-8") as f:
        assert f.read().count("\n") == 2  # old content survives a failed write
    assert os.listdir(tmp_path) == ["out.jsonl"]


# --- tokenizer --------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tok"))
    texts = [build_prompt(r["instruction"], r["context"]) + r["response"] for r in generate_synthetic(600, 0)]
    return train_tokenizer(texts, vocab_size=400, out_dir=out), out


def test_tokenizer_specials_and_reload(trained):
    tok, out = trained
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ("<pad>", "<s>", "</s>", "<unk>")
    assert len(tok) == 400
    reloaded = AutoTokenizer.from_pretrained(out)
    text = build_prompt("What is 3 plus 4?")
    assert reloaded.encode(text) == tok.encode(text)
    assert (reloaded.pad_token_id, reloaded.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)


def test_tokenizer_round_trips_and_adds_no_bos(trained):
    tok, _ = trained
    for text in ["Reverse: cat dog", "  odd  spacing , here .", "ünïcödé ✓ 🚀\n\n### Response:\n"]:
        ids = tok.encode(text)
        assert tok.bos_token_id not in ids and tok.eos_token_id not in ids
        assert tok.decode(ids) == text
    rec = generate_synthetic(20, 3)
    for r in rec:
        prompt = build_prompt(r["instruction"], r["context"])
        # prompt/response tokenized apart must match the joint tokenization
        assert tok.encode(prompt) + tok.encode(r["response"]) == tok.encode(prompt + r["response"])


def test_tokenizer_rejects_tiny_vocab(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_tokenizer(["abc"], vocab_size=100, out_dir=str(tmp_path))


def test_load_tokenizer_pads_with_eos_and_names_bad_path(trained, tmp_path):
    _, out = trained
    assert load_tokenizer(out).pad_token == "<pad>"
    config_path = os.path.join(out, "tokenizer_config.json")
    no_pad = tmp_path / "nopad"
    no_pad.mkdir()
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    config.pop("pad_token")
    (no_pad / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    with open(os.path.join(out, "tokenizer.json"), encoding="utf-8") as f:
        (no_pad / "tokenizer.json").write_text(f.read(), encoding="utf-8")
    tok = load_tokenizer(str(no_pad))
    assert tok.pad_token == "</s>" and tok.pad_token_id == tok.eos_token_id
    bad = str(tmp_path / "no_such_tokenizer")
    with pytest.raises(OSError, match="no_such_tokenizer"):
        load_tokenizer(bad)


# --- tokenize and collate ---------------------------------------------------


class CharTokenizer:
    """One id per character (ord), EOS = 1: lengths in tests are exact by construction."""

    eos_token_id = 1

    def __call__(self, texts, add_special_tokens=True):
        assert add_special_tokens is False
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


def _ex(i: int, prompt: str, response: str) -> Example:
    return Example(id=f"e{i}", prompt=prompt, references=[response, "alt"], category="c")


def test_tokenize_drops_long_prompts_and_truncates_responses(caplog):
    exs = [_ex(0, "abc", "xy"), _ex(1, "abcdefg", "z"), _ex(2, "abcd", "uvwxyz")]
    with caplog.at_level(logging.INFO, logger="promptkd.data.dataset"):
        kept, dropped = tokenize_examples(exs, CharTokenizer(), max_prompt_length=5, max_length=8)
    assert dropped == 1 and "dropped 1" in caplog.text
    assert [k.id for k in kept] == ["e0", "e2"]
    assert kept[0].prompt_ids == [97, 98, 99] and kept[0].response_ids == [120, 121, 1]
    # 4 prompt tokens leave room for 4 response tokens: EOS is cut
    assert kept[1].response_ids == [ord(c) for c in "uvwx"]
    assert kept[1].references == ["uvwxyz", "alt"] and kept[1].category == "c"


def test_tokenize_all_dropped_is_data_error():
    with pytest.raises(DataError, match="every prompt is longer than max_prompt_length=2"):
        tokenize_examples([_ex(0, "abc", "x")], CharTokenizer(), max_prompt_length=2, max_length=8)
    with pytest.raises(ValueError, match="max_prompt_length < max_length"):
        tokenize_examples([_ex(0, "a", "x")], CharTokenizer(), max_prompt_length=8, max_length=8)


def _tex(prompt: list[int], response: list[int]) -> TokenizedExample:
    return TokenizedExample(id="t", prompt_ids=prompt, response_ids=response, references=["r"], category="")


BATCH = [_tex([5, 6, 7], [8, 2]), _tex([9], [10, 11, 12]), _tex([3, 4], [2])]


def test_collate_prompts_left_pads():
    out = collate_prompts(BATCH, pad_id=0)
    assert torch.equal(out["input_ids"], torch.tensor([[5, 6, 7], [0, 0, 9], [0, 3, 4]]))
    assert torch.equal(out["attention_mask"], torch.tensor([[1, 1, 1], [0, 0, 1], [0, 1, 1]]))
    assert out["input_ids"].dtype == out["attention_mask"].dtype == torch.long


def test_collate_full_right_pads_and_masks_responses():
    out = collate_full(BATCH, pad_id=0)
    assert torch.equal(out["input_ids"], torch.tensor([
        [5, 6, 7, 8, 2],
        [9, 10, 11, 12, 0],
        [3, 4, 2, 0, 0],
    ]))
    assert torch.equal(out["attention_mask"], torch.tensor([
        [1, 1, 1, 1, 1],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 0, 0],
    ]))
    assert torch.equal(out["loss_mask"], torch.tensor([
        [0, 0, 0, 1, 1],
        [0, 1, 1, 1, 0],
        [0, 0, 1, 0, 0],
    ]))
    assert all(t.dtype == torch.long for t in out.values())
    with pytest.raises(ValueError):
        collate_full([], pad_id=0)


def test_list_dataset_shards_with_distributed_sampler():
    data = ListDataset(["a", "b", "c", "d", "e"])
    assert len(data) == 5 and data[2] == "c"
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=2, rank=1, shuffle=False)
    assert [data[i] for i in sampler] == ["b", "d", "a"]
