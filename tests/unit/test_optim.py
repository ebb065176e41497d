"""promptkd.optim and the student optimizer's wiring: offload choice, non-finite guard, decay groups, fp32 accumulation."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from promptkd.config import OptimConfig, build_ds_config, load_config
from promptkd.config.deepspeed import offloads_optimizer
from promptkd.methods.soft_prompt import SoftPrompt
from promptkd.models import PromptedTeacher, build_tiny
from promptkd.optim import GuardedAdamW, adamw, nonfinite_count, offload_optimizer_choice, param_groups
from tests.fixtures.cli import REPO, cli_env, tail

# ----------------------------------------------------------------------------- offload: CPU Adam or the fallback


def test_offload_uses_cpu_adam_when_cuda_and_the_op_builds():
    use, why = offload_optimizer_choice(cuda=True, can_build=lambda: (True, "prebuilt"))
    assert use and why == "prebuilt"


def test_offload_falls_back_when_the_op_cannot_build():
    use, why = offload_optimizer_choice(cuda=True, can_build=lambda: (False, "no C++ compiler on PATH"))
    assert not use and "cannot be loaded or built (no C++ compiler on PATH)" in why


def test_offload_without_cuda_falls_back_without_trying_to_build():
    def build():  # compiling takes a minute: never on a machine without CUDA
        raise AssertionError("can_build called without CUDA")

    use, why = offload_optimizer_choice(cuda=False, can_build=build)
    assert not use and why == "no CUDA accelerator"


def test_offloads_optimizer_reads_the_zero_section():
    assert offloads_optimizer({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}})
    assert offloads_optimizer({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}})
    assert not offloads_optimizer({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "none"}}})
    assert not offloads_optimizer({"zero_optimization": {"stage": 2}})


def _cfg(*overrides: str):
    return load_config(None, ["stage=train", "data.train_file=x.jsonl", *overrides])


def test_offloading_config_gets_torch_adamw_and_the_force_flag_off_here(caplog):
    from promptkd.training.builders import student_optimizer

    cfg = _cfg("deepspeed=ds_configs/zero2_offload.json")
    ds = build_ds_config(cfg, 1)
    model = build_tiny("llama", 1, 16, 2, vocab_size=40)
    with caplog.at_level("WARNING"):
        opt = student_optimizer(cfg, model, ds)
    if torch.cuda.is_available():  # pragma: no cover - the GPU path: CPU Adam when it builds
        return
    assert type(opt) is torch.optim.AdamW and ds["zero_force_ds_cpu_optimizer"] is False
    assert "torch AdamW on the CPU, not DeepSpeed's CPU Adam: no CUDA accelerator" in caplog.text
    plain = build_ds_config(_cfg("deepspeed=ds_configs/zero2.json"), 1)
    student_optimizer(_cfg("deepspeed=ds_configs/zero2.json"), model, plain)
    assert "zero_force_ds_cpu_optimizer" not in plain  # only offloading configs need it


# ----------------------------------------------------------------------------- GuardedAdamW: one host read


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", [0, 1, 2])
def test_a_non_finite_value_in_any_tensor_is_detected(bad, where):
    grads = [torch.ones(3, 4), torch.ones(5), torch.ones(2, 2, 2)]
    grads[where].view(-1)[-1] = bad
    assert int(nonfinite_count(grads)) == 1
    grads[(where + 1) % 3].view(-1)[0] = float("nan")
    assert int(nonfinite_count(grads)) == 2


def test_large_finite_gradients_are_not_flagged():
    # a 2-norm of these overflows fp32 (and bf16) to inf; the max-|x| used here does not
    grads = [torch.full((1000,), 3e38), torch.full((10,), 3e38, dtype=torch.bfloat16)]
    assert torch.isinf(grads[0].norm())
    assert int(nonfinite_count(grads)) == 0 and int(nonfinite_count([])) == 0


def test_guarded_adamw_skips_a_non_finite_step_and_takes_a_finite_one():
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, 2))]
    opt = GuardedAdamW(params, lr=0.1)
    params[0].grad = torch.ones(3)
    params[1].grad = torch.tensor([[1.0, float("inf")], [1.0, 1.0]])
    opt.step()
    assert opt.overflow and all(torch.equal(p, torch.ones_like(p)) for p in params) and not opt.state
    params[1].grad = torch.ones(2, 2)
    opt.step()
    assert not opt.overflow and all((p < 1).all() for p in params)


def test_guarded_step_reads_the_host_once(monkeypatch):
    """The finite check is a device reduction; the only host read is the one bool of the step."""
    reads = []
    original = torch.Tensor.__bool__

    def counting(self):
        reads.append(1)
        return original(self)

    params = [torch.nn.Parameter(torch.ones(4)) for _ in range(6)]
    opt = GuardedAdamW(params, lr=0.1)
    for p in params:
        p.grad = torch.ones(4)
    monkeypatch.setattr(torch.Tensor, "__bool__", counting)
    opt.step()
    monkeypatch.undo()
    assert len(reads) == 1, f"{len(reads)} host reads for 6 gradient tensors"


# ----------------------------------------------------------------------------- weight-decay groups (official rule)


def _groups(model: torch.nn.Module) -> tuple[set[str], set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = param_groups(list(model.named_parameters()), 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    return {names[id(p)] for p in decay["params"]}, {names[id(p)] for p in no_decay["params"]}


def test_gpt2_biases_and_layer_norms_do_not_decay():
    decay, no_decay = _groups(build_tiny("gpt2", 2, 16, 2, vocab_size=40))
    assert no_decay == {n for n in no_decay | decay
                        if n.endswith(".bias") or n.split(".")[-2] in ("ln_1", "ln_2", "ln_f")}
    assert "transformer.h.0.ln_1.weight" in no_decay and "transformer.ln_f.weight" in no_decay
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.h.1.attn.c_attn.weight",
            "transformer.h.1.mlp.c_fc.weight"} <= decay


def test_opt_and_llama_decay_their_norms_as_the_official_code_does():
    from transformers import AutoModelForCausalLM, OPTConfig

    opt = AutoModelForCausalLM.from_config(OPTConfig(vocab_size=40, hidden_size=16, word_embed_proj_dim=16,
                                                     ffn_dim=32, num_hidden_layers=2, num_attention_heads=2))
    decay, no_decay = _groups(opt)
    assert no_decay and all(n.endswith(".bias") for n in no_decay)
    assert "model.decoder.layers.0.self_attn_layer_norm.weight" in decay
    assert "model.decoder.final_layer_norm.weight" in decay
    decay, no_decay = _groups(build_tiny("llama", 2, 16, 2, vocab_size=40))
    assert not no_decay  # LLaMA has no biases and its norms are not named ln_*
    assert {"model.norm.weight", "model.layers.0.input_layernorm.weight"} <= decay


def test_frozen_parameters_are_left_out():
    model = build_tiny("gpt2", 1, 16, 2, vocab_size=40)
    model.transformer.wpe.weight.requires_grad_(False)
    decay, no_decay = _groups(model)
    assert "transformer.wpe.weight" not in decay | no_decay


def test_student_and_prompt_optimizers_use_the_groups():
    from promptkd.training.builders import student_optimizer

    cfg = _cfg("deepspeed=ds_configs/zero1.json", "optim.student.weight_decay=0.05")
    model = build_tiny("gpt2", 1, 16, 2, vocab_size=40)
    student = student_optimizer(cfg, model, build_ds_config(cfg, 1))
    expected = param_groups(list(model.named_parameters()), 0.05)
    assert [[id(p) for p in g["params"]] for g in student.param_groups] == \
        [[id(p) for p in g["params"]] for g in expected]
    assert [g["weight_decay"] for g in student.param_groups] == [0.05, 0.0]
    # the official prompt optimizer takes every trainable parameter of the prompted teacher at the run's decay
    teacher = PromptedTeacher(build_tiny("llama", 1, 16, 2, vocab_size=40), prompt_length=3, init="random",
                              dtype=torch.float32)
    prompt = SoftPrompt(teacher, OptimConfig(weight_decay=0.03), 10, 1.0, "tiny")
    groups = prompt.optimizer.param_groups
    assert len(groups) == 1 and groups[0]["params"] == [teacher.prompt] and groups[0]["weight_decay"] == 0.03


def test_cpu_adam_gets_the_same_groups(monkeypatch):
    """With the op available, the CPU Adam is built in AdamW mode over the same groups, betas, eps."""
    import deepspeed.ops.adam as ds_adam

    seen = {}

    class FakeCPUAdam:
        def __init__(self, groups, **kwargs):
            seen.update(groups=groups, **kwargs)

    monkeypatch.setattr(ds_adam, "DeepSpeedCPUAdam", FakeCPUAdam)
    model = build_tiny("gpt2", 1, 16, 2, vocab_size=40)
    opt = OptimConfig(lr=1e-3, betas=[0.8, 0.9], eps=1e-6, weight_decay=0.02)
    assert isinstance(adamw(list(model.parameters()), opt, list(model.named_parameters()), cpu_adam=True),
                      FakeCPUAdam)
    assert seen["adamw_mode"] is True and seen["betas"] == (0.8, 0.9) and seen["eps"] == 1e-6 and seen["lr"] == 1e-3
    assert [g["weight_decay"] for g in seen["groups"]] == [0.02, 0.0]


# ----------------------------------------------------------------------------- fp32 gradient accumulation


@pytest.mark.parametrize("ds_json,stage", [("zero0", 0), ("zero1", 1), ("zero2", 2), ("zero2_offload", 2),
                                           ("zero3", 3)])
def test_bf16_merged_config_asks_for_fp32_accumulation(ds_json, stage):
    ds = build_ds_config(_cfg(f"deepspeed=ds_configs/{ds_json}.json", "train.precision=bf16",
                              "train.grad_accum=4"), 1)
    if stage == 0:  # DeepSpeed 0.19.8 raises NotImplementedError for bf16 + fp32 accumulation without ZeRO
        assert "data_types" not in ds
    else:
        assert ds["data_types"] == {"grad_accum_dtype": "fp32"}
    fp32 = build_ds_config(_cfg(f"deepspeed=ds_configs/{ds_json}.json", "train.precision=fp32"), 1)
    assert "data_types" not in fp32


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> dict:
    """bf16 engines at ZeRO 0-3 (+ offload) built by build_student_engine in one subprocess (own process group)."""
    out = tmp_path_factory.mktemp("gacc") / "probe.json"
    proc = subprocess.run(["timeout", "300", sys.executable, os.path.join(REPO, "tests", "fixtures",
                                                                          "grad_accum_probe.py"), str(out)],
                          cwd=REPO, env=cli_env(), capture_output=True, text=True)
    assert proc.returncode == 0 and out.exists(), tail(proc.stdout + proc.stderr, 40)
    return json.loads(out.read_text())


# What DeepSpeed 0.19.8 accumulates in, per stage, with grad_accum_dtype=fp32 under bf16 (see
# promptkd/config/deepspeed.py set_fp32_grad_accum): the buffer names are DeepSpeed's own attributes.
FP32_BUFFERS = {
    "zero1": ("BF16_Optimizer", "fp32_groups_gradients_flat"),
    "zero1_offload": ("DeepSpeedZeroOptimizer", "param.grad_accum"),
    "zero2": ("DeepSpeedZeroOptimizer", "averaged_gradients"),
    "zero2_offload": ("DeepSpeedZeroOptimizer", "averaged_gradients"),
    "zero3": ("DeepSpeedZeroOptimizer_Stage3", "grad_partitions_flat_buffer"),
    "zero3_offload": ("DeepSpeedZeroOptimizer_Stage3", "grad_partitions_flat_buffer"),
}


@pytest.mark.parametrize("case", sorted(FP32_BUFFERS))
def test_bf16_engines_accumulate_in_fp32(engines, case):
    res = engines[case]
    assert "error" not in res, res
    optimizer, buffer = FP32_BUFFERS[case]
    assert res["optimizer"] == optimizer
    assert res["accumulation"].get(buffer) == ["torch.float32"], res["accumulation"]
    assert res["global_steps"] == 1 and res["skipped_steps"] == 0 and res["stepped"] in (True, None)


def test_bf16_engine_without_zero_still_steps(engines):
    res = engines["zero0"]
    assert "error" not in res, res
    assert res["data_types"] is None and res["stepped"] is True and res["global_steps"] == 1
