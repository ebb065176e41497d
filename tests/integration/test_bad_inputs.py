"""A catalogue of bad inputs to the real CLI (issue 6, item 7; issue 20: in-process).

Each case calls the launcher's own ``main(argv)`` in this process, the way
``python launcher/main.py --config base.yaml ...`` would, and checks the contract
of DESIGN.md §2 for bad input:

- exit code 2;
- the last non-empty stderr line starts with ``error:`` and names the key,
  file or line at fault (each case lists the substrings it must contain);
- no ``Traceback`` in stderr (``--debug`` is the one way to get one, tested
  apart);
- nothing half-written: no ``export/``, no ``checkpoints/``, and no
  ``config.yaml`` (a failed start must not make the corrected rerun look like
  "another run" in the same dir); a fresh output dir is not even created, and
  a dir that already held files is unchanged.

In process, the world of one has no process group: ``dist.init`` is replaced by
a no-op (every ``promptkd.distributed`` helper already answers rank 0 of 1
without a group) and ``dist.shutdown(code)``, which would ``os._exit``, raises
``SystemExit(code)`` instead. What only a real process shows, the exit code
through ``dist.shutdown``'s ``os._exit`` and stderr as a terminal sees it, is
checked by ONE launch (``test_one_launch_exits_2_with_a_one_line_error``).

One case needs 2 ranks (world size larger than the dataset); it runs under
``python -m torch.distributed.run --standalone --nproc_per_node 2``. torchrun
turns any child failure into its own exit code 1 and prints its own
``ChildFailedError`` traceback, and it SIGTERMs the surviving rank as soon as
the first one exits, so only the first-failing rank is sure to print its error.
That case therefore reads each rank's stderr from the files torchrun writes
with ``--redirects 3 --log-dir``, checks that the rank(s) that got to print
printed the clean line and no traceback, and reads the child's real exit code
(2) from the "Root Cause" entry of torchrun's failure summary.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
import yaml

from promptkd.config import MOVED
from tests.fixtures.cli import cli_env, last_line, main_in_process, tail

REPO = Path(__file__).resolve().parents[2]
MAIN = REPO / "launcher" / "main.py"
CLI_TIMEOUT_S = 180   # outer `timeout` per launch: a hang fails fast
VOCAB = 512           # trained tokenizer; the mismatched teacher has 40


# ----------------------------------------------------------------------------- helpers

def _snapshot(root: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under ``root`` (empty when it does not exist)."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@dataclass
class Case:
    args: list[str]                  # after ``launcher/main.py``; ``--config`` is added unless given
    needles: list[str]               # substrings of the final ``error:`` line
    debug: bool = False
    out_dir: Path = field(default=Path())


@dataclass
class Paths:
    root: Path
    base_yaml: Path
    data: dict[str, str]
    tokenizer: Path
    small_vocab_teacher: Path
    bad: dict[str, Path]


# ----------------------------------------------------------------------------- fixtures

def _base_tree(data: dict[str, str], tokenizer: Path) -> dict:
    return {
        "stage": "train",
        "seed": 0,
        "deepspeed": "ds_configs/zero0.json",
        "dist_timeout_s": 60,
        "tokenizer": {"path": str(tokenizer), "train": False},
        "data": {"train_file": data["train"], "dev_file": data["dev"], "max_length": 128, "max_prompt_length": 96},
        "model": {
            "teacher": {"dtype": "fp32", "init": {"arch": "llama", "layers": 2, "hidden": 32, "heads": 4}},
            "student": {"init": {"arch": "llama", "layers": 2, "hidden": 32, "heads": 4}},
        },
        "train": {"max_steps": 1},
        "logging": {"progress_bar": False},
    }


def _bad_files(root: Path, data: dict[str, str]) -> dict[str, Path]:
    bad = root / "files"
    bad.mkdir()
    rows = Path(data["train"]).read_text().splitlines()[:6]
    out = {}

    truncated = list(rows)
    truncated[2] = truncated[2][: len(truncated[2]) // 2]  # line 3 is cut mid-object
    out["malformed"] = bad / "malformed.jsonl"
    out["malformed"].write_text("\n".join(truncated) + "\n")

    no_response = list(rows)
    record = json.loads(no_response[3])
    del record["response"]
    no_response[3] = json.dumps(record)  # line 4 lacks the required field
    out["missing_field"] = bad / "missing_field.jsonl"
    out["missing_field"].write_text("\n".join(no_response) + "\n")

    out["empty"] = bad / "empty.jsonl"
    out["empty"].write_text("\n\n")

    out["one_example"] = bad / "one_example.jsonl"
    out["one_example"].write_text(rows[0] + "\n")

    out["ds_batch"] = bad / "ds_batch.json"
    out["ds_batch"].write_text(json.dumps({"zero_optimization": {"stage": 1}, "train_batch_size": 64}))
    out["ds_stage7"] = bad / "ds_stage7.json"
    out["ds_stage7"].write_text(json.dumps({"zero_optimization": {"stage": 7}}))

    out["bad_yaml"] = bad / "bad.yaml"
    out["bad_yaml"].write_text("stage: train\nseed: 0\ntrain:\n  max_steps: [1, 2\nlogging: {}\n")

    # a checkpoint dir that was never completed (no COMPLETE marker: the save was cut short)
    out["incomplete_ckpt"] = bad / "step_3"
    out["incomplete_ckpt"].mkdir()
    (out["incomplete_ckpt"] / "state.pt").write_bytes(b"")

    # a run dir that already holds another run's resolved config
    out["other_run"] = root / "out" / "other_run"
    out["other_run"].mkdir(parents=True)
    (out["other_run"] / "config.yaml").write_text(yaml.safe_dump({"stage": "train", "seed": 7}))
    return out


def _small_vocab_teacher(root: Path, tokenizer) -> Path:
    from promptkd.models import build_tiny

    model = build_tiny("llama", 2, 32, 4, vocab_size=40, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    out = root / "teacher_vocab40"
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> Paths:
    from promptkd.data import load_examples, make_synthetic_splits, train_tokenizer

    root = tmp_path_factory.mktemp("bad_inputs")
    data = make_synthetic_splits(str(root / "data"), 64, 8, 8, seed=0)
    texts = [e.prompt + " " + e.references[0] for e in load_examples(data["train"])]
    tokenizer = train_tokenizer(texts, VOCAB, str(root / "tokenizer"))
    base_yaml = root / "base.yaml"
    base_yaml.write_text(yaml.safe_dump(_base_tree(data, root / "tokenizer"), sort_keys=False))
    return Paths(root=root, base_yaml=base_yaml, data=data, tokenizer=root / "tokenizer",
                 small_vocab_teacher=_small_vocab_teacher(root, tokenizer), bad=_bad_files(root, data))


# the flat key of earlier versions that is now method.gkd.lmbda
OLD_LAMBDA = next(k for k, v in MOVED.items() if v == "method.gkd.lmbda")




# name -> the case, built from the prepared paths. The tests are parametrized over these names: a case added
# here is checked without being listed a second time.
CATALOGUE: dict[str, Callable[[Paths], Case]] = {
    # --- command line and config parsing (no process group yet)
    "unknown_key": lambda p: Case(["train.bogus_key=1"], ["train.bogus_key", "unknown config key"]),
    "wrong_type": lambda p: Case(["train.max_steps=abc"], ["train.max_steps", "expected int", "'abc'"]),
    "negative_lr": lambda p: Case(["optim.student.lr=-1e-4"], ["optim.student.lr", "must be > 0"]),
    "bad_choice": lambda p: Case(["method.name=foo"], ["method.name", "must be one of", "'foo'"]),
    # a flat method key of earlier versions says where it moved; a key in the wrong section is unknown
    "old_flat_method_key": lambda p: Case([f"{OLD_LAMBDA}=0.3"],
                                          [OLD_LAMBDA, "unknown config key", "method.gkd.lmbda"]),
    "misplaced_method_key": lambda p: Case(["method.kd.lmbda=0.3"], ["method.kd.lmbda", "unknown config key"]),
    "bad_nested_method_value": lambda p: Case(["method.gkd.lmbda=1.5"],
                                              ["method.gkd.lmbda", "must be in [0, 1]", "1.5"]),
    "unknown_data_format": lambda p: Case(["data.format=csv"], ["data.format", "must be one of", "'csv'"]),
    "prompt_not_shorter_than_length": lambda p: Case(["data.max_prompt_length=128"],
                                                     ["data.max_prompt_length", "data.max_length"]),
    "hidden_not_divisible_by_heads": lambda p: Case(["model.student.init.hidden=30"],
                                                    ["model.student.init.hidden", "model.student.init.heads"]),
    "empty_eval_seeds": lambda p: Case(["eval.seeds=[]"], ["eval.seeds", "non-empty"]),
    "override_without_equals": lambda p: Case(["train.max_steps"], ["train.max_steps", "key=value"]),
    "section_given_a_scalar": lambda p: Case(["train=5"], ["train", "expected a mapping"]),
    "missing_config_file": lambda p: Case(["--config", str(p.root / "nope.yaml")],
                                          ["--config", str(p.root / "nope.yaml"), "not found"]),
    "invalid_yaml": lambda p: Case(["--config", str(p.bad["bad_yaml"])], [f"{p.bad['bad_yaml']}:5", "invalid YAML"]),
    "ds_json_sets_batch_size": lambda p: Case([f"deepspeed={p.bad['ds_batch']}"],
                                              [str(p.bad["ds_batch"]), "train_batch_size", "run config"]),
    "ds_zero_stage_7": lambda p: Case([f"deepspeed={p.bad['ds_stage7']}"],
                                      [str(p.bad["ds_stage7"]), "zero_optimization.stage", "got 7"]),
    "ds_json_missing": lambda p: Case([f"deepspeed={p.root / 'nope.json'}"],
                                      ["deepspeed", str(p.root / "nope.json"), "not found"]),
    # --- inputs found missing or bad once the stage runs
    "missing_model_path": lambda p: Case(["model.student.path=/nonexistent/dir"],
                                         ["model.student.path", "/nonexistent/dir"]),
    "missing_data_file": lambda p: Case([f"data.train_file={p.root / 'nope.jsonl'}"],
                                        [f"{p.root / 'nope.jsonl'}:0", "file not found"]),
    "malformed_jsonl_line": lambda p: Case([f"data.train_file={p.bad['malformed']}"],
                                           [f"{p.bad['malformed']}:3", "malformed JSON"]),
    "jsonl_missing_field": lambda p: Case([f"data.train_file={p.bad['missing_field']}"],
                                          [f"{p.bad['missing_field']}:4", "missing field 'response'"]),
    "empty_jsonl": lambda p: Case([f"data.train_file={p.bad['empty']}"], [f"{p.bad['empty']}:0", "no examples"]),
    "every_prompt_too_long": lambda p: Case(["data.max_prompt_length=8"],
                                            ["data.max_prompt_length", p.data["train"], "every prompt"]),
    "vocab_mismatch": lambda p: Case([f"model.teacher.path={p.small_vocab_teacher}"],
                                     ["model.teacher.path", "vocab", "40", str(VOCAB)]),
    "missing_tokenizer": lambda p: Case([f"tokenizer.path={p.root / 'no_tokenizer'}"],
                                        ["tokenizer.path", str(p.root / "no_tokenizer")]),
    "resume_missing_checkpoint": lambda p: Case([f"output.resume={p.root / 'no_ckpt'}"],
                                                ["output.resume", str(p.root / "no_ckpt")]),
    "eval_missing_model": lambda p: Case(["stage=eval", f"eval.model_path={p.root / 'no_model'}",
                                          f"eval.file={p.data['test']}"],
                                         ["eval.model_path", str(p.root / "no_model")]),
    "output_dir_holds_another_run": lambda p: Case([], ["output.dir", str(p.bad["other_run"]), "already holds a run",
                                                        "output.resume"], out_dir=p.bad["other_run"]),
    "resume_incomplete_checkpoint": lambda p: Case([f"output.resume={p.bad['incomplete_ckpt']}"],
                                                   ["output.resume", str(p.bad["incomplete_ckpt"]),
                                                    "not a complete checkpoint"]),
    "eval_prompt_dir_without_prompt": lambda p: Case(["stage=eval", f"eval.model_path={p.small_vocab_teacher}",
                                                      f"eval.prompt_path={p.root / 'files'}",
                                                      f"eval.file={p.data['test']}"],
                                                     ["eval.prompt_path", str(p.root / "files"), "teacher_prompt"]),
    # --- config checks that once fired mid-run (SeqKD's first step, stage=exposure, the pipeline's later
    #     sub-runs): now before the launch writes anything
    "seqkd_vllm_teacher_without_dir": lambda p: Case(["method.name=seqkd", "rollout.engine=vllm",
                                                      "model.teacher.placement=zero3"],
                                                     ["rollout.engine", "seqkd's teacher", "model.teacher.path"]),
    "vllm_sleep_without_gpu": lambda p: Case(["rollout.engine=vllm", "rollout.vllm.sleep=true"],
                                             ["rollout.vllm.sleep", "needs a GPU"]),
    "exposure_without_teacher": lambda p: Case(["stage=exposure"], ["exposure.teacher_path", "no teacher"]),
    "exposure_without_prompts": lambda p: Case(["stage=exposure", f"exposure.teacher_path={p.small_vocab_teacher}"],
                                               ["eval.file", "no prompts"]),
    "exposure_missing_student": lambda p: Case(["stage=exposure", f"exposure.teacher_path={p.small_vocab_teacher}",
                                                f"eval.file={p.data['test']}",
                                                f"exposure.students=[{p.root / 'no_student'}]"],
                                               ["exposure.students", str(p.root / "no_student")]),
    "pipeline_bad_later_subrun": lambda p: Case(["stage=pipeline", "pipeline.student_sft_patience=2"],
                                                ["train.early_stop_patience", "eval.dev_interval"]),
}


def _case(p: Paths, name: str) -> Case:
    case = CATALOGUE[name](p)
    if case.out_dir == Path():
        case.out_dir = p.root / "out" / name
    return case


def _argv(p: Paths, case: Case) -> list[str]:
    args = list(case.args)
    if "--config" not in args:
        args = ["--config", str(p.base_yaml), *args]
    return args + [f"output.dir={case.out_dir}"] + (["--debug"] if case.debug else [])


# ----------------------------------------------------------------------------- running the CLI

@pytest.fixture
def in_process(monkeypatch, capsys):
    """``run(p, case)``: the launcher's ``main`` in this process -> rc, stderr, the output dir before and after."""
    def run(p: Paths, case: Case) -> SimpleNamespace:
        before = _snapshot(case.out_dir)
        rc, stderr = main_in_process(_argv(p, case), monkeypatch, capsys)
        return SimpleNamespace(rc=rc, stderr=stderr, before=before, after=_snapshot(case.out_dir))

    return run


