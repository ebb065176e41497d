"""promptkd.evaluation: ROUGE-L / exact match, sharding, tables and in-order generation (one process)."""

from __future__ import annotations

import json

import pytest
import torch
from rouge_score import rouge_scorer

from promptkd.config import EvalConfig
from promptkd.data import TokenizedExample, train_tokenizer
from promptkd.evaluation import (
    Generator,
    evaluate,
    exact_match,
    generate_answers,
    per_category,
    results_table,
    rouge_l,
    score,
    shard_indices,
    write_results,
)
from promptkd.models import build_tiny
from promptkd.rollout import SamplingParams, hf_step_fn

SENTENCES = [
    "the cat sat on the mat and looked at the dog",
    "write a short poem about the sea and the sky",
    "list three colors: red, green and blue",
    "what is the capital of france? paris is the capital",
    "summarize the text in one sentence please",
    "numbers one two three four five six seven",
] * 4


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny models gain nothing from intra-op threads; on a shared 2-core box they only spin.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(SENTENCES, vocab_size=320, out_dir=str(tmp_path_factory.mktemp("tok")))


def _examples(tokenizer, prompts: list[str]) -> list[TokenizedExample]:
    out = []
    for i, text in enumerate(prompts):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        out.append(TokenizedExample(id=f"ex{i}", prompt_ids=list(ids), response_ids=[tokenizer.eos_token_id],
                                    references=[text], category="c%d" % (i % 2)))
    return out


PROMPTS = [
    "the cat sat on the mat and looked at the dog",  # long
    "red",
    "write a short poem about the sea",
    "paris is the capital",
    "one two",
    "list three colors: red, green and blue please",
    "summarize the text",
]


# ----------------------------------------------------------------------------- ROUGE-L / EM

PAIRS = [
    ("the cat sat", "the cat sat on the mat"),
    ("the cat is running", "The cats are running."),
    ("d c b a", "a b c d"),
    ("runs quick", "Running quickly!"),
    ("completely different words", "nothing shared here"),
    ("Paris", "paris"),
]


@pytest.mark.parametrize("prediction, reference", PAIRS)
def test_rouge_l_matches_rouge_score(prediction, reference):
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = 100.0 * scorer.score(reference, prediction)["rougeL"].fmeasure
    assert rouge_l(prediction, [reference]) == pytest.approx(expected)


@pytest.mark.parametrize("prediction, reference, expected", [
    ("the cat sat", "the cat sat on the mat", 200 / 3),   # LCS 3: P = 1, R = 1/2
    ("the cat is running", "The cats are running.", 75.0),  # stemmed: cat, run match; LCS 3 of 4
    ("d c b a", "a b c d", 25.0),                          # LCS 1 of 4
    ("runs quick", "Running quickly!", 50.0),              # "runs"/"running" stem alike, "quick"/"quickli" do not
    ("Paris", "paris", 100.0),
    ("completely different words", "nothing shared here", 0.0),
])
def test_rouge_l_hand_computed(prediction, reference, expected):
    assert rouge_l(prediction, [reference]) == pytest.approx(expected)


def test_rouge_l_f_measure_is_symmetric():
    assert rouge_l("the cat sat", ["the cat sat on the mat"]) == pytest.approx(
        rouge_l("the cat sat on the mat", ["the cat sat"]))


def test_rouge_l_multi_reference_takes_max():
    refs = ["nothing in common", "the cat sat on the mat", "the cat"]
    each = [rouge_l("the cat sat", [r]) for r in refs]
    assert each[0] == 0.0 and each[2] == pytest.approx(80.0)
    assert rouge_l("the cat sat", refs) == pytest.approx(max(each)) == pytest.approx(80.0)


def test_rouge_l_empty_prediction_is_zero():
    assert rouge_l("", ["the cat sat"]) == 0.0
    assert rouge_l("   ", ["the cat sat", "a"]) == 0.0


@pytest.mark.parametrize("prediction, references, expected", [
    ("Paris", ["paris"], 100.0),
    ("  The  Answer is: 42! ", ["the answer is 42"], 100.0),
    ("the answer\nis 42", ["The answer is 42."], 100.0),
    ("Paris.", ["London", "PARIS"], 100.0),
    ("Paris", ["Paris France"], 0.0),
    ("", ["x"], 0.0),
    ("forty two", ["42"], 0.0),
])
def test_exact_match_normalization(prediction, references, expected):
    assert exact_match(prediction, references) == expected


