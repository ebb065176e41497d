"""A chat model pair through ``deepspeed launcher/main.py`` (issue 21, "done when"): messages-format JSONL, a tiny
Qwen3 teacher and student (a tokenizer trained here with Qwen's special tokens and chat template), then SFT of
both (side by side), PromptKD on 2 ranks, and a sampled evaluation; plus a bad messages record through the
launcher's main, in process (exit 2).

These are the README's "Your own chat models" commands at toy size.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from promptkd.data import load_examples, load_tokenizer, make_synthetic_splits, train_tokenizer
from tests.fixtures.cli import MAIN, REPO, free_port, last_line, main_in_process, tail
from tests.fixtures.parallel import Launch, run_side_by_side
from tests.fixtures.shipped import save_tiny_chat_model

BIN = Path(sys.executable).parent
DEEPSPEED = BIN / "deepspeed" if (BIN / "deepspeed").exists() else REPO / ".venv" / "bin" / "deepspeed"
TIMEOUT_S = 300
TAIL = 60


def _messages(dolly: str, out: Path) -> str:
    with open(out, "w") as fh:
        for i, ex in enumerate(load_examples(dolly, template="none")):
            system = [{"role": "system", "content": "Answer briefly."}] if i % 2 else []
            fh.write(json.dumps({"id": ex.id, "messages": system + [
                {"role": "user", "content": ex.prompt}, {"role": "assistant", "content": ex.references[0]}]}) + "\n")
    return str(out)


def _cmd(args: list[str], ranks: int = 1) -> list[str]:
    return [str(DEEPSPEED), "--num_gpus", str(ranks), "--master_port", str(free_port()), str(MAIN), *args]


def _logged(cmd: list[str], proc: subprocess.CompletedProcess, log: Path) -> SimpleNamespace:
    text = proc.stdout + proc.stderr
    log.write_text(f"$ {' '.join(cmd)}\n{text}")
    return SimpleNamespace(rc=proc.returncode, text=text, stderr=proc.stderr)


def _launch(args: list[str], log: Path, ranks: int = 1) -> SimpleNamespace:
    cmd = _cmd(args, ranks)
    return _logged(cmd, run_side_by_side({"one": Launch(cmd, timeout_s=TIMEOUT_S)})["one"], log)


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("chat")
    files = make_synthetic_splits(str(root / "syn"), 64, 6, 6, seed=4)
    data = {split: _messages(files[split], root / f"{split}.jsonl") for split in ("train", "dev", "test")}
    texts = [e.prompt + " " + e.references[0] for e in load_examples(files["train"], template="none")]
    train_tokenizer(texts, 512, str(root / "tok"), chat="chatml")
    tok = load_tokenizer(str(root / "tok"))
    teacher = save_tiny_chat_model("qwen3", 64, tok, root / "qwen3-teacher", seed=1, vocab_multiple=64)
    student = save_tiny_chat_model("qwen3", 32, tok, root / "qwen3-student", seed=2, vocab_multiple=0)
    config = root / "chat.yaml"
    config.write_text(yaml.safe_dump({
        "stage": "train", "seed": 3, "dist_timeout_s": 120, "deepspeed": "ds_configs/zero2.json",
        "data": {"train_file": data["train"], "dev_file": data["dev"], "test_file": data["test"],
                 "format": "messages", "template": "chat", "template_kwargs": {"enable_thinking": False},
                 "max_length": 112, "max_prompt_length": 96},
        "rollout": {"max_new_tokens": 16},
        "optim": {"student": {"lr": 1e-3, "warmup_steps": 2}, "prompt": {"lr": 1e-3, "warmup_steps": 2}},
        "train": {"max_steps": 6, "micro_batch_size": 4},
        "eval": {"max_new_tokens": 16, "seeds": [10, 20], "max_examples": 6},
        "logging": {"interval": 1, "progress_bar": False},
    }, sort_keys=False))
    return {"root": root, "data": data, "teacher": teacher, "student": student, "config": config, "tok": tok}


@pytest.fixture(scope="module")
def pipeline(ws) -> dict:
    root, cfg = ws["root"], str(ws["config"])
    # the two SFT runs are independent one-rank launches: side by side
    cmds = {name: _cmd(["--config", cfg, "method.name=sft", f"model.student.path={model}", f"output.dir={root / name}"])
            for name, model in (("sft_teacher", ws["teacher"]), ("sft_student", ws["student"]))}
    procs = run_side_by_side({name: Launch(cmd, timeout_s=TIMEOUT_S) for name, cmd in cmds.items()})
    runs = {name: _logged(cmds[name], procs[name], root / f"{name}.log") for name in cmds}
    for name in cmds:
        assert runs[name].rc == 0, tail(runs[name].text, TAIL)
    runs["promptkd"] = _launch(["--config", cfg, "method.name=promptkd",
                                f"model.teacher.path={root / 'sft_teacher' / 'export'}",
                                f"model.student.path={root / 'sft_student' / 'export'}", "model.teacher.dtype=fp32",
                                f"output.dir={root / 'promptkd'}"], root / "promptkd.log", ranks=2)
    assert runs["promptkd"].rc == 0, tail(runs["promptkd"].text, TAIL)
    runs["eval"] = _launch(["--config", cfg, "stage=eval", f"eval.model_path={root / 'promptkd' / 'export'}",
                            f"eval.sets=[chat={ws['data']['test']}]", "eval.do_sample=true",
                            f"output.dir={root / 'eval'}"], root / "eval.log")
    assert runs["eval"].rc == 0, tail(runs["eval"].text, TAIL)
    return runs


def test_sft_promptkd_and_sampled_eval_of_a_qwen3_pair(ws, pipeline):
    root = ws["root"]
    assert "world size 2" in pipeline["promptkd"].text and "Traceback" not in pipeline["promptkd"].text
    export = root / "promptkd" / "export"
    assert (export / "teacher_prompt" / "teacher_prompt.safetensors").is_file()
    assert load_tokenizer(str(export)).chat_template == ws["tok"].chat_template   # the export keeps the template
    metrics = [json.loads(line) for line in (root / "promptkd" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss/rkl" in m] == list(range(1, 7))
    results = json.loads((root / "eval" / "eval" / "results.json").read_text())
    chat = results["models"]["model"]["datasets"]["chat"]
    assert results["decoding"]["do_sample"] and len(chat["by_seed"]) == 2 and 0.0 <= chat["rougeL"] <= 100.0
    answers = [json.loads(line) for line in
               (root / "eval" / "eval" / "answers" / "model" / "chat.jsonl").read_text().splitlines()]
    text = json.dumps(answers)
    # answers are the response text only: no end-of-turn token, no (empty) thinking block, no template header
    assert answers and "<|im_end|>" not in text and "<think>" not in text and "<|im_start|>" not in text


def test_sft_data_ends_responses_on_the_end_of_turn_token(ws, pipeline):
    log = pipeline["sft_student"].text
    assert "world size 1" in log and "Traceback" not in log
    assert (ws["root"] / "sft_student" / "best" / "best.json").is_file()


def test_a_bad_messages_record_is_a_one_line_error(ws, tmp_path, monkeypatch, capsys):
    """In process through the launcher's main (test_bad_inputs.py launches the one real bad-input process)."""
    bad = tmp_path / "bad.jsonl"
    rows = Path(ws["data"]["train"]).read_text().splitlines()
    rows[2] = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]})
    bad.write_text("\n".join(rows) + "\n")
    rc, stderr = main_in_process(["--config", str(ws["config"]), f"data.train_file={bad}",
                                  f"model.student.path={ws['student']}", f"output.dir={tmp_path / 'run'}"],
                                 monkeypatch, capsys)
    assert rc == 2, tail(stderr, TAIL)
    line = last_line(stderr)
    assert line.startswith("error:") and f"{bad}:3: messages[1]: unknown role 'bot'" in line, line
    assert "Traceback" not in stderr and not (tmp_path / "run" / "config.yaml").exists()
