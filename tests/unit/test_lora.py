"""LoRA students (model.student.lora): config, frozen base, merged weights, export, the planner's lines."""
from __future__ import annotations

import json
import os
import re
from types import SimpleNamespace

import pytest
import torch

from promptkd.config import ConfigError, OptimConfig, load_config
from promptkd.models import build_tiny
from promptkd.models import lora as L
from promptkd.optim import adamw, param_groups


def _cfg(**kw):
    return SimpleNamespace(**{"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": "all-linear", **kw})


def _tiny(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_tiny(arch, 2, 32, 4, vocab_size=97, max_positions=64).eval()


def _adapted(arch: str, **kw) -> torch.nn.Module:
    model = L.apply_lora(_tiny(arch), _cfg(**kw), seed=11)
    torch.manual_seed(5)
    with torch.no_grad():  # B starts at 0 (adapted == base); give it values so the merge matters
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.2)
    return model


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[3, 17, 42, 5, 9, 60, 2, 11]])


# ----------------------------------------------------------------------------- config

@pytest.mark.parametrize("override, message", [
    ("model.student.lora.r=-1", "model.student.lora.r: must be >= 0"),
    ("model.student.lora.r=2.5", "model.student.lora.r: expected int"),
    ("model.student.lora.target_modules=attention", "model.student.lora.target_modules: must be all-linear"),
    ("model.student.lora.target_modules=[]", "model.student.lora.target_modules: must be all-linear"),
    ("model.student.lora.alpha=0", "model.student.lora.alpha: must be > 0"),
    ("model.student.lora.dropout=1.0", "model.student.lora.dropout: must be in [0, 1)"),
])
def test_bad_lora_keys_are_one_line_errors_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, ["data.synthetic.enabled=true", override])


def test_lora_keys_load_and_default_off():
    cfg = load_config(None, ["data.synthetic.enabled=true"])
    assert cfg.model.student.lora.r == 0 and not L.enabled(cfg.model.student.lora)
    cfg = load_config(None, ["data.synthetic.enabled=true", "model.student.lora.r=8",
                             "model.student.lora.target_modules=[q_proj,v_proj]"])
    assert L.enabled(cfg.model.student.lora) and cfg.model.student.lora.target_modules == ["q_proj", "v_proj"]


def test_lora_off_leaves_the_student_alone():
    model = _tiny("llama")
    assert L.apply_lora(model, _cfg(r=0), seed=1) is model
    assert not L.has_lora(model) and all(p.requires_grad for p in model.parameters())


def _no_scan(module):
    raise AssertionError("has_lora walked the modules")


def test_has_lora_without_peft_loaded_never_walks_the_model(monkeypatch):
    """Rollouts ask per call: with LoRA off, peft need not be installed and nothing is walked."""
    import sys

    monkeypatch.delitem(sys.modules, "peft", raising=False)
    monkeypatch.setattr(L, "lora_layers", _no_scan)
    assert not L.has_lora(_tiny("llama"))


def test_has_lora_is_answered_once_per_model(monkeypatch):
    adapted, plain = _adapted("llama"), _tiny("llama")
    assert not L.has_lora(plain)  # first answer: walked, cached
    monkeypatch.setattr(L, "lora_layers", _no_scan)
    assert L.has_lora(adapted) and not L.has_lora(plain)


