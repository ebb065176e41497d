"""README "Reproducing the paper": every command in it parses (prepare's arguments, each config with its
overrides), every configs/paper/ file is used there and loads, and the configs say what the section's table says."""
from __future__ import annotations

import glob
import os
import re
import shlex
from pathlib import Path

import pytest

from promptkd.config import REGISTRY, load_config
from promptkd.data import paper_sets

REPO = Path(__file__).resolve().parents[2]
PAPER = sorted(glob.glob(str(REPO / "configs" / "paper" / "*.yaml")))


def _section() -> str:
    text = (REPO / "README.md").read_text()
    assert "\n## Reproducing the paper\n" in text
    return text.split("\n## Reproducing the paper\n", 1)[1].split("\n## ", 1)[0]


def _commands() -> list[list[str]]:
    """Every command of the section's bash blocks, continuation lines joined, comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", _section(), re.S)
    assert blocks
    out = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                out.append(words)
    return out


def _config_and_overrides(words: list[str]) -> tuple[str, list[str]]:
    at = words.index("--config")
    return words[at + 1], words[at + 2:]


def _check(words: list[str], monkeypatch) -> str:
    """Parse one command the way its program would; returns what it is."""
    if words[:3] == ["python", "-m", "promptkd.data.prepare"]:
        assert words[3] == "all"
        args = paper_sets.parse_args(words[4:])
        assert args.out == "data/eval"
        return "prepare"
    if words[:3] == ["python", "-m", "promptkd.plan"]:
        config, overrides = _config_and_overrides(words)
        cfg = load_config(config, overrides + ["stage=plan"])
        assert cfg.plan.world_size == 8
        return "plan"
    if words[:3] == ["deepspeed", "--num_gpus", "8"]:
        assert words[3] == "launcher/main.py"
        config, overrides = _config_and_overrides(words)
        cfg = load_config(config, overrides)
        if cfg.stage == "eval":
            assert cfg.eval.sets == ["data/eval"] and cfg.eval.models
            return "eval"
        return "train:" + os.path.basename(config)
    if words[:2] == ["huggingface-cli", "download"]:
        assert words[2] in {s.hub_repo for s in paper_sets.PAPER_SETS} and "--repo-type" in words
        return "download"
    raise AssertionError(f"README 'Reproducing the paper': a command the test does not know: {' '.join(words)}")


def test_every_command_of_the_section_parses(monkeypatch):
    monkeypatch.chdir(REPO)
    kinds = [_check(words, monkeypatch) for words in _commands()]
    assert kinds[0] == "prepare" and kinds.count("eval") == 2 and "plan" in kinds
    trained = {k.split(":", 1)[1] for k in kinds if k.startswith("train:")}
    assert trained == {os.path.basename(p) for p in PAPER}, "every configs/paper/ file is run by the section"


@pytest.mark.parametrize("path", PAPER, ids=os.path.basename)
def test_paper_configs_load_and_train_on_the_prepared_split(path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_config(path)
    assert cfg.stage == "train" and cfg.seed == 10 and cfg.method.name in REGISTRY
    # the prepared MiniLLM split, never the hub Dolly (it holds the test examples)
    assert (cfg.data.train_file, cfg.data.dev_file) == ("data/eval/dolly/train.jsonl", "data/eval/dolly/dev.jsonl")
    assert cfg.output.dir == "runs/paper/" + os.path.basename(path).removesuffix(".yaml")
    assert cfg.eval.dev_do_sample and cfg.eval.dev_max_examples == 1000


def _table_rows() -> dict[str, list[str]]:
    rows = {}
    for line in _section().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| `gpt2-base_") and len(cells) == 7:
            rows[cells[0].strip("`")] = cells
    return rows


def test_the_method_table_matches_the_configs(monkeypatch):
    monkeypatch.chdir(REPO)
    rows = _table_rows()
    assert set(rows) == {os.path.basename(p).removesuffix(".yaml") for p in PAPER if "gpt2-base_" in p}
    for name, (_, _, _, init, shape, lr, budget) in rows.items():
        cfg = load_config(str(REPO / "configs" / "paper" / f"{name}.yaml"))
        assert shape == f"8 × {cfg.train.micro_batch_size} × {cfg.train.grad_accum}", name
        assert float(lr.split(",")[0].split()[0]) == cfg.optim.student.lr, name
        assert budget == (f"{cfg.train.max_steps:,} steps" if cfg.train.max_steps else f"{cfg.train.epochs} epochs")
        assert (init == "gpt2") == (cfg.model.student.path == "gpt2"), name
        if REGISTRY[cfg.method.name].uses_teacher:
            assert cfg.model.teacher.path == "MiniLLM/teacher-gpt2-1.5B", name