def _launch(p: Paths, name: str, case: Case, ranks: int = 1) -> SimpleNamespace:
    """A real process: ``python launcher/main.py`` (or torchrun with ``ranks`` > 1)."""
    args = _argv(p, case)
    log_dir = p.root / "torchrun_logs" / name
    if ranks == 1:
        cmd = [sys.executable, str(MAIN), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
               "--redirects", "3", "--log-dir", str(log_dir), str(MAIN), *args]
    before = _snapshot(case.out_dir)
    proc = subprocess.run(["timeout", str(CLI_TIMEOUT_S), *cmd], cwd=REPO, env=cli_env(), capture_output=True,
                          text=True)
    (p.root / "logs").mkdir(exist_ok=True)
    (p.root / "logs" / f"{name}.log").write_text(f"$ {' '.join(cmd)}\n--- stdout\n{proc.stdout}\n"
                                                f"--- stderr\n{proc.stderr}")
    rank_stderr = {}
    if ranks > 1:  # <log_dir>/<run_id>/attempt_0/<rank>/stderr.log
        for f in sorted(log_dir.glob("*/attempt_*/*/stderr.log")):
            rank_stderr[int(f.parent.name)] = f.read_text()
    return SimpleNamespace(rc=proc.returncode, stdout=proc.stdout, stderr=proc.stderr, rank_stderr=rank_stderr,
                           before=before, after=_snapshot(case.out_dir))