# ----------------------------------------------------------------------------- training state

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_only_adapters_train_and_carry_optimizer_state(arch):
    model = L.apply_lora(_tiny(arch), _cfg(), seed=3)
    named = list(model.named_parameters())
    trainable = {n for n, p in named if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # every linear layer but the head is adapted; embeddings, norms and the head are frozen
    assert not any("lm_head" in n or "embed" in n or "wte" in n for n in trainable)
    groups = param_groups(named, 0.01)
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    opt = adamw([p for _, p in named], OptimConfig(lr=1e-2), named)
    base = {n: p.detach().clone() for n, p in named if not p.requires_grad}
    logits = model.train()(input_ids=IDS).logits
    logits.float().logsumexp(-1).mean().backward()
    opt.step()
    by_id = {id(p): n for n, p in named}
    assert {by_id[id(p)] for p in opt.state} == trainable  # optimizer state for the adapters only
    for n, p in named:
        if n in base:
            assert p.grad is None and torch.equal(p, base[n]), n
    # same seed, same adapters (every rank starts alike); B at zero: the adapted student is the base
    again = L.apply_lora(_tiny(arch), _cfg(), seed=3)
    fresh = dict(again.named_parameters())
    assert all(torch.equal(fresh[n], p) for n, p in L.apply_lora(_tiny(arch), _cfg(), seed=3).named_parameters())
    assert torch.equal(_logits(again.eval(), IDS), _logits(_tiny(arch), IDS))


def test_named_target_modules_adapt_only_those():
    model = L.apply_lora(_tiny("llama"), _cfg(target_modules=["q_proj", "v_proj"]), seed=3)
    names = {n.rsplit(".", 1)[-1] for n, _ in L.lora_layers(model)}
    assert names == {"q_proj", "v_proj"} and len(L.lora_layers(model)) == 4
    with pytest.raises(ConfigError, match="model.student.lora.target_modules"):
        L.apply_lora(_tiny("llama"), _cfg(target_modules=["no_such_layer"]), seed=3)


# ----------------------------------------------------------------------------- merged weights

@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: Conv1D, W is [in, out] (fan_in_fan_out)
def test_merged_state_dict_is_the_adapted_model(arch):
    model = _adapted(arch)
    merged = L.merge_state_dict(model, model.state_dict())
    plain = _tiny(arch, seed=99)
    assert set(merged) == set(plain.state_dict())
    plain.load_state_dict(merged)
    adapted, again = _logits(model, IDS), _logits(plain, IDS)
    assert (adapted - _logits(_tiny(arch), IDS)).abs().max() > 1e-2  # the adapters change the outputs
    torch.testing.assert_close(again, adapted, rtol=0, atol=1e-5)
    # nothing was merged into the training weights
    assert all(".lora_" in n or ".base_layer." in n or n in merged for n in model.state_dict())
    assert torch.equal(model.state_dict()["lm_head.weight"], _tiny(arch).state_dict()["lm_head.weight"])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_vllm_sync_stream_equals_the_merged_state_dict(arch):
    model = _adapted(arch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    streamed = dict(L.merged_parameters(model))
    merged = L.merge_state_dict(model, model.state_dict())
    names = {n for n, _ in _tiny(arch).named_parameters()}
    assert set(streamed) == names  # HF names, no adapter tensors
    for n, t in streamed.items():
        assert torch.equal(t, merged[n]), n
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_merge_in_bf16_rounds_once():
    w = torch.randn(16, 8).bfloat16()
    a, b = torch.randn(4, 8).bfloat16(), torch.randn(16, 4).bfloat16()
    out = L.merged_weight(w, a, b, 0.5, False)
    exact = (w.double() + 0.5 * b.double() @ a.double()).bfloat16()
    assert out.dtype == torch.bfloat16 and (out.float() - exact.float()).abs().max() <= 2 ** -6 * exact.abs().max()
    torch.testing.assert_close(L.merged_weight(w.T, a, b, 0.5, True), out.T)


# ----------------------------------------------------------------------------- export

class _Tok:
    def save_pretrained(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "tokenizer_marker.json"), "w") as fh:
            fh.write("{}")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_export_is_a_plain_hf_model_with_the_adapter_beside_it(tmp_path, arch):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from promptkd.training.checkpoint import export_student

    model = _adapted(arch)
    out = str(tmp_path / "export")
    export_student(SimpleNamespace(module=model), _Tok(), out)
    weights = load_file(os.path.join(out, "model.safetensors"))
    assert not any("lora_" in k or "base_layer" in k for k in weights)
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, no peft
    torch.testing.assert_close(_logits(loaded, IDS), _logits(model, IDS), rtol=0, atol=1e-5)
    adapter = os.path.join(out, L.ADAPTER_DIR)
    with open(os.path.join(adapter, "adapter_config.json")) as fh:
        conf = json.load(fh)
    assert conf["r"] == 4 and conf["lora_alpha"] == 8.0 and conf["peft_type"] == "LORA"
    assert not any(f.endswith(".safetensors") for f in os.listdir(adapter) if f != "adapter_model.safetensors")
    peft_model = PeftModel.from_pretrained(_tiny(arch), adapter).eval()  # the base + the saved adapter
    torch.testing.assert_close(_logits(peft_model, IDS), _logits(model, IDS), rtol=0, atol=1e-5)


def _fake_checkpoint(ckpt, model: torch.nn.Module, with_adapter_config: bool = True) -> None:
    """A ZeRO-0 checkpoint dir as training.checkpoint.save lays it out (without DeepSpeed)."""
    from promptkd.training import checkpoint as C

    os.makedirs(ckpt / "ds")
    torch.save({"module": model.state_dict()}, ckpt / "ds" / "mp_rank_00_model_states.pt")
    torch.save({}, ckpt / "state.pt")
    model.config.to_json_file(str(ckpt / "hf_config.json"))
    if with_adapter_config:
        L.save_adapter_config(model, str(ckpt / C.ADAPTER_CONFIG_DIR))
    (ckpt / C.MARKER).write_text("1\n")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_consolidate_merges_a_lora_checkpoint_like_export(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    from promptkd.training.consolidate import consolidate

    model = _adapted(arch)
    _fake_checkpoint(tmp_path / "step_1", model)
    consolidate(str(tmp_path / "step_1"), str(tmp_path / "out"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()  # plain transformers, no adapters
    assert not any("lora_" in n or "base_layer" in n for n, _ in loaded.named_parameters())
    torch.testing.assert_close(_logits(loaded, IDS), _logits(model, IDS), rtol=0, atol=1e-5)
    with open(tmp_path / "out" / L.ADAPTER_DIR / "adapter_config.json") as fh:
        assert json.load(fh)["r"] == 4
    assert not (tmp_path / "out.tmp").exists()


def test_consolidating_a_lora_checkpoint_without_its_adapter_config_says_so(tmp_path):
    from promptkd.training.consolidate import main

    _fake_checkpoint(tmp_path / "step_1", _adapted("llama"), with_adapter_config=False)
    assert main([str(tmp_path / "step_1"), str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


# ----------------------------------------------------------------------------- planner

def test_planner_counts_adapter_params_exactly():
    from promptkd.plan.arch import from_hf_config
    from promptkd.plan.memory import lora_params
    from promptkd.models import tiny_config

    for arch, targets in (("llama", "all-linear"), ("llama", ["q_proj", "v_proj"]), ("gpt2", "all-linear"),
                          ("gpt2", ["c_attn"])):
        shape = from_hf_config(tiny_config(arch, 2, 32, 4, 97, 64, 48), arch, "k")
        model = L.apply_lora(build_tiny(arch, 2, 32, 4, 97, 64, 48), _cfg(r=4, target_modules=targets), seed=1)
        real = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert lora_params(shape, 4, targets) == real, (arch, targets)
    # written out: llama, h=32, i=48, 2 layers, r=4: q,k,v,o 4·(32+32) each, gate/up 4·(32+48), down 4·(48+32)
    llama = from_hf_config(tiny_config("llama", 2, 32, 4, 97, 64, 48), "llama", "k")
    assert lora_params(llama, 4, "all-linear") == 2 * (4 * 4 * 64 + 3 * 4 * 80) == 3_968
    # gpt2: c_attn 4·(32+96), attn c_proj 4·(32+32), c_fc 4·(32+48), mlp c_proj 4·(48+32)
    gpt2 = from_hf_config(tiny_config("gpt2", 2, 32, 4, 97, 64, 48), "gpt2", "k")
    assert lora_params(gpt2, 4, "all-linear") == 2 * 4 * (128 + 64 + 80 + 80) == 2_816


def test_plan_counts_the_frozen_base_and_the_adapters_states():
    from promptkd.plan.core import plan_config, resolve_models
    from promptkd.plan.memory import lora_params

    over = ["data.synthetic.enabled=true", "stage=plan", "plan.student_arch=llama-7b", "plan.teacher_arch=llama-13b",
            "train.precision=bf16", "deepspeed=ds_configs/zero2.json", "plan.world_size=8"]
    full = plan_config(load_config(None, over))
    cfg = load_config(None, over + ["model.student.lora.r=16", "model.student.lora.target_modules=[q_proj,v_proj]"])
    plan = plan_config(cfg)
    lines = {line.check or line.term: line.bytes for line in plan.resident}
    full_lines = {line.check or line.term: line.bytes for line in full.resident}
    n_base = 6_738_415_616  # LLaMA-7B
    n = lora_params(resolve_models(cfg).student, 16, ["q_proj", "v_proj"])
    assert n == 32 * 2 * 16 * (4096 + 4096) == 8_388_608
    # weights: the frozen base in bf16 plus the adapters in bf16 (ZeRO-2 keeps them whole)
    assert lines["params"] == (n_base + n) * 2 == full_lines["params"] + 2 * n
    # gradients: the adapters only; ZeRO-2 with bf16 accumulates them in fp32, a 1/8 partition
    assert lines["grads"] == -(-n // 8) * 4
    # AdamW: two fp32 moments + the fp32 master, for the adapters' 1/8 partition only
    assert lines["optimizer"] == -(-n // 8) * (8 + 4)
    assert lines["optimizer"] < full_lines["optimizer"] / 500
    step = plan.phases["optimizer_step"][0].bytes
    assert step == -(-n // 8) * (2 * 4)  # AdamW's temporaries; bf16 grads at ZeRO-2 are fp32 already
