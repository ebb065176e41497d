"""Baseline methods without DeepSpeed: config keys, shared draws, DistiLLM schedule/buffer, SeqKD cache."""

from __future__ import annotations

import json
import os

import pytest
import torch

from promptkd.config import METHOD_NAMES, Config, ConfigError, help_lines, load_config
from promptkd.data import TokenizedExample
from promptkd.methods import METHODS, StepContext, step_context
from promptkd.methods.token_kd import SharedDraws
from promptkd.methods.distillm import DistiLLM, ReplayBuffer
from promptkd.methods.seqkd import SeqKD
from promptkd.models import PromptedTeacher, build_tiny
from promptkd.rollout import Rollout
from tests.fixtures.calls import CallCounter

VOCAB, PAD, EOS = 64, 0, 1
BASE = ["data.train_file=train.jsonl"]


def _cfg(*overrides: str):
    return load_config(None, BASE + list(overrides))


# ----------------------------------------------------------------------------- config

@pytest.mark.parametrize("name", ["seqkd", "imitkd", "gkd", "distillm", "minillm"])
def test_new_methods_are_registered(name):
    assert _cfg(f"method.name={name}").method.name == name
    assert name in METHODS and METHODS[name].uses_teacher
    assert set(METHODS) == set(METHOD_NAMES)


@pytest.mark.parametrize("override, key, shape", [
    ("method.gkd.lmbda=1.5", "method.gkd.lmbda", "must be in [0, 1] (got 1.5)"),
    ("method.gkd.beta=-0.1", "method.gkd.beta", "must be in [0, 1] (got -0.1)"),
    ("method.imitkd.beta=2", "method.imitkd.beta", "must be in [0, 1] (got 2.0)"),
    ("method.distillm.skew_alpha=1.0", "method.distillm.skew_alpha", "must be in [0, 1) (got 1.0)"),
    ("method.gkd.skew_alpha=1.0", "method.gkd.skew_alpha", "must be in [0, 1) (got 1.0)"),
    ("method.imitkd.skew_alpha=-0.5", "method.imitkd.skew_alpha", "must be in [0, 1] (got -0.5)"),
    ("method.distillm.replay_ratio=2", "method.distillm.replay_ratio", "must be in [0, 1] (got 2.0)"),
    ("method.distillm.init_prob=1.1", "method.distillm.init_prob", "must be in [0, 1] (got 1.1)"),
    ("method.distillm.replay_capacity=0", "method.distillm.replay_capacity", "must be > 0 (got 0)"),
    ("method.distillm.window=0", "method.distillm.window", "must be > 0 (got 0)"),
    ("method.distillm.loss_eps=-1", "method.distillm.loss_eps", "must be >= 0 (got -1.0)"),
    ("method.imitkd.divergence=hellinger", "method.imitkd.divergence",
     "must be one of fkl, rkl, jsd, tvd, sfkl, srkl (got 'hellinger')"),
    ("method.gkd.divergence=auto", "method.gkd.divergence",
     "must be one of fkl, rkl, jsd, tvd, sfkl, srkl (got 'auto')"),
    ("method.distillm.loss=jsd", "method.distillm.loss", "must be one of sfkl, srkl (got 'jsd')"),
    ("method.promptkd.reg_weight=-1", "method.promptkd.reg_weight", "must be >= 0 (got -1.0)"),
    ("method.promptkd.guidance=both", "method.promptkd.guidance",
     "must be one of teacher_student, student_teacher (got 'both')"),
])
def test_bad_baseline_values_name_the_key(override, key, shape):
    with pytest.raises(ConfigError) as info:
        _cfg(override)
    assert str(info.value) == f"{key}: {shape}"


def test_endpoints_are_valid():
    cfg = _cfg("method.gkd.lmbda=0", "method.gkd.beta=1", "method.gkd.skew_alpha=0", "method.gkd.divergence=tvd")
    g = cfg.method.gkd
    assert (g.lmbda, g.beta, g.skew_alpha, g.divergence) == (0.0, 1.0, 0.0, "tvd")
    assert cfg.method.imitkd == Config().method.imitkd  # a sibling section is untouched


def test_each_method_has_its_own_divergence_default():
    m = _cfg().method
    assert (m.imitkd.divergence, m.gkd.divergence, m.distillm.loss) == ("fkl", "jsd", "srkl")
    assert m.imitkd.beta == m.gkd.beta == 0.5 and m.imitkd.skew_alpha == m.distillm.skew_alpha == 0.1


