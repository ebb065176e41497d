"""The memory planner's formulas against written-out sums and against Hugging Face's real modules."""
from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, OPTConfig

from promptkd.config import ConfigError, load_config, parse_bytes
from promptkd.plan import memory as M
from promptkd.plan import plan_config
from promptkd.plan.arch import from_hf_config, load_shipped, resolve

GiB = 2 ** 30


def _hf(family: str, layers: int, h: int = 64, a: int = 4, i: int = 320, dropout: float = 0.0):
    if family == "llama":
        return LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=layers, num_attention_heads=a,
                           num_key_value_heads=a, vocab_size=512, tie_word_embeddings=False)
    if family == "gpt2":
        return GPT2Config(n_embd=h, n_layer=layers, n_head=a, n_inner=i, vocab_size=512, resid_pdrop=dropout,
                          embd_pdrop=dropout, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return OPTConfig(hidden_size=h, ffn_dim=i, num_hidden_layers=layers, num_attention_heads=a, vocab_size=512,
                     word_embed_proj_dim=h, dropout=dropout, attention_dropout=0.0)


def _saved_bytes(config, dtype, frozen: bool, batch: int = 2, seq: int = 40, keep: int = 1) -> int:
    """Storage bytes autograd keeps for backward in one forward (parameters excluded), as in training."""
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(dtype).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    ids = torch.randint(0, 512, (batch, seq))
    att = torch.ones(batch, seq, dtype=torch.long)
    att[0, :3] = 0  # left padding, as rollouts have
    kw = {"input_ids": ids}
    if frozen:  # the teacher: weights frozen, the input (the prompt's path) needs grad
        model.requires_grad_(False)
        kw = {"inputs_embeds": model.get_input_embeddings()(ids).detach().requires_grad_(True)}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(attention_mask=att, position_ids=(att.cumsum(-1) - 1).clamp(min=0), use_cache=False,
                    logits_to_keep=keep, **kw)
    del out
    return sum(saved.values())


CASES = [(f, d, fr, dr) for f in ("llama", "gpt2", "opt") for d in (torch.float32, torch.bfloat16)
         for fr in (False, True) for dr in ((0.0, 0.1) if f != "llama" else (0.0,))]


@pytest.mark.parametrize("family,dtype,frozen,dropout", CASES)
def test_layer_formula_equals_what_the_hf_layer_saves(family, dtype, frozen, dropout):
    """LAYER_SAVED: one more decoder layer adds exactly the planned bytes, for each family, dtype and mode."""
    batch, seq = 2, 40
    measured = (_saved_bytes(_hf(family, 2, dropout=dropout), dtype, frozen, batch, seq)
                - _saved_bytes(_hf(family, 1, dropout=dropout), dtype, frozen, batch, seq))
    arch = from_hf_config(_hf(family, 2, dropout=dropout), "t", "k")
    e = torch.tensor([], dtype=dtype).element_size()
    assert measured == M.layer_saved(arch, M.Shape(batch, seq, 1), e, frozen, dropout > 0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("frozen", [False, True])
def test_whole_forward_saved_bytes_within_two_percent(family, frozen):
    """All layers + the final norm + the LM head input vs what a 4-layer forward keeps (bf16)."""
    batch, seq, keep = 2, 48, 17
    cfg = _hf(family, 4, h=96, a=4, i=256)
    measured = _saved_bytes(cfg, torch.bfloat16, frozen, batch, seq, keep)
    arch = from_hf_config(cfg, "t", "k")
    s = M.Shape(batch, seq, keep)
    planned = M.activations(arch, s, 2, frozen, False, False)
    assert planned == pytest.approx(measured, rel=0.02)


KNOWN_PARAMS = {"gpt2": 124_439_808, "gpt2-xl": 1_557_611_200, "llama-7b": 6_738_415_616,
                "llama-13b": 13_015_864_320}


@pytest.mark.parametrize("name", sorted(KNOWN_PARAMS))
def test_shipped_architectures_have_the_published_parameter_counts(name):
    assert load_shipped(name, "k").n_params == KNOWN_PARAMS[name]


def test_model_states_are_the_written_out_sums():
    arch = load_shipped("gpt2", "k")
    n, w = arch.n_params, 8
    part = -(-n // w)
    z0, z2, z3 = M.Zero(0), M.Zero(2, reduce_bucket=1000), M.Zero(3, reduce_bucket=1000)
    # ZeRO-0 fp32: 4N weights, 4N gradients, 8N AdamW moments (no separate master copy)
    assert (M.student_params(arch, z0, 4, w), M.student_grads(arch, z0, 4, w),
            M.student_optimizer(arch, z0, 4, w)) == (4 * n, 4 * n, 8 * n)
    # ZeRO-2 bf16: 2N weights, 2N/W gradients, (4 + 8)N/W fp32 master + moments
    assert (M.student_params(arch, z2, 2, w), M.student_grads(arch, z2, 2, w),
            M.student_optimizer(arch, z2, 2, w)) == (2 * n, 2 * part, 12 * part)
    # ZeRO-3 bf16: 2N/W weights (+ small persistent ones), 2N/W gradients + the reduce bucket
    persistent = sum(x for x in arch.param_sizes if x < z3.persistence_threshold) * 2
    assert M.student_params(arch, z3, 2, w) == 2 * part + persistent
    assert M.student_grads(arch, z3, 2, w) == 2 * part + 2 * 1000
    # optimizer offload: nothing of it on the GPU
    off = M.Zero(2, offload_optimizer=True)
    assert M.student_optimizer(arch, off, 2, w) == 0 and M.student_optimizer_cpu(arch, off, 2, w) == 12 * part
    # the step itself: two fp32 AdamW temporaries per updated parameter, plus fp32 gradients under ZeRO/16 bits
    assert M.optimizer_step(arch, z0, 4, w) == 8 * n and M.optimizer_step(arch, z2, 2, w) == 12 * part
    assert M.optimizer_step(arch, off, 2, w) == 0
    assert M.prompt_states(7, 1600) == 7 * 1600 * 16
    s = M.Shape(4, 100, 33)
    assert M.logits(s, 50257, 2) == 4 * 33 * 50257 * 2
    assert M.kv_cache(arch, 4, 100, 2) == 12.5 * 2 * 4 * 100 * 768 * 2


@pytest.mark.parametrize("text,expected", [("80GiB", 80 * GiB), ("81920MiB", 80 * GiB), ("40GB", 40 * 10 ** 9),
                                           ("1.5e9", 1_500_000_000), (" 2 gib ", 2 * GiB)])
def test_memory_strings(text, expected):
    assert parse_bytes("plan.gpu_memory", text) == expected


@pytest.mark.parametrize("text", ["80", "lots", "80XB", "-3GiB", "0GiB", ""])
def test_bad_memory_strings_name_the_key(text):
    if text == "80":  # a bare number is bytes: valid
        assert parse_bytes("plan.gpu_memory", text) == 80
        return
    with pytest.raises(ConfigError, match=r"^plan\.gpu_memory: cannot read"):
        parse_bytes("plan.gpu_memory", text)


def test_config_validation_rejects_a_bad_memory_string():
    with pytest.raises(ConfigError, match=r"^plan\.overhead: cannot read 'two'"):
        load_config(None, ["stage=plan", "plan.overhead=two"])


def test_architecture_resolution(tmp_path):
    arch, how = resolve("runs/sft/gpt2-xl/export", "", "model.teacher.path", "plan.teacher_arch")
    assert arch.n_params == KNOWN_PARAMS["gpt2-xl"] and "shipped gpt2-xl" in how
    arch, how = resolve("huggyllama/llama-7b", "", "model.student.path", "plan.student_arch")
    assert arch.n_params == KNOWN_PARAMS["llama-7b"]
    with pytest.raises(ConfigError, match=r"^plan\.student_arch: unknown model size 'llama-70b'"):
        resolve("x", "llama-70b", "model.student.path", "plan.student_arch")
    with pytest.raises(ConfigError, match=r"^model\.student\.path: cannot find the architecture of 'runs/mine'"):
        resolve("runs/mine", "", "model.student.path", "plan.student_arch")
    _hf("llama", 3).save_pretrained(tmp_path)  # a local dir: its config.json, exactly
    arch, how = resolve(str(tmp_path), "", "model.student.path", "plan.student_arch")
    with torch.device("meta"):
        real = AutoModelForCausalLM.from_config(_hf("llama", 3))
    assert how == "config.json" and arch.n_params == sum(p.numel() for p in real.parameters())
    assert json.load(open(os.path.join(tmp_path, "config.json")))["num_hidden_layers"] == arch.layers == 3


def test_largest_micro_batch_is_the_boundary():
    cfg = load_config("configs/gpt2-xl_to_gpt2-base.yaml", ["plan.world_size=8", "plan.gpu_memory=24GiB"])
    plan = plan_config(cfg)
    best = plan.max_micro_batch
    assert best >= 1
    assert plan_config(cfg, micro_batch=best).fits and not plan_config(cfg, micro_batch=best + 1).fits


def test_every_line_names_the_keys_that_move_it():
    cfg = load_config("configs/llama-13b_to_llama-7b.yaml", ["plan.world_size=4"])
    plan = plan_config(cfg)
    lines = plan.resident + [x for xs in plan.phases.values() for x in xs] + [plan.overhead]
    assert lines and all(line.keys for line in lines)
    assert set(plan.phases) == {"rollout", "prompt_step", "student_step", "optimizer_step"}


def test_loss_buffers_fused_or_autograd():
    s = M.Shape(4, 100, 33)
    # autograd losses: three fp32 [N, V] tensors over all K positions, or over one chunk of positions
    assert M.loss_chunk(s, 1000, 0, fused=False) == 3 * 4 * 33 * 1000 * 4
    assert M.loss_chunk(s, 1000, 8, fused=False) == 3 * 4 * 8 * 1000 * 4
    # fused KL: four fp32 buffers of an automatic ~16 MB chunk (here all 33 positions fit in one)
    assert M.loss_chunk(s, 1000, 0, fused=True) == 4 * 4 * 33 * 1000 * 4
    assert M.loss_chunk(M.Shape(4, 600, 513), 32000, 0, fused=True) == 4 * 4 * ((1 << 22) // (4 * 32000)) * 32000 * 4


@pytest.mark.parametrize("overrides,fused", [
    (["method.name=promptkd"], True), (["method.name=rkl"], True), (["method.name=sft"], False),
    (["method.name=kd"], True), (["method.name=kd", "method.kd.ce_weight=0.5"], False),
    (["method.name=gkd"], False), (["method.name=gkd", "method.gkd.divergence=rkl"], True),
    (["method.name=imitkd"], True), (["method.name=imitkd", "method.imitkd.divergence=tvd"], False),
    (["method.name=distillm"], False), (["method.name=seqkd"], False)])
def test_each_method_says_whether_its_loss_is_fused(overrides, fused):
    """Method.fused_loss mirrors what the method calls: forward/reverse KL are fused, the rest run autograd."""
    from promptkd.methods import METHODS

    cfg = load_config(None, ["stage=plan", *overrides])
    assert METHODS[cfg.method.name].fused_loss(cfg) is fused
