"""``python -m promptkd.data.prepare all``: every paper test set found under --raw (MiniLLM's released layout or
the upstream ones), given per set, or on the hub; a summary of what is missing and where to put it; exit 2 on a
bad raw file (file:line) or when nothing was found; sets written whole or not at all. No network: the hub is
skipped (--no-hub), faked, or offline."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from promptkd.data import build_prompt, load_examples
from promptkd.data import paper_sets
from promptkd.data.paper_sets import PAPER_SETS, find
from promptkd.data.prepare import main
from promptkd.evaluation.core import resolve_sets
from tests.fixtures.minillm_layout import LONG, jsonl as _jsonl, minillm_root, row as _row

RAW = Path(__file__).resolve().parents[1] / "fixtures" / "raw"
def _run(*argv: str) -> int:
    return main(["all", *argv])


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("."))


def test_all_five_from_minillm_layout(tmp_path, capsys):
    raw, out = minillm_root(tmp_path / "data"), tmp_path / "eval"
    assert _run("--out", str(out), "--raw", str(raw), "--no-hub", "--dev-size", "2", "--limit", "3") == 0
    printed = capsys.readouterr().out
    assert printed.count("prepared  ") == 5 and "MISSING" not in printed, printed
    # eval.sets=[out] sees the five sets, in the paper's order
    sets = resolve_sets([str(out)])
    assert list(sets) == ["dolly", "selfinst", "vicuna", "sni", "unni"]
    assert _leftovers(out) == []
    # dolly: valid.jsonl is test; raw.jsonl's first --dev-size lines are dev, the rest train (MiniLLM's rule)
    dolly = {s: load_examples(str(out / "dolly" / f"{s}.jsonl"), "dolly") for s in ("test", "dev", "train")}
    assert [e.references for e in dolly["test"]] == [["Test answer 0."], ["Test answer 1."], ["Test answer 2."]]
    assert [e.references[0] for e in dolly["dev"]] == ["Train answer 0.", "Train answer 1."]
    assert [e.references[0] for e in dolly["train"]] == ["Train answer 2.", "Train answer 3.", "Train answer 4."]
    assert dolly["dev"][0].prompt == build_prompt("Train question 0?", "ctx")
    # the others: prompt rebuilt from instruction + input (the training template), every reference kept
    si = load_examples(sets["selfinst"], "prompt_output")
    assert si[0].prompt == build_prompt("Rewrite it.", "Some text.") and si[1].references == ["Blue."]
    assert load_examples(sets["sni"], "prompt_output")[0].references == [LONG, LONG + " Again."]
    assert len(load_examples(sets["unni"], "prompt_output")) == 3  # --limit: the official eval reads the first 10,000
    meta = json.loads((out / "sni" / "meta.json").read_text())
    assert meta["origin"] == "raw" and meta["source"] == str(raw / "sinst/11_") and meta["stats"]["layout"] == "minillm"


def test_all_from_upstream_layouts_and_per_set_paths(tmp_path, capsys):
    """--raw holding <set name>/ dirs in the upstream layouts (the repo's fixtures), one set given explicitly in
    MiniLLM's layout: all five, each read in its own layout."""
    mini = minillm_root(tmp_path / "mini", sets=("vicuna",))
    out = tmp_path / "eval"
    assert _run("--out", str(out), "--raw", str(RAW), "--vicuna", str(mini / "vicuna"), "--no-hub",
                "--test-size", "3", "--dev-size", "2") == 0
    printed = capsys.readouterr().out
    assert f"vicuna   test 1  <- {mini / 'vicuna'} (given)" in printed
    assert f"sni      test 3  <- {RAW / 'sni'} (raw)" in printed
    n = {name: len(load_examples(path, "prompt_output" if name != "dolly" else "dolly"))
         for name, path in resolve_sets([str(out)]).items()}
    assert n == {"dolly": 3, "selfinst": 4, "vicuna": 1, "sni": 3, "unni": 4}


def test_missing_sets_are_named_with_where_to_put_them(tmp_path, capsys):
    raw, out = minillm_root(tmp_path / "data", sets=("dolly", "vicuna")), tmp_path / "eval"
    assert _run("--out", str(out), "--raw", str(raw), "--no-hub", "--dev-size", "2") == 0
    printed = capsys.readouterr().out
    missing = [line.split()[1] for line in printed.splitlines() if line.startswith("MISSING")]
    assert missing == ["selfinst", "sni", "unni"]
    assert f"{raw}/sinst/11_/valid.jsonl" in printed and "huggingface-cli download MiniLLM/sinst" in printed
    assert "--sni PATH" in printed and "splits/default/test_tasks.txt" in printed
    assert f"{raw}/self-inst/valid.jsonl" in printed and f"{raw}/uinst/11_/valid.jsonl" in printed
    assert printed.splitlines()[-1] == f"eval.sets=[{out}] evaluates: dolly, vicuna; missing: selfinst, sni, unni"
    assert sorted(p.name for p in out.iterdir()) == ["dolly", "vicuna"]


def test_nothing_found_exits_2_with_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert _run("--out", str(tmp_path / "eval"), "--raw", str(tmp_path / "empty"), "--no-hub") == 2
    captured = capsys.readouterr()
    assert captured.out.count("MISSING") == 5
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: prepare all: none of the five sets could be found")
    assert not (tmp_path / "eval").exists() or not any((tmp_path / "eval").iterdir())


def test_malformed_raw_file_is_one_line_with_file_and_line_and_nothing_is_written(tmp_path, capsys):
    raw, out = minillm_root(tmp_path / "data"), tmp_path / "eval"
    bad = _jsonl(raw / "self-inst" / "valid.jsonl", [_row("Fine.", "", "Ok."), '{"instruction": "broken", '])
    assert _run("--out", str(out), "--raw", str(raw), "--no-hub", "--dev-size", "2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {bad}:2: malformed JSON"), err
    assert not out.exists() or not any(out.iterdir())  # dolly was fine, yet nothing is half-done
    # a record of the wrong shape names its field
    _jsonl(raw / "self-inst" / "valid.jsonl", [_row("Fine.", "", "Ok."), _row("No refs.", "", [])])
    assert _run("--out", str(out), "--raw", str(raw), "--no-hub", "--dev-size", "2") == 2
    assert f"{bad}:2: field 'output' must be a string or a non-empty list" in capsys.readouterr().err


def test_a_given_path_that_does_not_exist_is_an_error(tmp_path, capsys):
    assert _run("--out", str(tmp_path / "eval"), "--sni", str(tmp_path / "nope"), "--no-hub") == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nope'}:0: --sni: no such file or directory"


def test_hub_repos_are_minillms_and_a_found_snapshot_is_used(tmp_path, capsys):
    mirror = minillm_root(tmp_path / "hub")
    calls = []

    def snapshot(repo, patterns):  # stands in for huggingface_hub.snapshot_download
        calls.append((repo, patterns))
        if repo == "MiniLLM/uinst":
            raise ConnectionError("no route to host\nmore detail")
        local = {"MiniLLM/dolly": "dolly", "MiniLLM/self-inst": "self-inst", "MiniLLM/Vicuna": "vicuna",
                 "MiniLLM/sinst": "sinst"}[repo]
        return str(mirror / local)  # the repo root: sinst's holds 11_/valid.jsonl

    out = tmp_path / "eval"
    assert paper_sets.main(["--out", str(out), "--dev-size", "2"], snapshot=snapshot) == 0
    assert calls == [("MiniLLM/dolly", ["valid.jsonl", "raw.jsonl"]), ("MiniLLM/self-inst", ["valid.jsonl"]),
                     ("MiniLLM/Vicuna", ["valid.jsonl"]), ("MiniLLM/sinst", ["11_/valid.jsonl"]),
                     ("MiniLLM/uinst", ["11_/valid.jsonl"])]
    printed = capsys.readouterr().out
    assert "MISSING   unni     hub MiniLLM/uinst not reachable (ConnectionError: no route to host)" in printed
    assert list(resolve_sets([str(out)])) == ["dolly", "selfinst", "vicuna", "sni"]


def test_offline_hub_fails_at_once_and_says_so(monkeypatch, tmp_path):
    """The real huggingface_hub call under HF_HUB_OFFLINE=1: the local cache only, no network wait."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = next(s for s in PAPER_SETS if s.name == "sni")
    found = find(spec, "", "", True, str(tmp_path), paper_sets.hub_snapshot)
    assert not found.source and found.why.startswith("hub MiniLLM/sinst not reachable (")
    assert "\n" not in found.why


def test_rerun_keeps_earlier_sets_and_replaces_whole(tmp_path, capsys, monkeypatch):
    raw, out = minillm_root(tmp_path / "data"), tmp_path / "eval"
    assert _run("--out", str(out), "--raw", str(raw), "--no-hub", "--dev-size", "2") == 0
    before = (out / "vicuna" / "test.jsonl").read_text()
    # no source this time: the sets already in --out are kept and reported, exit 0
    (tmp_path / "empty").mkdir()
    assert _run("--out", str(out), "--raw", str(tmp_path / "empty"), "--no-hub") == 0
    assert capsys.readouterr().out.count("kept      ") == 5
    # a write that dies half-way leaves the earlier set as it was, and no temp dir
    _jsonl(raw / "vicuna" / "valid.jsonl", [_row("A new question?", "", LONG)])
    import promptkd.data.synthetic as synthetic

    def dies(path, records):
        raise OSError("disk full")

    monkeypatch.setattr(synthetic, "write_jsonl", dies)
    with pytest.raises(OSError):
        _run("--out", str(out), "--vicuna", str(raw / "vicuna"), "--no-hub")
    assert (out / "vicuna" / "test.jsonl").read_text() == before and _leftovers(out) == []
    monkeypatch.undo()
    assert _run("--out", str(out), "--vicuna", str(raw / "vicuna"), "--no-hub") == 0
    assert "A new question?" in (out / "vicuna" / "test.jsonl").read_text() and _leftovers(out) == []


def test_single_set_command_reads_minillm_layout(tmp_path, capsys):
    raw = minillm_root(tmp_path / "data", sets=("unni",))
    assert main(["unni", "--source", str(raw / "uinst"), "--out", str(tmp_path / "eval"), "--limit", "2"]) == 0
    assert "unni test: 2 examples" in capsys.readouterr().out
    assert os.path.isfile(tmp_path / "eval" / "unni" / "meta.json")