def test_help_documents_baselines_and_promptkd_ablations():
    text = "\n".join(help_lines())
    for key in ("method.imitkd.divergence", "method.gkd.divergence", "method.gkd.lmbda", "method.gkd.beta",
                "method.distillm.skew_alpha", "method.distillm.loss", "method.distillm.replay_capacity",
                "method.seqkd.cache_dir", "method.kd.ce_weight",
                # the paper's PromptKD ablations
                "method.promptkd.guidance", "method.promptkd.reg_schedule", "method.promptkd.reg_weight",
                "model.teacher.prompt_length", "model.teacher.prompt_init ", "model.teacher.prompt_init_text"):
        assert key in text, key
    line = next(l for l in help_lines() if l.strip().startswith("method.name "))
    for name in METHOD_NAMES:
        assert name in line


# ----------------------------------------------------------------------------- shared draws

def test_shared_draws_ignore_global_rng_and_resume_exactly():
    a, b = SharedDraws(7), SharedDraws(7)
    torch.manual_seed(123)
    first = a.draw(3)
    torch.manual_seed(999)
    assert b.draw(3) == first
    state = a.state_dict()
    nxt = a.draw(2)
    c = SharedDraws(0)
    c.load_state_dict(state)
    assert c.draw(2) == nxt
    assert SharedDraws(8).draw(3) != first


# ----------------------------------------------------------------------------- distillm

def _ctx(cfg, teacher=None, seed: int = 0) -> StepContext:
    return step_context(cfg, METHODS[cfg.method.name].section, None, pad_id=PAD, eos_id=EOS, vocab_size=VOCAB,
                        total_steps=10, teacher=teacher, generator=torch.Generator().manual_seed(seed))


def test_distillm_prob_grows_only_when_the_window_loss_stalls():
    m = DistiLLM(_ctx(_cfg("method.name=distillm", "method.distillm.window=2", "method.distillm.init_prob=0.2",
                           "method.distillm.prob_step=0.25", "method.distillm.loss_eps=0.1")))
    for loss in (5.0, 5.0):       # first window: nothing to compare with
        m._update_schedule(loss)
    assert m.phi == 0.2 and m.prev_window == 5.0
    for loss in (4.0, 4.0):       # improved by 1 > eps
        m._update_schedule(loss)
    assert m.phi == 0.2
    for loss in (3.95, 3.95):     # improved by only 0.05 <= eps: stalled
        m._update_schedule(loss)
    assert m.phi == pytest.approx(0.45)
    for _ in range(10):           # rising loss: capped at 1
        m._update_schedule(9.0)
    assert m.phi == 1.0 and m.window == []


