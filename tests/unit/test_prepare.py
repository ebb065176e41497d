"""promptkd.data.prepare: each hand-made raw fixture (tests/fixtures/raw/<dataset>/, true raw layout)
converts to the expected records, the files load with ``load_examples``, hub ids go through
``datasets.load_dataset`` and the CLI works without the launcher."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from promptkd.data import DataError, build_prompt, load_examples
from promptkd.data.prepare import convert_unni, main, prepare, word_count, write_prepared

RAW = Path(__file__).resolve().parents[1] / "fixtures" / "raw"


def _ids(records):
    return [r["id"] for r in records]


def _po(ex_id, instruction, inp, refs, category, **extra):
    """The prompt_output record prepare writes (prompt templated, refs a list)."""
    return {"id": ex_id, "prompt": build_prompt(instruction, inp), "output": refs, "category": category,
            "instruction": instruction, "input": inp, **extra}


# ----------------------------------------------------------------------------- dolly

def test_dolly_split_is_seeded_disjoint_and_order_keeping(tmp_path):
    p = prepare("dolly", str(RAW / "dolly"), test_size=3, dev_size=2)
    # pinned: random.Random(42).shuffle over the 12 raw indices
    assert _ids(p.splits["test"]) == ["dolly-2", "dolly-5", "dolly-7"]
    assert _ids(p.splits["dev"]) == ["dolly-8", "dolly-9"]
    assert _ids(p.splits["train"]) == ["dolly-0", "dolly-1", "dolly-3", "dolly-4", "dolly-6", "dolly-10", "dolly-11"]
    assert p.fmt == "dolly" and p.stats == {"raw": 12, "seed": 42}
    assert p.splits["test"][2] == {
        "id": "dolly-7", "instruction": "Summarize the passage in one sentence.",
        "context": "The Lakers won the game after a late three-pointer, ending a five-game losing streak that had "
                   "worried fans.",
        "response": "A late three-pointer gave the Lakers a win that ended their five-game losing streak.",
        "category": "summarization"}
    again = prepare("dolly", str(RAW / "dolly" / "databricks-dolly-15k.jsonl"), test_size=3, dev_size=2)
    assert again.splits == p.splits  # deterministic, file or dir source alike
    other = prepare("dolly", str(RAW / "dolly"), test_size=3, dev_size=2, seed=7)
    assert _ids(other.splits["test"]) != _ids(p.splits["test"])


def test_dolly_files_load_as_dolly_format(tmp_path):
    p = prepare("dolly", str(RAW / "dolly"), test_size=3, dev_size=2)
    paths = write_prepared(str(tmp_path), "dolly", p, {"source": "fixture"})
    assert set(paths) == {"test", "dev", "train"}
    test = load_examples(paths["test"], "dolly")
    assert [e.id for e in test] == ["dolly-2", "dolly-5", "dolly-7"]
    assert "### Input:\nThe Lakers won" in test[2].prompt and "### Input:" not in test[0].prompt
    assert test[2].references == [p.splits["test"][2]["response"]] and test[2].category == "summarization"
    meta = json.loads((tmp_path / "dolly" / "meta.json").read_text())
    assert meta["format"] == "dolly" and meta["source"] == "fixture"
    assert {s: v["n"] for s, v in meta["splits"].items()} == {"test": 3, "dev": 2, "train": 7}


def test_dolly_too_small_for_the_split():
    with pytest.raises(DataError, match="cannot hold test=10"):
        prepare("dolly", str(RAW / "dolly"), test_size=10, dev_size=2)


# ----------------------------------------------------------------------------- selfinst

def test_selfinst_one_record_per_instance(tmp_path):
    p = prepare("selfinst", str(RAW / "selfinst"))
    wordy = ("The sentence you are given might be too wordy, complicated, or unclear. Rewrite the sentence and make "
             "your writing clearer by keeping it concise.")
    assert p.splits["test"] == [
        _po("user_oriented_task_0-0", wordy,
            "If you have any questions about my rate or if you find it necessary to increase or decrease the scope "
            "for this project, please let me know.",
            ["If you have any questions about my rate or find it necessary to increase or decrease this project's "
             "scope, please let me know."], "Grammarly"),
        _po("user_oriented_task_1-0", "Suggest a subject line for the email.",
            "Hi team, the launch moves to Friday because QA found two blockers.", ["Launch moved to Friday"], "Gmail"),
        _po("user_oriented_task_1-1", "Suggest a subject line for the email.",
            "Reminder: expense reports are due at the end of the month.", ["Expense reports due this month"], "Gmail"),
        _po("user_oriented_task_2-0", "Give three tips for staying healthy.", "",
            ["1. Eat a balanced diet.\n2. Exercise regularly.\n3. Get enough sleep."], "Google Search"),
    ]
    path = write_prepared(str(tmp_path), "selfinst", p, {})["test"]
    exs = load_examples(path, "prompt_output")
    assert "### Input:\nHi team" in exs[1].prompt and "### Input:" not in exs[3].prompt
    assert exs[3].prompt.endswith("### Response:\n")  # templated once, not twice


# ----------------------------------------------------------------------------- vicuna

def test_vicuna_llm_judge_layout_collects_references():
    p = prepare("vicuna", str(RAW / "vicuna"))
    assert p.splits["test"] == [
        _po("vicuna-1", "How can I improve my time management skills?", "",
            ["Set clear goals, prioritize tasks, and use a calendar to plan your day.",              # gpt-4.jsonl
             "Break work into small blocks, remove distractions, and review your schedule weekly."],  # gpt-4o.jsonl
            "generic"),
        _po("vicuna-68", "Given that f(x) = 5x^3 - 2x + 3, find the value of f(2).", "",
            ["f(2) = 5(2)^3 - 2(2) + 3 = 40 - 4 + 3 = 39. So, the value of f(2) is 39."], "math"),
        _po("vicuna-80", "Write a symphony concert review, discussing the orchestra's performance and overall "
                         "audience experience.", "",
            ["Last night's symphony was a triumph: the strings were warm, the brass precise, and the audience rose "
             "in applause."], "writing"),
    ]
    assert p.stats["dropped_no_reference"] == [2]
    only4 = prepare("vicuna", str(RAW / "vicuna" / "question.jsonl"),
                    references=[str(RAW / "vicuna" / "reference_answer" / "gpt-4.jsonl")])
    assert _ids(only4.splits["test"]) == ["vicuna-1", "vicuna-68"]
    assert only4.splits["test"][0]["output"] == ["Set clear goals, prioritize tasks, and use a calendar to plan your day."]


def test_vicuna_older_table_layout(tmp_path):
    (tmp_path / "question.jsonl").write_text(json.dumps(
        {"question_id": 3, "text": "What are the main differences between Python and JavaScript?",
         "category": "generic"}) + "\n")
    ans = tmp_path / "answer_gpt35.jsonl"
    ans.write_text(json.dumps({"answer_id": "x", "model_id": "gpt-3.5-turbo:20230327", "question_id": 3,
                               "text": "Python is dynamically typed; so is JavaScript.", "metadata": {}}) + "\n")
    p = prepare("vicuna", str(tmp_path / "question.jsonl"), references=[str(ans)])
    assert p.splits["test"] == [_po("vicuna-3", "What are the main differences between Python and JavaScript?", "",
                                    ["Python is dynamically typed; so is JavaScript."], "generic")]
    with pytest.raises(DataError, match="reference_answer"):
        prepare("vicuna", str(tmp_path / "question.jsonl"))


# ----------------------------------------------------------------------------- sni

SNI_TITLE = "Generate an appropriate title for the given text. The generated title must be short."
SNI_GEN = "In this task, you are given a set of concepts. Write a sentence that uses all of them."


def test_sni_test_tasks_long_references_only():
    p = prepare("sni", str(RAW / "sni"))
    assert p.splits["test"] == [
        _po("task1356-aaa1", SNI_TITLE, "The council met on Tuesday to vote on the budget.",
            ["The city council approved the new budget after a long debate about funding for public parks and "
             "libraries."], "Title Generation", task="task1356_xlsum_title_generation"),
        # "Budget passes" (2 words) is dropped, the long alternative stays
        _po("task1356-aaa3", SNI_TITLE, "Budget debate text.",
            ["Council approves budget following a lengthy debate over money for parks and the public library "
             "system."], "Title Generation", task="task1356_xlsum_title_generation"),
        _po("task102-bbb1", SNI_GEN, "dog, frisbee, park, catch",
            ["In the park a happy dog jumps high to catch the red frisbee thrown by a child."], "Data to Text",
            task="task102_commongen_sentence_generation"),
    ]  # task001 is a training task: not in splits/default/test_tasks.txt
    assert p.stats == {"tasks": 2, "instances_seen": 5, "min_words": 11, "max_per_task": 100}
    first = prepare("sni", str(RAW / "sni"), max_per_task=1)
    assert _ids(first.splits["test"]) == ["task1356-aaa1", "task102-bbb1"]
    assert _ids(prepare("sni", str(RAW / "sni"), min_words=20).splits["test"]) == []


def test_sni_task_list_override_and_missing_list(tmp_path):
    listing = tmp_path / "tasks.txt"
    listing.write_text("task001_quoref_question_generation\n")
    p = prepare("sni", str(RAW / "sni"), tasks_file=str(listing))
    assert _ids(p.splits["test"]) == ["task001-ccc1"]
    with pytest.raises(DataError, match="test_tasks.txt"):
        prepare("sni", str(tmp_path))


# ----------------------------------------------------------------------------- unni

def test_unni_first_n_with_long_outputs():
    p = prepare("unni", str(RAW / "unni"), limit=3)
    assert p.splits["test"] == [
        _po("unni-1-0", "You are given a sentence. Rewrite it in the passive voice.",
            "The committee approved the new proposal after a long discussion on Monday.",
            ["The new proposal was approved by the committee after a long discussion on Monday."], "",
            constraints="None."),
        _po("unni-3-0", "Explain the given idiom in simple words.", "Break the ice",
            ["To break the ice means to do or say something that makes people feel more relaxed when they first "
             "meet."], "", constraints="None."),
        _po("unni-3-1", "Explain the given idiom in simple words.", "Spill the beans",
            ["To spill the beans means to reveal a secret or tell people something that was supposed to stay "
             "hidden."], "", constraints="None."),
    ]  # line 2 ("Yes") is too short; line 4 is past the limit
    assert _ids(prepare("unni", str(RAW / "unni")).splits["test"]) == ["unni-1-0", "unni-3-0", "unni-3-1", "unni-4-0"]


def test_length_filter_boundary_is_eleven_words():
    ten, eleven = " ".join(["w"] * 10), "a  b\tc\nd e f g h i j k"
    assert word_count(ten) == 10 and word_count(eleven) == 11
    rows = [("r:1", {"instruction": "i", "instances": [{"input": "", "output": ten}, {"input": "", "output": eleven}]})]
    assert [r["output"] for r in convert_unni(rows).splits["test"]] == [[eleven]]


# ----------------------------------------------------------------------------- hub sources

def _fake_datasets(monkeypatch, tables: dict) -> list:
    calls = []

    def load_dataset(*args, split):
        calls.append((args, split))
        return tables[args]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_hub_ids_go_through_load_dataset(monkeypatch):
    dolly_rows = [json.loads(line) for line in (RAW / "dolly" / "databricks-dolly-15k.jsonl").read_text().splitlines()]
    # the hub's self_instruct/human_eval stores instances as a dict of lists
    selfinst_rows = [{"id": "user_oriented_task_9", "motivation_app": "Yelp", "instruction": "Rate the review.",
                      "instances": {"input": ["Great food, slow service."], "output": ["3 stars"]}}]
    sni_rows = [{"task_name": "task1356_xlsum", "id": "t-1", "definition": "Write a title.", "inputs": "Some text.",
                 "targets": "A title that is long enough to pass the eleven word filter easily."},
                {"task_name": "task1356_xlsum", "id": "t-2", "definition": "Write a title.", "inputs": "More.",
                 "targets": "Too short."}]
    calls = _fake_datasets(monkeypatch, {("databricks/databricks-dolly-15k",): dolly_rows,
                                         ("yizhongw/self_instruct", "human_eval"): selfinst_rows,
                                         ("Muennighoff/natural-instructions",): sni_rows})
    from_hub = prepare("dolly", "databricks/databricks-dolly-15k", test_size=3, dev_size=2)
    assert from_hub.splits == prepare("dolly", str(RAW / "dolly"), test_size=3, dev_size=2).splits
    si = prepare("selfinst", "yizhongw/self_instruct", config="human_eval")
    assert si.splits["test"] == [_po("user_oriented_task_9-0", "Rate the review.", "Great food, slow service.",
                                     ["3 stars"], "Yelp")]
    sni = prepare("sni", "Muennighoff/natural-instructions")
    assert _ids(sni.splits["test"]) == ["t-1"] and sni.splits["test"][0]["task"] == "task1356_xlsum"
    assert calls == [(("databricks/databricks-dolly-15k",), "train"), (("yizhongw/self_instruct", "human_eval"), "train"),
                     (("Muennighoff/natural-instructions",), "test")]  # sni defaults to the test split


def test_hub_failure_is_one_data_error(monkeypatch):
    def offline(*args, split):
        raise ConnectionError("no network\nsecond line")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(DataError, match=r"owner/unni\[train\]:0: cannot load dataset: ConnectionError: no network$"):
        prepare("unni", "owner/unni")


# ----------------------------------------------------------------------------- errors + CLI

def test_bad_raw_record_names_file_and_line(tmp_path):
    bad = tmp_path / "core_data.jsonl"
    bad.write_text(json.dumps({"instruction": "x", "instances": [{"input": "", "output": "y " * 12}]}) + "\n"
                   + json.dumps({"instruction": "x", "instances": "oops"}) + "\n")
    with pytest.raises(DataError, match=f"{bad}:2: field 'instances'"):
        prepare("unni", str(tmp_path))
    with pytest.raises(DataError, match="none of databricks-dolly-15k.jsonl"):
        prepare("dolly", str(tmp_path))


def test_cli_writes_every_set_under_one_root(tmp_path, capsys):
    out = tmp_path / "sets"
    for name in ("selfinst", "vicuna", "sni", "unni"):
        assert main([name, "--source", str(RAW / name), "--out", str(out)]) == 0
    assert main(["dolly", "--source", str(RAW / "dolly"), "--out", str(out), "--test-size", "3", "--dev-size", "2"]) == 0
    printed = capsys.readouterr().out
    assert "vicuna test: 3 examples" in printed and "dolly train: 7 examples" in printed
    assert sorted(p.name for p in out.iterdir()) == ["dolly", "selfinst", "sni", "unni", "vicuna"]
    assert json.loads((out / "unni" / "meta.json").read_text())["params"]["limit"] == 10_000
    assert main(["sni", "--source", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "error:" in capsys.readouterr().err
