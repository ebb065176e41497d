"""Model selection: ``Trainer.run_dev_eval`` keeps the best dev ROUGE-L as ``<run>/best`` (student export +
teacher prompt + best.json), via ``checkpoint.save_best``."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from promptkd.training import checkpoint
from promptkd.config import OptimConfig, load_config
from promptkd.data import train_tokenizer
from promptkd.methods.soft_prompt import SoftPrompt
from promptkd.models import PromptedTeacher, build_tiny
from promptkd.training.trainer import Trainer

SCORES = [10.0, 30.0, 20.0, 30.0, 25.0, 5.0]   # steps 1..6: the first 30 (step 2) wins, the tie does not replace


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = ["the cat sat on the mat", "a dog ran in the park", "one two three four"] * 8
    return train_tokenizer(texts, vocab_size=300, out_dir=str(tmp_path_factory.mktemp("tok")))


class Recorder:
    def __init__(self):
        self.rows = []

    def scalars(self, step, values):
        self.rows.append((step, values))


def _trainer(tmp_path, tokenizer, with_prompt: bool):
    torch.manual_seed(0)
    student = build_tiny("llama", 1, 16, 2, vocab_size=len(tokenizer))
    teacher = PromptedTeacher(build_tiny("llama", 1, 16, 2, vocab_size=len(tokenizer)), prompt_length=3,
                              init="random", dtype=torch.float32) if with_prompt else None
    ctx = SimpleNamespace(engine=SimpleNamespace(module=student), teacher=teacher)
    # the method's export files: its SoftPrompt's (the one owner of the prompt), or none
    prompt = SoftPrompt(teacher, OptimConfig(), 10, 1.0, "tiny-from-config") if with_prompt else None
    method = SimpleNamespace(ctx=ctx, export=prompt.export if prompt is not None else lambda out_dir: None)

    def dev_eval(step):
        # "training" changed the weights: stamp the step into the student and the prompt
        with torch.no_grad():
            student.lm_head.weight.fill_(float(step))
            if teacher is not None:
                teacher.prompt.fill_(float(step))
        return {"rougeL": SCORES[step - 1], "exact_match": 0.0}

    cfg = load_config(None, ["data.train_file=unused.jsonl"])
    trainer = Trainer(cfg, str(tmp_path), method, [], len(SCORES), dev_eval=dev_eval, tokenizer=tokenizer,
                      logger=Recorder())
    return trainer, student


@pytest.mark.parametrize("with_prompt", [True, False])
def test_best_holds_the_argmax_step(tmp_path, tokenizer, with_prompt):
    trainer, _ = _trainer(tmp_path, tokenizer, with_prompt)
    seen = []
    for step in range(1, len(SCORES) + 1):
        trainer.state.step = step
        assert trainer.run_dev_eval() == SCORES[step - 1]
        seen.append(json.loads((tmp_path / "best" / "best.json").read_text())["step"])
    assert seen == [1, 2, 2, 2, 2, 2]                     # best/ follows the running argmax
    assert trainer.state.best_dev == 30.0
    best = tmp_path / "best"
    assert json.loads((best / "best.json").read_text()) == {"step": 2, "metric": "dev/rougeL", "score": 30.0}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(best))
    assert torch.all(model.lm_head.weight == 2.0)         # the weights of step 2, not the last step's
    assert len(AutoTokenizer.from_pretrained(str(best))) == len(tokenizer)
    if with_prompt:
        prompt = load_file(str(best / "teacher_prompt" / "teacher_prompt.safetensors"))["prompt"]
        assert prompt.shape == (3, 16) and torch.all(prompt == 2.0)
        assert json.loads((best / "teacher_prompt" / "teacher_prompt.json").read_text())["teacher"] == "tiny-from-config"
    else:
        assert not (best / "teacher_prompt").exists()
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == ["best"], leftovers               # no staging or .old dirs survive
    assert [s for s, _ in trainer.logger.rows] == list(range(1, 7))


def test_save_best_replaces_atomically(tmp_path, tokenizer):
    trainer, student = _trainer(tmp_path, tokenizer, with_prompt=False)
    engine = trainer.method.ctx.engine
    checkpoint.save_best(str(tmp_path), 5, 1.5, engine, tokenizer)
    (tmp_path / "best" / "stale.txt").write_text("from the older best")
    checkpoint.save_best(str(tmp_path), 9, 2.5, engine, tokenizer, metric="dev/custom")
    assert not (tmp_path / "best" / "stale.txt").exists()
    assert json.loads((tmp_path / "best" / "best.json").read_text()) == {"step": 9, "metric": "dev/custom",
                                                                         "score": 2.5}
