"""promptkd.evaluation: ROUGE-L / exact match, sharding, tables and in-order generation (one process)."""

from __future__ import annotations

import json

import pytest
import torch
from rouge_score import rouge_scorer

from promptkd.config import EvalConfig
from promptkd.data import TokenizedExample, train_tokenizer
from promptkd.data.formats import sniff_format
from promptkd.evaluation import (
    Decoder,
    evaluate,
    exact_match,
    generate_answers,
    per_category,
    resolve_sets,
    rouge_l,
    scalars,
    score,
    shard_indices,
    slug,
    summarize,
    write_results,
)
from promptkd.evaluation.report import results_markdown
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


@pytest.mark.parametrize("prediction, references", [
    ("the cat sat", ["nothing in common", "the cat sat on the mat", "the cat"]),
    ("", ["the cat sat", "a dog"]),                      # empty prediction
    ("...", ["the cat sat"]),                            # punctuation only: no tokens
    ("the cat", ["", "cat the"]),                        # an empty reference among several
    ("Running dogs jumped", ["the dog runs", "jumping dogs ran quickly", "dogs"]),
])
def test_rouge_l_multi_reference_matches_rouge_score(prediction, references):
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = 100.0 * max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in references)
    assert rouge_l(prediction, references) == pytest.approx(expected)
    if not prediction.strip(" ."):
        assert rouge_l(prediction, references) == 0.0


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

def _run(seed, rl, em, cats, answers=("a", "b")):
    return {"seed": seed, "rougeL": rl, "exact_match": em, "by_category": cats, "answers": list(answers)}


def _result(*runs):
    """What ``evaluate`` returns, built from per-seed runs (means/stds by hand below)."""
    import statistics as st

    cats = {c: st.fmean(r["by_category"][c] for r in runs) for c in runs[0]["by_category"]}
    return {"n": len(runs[0]["answers"]), "rougeL": st.fmean(r["rougeL"] for r in runs),
            "rougeL_std": st.pstdev(r["rougeL"] for r in runs), "exact_match": st.fmean(r["exact_match"] for r in runs),
            "exact_match_std": st.pstdev(r["exact_match"] for r in runs), "by_category": cats, "seeds": list(runs)}


def _fake_results() -> dict:
    return {
        "student": {"dolly": _result(_run(10, 30.0, 10.0, {"open_qa": 20.0, "summarization": 40.0}),
                                     _run(20, 34.0, 20.0, {"open_qa": 22.0, "summarization": 44.0})),
                    "vicuna": _result(_run(10, 16.0, 0.0, {"generic": 16.0}), _run(20, 18.0, 0.0, {"generic": 18.0}))},
        "teacher + learned prompt": {
            "dolly": _result(_run(10, 44.0, 50.0, {"open_qa": 40.0, "summarization": 48.0}),
                             _run(20, 44.0, 50.0, {"open_qa": 40.0, "summarization": 48.0})),
            "vicuna": _result(_run(10, 20.0, 0.0, {"generic": 20.0}), _run(20, 22.0, 0.0, {"generic": 22.0}))},
    }


def test_summary_average_over_datasets_is_per_seed():
    summary = summarize(_fake_results())
    student = summary["models"]["student"]
    assert student["datasets"]["dolly"]["rougeL"] == pytest.approx(32.0)
    assert student["datasets"]["dolly"]["rougeL_std"] == pytest.approx(2.0)  # population std of 30, 34
    avg = student["average"]
    # seed 10: (30 + 16) / 2 = 23; seed 20: (34 + 18) / 2 = 26 -> 24.5 ± 1.5
    assert [s["rougeL"] for s in avg["by_seed"]] == pytest.approx([23.0, 26.0])
    assert avg["rougeL"] == pytest.approx(24.5) and avg["rougeL_std"] == pytest.approx(1.5)
    assert avg["exact_match"] == pytest.approx(7.5) and avg["n"] == 4
    assert "answers" not in json.dumps(summary)  # answers go to their own files


def test_results_markdown_is_models_by_datasets():
    summary = summarize(_fake_results())
    md = results_markdown(summary)
    lines = md.splitlines()
    header = lines.index("| model | dolly | vicuna | average |")
    assert lines[header + 2] == "| student | 32.00 ± 2.00 | 17.00 ± 1.00 | 24.50 ± 1.50 |"
    assert lines[header + 3] == "| teacher + learned prompt | 44.00 ± 0.00 | 21.00 ± 1.00 | 32.50 ± 0.50 |"
    assert "## Exact match" in md and "| student | 15.00 ± 5.00 | 0.00 ± 0.00 | 7.50 ± 2.50 |" in md
    assert "| student | dolly | 30.00 | 34.00 |" in md  # per seed
    assert "| student | 21.0 | 42.0 |" in md  # dolly per category (open_qa, summarization)
    one_seed = summarize({"m": {"test": _result(_run(10, 12.345, 0.0, {"x": 1.0}))}})
    assert "| m | 12.35 |" in results_markdown(one_seed)  # no ± and no average column with one seed and set


