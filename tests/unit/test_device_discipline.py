"""Device discipline (DESIGN.md §3): the rules that keep the CUDA path right, checked on CPU.

CI has no GPU, so a CPU generator meeting CUDA probabilities, or a CPU draw with a CUDA
generator, never fails here by itself. These tests check the rules instead:
- statically, over the library: every ``torch.Generator(`` names its device, every
  ``torch.load(`` names a ``map_location``, every creation op that draws with a
  ``generator=`` names the device it draws on;
- behaviourally, with a stand-in accelerator device: the generator that evaluation, the
  exposure metric and DistiLLM's replay hand to a sampling op is on the device of the
  tensors that op draws for.
"""
from __future__ import annotations

import ast
import os
import types
from pathlib import Path

import pytest
import torch

from promptkd import distributed as dist
from promptkd.data import TokenizedExample

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted([*(ROOT / "promptkd").rglob("*.py"), *(ROOT / "launcher").rglob("*.py")])
CREATION_OPS = {"rand", "randn", "randint", "randperm", "normal", "bernoulli", "rand_like", "randn_like",
                "randint_like"}
FAKE_ACCEL = torch.device("cuda", 0)
REAL_GENERATOR = torch.Generator


def _torch_calls(path: Path):
    """(op name, keyword names, line) of every ``torch.<op>(...)`` call in a file."""
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
            yield node.func.attr, {k.arg for k in node.keywords}, f"{path.name}:{node.lineno}"


def _violations(sources: list[Path]) -> list[str]:
    bad = []
    for path in sources:
        for op, kwargs, where in _torch_calls(path):
            if op == "Generator" and "device" not in kwargs:
                bad.append(f"{where}: torch.Generator() without device=")
            elif op == "load" and "map_location" not in kwargs:
                bad.append(f"{where}: torch.load() without map_location=")
            elif op in CREATION_OPS and "generator" in kwargs and "device" not in kwargs:
                bad.append(f"{where}: torch.{op}(generator=...) without device= (draws on the CPU)")
    return bad


def test_library_follows_the_device_rules():
    assert SOURCES, ROOT
    bad = _violations(SOURCES)
    assert not bad, "\n".join(bad)


def test_the_rule_scan_catches_each_class(tmp_path):
    """The scan itself can fail: the code this project shipped before is flagged, line by line."""
    src = tmp_path / "old.py"
    src.write_text("import torch\n"
                   "g = torch.Generator().manual_seed(0)\n"
                   "s = torch.load('state.pt', weights_only=False)\n"
                   "o = torch.randperm(5, generator=g)\n"
                   "ok = torch.randperm(5, generator=g, device=g.device)\n")
    bad = _violations([src])
    assert sorted(b.split(": ", 1)[1] for b in bad) == ["torch.Generator() without device=",
                                                 "torch.load() without map_location=",
                                                 "torch.randperm(generator=...) without device= (draws on the CPU)"]


# ----------------------------------------------------------------------------- behaviour, with a stand-in device

class _AccelGenerator:
    """Stands for a generator on an accelerator: only its ``device`` is read before a draw."""

    def __init__(self, device=None):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.real = REAL_GENERATOR(device="cpu").manual_seed(0)

    def manual_seed(self, seed: int) -> "_AccelGenerator":
        self.real.manual_seed(seed)
        return self


def _spy_creation_ops(monkeypatch, calls: list):
    """torch.randperm / randint check that they draw on their generator's device, then run on the CPU."""
    for name in ("randperm", "randint"):
        real = getattr(torch, name)

        def spy(*args, _real=real, _name=name, generator=None, device=None, **kwargs):
            calls.append((_name, torch.device(device) if device is not None else torch.device("cpu"),
                          generator.device))
            real_gen = generator.real if isinstance(generator, _AccelGenerator) else generator
            return _real(*args, generator=real_gen, **kwargs)

        monkeypatch.setattr(torch, name, spy)


@pytest.mark.parametrize("n_items", [6, 2])  # without replacement (randperm), with replacement (randint)
def test_distillm_replay_draws_on_the_rollout_generators_device(monkeypatch, n_items):
    from promptkd.methods.distillm import ReplayBuffer

    buf = ReplayBuffer(capacity=8)
    buf.items.extend({"id": str(i), "prompt_ids": [1, 2], "response_ids": [3, 4]} for i in range(n_items))
    calls: list = []
    _spy_creation_ops(monkeypatch, calls)
    out = buf.sample([2, 2], _AccelGenerator(FAKE_ACCEL))
    assert [len(mb) for mb in out] == [2, 2]
    assert calls and all(op_dev == gen_dev == FAKE_ACCEL for _, op_dev, gen_dev in calls), calls


def _examples(n: int) -> list[TokenizedExample]:
    return [TokenizedExample(id=str(i), prompt_ids=[5] * (2 + i % 3), response_ids=[7, 2], references=["x"],
                             category="c") for i in range(n)]


def _on_stand_in_device(monkeypatch):
    """dist.device() is an accelerator (tensors go to "meta"); torch.Generator records where it was made."""
    monkeypatch.setattr(dist, "device", lambda: torch.device("meta"))
    monkeypatch.setattr(torch, "Generator", _AccelGenerator)