# ----------------------------------------------------------------------------- checks

def _assert_clean_error(stderr: str, needles: list[str], shown: str) -> None:
    last = last_line(stderr)
    assert last.startswith("error:"), shown
    missing = [n for n in needles if n not in last]
    assert not missing, f"{missing} not in {last!r}\n{shown}"
    assert "Traceback" not in stderr, shown


def _assert_nothing_half_written(case: Case, res: SimpleNamespace, shown: str) -> None:
    assert res.after == res.before, (f"{case.out_dir} changed: before {sorted(res.before)}, "
                                     f"after {sorted(res.after)}\n{shown}")
    assert not (case.out_dir / "export").exists(), shown
    assert not (case.out_dir / "checkpoints").exists(), shown
    if not res.before:  # a fresh output.dir: not even created (no config.yaml, no empty dir)
        assert not case.out_dir.exists(), shown


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_bad_input_is_a_one_line_error(paths, in_process, name):
    case = _case(paths, name)
    res = in_process(paths, case)
    shown = f"rc={res.rc}\n--- stderr tail\n{tail(res.stderr)}"
    assert res.rc == 2, shown
    _assert_clean_error(res.stderr, case.needles, shown)
    _assert_nothing_half_written(case, res, shown)


def test_every_case_fails_in_its_own_way(paths, in_process):
    """No two cases end on the same error line: each one reaches a different check."""
    lines = {}
    for name in CATALOGUE:
        lines.setdefault(last_line(in_process(paths, _case(paths, name)).stderr), []).append(name)
    assert all(len(names) == 1 for names in lines.values()), {k: v for k, v in lines.items() if len(v) > 1}