def test_score_and_per_category_average():
    exs = [TokenizedExample("a", [1], [2], ["the cat sat on the mat"], "x"),
           TokenizedExample("b", [1], [2], ["paris"], "y"),
           TokenizedExample("c", [1], [2], ["blue"], "y")]
    preds = ["the cat sat", "Paris", "red"]
    s = score(preds, exs)
    assert s["rougeL"] == pytest.approx((200 / 3 + 100 + 0) / 3)
    assert s["exact_match"] == pytest.approx(100 / 3)
    assert per_category(preds, exs) == pytest.approx({"x": 200 / 3, "y": 50.0})


# ----------------------------------------------------------------------------- sharding

@pytest.mark.parametrize("n, world", [(7, 2), (10, 3), (5, 4), (3, 5), (8, 4), (1, 2), (0, 3)])
def test_shard_indices_cover_range_once_with_equal_lengths(n, world):
    shards = [shard_indices(n, r, world) for r in range(world)]
    assert len({len(s) for s in shards}) == 1
    assert len(shards[0]) == -(-n // world)
    real = [i for s in shards for i in s if i >= 0]
    assert sorted(real) == list(range(n))
    assert len(real) == len(set(real))
    assert all(i == -1 for s in shards for i in s if i < 0)
    for r, s in enumerate(shards):  # strided: rank r takes r, r + W, ...
        assert [i for i in s if i >= 0] == list(range(r, n, world))


# ----------------------------------------------------------------------------- reports

def _fake_results() -> dict:
    def run(seed, rl, cats):
        return {"seed": seed, "rougeL": rl, "exact_match": 10.0, "by_category": cats, "answers": ["a", "b"]}

    return {
        "student": {"n": 2, "rougeL": 31.5, "rougeL_std": 1.25, "exact_match": 10.0,
                    "by_category": {"open_qa": 20.5, "summarization": 42.25},
                    "seeds": [run(10, 30.25, {"open_qa": 20.0, "summarization": 40.5}),
                              run(20, 32.75, {"open_qa": 21.0, "summarization": 44.0})]},
        "teacher_prompted": {"n": 2, "rougeL": 44.0, "rougeL_std": 0.0, "exact_match": 10.0,
                             "by_category": {"brainstorming": 12.5},
                             "seeds": [run(10, 44.0, {"brainstorming": 12.5})]},
    }


def test_results_table_has_every_model_and_category():
    table = results_table(_fake_results())
    lines = table.strip().splitlines()
    assert len(lines) == 2 + 2
    for word in ("student", "teacher_prompted", "open_qa", "summarization", "brainstorming"):
        assert word in table
    student = next(line for line in lines if line.startswith("| student"))
    assert "31.50 ± 1.25" in student  # spread shown only with several seeds
    assert "20.5 | 42.2" in student  # per-category columns are means over seeds
    teacher = next(line for line in lines if line.startswith("| teacher_prompted"))
    assert "44.00 |" in teacher and "±" not in teacher
    n_cols = len(lines[0].split("|"))
    assert all(len(line.split("|")) == n_cols for line in lines)


def test_write_results_files(tmp_path):
    exs = [TokenizedExample("a", [1], [2], ["r1"], "c"), TokenizedExample("b", [1], [2], ["r2"], "c")]
    write_results(str(tmp_path), _fake_results(), exs)
    data = json.loads((tmp_path / "results.json").read_text())
    assert set(data) == {"student", "teacher_prompted"}
    assert "seeds" not in data["student"] and len(data["student"]["by_seed"]) == 2
    assert "answers" not in data["student"]["by_seed"][0]
    assert (tmp_path / "results.md").read_text() == results_table(_fake_results())
    rows = [json.loads(line) for line in (tmp_path / "answers_student.jsonl").read_text().splitlines()]
    assert [(r["id"], r["seed"]) for r in rows] == [("a", 10), ("b", 10), ("a", 20), ("b", 20)]


# ----------------------------------------------------------------------------- generation

class EchoLastToken:
    """Step-function stub: each row repeats its prompt's last token twice, then EOS."""

    def __init__(self, vocab: int, eos: int) -> None:
        self.vocab, self.eos = vocab, eos

    def __call__(self, ids, mask, past):
        if past is None:
            past = {"tok": ids[:, -1].clone(), "step": 0}  # left padding: the last column is real
        # one finite logit per row: greedy and sampling both pick it
        logits = torch.full((ids.shape[0], self.vocab), float("-inf"))
        if past["step"] < 2:
            logits[torch.arange(ids.shape[0]), past["tok"]] = 0.0
        else:
            logits[:, self.eos] = 0.0
        return logits, {"tok": past["tok"], "step": past["step"] + 1}


def _gen_stub(tokenizer) -> Generator:
    return Generator(step_fn=EchoLastToken(len(tokenizer), tokenizer.eos_token_id), pad_id=tokenizer.pad_token_id,
                     eos_id=tokenizer.eos_token_id, vocab_size=len(tokenizer))


@pytest.mark.parametrize("batch_size", [1, 2, 3, 50])
def test_generate_answers_in_dataset_order_stub(tokenizer, batch_size):
    exs = _examples(tokenizer, PROMPTS)
    params = SamplingParams(max_new_tokens=5, do_sample=False)
    answers = generate_answers(_gen_stub(tokenizer), tokenizer, exs, params, batch_size=batch_size, seed=1)
    expected = [tokenizer.decode([ex.prompt_ids[-1]] * 2, skip_special_tokens=True).strip() for ex in exs]
    assert answers == expected
    assert len(set(expected)) == len(expected)  # distinct, so order is really checked


@pytest.fixture(scope="module")
def tiny_gen(tokenizer) -> Generator:
    torch.manual_seed(0)
    model = build_tiny("llama", 2, 32, 4, vocab_size=len(tokenizer)).eval()
    return Generator(step_fn=hf_step_fn(model), pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                     vocab_size=len(tokenizer))


def test_generate_answers_greedy_independent_of_batch_size(tokenizer, tiny_gen):
    exs = _examples(tokenizer, PROMPTS)
    params = SamplingParams(max_new_tokens=6, do_sample=False)
    one = generate_answers(tiny_gen, tokenizer, exs, params, batch_size=1, seed=10)
    three = generate_answers(tiny_gen, tokenizer, exs, params, batch_size=3, seed=10)
    assert len(one) == len(exs)
    assert one == three
    assert len(set(one)) > 1  # the prompts lead to different answers, so order matters
    # batch_size=1 really is each prompt on its own: compare with one-example calls
    assert one == [generate_answers(tiny_gen, tokenizer, [ex], params, batch_size=1, seed=10)[0] for ex in exs]


def test_generate_answers_sampling_seeded(tokenizer, tiny_gen):
    exs = _examples(tokenizer, PROMPTS[:4])
    params = SamplingParams(max_new_tokens=6, do_sample=True)
    a = generate_answers(tiny_gen, tokenizer, exs, params, batch_size=2, seed=10)
    b = generate_answers(tiny_gen, tokenizer, exs, params, batch_size=2, seed=10)
    c = generate_answers(tiny_gen, tokenizer, exs, params, batch_size=2, seed=20)
    assert a == b
    assert a != c


def test_evaluate_aggregates_over_seeds(tokenizer):
    # The stub echoes the last prompt token twice; references are exactly that, or not.
    exs = _examples(tokenizer, PROMPTS[:4])
    for i, ex in enumerate(exs):
        echo = tokenizer.decode([ex.prompt_ids[-1]] * 2, skip_special_tokens=True).strip()
        ex.references = [echo] if i % 2 == 0 else ["zzz"]
    ev = EvalConfig(batch_size=3, max_new_tokens=5, do_sample=True, no_repeat_ngram_size=0, seeds=[1, 2, 3])
    res = evaluate(_gen_stub(tokenizer), tokenizer, exs, ev)
    assert res["n"] == 4 and [s["seed"] for s in res["seeds"]] == [1, 2, 3]
    assert res["rougeL"] == pytest.approx(50.0) and res["rougeL_std"] == pytest.approx(0.0)
    assert res["exact_match"] == pytest.approx(50.0)
    greedy = evaluate(_gen_stub(tokenizer), tokenizer, exs,
                      EvalConfig(batch_size=3, max_new_tokens=5, do_sample=False, no_repeat_ngram_size=0,
                                 seeds=[1, 2, 3], max_examples=2))
    assert greedy["n"] == 2 and len(greedy["seeds"]) == 1  # greedy: one seed is enough