def _rollout() -> Rollout:
    # prompts [7, 8] (left-padded) and [5, 6, 9]; responses [10, EOS] and [11, 12, EOS]
    ids = torch.tensor([[PAD, 7, 8, 10, EOS, PAD], [5, 6, 9, 11, 12, EOS]])
    attn = torch.tensor([[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    loss = torch.tensor([[0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1]])
    return Rollout(ids, attn, loss, prompt_len=3)


def _ex(i: str, prompt: list[int]) -> TokenizedExample:
    return TokenizedExample(id=i, prompt_ids=prompt, response_ids=[3, EOS], references=[], category="")


def test_replay_buffer_keeps_samples_fifo_and_samples_sizes():
    buf = ReplayBuffer(capacity=3)
    buf.add([_rollout()], [[_ex("a", [7, 8]), _ex("b", [5, 6, 9])]])
    assert list(buf.items) == [{"id": "a", "prompt_ids": [7, 8], "response_ids": [10, EOS]},
                               {"id": "b", "prompt_ids": [5, 6, 9], "response_ids": [11, 12, EOS]}]
    buf.add([_rollout()], [[_ex("c", [7, 8]), _ex("d", [5, 6, 9])]])
    assert [it["id"] for it in buf.items] == ["b", "c", "d"]      # oldest dropped
    mbs = buf.sample([2, 1], torch.Generator().manual_seed(0))
    assert [len(mb) for mb in mbs] == [2, 1]
    assert len({ex.id for mb in mbs for ex in mb}) == 3           # without replacement when it fits
    assert [len(mb) for mb in buf.sample([4, 4], torch.Generator().manual_seed(0))] == [4, 4]


def test_distillm_state_round_trip():
    cfg = _cfg("method.name=distillm", "method.distillm.init_prob=0.3")
    m = DistiLLM(_ctx(cfg))
    m.buffer.add([_rollout()], [[_ex("a", [7, 8]), _ex("b", [5, 6, 9])]])
    m.phi, m.window, m.prev_window = 0.7, [1.5], 2.0
    m.draws.draw(5)
    state = m.state_dict()
    expected_draws = m.draws.draw(4)
    fresh = DistiLLM(_ctx(cfg))
    fresh.load_state_dict(state)
    assert list(fresh.buffer.items) == list(m.buffer.items)
    assert (fresh.phi, fresh.window, fresh.prev_window) == (0.7, [1.5], 2.0)
    assert fresh.draws.draw(4) == expected_draws


# ----------------------------------------------------------------------------- seqkd cache

@pytest.fixture(scope="module")
def teacher() -> PromptedTeacher:
    torch.manual_seed(0)
    base = build_tiny("llama", 2, 32, 4, vocab_size=VOCAB, eos_token_id=EOS, pad_token_id=PAD)
    return PromptedTeacher(base, prompt_length=0, dtype=torch.float32)


def _seqkd(tmp_path, teacher, *extra: str) -> SeqKD:
    cfg = _cfg("method.name=seqkd", f"method.seqkd.cache_dir={tmp_path}", "rollout.max_new_tokens=6", *extra)
    m = SeqKD.from_config(cfg, _ctx(cfg, teacher))
    m.calls = CallCounter(m, "_teacher_generate")  # teacher decode loops run
    return m


MB = [_ex("a", [5, 9, 13]), _ex("b", [33, 21]), _ex("c", [8, 8, 50, 3])]


def test_seqkd_cache_is_reused_and_invalidated(tmp_path, teacher):
    first = _seqkd(tmp_path, teacher)
    out1 = first.teacher_examples(MB)
    assert (first.calls.n, first.generated) == (1, 3)
    assert [ex.prompt_ids for ex in out1] == [ex.prompt_ids for ex in MB]
    assert all(ex.response_ids and len(ex.response_ids) <= 6 for ex in out1)
    assert all(ex.response_ids[-1] == EOS for ex in out1)  # forced EOS
    assert first.teacher_examples(MB) == out1 and first.calls.n == 1  # in-memory hits

    again = _seqkd(tmp_path, teacher)  # a rerun: everything from disk, no teacher call
    assert again.teacher_examples(MB) == out1
    assert (again.calls.n, again.generated) == (0, 0)
    assert again.cache.dir == first.cache.dir

    edited = [MB[0], _ex("b", [33, 22]), MB[2]]  # same id, different prompt: regenerated alone
    assert again.teacher_examples(edited)[0] == out1[0]
    assert (again.calls.n, again.generated) == (1, 1)

    for change in ("rollout.temperature=0.7", "rollout.top_k=5", "rollout.max_new_tokens=5", "rollout.top_p=0.9"):
        other = _seqkd(tmp_path, teacher, change)
        assert other.cache.dir != first.cache.dir, change
        other.teacher_examples(MB)
        assert (other.calls.n, other.generated) == (1, 3), change
    meta = json.loads(open(os.path.join(first.cache.dir, "meta.json")).read())
    assert meta["decoding"]["max_new_tokens"] == 6 and meta["teacher"]["init"]["layers"] == 4


def test_seqkd_cache_key_covers_teacher_and_data(tmp_path, teacher):
    base = _seqkd(tmp_path, teacher).cache.key
    assert _seqkd(tmp_path, teacher, "model.teacher.init.layers=2").cache.key != base
    assert _seqkd(tmp_path, teacher, "seed=3").cache.key != base          # tiny teacher weights depend on it
    assert _seqkd(tmp_path, teacher, "data.train_file=other.jsonl").cache.key != base
    assert _seqkd(tmp_path, teacher, "train.micro_batch_size=5").cache.key == base


def test_seqkd_skips_a_truncated_cache_line(tmp_path, teacher):
    first = _seqkd(tmp_path, teacher)
    first.teacher_examples(MB)
    with open(first.cache.path, "a") as fh:
        fh.write('{"id": "z", "prompt_sha": ')  # a crash mid-write
    again = _seqkd(tmp_path, teacher)
    again.teacher_examples(MB)
    assert again.calls.n == 0 and "z" not in again.cache.entries
    again.teacher_examples([_ex("y", [4, 4])])  # appended on a fresh line, so readable next time
    assert "y" in _seqkd(tmp_path, teacher).cache.entries
