"""Host syncs and collectives per step (issue 19, item 3): what bench/counts.py measures, pinned as rules.

- the fused losses run ONE nonzero per loss, however many chunks;
- a step's metrics are device sums reduced in ONE collective, and the trainer asks for them on logging
  steps only;
- models load in their dtype straight onto their device.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from promptkd import distributed as dist
from promptkd.losses import kl_divergence, prompt_loss
from promptkd.methods.base import StepResult, Tally


class CountOps(TorchDispatchMode):
    """Counts the ops that make the host wait for the device."""

    def __init__(self) -> None:
        super().__init__()
        self.n = {"nonzero": 0, "bool_index": 0, "scalar": 0}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("nonzero", "masked_select"):
            self.n["nonzero"] += 1
        elif name == "_local_scalar_dense":
            self.n["scalar"] += 1
        elif name in ("index", "index_put", "index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []) if i is not None):
            self.n["bool_index"] += 1
        return func(*args, **(kwargs or {}))


def _inputs(seed: int = 0, B: int = 3, T: int = 11, V: int = 17):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(B, T, V, generator=g, requires_grad=True)
    q = torch.randn(B, T, V, generator=g, requires_grad=True)
    mask = (torch.rand(B, T, generator=g) > 0.3).long()
    return p, q, mask


@pytest.mark.parametrize("chunk", [None, 1, 2, 5])
def test_fused_kl_syncs_once_per_loss_whatever_the_chunk(chunk):
    p, q, mask = _inputs()
    with CountOps() as ops:
        loss, _ = kl_divergence(p, q, mask=mask, chunk_size=chunk)
        loss.backward()
    # before: a boolean-mask select per input and a masked write per gradient, per chunk (4 x 11 at chunk 1)
    assert ops.n == {"nonzero": 1, "bool_index": 0, "scalar": 0}, ops.n


@pytest.mark.parametrize("chunk", [None, 1, 3])
def test_fused_prompt_loss_syncs_once_per_loss(chunk):
    p, q, mask = _inputs(1)
    base = torch.randn_like(q)
    with CountOps() as ops:
        out = prompt_loss(q, prompted=p, teacher=base, mask=mask, reg_weight=0.5, chunk_size=chunk)
        out.total.backward()
    assert ops.n == {"nonzero": 1, "bool_index": 0, "scalar": 0}, ops.n


def test_fused_chunks_by_rows_equal_one_chunk():
    """Chunks are slices of the kept rows: every chunk size gives the unchunked loss and gradients."""
    ref = None
    for chunk in (None, 1, 2, 4, 100):
        p, q, mask = _inputs(2)
        loss, _ = kl_divergence(p, q, mask=mask, chunk_size=chunk)
        loss.backward()
        got = (loss.detach(), p.grad, q.grad)
        if ref is None:
            ref = got
            continue
        torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got[1], ref[1], rtol=0, atol=0)  # rows are computed alone: bitwise
        torch.testing.assert_close(got[2], ref[2], rtol=0, atol=0)


def test_auto_chunk_is_sized_for_the_device(monkeypatch):
    from promptkd.losses import fused

    assert fused.chunk_elements(torch.device("cpu")) == fused.FUSED_CHUNK_ELEMENTS
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 << 30, 141 << 30))
    assert fused.chunk_elements(torch.device("cuda", 0)) == fused.DEVICE_CHUNK_ELEMENTS   # capped
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 30, 141 << 30))
    assert fused.chunk_elements(torch.device("cuda", 0)) == max(fused.FUSED_CHUNK_ELEMENTS, (1 << 30) // 64)
    # the OPT/LLaMA shape: 16 x 512 positions at vocab 32000 is one chunk on a GPU with room, 64 on CPU
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 << 30, 141 << 30))
    assert 512 // (fused.DEVICE_CHUNK_ELEMENTS // (16 * 32000)) <= 1
    assert 512 // (fused.FUSED_CHUNK_ELEMENTS // (16 * 32000)) == 64


# ----------------------------------------------------------------------------- metrics


def test_tally_reduces_every_sum_in_one_collective(monkeypatch):
    calls = []
    real = dist.all_reduce_sum

    def counting(value):
        calls.append(value)
        return real(value) * 2  # as if a second rank held the same sums

    monkeypatch.setattr(dist, "all_reduce_sum", counting)
    t = Tally({"prompt/reg_weight": 0.5})
    with CountOps() as ops:
        for v in (1.5, 2.25):
            t.add("loss/rkl", torch.tensor(v))
            t.add("tokens", torch.tensor(3))
        t.mean("loss/rkl", "loss/rkl")
        t.mean("tokens", "tokens", per=None)
    assert ops.n["scalar"] == 0 and not calls          # nothing leaves the device while the step runs
    out = StepResult(t).reduce()
    assert len(calls) == 1
    assert out == {"prompt/reg_weight": 0.5, "loss/rkl": (1.5 + 2.25) * 2 / 12, "tokens": 12.0}
    assert StepResult(t).metrics == out and len(calls) == 1   # cached: no second collective


def test_tally_sums_in_fp64_like_python_floats():
    values = [torch.tensor(x, dtype=torch.float32) for x in (0.1, 1e-8, 3.3333333, 7e5)]
    t = Tally()
    total = 0.0
    for v in values:
        t.add("x", v)
        total += float(v)
    t.mean("x", "x", per=None)
    assert t.reduce()["x"] == total   # exactly: the logged numbers did not change with the move to the device


class _Steps:
    """A method whose steps count how often the trainer reduces their metrics."""

    def __init__(self):
        self.reduced = []
        self.ctx = SimpleNamespace(engine=SimpleNamespace(module=torch.nn.Linear(1, 1), get_lr=lambda: [0.1],
                                                          get_global_grad_norm=lambda: 1.0),
                                   timer=SimpleNamespace(pop=lambda: {}))

    def step(self, micro, step):
        t = Tally()
        t.add("loss/x", torch.tensor(1.0))
        t.mean("loss/x", "loss/x", per=None)
        result = StepResult(t)
        real = result.reduce

        def reduce():
            self.reduced.append(step + 1)
            return real()

        result.reduce = reduce
        return result


def test_trainer_reduces_metrics_only_on_logging_steps(tmp_path):
    from promptkd.config import load_config
    from promptkd.training.trainer import Trainer

    class Recorder:
        def __init__(self):
            self.rows = []

        def scalars(self, step, values):
            self.rows.append((step, values))

    cfg = load_config(None, ["data.train_file=unused.jsonl", "logging.interval=3", "logging.progress_bar=false"])
    method = _Steps()
    trainer = Trainer(cfg, str(tmp_path), method, [], 7, logger=Recorder())
    for _ in range(7):
        trainer._one_step([], None, None)
    assert method.reduced == [3, 6, 7]                     # interval steps and the last one
    assert [s for s, _ in trainer.logger.rows] == [3, 6, 7]
    assert trainer.logger.rows[0][1]["loss/x"] == 1.0 and "train/skipped_steps" in trainer.logger.rows[0][1]


# ----------------------------------------------------------------------------- loading


@pytest.fixture
def saved_tiny(tmp_path):
    from promptkd.models import build_tiny

    torch.manual_seed(0)
    build_tiny("llama", 1, 16, 2, vocab_size=320).save_pretrained(tmp_path / "m")
    return str(tmp_path / "m")


def _record_from_pretrained(monkeypatch):
    from transformers import AutoModelForCausalLM

    seen = []
    real = AutoModelForCausalLM.from_pretrained.__func__

    def recording(cls, path, *args, **kwargs):
        seen.append(kwargs)
        return real(cls, path, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(recording))
    return seen


def test_load_pretrained_reads_in_dtype_onto_the_device(monkeypatch, saved_tiny):
    from promptkd.models import load_pretrained

    seen = _record_from_pretrained(monkeypatch)
    model = load_pretrained(saved_tiny, torch.bfloat16, device=dist.device())
    assert seen == [{"dtype": torch.bfloat16, "device_map": dist.device()}]
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device for p in model.parameters()} == {dist.device()}
    assert not hasattr(model, "hf_device_map") or len(set(model.hf_device_map.values())) == 1  # no split, no hooks


def test_load_pretrained_leaves_zero3_placement_to_deepspeed(monkeypatch, saved_tiny):
    from promptkd.models import loading

    seen = _record_from_pretrained(monkeypatch)
    monkeypatch.setattr(loading, "_zero3_live", lambda: True)
    loading.load_pretrained(saved_tiny, torch.float32, device=dist.device())
    assert seen == [{"dtype": torch.float32}]     # zero.Init partitions at construction: no device_map


def test_builders_load_teacher_and_student_in_their_dtypes_on_the_device(monkeypatch, saved_tiny, tmp_path):
    from promptkd.config import load_config
    from promptkd.data import train_tokenizer
    from promptkd.models.teacher import TeacherSpec, load_teacher
    from promptkd.training import builders

    tok = train_tokenizer(["the cat sat on the mat", "a dog ran"] * 20, 280, str(tmp_path / "tok"))
    seen = _record_from_pretrained(monkeypatch)
    cfg = load_config(None, ["data.train_file=x", f"model.student.path={saved_tiny}",
                             f"model.teacher.path={saved_tiny}", "model.teacher.dtype=bf16", "train.precision=bf16"])
    student = builders.build_student_module(cfg, tok, {"zero_optimization": {"stage": 0}})
    teacher = load_teacher(TeacherSpec.for_training(cfg, 0), tok).base
    frozen = load_teacher(TeacherSpec.learned(saved_tiny, torch.bfloat16)).base  # evaluation's and exposure's
    assert seen == [{"dtype": torch.bfloat16, "device_map": dist.device()}] * 3
    for model in (student, teacher, frozen):
        assert {(p.dtype, p.device) for p in model.parameters()} == {(torch.bfloat16, dist.device())}