@pytest.mark.parametrize("name", ["missing_data_file", "unknown_key"])
def test_debug_shows_the_traceback(paths, in_process, name):
    """--debug adds the traceback, after a process group exists and before (a config error)."""
    case = _case(paths, name)
    case.debug, case.out_dir = True, paths.root / "out" / f"debug_{name}"
    res = in_process(paths, case)
    shown = f"rc={res.rc}\n--- stderr tail\n{tail(res.stderr)}"
    assert res.rc == 2, shown
    assert "Traceback (most recent call last)" in res.stderr, shown
    last = last_line(res.stderr)
    assert last.startswith("error:") and all(n in last for n in case.needles), shown


def test_one_launch_exits_2_with_a_one_line_error(paths):
    """The real process: exit code 2 through dist.init and dist.shutdown's os._exit, one clean stderr line."""
    case = _case(paths, "missing_data_file")
    case.out_dir = paths.root / "out" / "launched"
    res = _launch(paths, "launched", case)
    shown = f"rc={res.rc}\n--- stderr tail\n{tail(res.stderr)}"
    assert res.rc == 2, shown
    _assert_clean_error(res.stderr, case.needles, shown)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert errors == [last_line(res.stderr)], shown  # the message is one line, printed once
    _assert_nothing_half_written(case, res, shown)


