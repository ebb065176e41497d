"""A teacher is loaded one way (issue 20, item 4): ``promptkd.models.teacher.load_teacher``, for training (a prompt
to train, a placement), evaluation and exposure (frozen, a learned prompt or none); a scan keeps it the only one."""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

from promptkd.config import ConfigError, load_config, with_overrides
from promptkd.models import PromptedTeacher, build_tiny
from promptkd.models.teacher import TeacherSpec, load_teacher
from tests.fixtures.scan import PKG, scan_library

LOADER = PKG / "models" / "teacher.py"
HF_LOADER = PKG / "models" / "loading.py"


class _Tokenizer:
    """What a tiny teacher reads from a tokenizer: its length and special ids."""

    pad_token_id, bos_token_id, eos_token_id, name_or_path = 0, 1, 2, "fake"

    def __len__(self) -> int:
        return 40


def _train_cfg(*overrides: str):
    return load_config(None, ["data.train_file=unused.jsonl", "model.teacher.init.layers=1",
                              "model.teacher.init.hidden=32", "model.teacher.init.heads=4",
                              "model.teacher.prompt_init=random", *overrides])


# ----------------------------------------------------------------------------- training


def test_a_training_teacher_is_frozen_seeded_and_carries_a_prompt_to_train():
    cfg = _train_cfg("model.teacher.dtype=bf16")
    a, b = (load_teacher(TeacherSpec.for_training(cfg, 3), _Tokenizer()) for _ in range(2))
    assert isinstance(a, PromptedTeacher) and a.prompt_length == 3 and not a.training
    assert a.prompt.requires_grad and a.prompt.dtype == torch.float32
    assert all(not p.requires_grad and p.dtype == torch.bfloat16 for p in a.base.parameters())
    # the same weights and prompt on every rank whatever the RNG did: nothing is broadcast
    torch.manual_seed(123)
    assert torch.equal(a.prompt, b.prompt)
    assert all(torch.equal(p, q) for p, q in zip(a.base.parameters(), b.base.parameters()))
    other = load_teacher(TeacherSpec.for_training(with_overrides(cfg, {"seed": 7}), 3), _Tokenizer())
    assert not torch.equal(a.prompt, other.prompt)


def test_a_training_teacher_checkpoints_its_frozen_layers_with_dropout_off():
    teacher = load_teacher(TeacherSpec.for_training(_train_cfg("model.teacher.gradient_checkpointing=true"), 2),
                           _Tokenizer())
    flagged = [m for m in teacher.base.modules() if getattr(m, "gradient_checkpointing", False)]
    assert flagged and all(m.training for m in flagged)
    assert not any(m.training for m in teacher.base.modules() if isinstance(m, torch.nn.Dropout))


def test_after_bos_needs_a_tokenizer_with_a_bos_token():
    tok = _Tokenizer()
    tok.bos_token_id = None
    with pytest.raises(ConfigError, match=r"^model\.teacher\.prompt_position: after_bos needs"):
        load_teacher(TeacherSpec.for_training(_train_cfg("model.teacher.prompt_position=after_bos"), 2), tok)


def test_the_placement_picks_the_deepspeed_config():
    assert TeacherSpec.for_training(_train_cfg(), 0).zero3 is None
    zero3 = TeacherSpec.for_training(_train_cfg("model.teacher.placement=zero3", "model.teacher.path=/x"), 0).zero3
    assert zero3["zero_optimization"]["stage"] == 3


# ----------------------------------------------------------------------------- evaluation and exposure


@pytest.fixture
def trained(tmp_path):
    """A tiny teacher saved as an HF dir, and a learned prompt (after BOS) saved beside it."""
    torch.manual_seed(0)
    base = build_tiny("llama", 1, 32, 4, vocab_size=40, bos_token_id=1)
    base.save_pretrained(tmp_path / "teacher")
    teacher = PromptedTeacher(base, prompt_length=3, init="random", dtype=torch.float32, seed=5, position="after_bos")
    teacher.save_prompt(str(tmp_path / "prompt"), "tiny")
    return tmp_path, teacher.eval()


def test_a_learned_prompt_is_loaded_frozen_with_its_rows_and_place(trained):
    root, original = trained
    loaded = load_teacher(TeacherSpec.learned(str(root / "teacher"), torch.float32, str(root / "prompt")))
    assert loaded.position == "after_bos" and not loaded.training
    assert torch.equal(loaded.prompt, original.prompt)
    assert not any(p.requires_grad for p in loaded.base.parameters())
    ids, mask = torch.tensor([[1, 5, 6, 7]]), torch.ones(1, 4, dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask)[0], original(ids, mask)[0])


def test_without_a_learned_prompt_the_teacher_is_the_plain_model(trained):
    root, original = trained
    loaded = load_teacher(TeacherSpec.learned(str(root / "teacher"), torch.float32))
    assert loaded.prompt_length == 0
    ids, mask = torch.tensor([[1, 5, 6, 7]]), torch.ones(1, 4, dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask)[0], original.base(input_ids=ids).logits)


def test_a_missing_teacher_dir_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^exposure\.teacher_path: cannot load"):
        load_teacher(TeacherSpec.learned(str(tmp_path / "nope"), torch.float32, key="exposure.teacher_path"))


# ----------------------------------------------------------------------------- the only way


def _teacher_builds(path: Path, tree: ast.AST):
    """Calls that build a teacher, or read a teacher's weights or learned prompt, outside the loader."""
    if path == LOADER:
        return
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        owner = ast.unparse(func.value) if isinstance(func, ast.Attribute) else ""
        text = ast.unparse(node).lower()
        if name == "PromptedTeacher":
            yield node.lineno, "builds a PromptedTeacher"
        elif name == "load_prompt":
            yield node.lineno, "reads a learned prompt"
        elif name == "from_pretrained" and "Model" in owner and path != HF_LOADER:
            yield node.lineno, f"loads a model with {owner}.from_pretrained (promptkd.models.loading does)"
        elif name == "load_pretrained" and "teacher" in text:
            yield node.lineno, "loads the teacher's weights"


def test_the_library_loads_a_teacher_one_way():
    found = scan_library(_teacher_builds)
    assert not found, "build teachers with promptkd.models.teacher.load_teacher:\n" + "\n".join(found)


@pytest.mark.parametrize("source", [
    "t = PromptedTeacher(base, prompt_length=3)",
    "rows = load_prompt(prompt_dir)",
    "m = load_pretrained(cfg.model.teacher.path, dtype)",
    "m = AutoModelForCausalLM.from_pretrained(path)",
    "m = transformers.AutoModelForCausalLM.from_pretrained(teacher_dir)",
])
def test_the_teacher_scan_can_fail(source):
    assert list(_teacher_builds(PKG / "stages.py", ast.parse(source)))
    assert not list(_teacher_builds(LOADER, ast.parse(source)))


def test_the_teacher_scan_leaves_other_loads_alone():
    ok = ["tok = AutoTokenizer.from_pretrained(teacher_path)", "m = load_pretrained(path, dtype, key='model.path')",
          "c = AutoConfig.from_pretrained(path)"]
    assert not [hit for s in ok for hit in _teacher_builds(PKG / "stages.py", ast.parse(s))]


def test_a_spec_is_a_value():
    spec = TeacherSpec.learned("/m", torch.float32, "/p")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.path = "/other"  # type: ignore[misc]
    assert dataclasses.replace(spec, prompt_dir="") == TeacherSpec.learned("/m", torch.float32)