def test_write_results_files(tmp_path):
    exs = {"dolly": [TokenizedExample("d1", [1], [2], ["r1"], "open_qa"),
                     TokenizedExample("d2", [1], [2], ["r2", "r2b"], "summarization")],
           "vicuna": [TokenizedExample("v1", [1], [2], ["r3"], "generic"),
                      TokenizedExample("v2", [1], [2], ["r4"], "generic")]}
    ev = EvalConfig(seeds=[10, 20])
    summary = write_results(str(tmp_path), _fake_results(), exs, ev, {"dolly": {"n": 2}, "vicuna": {"n": 2}})
    data = json.loads((tmp_path / "results.json").read_text())
    assert data == json.loads(json.dumps(summary))
    assert data["decoding"]["seeds"] == [10, 20] and data["decoding"]["no_repeat_ngram_size"] == 6
    assert set(data["models"]) == {"student", "teacher + learned prompt"}
    assert len(data["models"]["student"]["datasets"]["dolly"]["by_seed"]) == 2
    assert (tmp_path / "results.md").read_text() == results_markdown(summary)
    rows = [json.loads(line) for line in (tmp_path / "answers" / "teacher_learned_prompt" / "dolly.jsonl")
            .read_text().splitlines()]
    assert [(r["id"], r["seed"], r["answer"]) for r in rows] == [("d1", 10, "a"), ("d2", 10, "b"), ("d1", 20, "a"),
                                                                 ("d2", 20, "b")]
    assert rows[1]["references"] == ["r2", "r2b"] and rows[1]["category"] == "summarization"
    assert (tmp_path / "answers" / "student" / "vicuna.jsonl").is_file()


def test_tensorboard_scalar_names():
    several = scalars(summarize(_fake_results()))
    assert several["eval/student/dolly/rougeL"] == pytest.approx(32.0)
    assert several["eval/teacher_learned_prompt/average/rougeL"] == pytest.approx(32.5)
    assert several["eval/student/vicuna/exact_match_std"] == 0.0
    one = scalars(summarize({"student": _fake_results()["student"]}))
    assert one["eval/dolly/rougeL"] == pytest.approx(32.0) and one["eval/average/rougeL_std"] == pytest.approx(1.5)
    assert all(k.startswith("eval/") and "//" not in k for k in one)


def test_slug_is_file_safe():
    assert slug("teacher + learned prompt") == "teacher_learned_prompt"
    assert slug("student (promptkd)") == "student_promptkd"
    assert slug("a/b c") == "a_b_c" and slug("+++") == "model"


# ----------------------------------------------------------------------------- eval sets

def test_resolve_sets_named_files_dirs_and_fallback(tmp_path):
    for name in ("unni", "dolly", "zzz", "vicuna"):
        (tmp_path / "root" / name).mkdir(parents=True)
        (tmp_path / "root" / name / "test.jsonl").write_text("{}\n")
    (tmp_path / "root" / "notes").mkdir()
    root = str(tmp_path / "root")
    # a prepared root: the paper's order first, then others by name; dirs without test.jsonl are skipped
    assert list(resolve_sets([root])) == ["dolly", "vicuna", "unni", "zzz"]
    assert resolve_sets([f"{root}/vicuna"]) == {"vicuna": f"{root}/vicuna/test.jsonl"}
    assert resolve_sets(["mine=/x/y.jsonl", f"d={root}/dolly"]) == {"mine": "/x/y.jsonl",
                                                                   "d": f"{root}/dolly/test.jsonl"}
    assert resolve_sets([], "data/test.jsonl") == {"test": "data/test.jsonl"}
    for bad, match in (([], "nothing to evaluate"), ([str(tmp_path / "nope")], "neither name=path"),
                       ([f"{root}/dolly", f"{root}/dolly"], "duplicate set name 'dolly'"),
                       ([f"x={root}"], "holds several sets"), ([str(tmp_path / "root" / "notes")], "no test.jsonl")):
        with pytest.raises(ValueError, match=match):
            resolve_sets(bad)


def test_sniff_format(tmp_path):
    po, dolly, other = tmp_path / "po.jsonl", tmp_path / "d.jsonl", tmp_path / "o.jsonl"
    po.write_text(json.dumps({"prompt": "p", "output": ["a"]}) + "\n")
    dolly.write_text("\n" + json.dumps({"instruction": "i", "context": "", "response": "r"}) + "\n")
    other.write_text(json.dumps({"question": "q"}) + "\n")
    assert sniff_format(str(po)) == "prompt_output"
    assert sniff_format(str(dolly), "prompt_output") == "dolly"
    assert sniff_format(str(other), "prompt_output") == "prompt_output"
    assert sniff_format("owner/name", "dolly") == "dolly"


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


def _gen_stub(tokenizer) -> Decoder:
    return Decoder(step_fn=EchoLastToken(len(tokenizer), tokenizer.eos_token_id), pad_id=tokenizer.pad_token_id,
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
def tiny_gen(tokenizer) -> Decoder:
    torch.manual_seed(0)
    model = build_tiny("llama", 2, 32, 4, vocab_size=len(tokenizer)).eval()
    return Decoder(step_fn=hf_step_fn(model), pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
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