def test_world_size_larger_than_dataset_two_ranks(paths):
    """torchrun exits 1 for a failed child; the child's own stderr and exit code are checked (module docstring)."""
    case = Case([f"data.train_file={paths.bad['one_example']}"], ["data.train_file", "1 usable examples",
                                                                   "world_size 2"],
                out_dir=paths.root / "out" / "world_size_exceeds_dataset")
    res = _launch(paths, "world_size_exceeds_dataset", case, ranks=2)
    shown = f"rc={res.rc}\n--- torchrun stderr tail\n{tail(res.stderr)}\n--- ranks {res.rank_stderr}"
    assert res.rc != 0, shown
    assert sorted(res.rank_stderr) == [0, 1], shown
    printed = {r: err for r, err in res.rank_stderr.items() if last_line(err)}
    assert printed, shown
    for rank, stderr in printed.items():
        _assert_clean_error(stderr, case.needles, f"rank {rank}:\n{tail(stderr)}")
    # the first rank to fail exited 2; torchrun SIGTERMs (-15) the other one if it is still running
    root_cause = res.stderr.split("Root Cause (first observed failure):", 1)[-1]
    assert re.search(r"exitcode\s*:\s*2\b", root_cause), shown
    codes = {int(c) for c in re.findall(r"exitcode\s*:\s*(-?\d+)", res.stderr)}
    assert codes <= {2, -15}, shown
    _assert_nothing_half_written(case, res, shown)
