"""The real CLI through the real launcher (DESIGN.md §2 outputs, §4 launch facts).

One 2-rank ``deepspeed`` launch of a tiny PromptKD run (module-scoped) feeds
most assertions; the one-process runs (SFT, early stopping, the quickstart
pipeline) run beside it, and the two ``stage=eval`` runs on its export side by
side after it (tests/fixtures/parallel.py); the bad inputs run in process
(``main_in_process``).

On this CPU-only machine DeepSpeed's CPU accelerator counts NUMA nodes (1 here)
as devices, so ``--num_gpus 2`` is what makes the launcher start 2 local ranks
(``--include localhost:0,1`` is rejected: slot 1 does not exist).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from promptkd.config import load_config
from promptkd.data import make_synthetic_splits
from tests.fixtures.cli import free_port, last_line, main_in_process, tail
from tests.fixtures.parallel import Launch, run_side_by_side

REPO = Path(__file__).resolve().parents[2]
MAIN = REPO / "launcher" / "main.py"
BIN = Path(sys.executable).parent
DEEPSPEED = BIN / "deepspeed" if (BIN / "deepspeed").exists() else REPO / ".venv" / "bin" / "deepspeed"

LAUNCH_TIMEOUT_S = 300   # outer `timeout` around the 2-rank launch: a hang fails fast
CLI_TIMEOUT_S = 240      # single-process runs
TAIL = 80                # log lines shown on failure

TRAIN_STEPS = 4
TEACHER_HIDDEN = 64
PROMPT_LENGTH = 7        # the paper's default, not set in the run config
# 512, not 300: with 300 (256 bytes + 44 merges) the Alpaca template alone is ~75+
# tokens, so every prompt exceeds max_prompt_length=64 and the run has no data.
VOCAB = 512

SCALAR_TAGS = (
    "loss/rkl", "prompt/guidance_kl", "prompt/reg_kl", "prompt/reg_weight", "prompt/lr", "student/lr",
    "prompt/grad_norm", "rollout/mean_response_len", "perf/tokens_per_second", "time/rollout",
    "time/prompt_step", "time/student_step", "dev/rougeL",
)


# ----------------------------------------------------------------------------- helpers

def _write_yaml(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def _tiny_tree(data: dict[str, str], out_dir: Path) -> dict:
    return {
        "stage": "train",
        "seed": 0,
        "deepspeed": "ds_configs/zero2.json",
        "dist_timeout_s": 120,
        "tokenizer": {"train": True, "vocab_size": VOCAB},
        "data": {"train_file": data["train"], "dev_file": data["dev"], "test_file": data["test"],
                 "max_length": 96, "max_prompt_length": 64},
        "model": {
            "teacher": {"dtype": "fp32",
                        "init": {"arch": "llama", "layers": 2, "hidden": TEACHER_HIDDEN, "heads": 4}},
            "student": {"init": {"arch": "llama", "layers": 2, "hidden": 32, "heads": 4}},
        },
        "method": {"name": "promptkd"},
        "train": {"max_steps": TRAIN_STEPS, "micro_batch_size": 4, "grad_accum": 2},
        "rollout": {"max_new_tokens": 12},
        "eval": {"do_sample": False, "seeds": [10], "max_new_tokens": 12, "max_examples": 8},
        "output": {"dir": str(out_dir), "save_interval": 2},
        "logging": {"interval": 1, "progress_bar": False},
    }


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("launcher")


@pytest.fixture(scope="module")
def data(workdir) -> dict[str, str]:
    return make_synthetic_splits(str(workdir / "data"), n_train=256, n_dev=16, n_test=24, seed=0)


@pytest.fixture(scope="module")
def config_yaml(workdir, data) -> Path:
    return _write_yaml(workdir / "tiny.yaml", _tiny_tree(data, workdir / "unused_default_run"))


def _cli(*args: str, timeout: int = CLI_TIMEOUT_S) -> Launch:
    """Single-process ``python launcher/main.py ...``."""
    return Launch([sys.executable, str(MAIN), *args], timeout_s=timeout)


def _result(proc: subprocess.CompletedProcess, args: list[str], log: Path) -> SimpleNamespace:
    """stdout+stderr kept apart and logged."""
    log.write_text(f"$ {' '.join(args)}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return SimpleNamespace(rc=proc.returncode, stdout=proc.stdout, stderr=proc.stderr,
                           text=proc.stdout + proc.stderr)


def _single_runs(workdir: Path, config_yaml: Path) -> dict[str, list[str]]:
    """The one-process runs that need nothing from the 2-rank launch: name -> launcher arguments."""
    return {
        "sft": ["--config", str(config_yaml), "method.name=sft", "train.max_steps=2", f"output.dir={workdir / 'run_sft'}",
                "deepspeed=ds_configs/zero0.json"],
        # lr ~0: dev ROUGE-L never improves on step 1's, so patience 1 stops the run at step 2 of 30
        "early_stop": ["--config", str(config_yaml), "method.name=sft", "train.max_steps=30", "optim.student.lr=1e-12",
                       "eval.dev_interval=1", "train.early_stop_patience=1", f"output.dir={workdir / 'run_early_stop'}",
                       "data.test_file=", "deepspeed=ds_configs/zero0.json"],
        # the quickstart's own config through the launcher, shrunk
        "quickstart": ["--config", str(REPO / "configs" / "quickstart.yaml"), f"output.dir={workdir / 'quickstart_toy'}",
                       "pipeline.teacher_sft_steps=2", "pipeline.student_sft_steps=3",
                       "pipeline.student_sft_dev_interval=1", "pipeline.student_sft_patience=1", "train.max_steps=2",
                       "eval.dev_interval=1", "data.synthetic.n_train=64", "data.synthetic.n_dev=6",
                       "data.synthetic.n_test=8", "train.micro_batch_size=4", "rollout.max_new_tokens=6",
                       "eval.max_new_tokens=6", "eval.seeds=[10,20]",
                       "model.teacher.init={arch: llama, layers: 2, hidden: 64, heads: 4}",
                       "model.student.init={arch: llama, layers: 1, hidden: 32, heads: 2}"],
    }


@pytest.fixture(scope="module")
def launches(workdir, config_yaml) -> dict[str, SimpleNamespace]:
    """ONE real 2-rank deepspeed launch of the tiny PromptKD run, shared by the tests below, side by side with
    the one-process runs that do not need it (the quickstart pipeline first: the longest)."""
    singles = _single_runs(workdir, config_yaml)
    overrides = [f"output.dir={workdir / 'run_promptkd'}"]
    cmd = [str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(free_port()), str(MAIN), "--config",
           str(config_yaml), *overrides]
    order = ["ds", "quickstart", "sft", "early_stop"]
    procs = run_side_by_side({"ds": Launch(cmd, timeout_s=LAUNCH_TIMEOUT_S),
                              **{name: _cli(*singles[name]) for name in order[1:]}})
    (workdir / "ds_launch.log").write_text(procs["ds"].stdout + procs["ds"].stderr)
    out = {name: _result(procs[name], singles[name], workdir / f"{name}.log") for name in order[1:]}
    out["ds"] = SimpleNamespace(rc=procs["ds"].returncode, run_dir=workdir / "run_promptkd",
                                log=procs["ds"].stdout + procs["ds"].stderr,
                                cfg=load_config(str(config_yaml), overrides))
    return out


@pytest.fixture(scope="module")
def ds_run(launches) -> SimpleNamespace:
    return launches["ds"]


@pytest.fixture(scope="module")
def run_dir(ds_run) -> Path:
    """The launch's run dir; every dependent test fails (with the log tail) if the launch did."""
    assert ds_run.rc == 0, f"deepspeed launch exited {ds_run.rc}; log tail:\n{tail(ds_run.log, TAIL)}"
    return ds_run.run_dir


