"""The multi-answer suite (promptkd.data.multi_answer) and Dolly's optional ``references`` list, scored as the max
ROUGE-L over references (issue 23 item 5)."""

from __future__ import annotations

import itertools
import json
import random

import pytest
from rouge_score import rouge_scorer

from promptkd.data import DataError, load_examples, tokenize_examples, train_tokenizer
from promptkd.data.multi_answer import COLOR_TABLE, FAMILIES, LETTERS, generate_multi_answer, make_multi_answer_splits
from promptkd.data.synthetic import NOUNS
from promptkd.evaluation import per_category, rouge_l, score


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_dolly_references_follow_the_response_deduplicated(tmp_path):
    path = _write(tmp_path / "d.jsonl", [
        {"instruction": "Pick", "response": "b", "references": ["a", "b", "c", "a"]},
        {"instruction": "Only one", "response": "x"},
    ])
    multi, single = load_examples(path, "dolly")
    # the response stays first: it is the training target (references[0]); the list adds the other valid answers
    assert multi.references == ["b", "a", "c"]
    assert single.references == ["x"]


@pytest.mark.parametrize("bad", [[], "abc", [1, 2], ["a", None]])
def test_dolly_bad_references_name_file_and_line(tmp_path, bad):
    path = _write(tmp_path / "d.jsonl", [{"instruction": "i", "response": "r"},
                                         {"instruction": "i", "response": "r", "references": bad}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: field 'references' must be a non-empty list of strings"):
        load_examples(path, "dolly")


def _tokenized(tmp_path, rows):
    path = _write(tmp_path / "d.jsonl", rows)
    examples = load_examples(path, "dolly")
    tok = train_tokenizer([e.prompt + " " + r for e in examples for r in e.references], 300, str(tmp_path / "tok"))
    return tokenize_examples(examples, tok, max_prompt_length=200, max_length=256)[0]


def test_score_is_the_written_out_max_over_references(tmp_path):
    rows = [{"instruction": "List these words in any order.", "context": "cat dog sun", "response": "dog sun cat",
             "references": [" ".join(p) for p in itertools.permutations(["cat", "dog", "sun"])], "category": "a"},
            {"instruction": "What is 2 plus 3?", "response": "It is 5.",
             "references": ["2 plus 3 is 5.", "The sum is 5.", "It is 5."], "category": "b"}]
    examples = _tokenized(tmp_path, rows)
    predictions = ["cat dog sun", "The sum is five 5."]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    by_hand = [100.0 * max(scorer.score(ref, p)["rougeL"].fmeasure for ref in [r["response"], *r["references"]])
               for p, r in zip(predictions, rows)]
    assert by_hand[0] == pytest.approx(100.0)  # a valid order other than the sampled one is a perfect answer
    single = 100.0 * scorer.score("It is 5.", predictions[1])["rougeL"].fmeasure
    assert by_hand[1] > single  # the max picked another phrasing than the response
    assert score(predictions, examples)["rougeL"] == pytest.approx(sum(by_hand) / 2)
    assert per_category(predictions, examples) == pytest.approx({"a": by_hand[0], "b": by_hand[1]})


def test_single_reference_score_is_unchanged(tmp_path):
    """A record without ``references`` (or with a list holding only its response) scores exactly as before."""
    plain = [{"instruction": "What is 2 plus 3?", "response": "2 plus 3 is 5."}]
    listed = [{**plain[0], "references": ["2 plus 3 is 5."]}]
    prediction = ["The sum is 5."]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    today = 100.0 * scorer.score("2 plus 3 is 5.", prediction[0])["rougeL"].fmeasure
    for rows in (plain, listed):
        examples = _tokenized(tmp_path, rows)
        assert examples[0].references == ["2 plus 3 is 5."]
        assert score(prediction, examples)["rougeL"] == today
        assert rouge_l(prediction[0], examples[0].references) == today


def _valid(record: dict) -> bool:
    """Whether the record's response is a right answer, checked from the prompt and the tables alone."""
    fam, ctx, resp, ins = record["category"], record["context"], record["response"], record["instruction"]
    if fam == "colors":
        return sorted(resp.split()) == sorted(COLOR_TABLE[ins.split()[-1].rstrip(".")])
    if fam == "sum_pair":
        a, b = map(int, resp.split(" and "))
        return a >= 1 and b >= 1 and a + b == int(ins.rstrip(".").split()[-1])
    if fam == "letter":
        return resp in NOUNS and resp[0] == ins.rstrip(".")[-1]
    if fam == "add":
        a, b = map(int, ins[len("What is "):-1].split(" plus "))
        return resp.rstrip(".").split()[-1] == str(a + b)
    return resp.rstrip(".").split()[-2] == str(len(ctx.split(", ")))  # "... 5 items."


def test_generator_answers_are_valid_and_listed_in_full():
    records = generate_multi_answer(500, random.Random(3), with_references=True)
    assert {r["category"] for r in records} == set(FAMILIES)
    assert all(_valid(r) for r in records)
    for r in records:
        assert r["response"] in r["references"] and len(set(r["references"])) == len(r["references"]) >= 2
        assert all(_valid({**r, "response": ref}) for ref in r["references"])
        if r["category"] == "colors":
            assert len(r["references"]) == 6
        if r["category"] == "sum_pair":
            assert len(r["references"]) == int(r["instruction"].rstrip(".").split()[-1]) - 1
    assert all(len([n for n in NOUNS if n[0] == c]) >= 2 for c in LETTERS)
    assert all(len(set(c)) == 3 for c in COLOR_TABLE.values()) and len(COLOR_TABLE) == 16


def test_training_references_are_sampled_across_valid_answers():
    """Train gives one answer per prompt, drawn over all valid ones: the same prompt shows different answers."""
    records = generate_multi_answer(3000, random.Random(5), with_references=False)
    assert all("references" not in r for r in records)
    add = {}
    for r in records:
        if r["category"] == "add":
            add.setdefault(r["instruction"], set()).add(r["response"].split(" is ")[0])
    phrasings = {p.split()[0] if p.startswith(("The", "It")) else "a plus b" for s in add.values() for p in s}
    assert phrasings == {"The", "It", "a plus b"}
    assert any(len(s) >= 2 for s in add.values())


def test_splits_are_deterministic_and_avoid_train_prompts(tmp_path):
    a = make_multi_answer_splits(str(tmp_path / "a"), 300, 40, 60, seed=7)
    b = make_multi_answer_splits(str(tmp_path / "b"), 300, 40, 60, seed=7)
    for split in ("train", "dev", "test"):
        assert open(a[split]).read() == open(b[split]).read()
    rows = {s: [json.loads(x) for x in open(a[s])] for s in a}
    train = {(r["instruction"], r["context"]) for r in rows["train"]}
    for split in ("dev", "test"):
        assert all("references" in r for r in rows[split])
        fresh = [r for r in rows[split] if r["category"] == "count"]  # the one held-out family
        assert fresh and all((r["instruction"], r["context"]) not in train for r in fresh)
    loaded = load_examples(a["test"], "dolly")
    assert all(e.references[0] == r["response"] and set(e.references) == set(r["references"])
               for e, r in zip(loaded, rows["test"]))


def test_quality_multi_config_smoke(tmp_path):
    """configs/quality_multi.yaml through bench/quality.py --smoke on a toy multi-answer split: the config loads,
    every job runs, and the report's families are the suite's."""
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    data = tmp_path / "data"
    make_multi_answer_splits(str(data), 96, 8, 16, seed=3)
    env = dict(os.environ, BENCH_RESULTS=str(tmp_path / "results"), DS_ACCELERATOR="cpu")
    proc = subprocess.run([sys.executable, os.path.join(repo, "bench", "quality.py"), "--smoke", "--config",
                           os.path.join(repo, "configs", "quality_multi.yaml"), "--data", str(data), "--work-dir",
                           str(tmp_path / "work"), "--methods", "rkl"], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(out["test_rougeL"]) == {"rkl"}
    assert set(out["reference"]["sampled"]["teacher"]["test"]["by_category"]) <= set(FAMILIES)
    assert all(0.0 <= v["mean"] <= 100.0 for row in out["test_rougeL"].values() for v in row.values())
    answers = list((tmp_path / "work").rglob("answers/*/test.jsonl"))
    assert answers and all(len(json.loads(line)["references"]) >= 2 for line in answers[0].open())
