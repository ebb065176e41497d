"""Students are evaluated in bf16 with TF32 allowed on a GPU that has bf16, in fp32 elsewhere (eval.dtype)."""
from __future__ import annotations

import pytest
import torch

from promptkd import stages
from promptkd.config import ConfigError
from promptkd.config.loading import load_config
from tests.fixtures.cli import REPO


def _cfg(**overrides):
    return load_config(str(REPO / "configs" / "quickstart.yaml"), [f"{k}={v}" for k, v in overrides.items()])


@pytest.mark.parametrize("cuda,bf16,expected", [(False, False, torch.float32), (True, True, torch.bfloat16),
                                                (True, False, torch.float32)])
def test_auto_is_bf16_only_on_a_gpu_that_has_it(monkeypatch, cuda, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert stages.student_eval_dtype(_cfg()) == expected


def test_an_explicit_dtype_wins(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert stages.student_eval_dtype(_cfg(**{"eval.dtype": "fp32"})) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert stages.student_eval_dtype(_cfg(**{"eval.dtype": "bf16"})) == torch.bfloat16


def test_tf32_is_allowed_for_evaluation_on_cuda_only(monkeypatch):
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        stages.allow_tf32()
        assert torch.backends.cuda.matmul.allow_tf32 is False
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        stages.allow_tf32()
        assert torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_a_bad_dtype_names_the_key():
    with pytest.raises(ConfigError, match="eval.dtype"):
        _cfg(**{"eval.dtype": "fp16"})