def test_sampled_eval_generator_is_on_the_batch_device(monkeypatch):
    from promptkd.evaluation import core

    _on_stand_in_device(monkeypatch)
    seen = []

    def fake_generate(step_fn, input_ids, attention_mask, params, eos_id, pad_id, vocab, generator=None, **kw):
        seen.append((generator.device, input_ids.device))
        return types.SimpleNamespace(response_ids=torch.zeros(input_ids.shape[0], 1, dtype=torch.long))

    monkeypatch.setattr(core, "generate", fake_generate)
    gen = core.Decoder(step_fn=None, pad_id=0, eos_id=2, vocab_size=16)
    tok = types.SimpleNamespace(decode=lambda ids, skip_special_tokens=True: "a")
    params = core.SamplingParams(max_new_tokens=1, do_sample=True)
    answers = core.generate_answers(gen, tok, _examples(5), params, batch_size=2, seed=10)
    assert answers == ["a"] * 5
    assert seen and all(g == t == torch.device("meta") for g, t in seen), seen


def test_exposure_generator_is_on_the_batch_device(monkeypatch):
    from promptkd.evaluation import exposure

    _on_stand_in_device(monkeypatch)
    seen = []

    def fake_errors(sampler, teacher, student, batch, n_pos, vocab, eos_id, pad_id, generator):
        seen.append((generator.device, batch["input_ids"].device))
        zeros = torch.zeros(batch["input_ids"].shape[0], n_pos)
        return zeros, zeros

    monkeypatch.setattr(exposure, "sample_errors", fake_errors)
    a, b = exposure.prompt_curves(None, None, _examples(3), n_pos=2, samples=1, vocab=16, eos_id=2, pad_id=0,
                                  batch_size=2, seed=1)
    assert a.shape == b.shape == (3, 2)
    assert seen and all(g == t == torch.device("meta") for g, t in seen), seen


# ----------------------------------------------------------------------------- local rank -> device ordinal

@pytest.mark.parametrize("n_devices, expect", [
    (1, [0, 0, 0, 0, 0, 0, 0, 0]),          # srun --gpus-per-task=1: each task sees only its own cuda:0
    (4, [0, 1, 2, 3, 0, 1, 2, 3]),          # 8 tasks sharing 4 visible devices
    (8, [0, 1, 2, 3, 4, 5, 6, 7]),          # torchrun / deepspeed launcher: every device visible
])
def test_device_index_is_the_local_rank_among_visible_devices(n_devices, expect):
    assert [dist.device_index(r, n_devices) for r in range(8)] == expect


def test_device_index_without_a_device_is_an_error():
    with pytest.raises(ValueError, match="no CUDA device"):
        dist.device_index(0, 0)


def test_bind_device_under_srun_with_one_gpu_per_task(monkeypatch):
    """SLURM_LOCALID 3 with one visible GPU: cuda:0, and DeepSpeed's LOCAL_RANK says so too."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", "3")
    dist._bind_device()
    assert chosen == [0]
    assert os.environ["LOCAL_RANK"] == "0"


# ----------------------------------------------------------------------------- vLLM colocated on each rank's device

def _vllm_kwargs(rank: int, world: int, sleep: bool = False) -> dict:
    from promptkd.config import VLLMConfig
    from promptkd.rollout.vllm import engine_kwargs

    return engine_kwargs("/m", "bfloat16", 256, seed=100, opts=VLLMConfig(sleep=sleep), rank=rank, world_size=world)


def test_vllm_engine_is_single_process_in_a_world_of_one():
    kw = _vllm_kwargs(0, 1)
    # the run seed 100 gives the engine of rank 0 the seed of rank 0's rollout generator
    assert "distributed_executor_backend" not in kw and kw["seed"] == 7919 * 100
    assert kw["load_format"] == "dummy" and kw["max_model_len"] == 256 and kw["enable_sleep_mode"] is False


def test_vllm_engines_use_the_external_launcher_one_per_rank():
    """World 2: vLLM's single-process executor would put both engines on cuda:0; the external launcher takes
    each rank's own LOCAL_RANK device, tensor parallelism 1 (one whole engine per rank), seeds apart."""
    ranks = [_vllm_kwargs(r, 2, sleep=True) for r in range(2)]
    for kw in ranks:
        assert kw["distributed_executor_backend"] == "external_launcher"
        assert kw["tensor_parallel_size"] == 1 and kw["enable_sleep_mode"] is True
    assert [kw["seed"] for kw in ranks] == [7919 * 100, 7919 * 100 + 1]
    assert {k: v for k, v in ranks[0].items() if k != "seed"} == {k: v for k, v in ranks[1].items() if k != "seed"}


def test_eval_and_teacher_engines_are_placed_per_rank_too(monkeypatch):
    """eval.engine=vllm and SeqKD's vLLM teacher build their engines through eval_llm: same placement."""
    import sys

    from promptkd.rollout import vllm as rv

    built = []
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=lambda **kw: built.append(kw)))
    for world in (1, 2):
        monkeypatch.setattr(dist, "world_size", lambda w=world: w)
        rv.eval_llm("/m", "bfloat16", 256, 0.3)
    assert "distributed_executor_backend" not in built[0]
    assert built[1]["distributed_executor_backend"] == "external_launcher" and built[1]["tensor_parallel_size"] == 1