@pytest.fixture(scope="module")
def tb(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


# ----------------------------------------------------------------------------- 2-rank happy path

def test_launch_exits_zero_with_two_ranks(ds_run):
    assert ds_run.rc == 0, f"deepspeed launch exited {ds_run.rc}; log tail:\n{tail(ds_run.log, TAIL)}"
    # both ranks really ran: the training log reports world size 2
    assert "world size 2" in ds_run.log, tail(ds_run.log, TAIL)
    assert "Traceback" not in ds_run.log, tail(ds_run.log, TAIL)


def test_resolved_config_round_trips(ds_run, run_dir):
    saved = run_dir / "config.yaml"
    assert saved.is_file()
    assert load_config(str(saved)) == ds_run.cfg


def test_tensorboard_scalars_and_text(tb):
    tags = tb.Tags()
    missing = [t for t in SCALAR_TAGS if t not in tags["scalars"]]
    assert not missing, f"missing scalar tags {missing}; have {sorted(tags['scalars'])}"
    assert [e.step for e in tb.Scalars("loss/rkl")] == list(range(1, TRAIN_STEPS + 1))
    for tag in ("loss/rkl", "prompt/guidance_kl", "prompt/reg_kl", "dev/rougeL"):
        for e in tb.Scalars(tag):
            assert math.isfinite(e.value) and e.value >= 0.0, (tag, e)
    # linear regularizer schedule w = 1 - t/T, t the 0-based step of the logged (1-based) step
    weights = [(e.step, e.value) for e in tb.Scalars("prompt/reg_weight")]
    assert [s for s, _ in weights] == list(range(1, TRAIN_STEPS + 1))
    assert all(b < a for (_, a), (_, b) in zip(weights, weights[1:])), weights
    for step, w in weights:
        assert w == pytest.approx(1.0 - (step - 1) / TRAIN_STEPS), weights
    text_tags = [t for t in tags["tensors"] if t.startswith("rollout/samples")]
    assert text_tags, f"no rollout sample text tag; tensor tags {tags['tensors']}"


def test_checkpoints_complete_and_latest(run_dir):
    from promptkd.training import checkpoint

    root = run_dir / "checkpoints"
    for step in (2, 4):
        ckpt = root / f"step_{step}"
        assert ckpt.is_dir(), sorted(p.name for p in root.iterdir())
        assert (ckpt / "COMPLETE").is_file()
        for rank in (0, 1):  # per-rank RNG state: both ranks took part
            assert (ckpt / f"rank_{rank}.pt").is_file()
    assert checkpoint.latest(str(run_dir)) == str(root / "step_4")
    assert not (root / "latest").exists()  # the COMPLETE markers are the one record of what is complete
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp")]


def test_export_loads_with_transformers(run_dir):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = run_dir / "export"
    model = AutoModelForCausalLM.from_pretrained(str(export))
    tokenizer = AutoTokenizer.from_pretrained(str(export))
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2
    assert len(tokenizer) <= model.config.vocab_size
    ids = tokenizer("### Instruction:\nhello", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert model(ids).logits.shape[-1] == model.config.vocab_size
    # the HF dir holds the student only (vLLM loads every *.safetensors of it); the prompt sits in a subdir
    assert sorted(p.name for p in export.glob("*.safetensors")) == ["model.safetensors"]
    meta = json.loads((export / "teacher_prompt" / "teacher_prompt.json").read_text())
    assert meta["prompt_length"] == PROMPT_LENGTH
    prompt = load_file(str(export / "teacher_prompt" / "teacher_prompt.safetensors"))["prompt"]
    assert list(prompt.shape) == [PROMPT_LENGTH, TEACHER_HIDDEN]
    assert prompt.dtype == torch.float32 and torch.isfinite(prompt).all()


def test_eval_results_json(run_dir):
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert "student" in results["models"], results["models"].keys()
    test = results["models"]["student"]["datasets"]["test"]
    assert 0.0 <= test["rougeL"] <= 100.0
    assert test["n"] == 8  # eval.max_examples
    assert (run_dir / "eval" / "answers" / "student" / "test.jsonl").is_file()


def test_best_export_beside_checkpoints(run_dir):
    best = run_dir / "best"
    meta = json.loads((best / "best.json").read_text())
    assert meta["step"] == TRAIN_STEPS and meta["metric"] == "dev/rougeL"  # the only dev eval: at the end
    assert (best / "config.json").is_file() and (best / "teacher_prompt" / "teacher_prompt.safetensors").is_file()
    assert sorted(p.name for p in best.glob("*.safetensors")) == ["model.safetensors"]


def test_metrics_jsonl_one_line_per_logged_step(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert all(isinstance(r["step"], int) and 1 <= r["step"] <= TRAIN_STEPS for r in lines), lines
    train_steps = [r["step"] for r in lines if "loss/rkl" in r]
    assert train_steps == list(range(1, TRAIN_STEPS + 1)), train_steps  # logging.interval=1, no duplicates
    assert any("dev/rougeL" in r for r in lines)
    # the loss normaliser is the GLOBAL token count: more than one rank can produce
    # (micro_batch_size * grad_accum * max_new_tokens = 96), at most both ranks can
    one_rank_max = 4 * 2 * 12
    for r in lines:
        if "tokens" in r:
            assert one_rank_max < r["tokens"] <= 2 * one_rank_max, r


# ----------------------------------------------------------------------------- stage=eval on the export

@pytest.fixture(scope="module")
def evals(workdir, config_yaml, data, run_dir) -> dict[str, SimpleNamespace]:
    """The two stage=eval runs on the launch's export, side by side."""
    args = {
        "eval_only": ["--config", str(config_yaml), "stage=eval", f"eval.model_path={run_dir / 'export'}",
                      f"eval.file={data['test']}", f"output.dir={workdir / 'eval_only'}"],
        "eval_protocol": ["--config", str(config_yaml), "stage=eval",
                          f"eval.models=[last={run_dir / 'export'},best={run_dir / 'best'}]", "eval.do_sample=true",
                          "eval.seeds=[10,20]", "eval.greedy_too=true", f"eval.file={data['test']}",
                          f"output.dir={workdir / 'eval_protocol'}"],
    }
    procs = run_side_by_side({name: _cli(*a) for name, a in args.items()})
    return {name: _result(procs[name], args[name], workdir / f"{name}.log") for name in args}


def test_stage_eval_on_export(workdir, evals):
    out = workdir / "eval_only"
    res = evals["eval_only"]
    assert res.rc == 0, tail(res.text, TAIL)
    table = (out / "eval" / "results.md").read_text()
    assert "| model | test |" in table  # models x datasets (one of each here)
    results = json.loads((out / "eval" / "results.json").read_text())
    assert 0.0 <= results["models"]["model"]["datasets"]["test"]["rougeL"] <= 100.0


# ----------------------------------------------------------------------------- single process (no launcher)

def test_single_process_sft(workdir, launches):
    out = workdir / "run_sft"
    res = launches["sft"]
    assert res.rc == 0, tail(res.text, TAIL)
    assert (out / "export" / "config.json").is_file()
    assert not (out / "export" / "teacher_prompt").exists()
    assert "world size 1" in res.text


def test_early_stopping_keeps_the_best_dev_student(workdir, launches):
    """lr ~0: dev ROUGE-L never improves on step 1's, so patience 1 stops the run at step 2 of 30."""
    out = workdir / "run_early_stop"
    res = launches["early_stop"]
    assert res.rc == 0, tail(res.text, TAIL)
    assert "early stop at step 2" in res.text
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 2
    assert json.loads((out / "best" / "best.json").read_text())["step"] == 1
    assert (out / "export" / "config.json").is_file()


def test_stage_eval_several_models_sampled_and_greedy(workdir, config_yaml, evals, monkeypatch, capsys):
    out = workdir / "eval_protocol"
    res = evals["eval_protocol"]
    assert res.rc == 0, tail(res.text, TAIL)
    sampled = json.loads((out / "eval" / "results.json").read_text())
    greedy = json.loads((out / "eval" / "greedy" / "results.json").read_text())
    assert list(sampled["models"]) == ["last", "best"] == list(greedy["models"])
    assert sampled["decoding"]["do_sample"] and sampled["decoding"]["seeds"] == [10, 20]
    assert not greedy["decoding"]["do_sample"] and greedy["decoding"]["seeds"] == [10]
    assert len(sampled["models"]["best"]["datasets"]["test"]["by_seed"]) == 2
    assert "Sampled (the paper's protocol) beside greedy" in res.stdout
    # a model without a name: bad input, in process (test_bad_inputs.py launches the one real bad-input process)
    rc, stderr = main_in_process(["--config", str(config_yaml), "stage=eval", "eval.models=[nameless]",
                                  f"output.dir={out}_bad"], monkeypatch, capsys)
    assert rc == 2 and "eval.models" in last_line(stderr) and not (out.parent / "eval_protocol_bad").exists()


def test_quickstart_pipeline_at_toy_size(workdir, launches):
    """The quickstart's own config through the launcher, shrunk: best-dev students, sampled beside greedy."""
    out = workdir / "quickstart_toy"
    res = launches["quickstart"]
    assert res.rc == 0, tail(res.text, TAIL)
    assert "Sampled (the paper's protocol) beside greedy" in res.stdout
    sampled = json.loads((out / "eval" / "results.json").read_text())["models"]
    greedy = json.loads((out / "eval" / "greedy" / "results.json").read_text())["models"]
    assert list(sampled) == list(greedy) and len(sampled) == 4  # teacher, SFT student, PromptKD, prompted teacher
    distilled = [m for m in sampled if m.startswith("student (promptkd, best dev, step ")]
    assert distilled and any(m.startswith("student (SFT, best dev, step ") for m in sampled), list(sampled)
    best = json.loads((out / "distill" / "best" / "best.json").read_text())
    assert distilled[0].endswith(f"step {best['step']})")
    assert (out / "distill" / "best" / "teacher_prompt" / "teacher_prompt.safetensors").is_file()


# ----------------------------------------------------------------------------- bad inputs

def _bad_inputs(workdir: Path, data: dict[str, str]) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (overrides, substrings the error line must contain)."""
    bad_dir = workdir / "bad"
    bad_dir.mkdir(exist_ok=True)
    rows = Path(data["train"]).read_text().splitlines()[:6]
    rows[2] = rows[2][: len(rows[2]) // 2]  # truncated JSON object on line 3
    malformed = bad_dir / "malformed.jsonl"
    malformed.write_text("\n".join(rows) + "\n")
    batch_json = bad_dir / "ds_batch.json"
    batch_json.write_text(json.dumps({"zero_optimization": {"stage": 1}, "train_batch_size": 64}))
    stage7 = bad_dir / "ds_stage7.json"
    stage7.write_text(json.dumps({"zero_optimization": {"stage": 7}}))
    return {
        "unknown_key": (["train.bogus_key=1"], ["train.bogus_key", "unknown"]),
        "missing_data": (["data.train_file=/nonexistent.jsonl"], ["/nonexistent.jsonl"]),
        # the column is the truncated line's end (1-based), not json's "line 2, column 1"
        "malformed_line": ([f"data.train_file={malformed}"], [f"{malformed}:3", f"column {len(rows[2]) + 1}"]),
        "ds_train_batch_size": ([f"deepspeed={batch_json}"], ["train_batch_size", str(batch_json)]),
        "ds_zero_stage_7": ([f"deepspeed={stage7}"], ["zero_optimization.stage", "got 7", str(stage7)]),
    }


@pytest.mark.parametrize("case", ["unknown_key", "missing_data", "malformed_line", "ds_train_batch_size",
                                  "ds_zero_stage_7"])
def test_bad_input_is_a_one_line_error(workdir, config_yaml, data, case, monkeypatch, capsys):
    """In process through the launcher's main (tests/integration/test_bad_inputs.py launches the real process)."""
    overrides, needles = _bad_inputs(workdir, data)[case]
    rc, stderr = main_in_process(["--config", str(config_yaml), f"output.dir={workdir / 'bad' / case}", *overrides],
                                 monkeypatch, capsys)
    shown = f"rc={rc}\n--- stderr tail\n{tail(stderr, 30)}"
    assert rc == 2, shown
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines, shown
    last = lines[-1]
    assert last.startswith("error:"), shown
    for needle in needles:
        assert needle in last, f"{needle!r} not in {last!r}"
    assert "Traceback" not in stderr, shown
