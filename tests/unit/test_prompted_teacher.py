"""PromptedTeacher and model loading on tiny random models (no hub access)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import PreTrainedTokenizerFast

from promptkd.models import (
    PROMPT_DIR,
    PROMPT_META,
    PROMPT_WEIGHTS,
    PromptedTeacher,
    build_tiny,
    check_vocab,
    load_pretrained,
    load_prompt,
)

VOCAB = 97
ARCHS = ["llama", "gpt2"]
WORDS = ["<pad>", "<unk>", "Suppose", "you", "are", "a", "student.", "hello", "world"]


def _tiny(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_tiny(arch, layers=2, hidden=32, heads=4, vocab_size=VOCAB, max_positions=64)


def _teacher(arch: str, prompt_length: int = 4, dtype: torch.dtype = torch.float32, **kw):
    kw.setdefault("init", "random")
    return PromptedTeacher(_tiny(arch), prompt_length=prompt_length, dtype=dtype, **kw)


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(WORDS)}
    backend = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _left_padded(
    lengths: list[int], total: int, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch of random sequences of the given real lengths, left-padded with id 0."""
    ids = _ids(len(lengths), total, seed)
    mask = torch.ones(len(lengths), total, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, : total - n] = 0
        ids[row, : total - n] = 0
    return ids, mask


# ---------------------------------------------------------------- loading


@pytest.mark.parametrize("arch", ARCHS)
def test_build_tiny_shapes_and_config(arch: str) -> None:
    model = build_tiny(arch, layers=2, hidden=48, heads=4, vocab_size=VOCAB, max_positions=32,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg = model.config
    assert cfg.vocab_size == VOCAB and cfg.num_hidden_layers == 2 and cfg.hidden_size == 48
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (0, 1, 2)
    assert cfg.max_position_embeddings == 32
    logits = model(input_ids=_ids(2, 5)).logits
    assert logits.shape == (2, 5, VOCAB)
    # Dropout 0: train mode gives the same output as eval mode.
    model.train()
    again = model(input_ids=_ids(2, 5)).logits
    assert torch.equal(logits, again)


def test_build_tiny_llama_unties_embeddings_and_unknown_arch() -> None:
    model = build_tiny("llama", 2, 32, 4, VOCAB)
    assert model.get_input_embeddings().weight.data_ptr() != model.lm_head.weight.data_ptr()
    assert model.config.intermediate_size == 4 * 32
    with pytest.raises(ValueError, match="mamba"):
        build_tiny("mamba", 2, 32, 4, VOCAB)


def test_load_pretrained_round_trip_and_missing_path(tmp_path) -> None:
    model = _tiny("llama")
    model.save_pretrained(tmp_path / "m")
    loaded = load_pretrained(str(tmp_path / "m"), dtype=torch.bfloat16)
    assert next(loaded.parameters()).dtype == torch.bfloat16
    ref = model.get_input_embeddings().weight.to(torch.bfloat16)
    assert torch.equal(loaded.get_input_embeddings().weight, ref)
    missing = str(tmp_path / "nope")
    with pytest.raises(ValueError, match=r"model\.path: cannot load '.*nope'"):
        load_pretrained(missing, dtype=torch.float32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"model\.path: cannot load"):
        load_pretrained(str(tmp_path / "empty"), dtype=torch.float32)


def test_check_vocab() -> None:
    assert check_vocab(100, 100, 100) == 100
    assert check_vocab(100, 128, 100) == 100  # padded teacher vocab is fine
    assert check_vocab(100, 128, 112) == 100
    with pytest.raises(ValueError, match=r"teacher vocab is 90 and student vocab is 100"):
        check_vocab(100, 90, 100)
    with pytest.raises(ValueError, match="student"):
        check_vocab(100, 100, 99)


# ---------------------------------------------------------------- forward


@pytest.mark.parametrize("arch", ARCHS)
def test_zero_length_prompt_equals_base(arch: str) -> None:
    teacher = _teacher(arch, prompt_length=0)
    assert teacher.prompt.shape == (0, 32)
    ids = _ids(2, 6)
    mask = torch.ones_like(ids)
    logits, _ = teacher(ids, mask)
    assert torch.equal(logits, teacher.base(input_ids=ids, attention_mask=mask).logits)
    # Left padded: same as the base given the pad-aware positions.
    ids, mask = _left_padded([3, 6], 6)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    ref = teacher.base(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert torch.equal(teacher(ids, mask)[0], ref)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_left_padding_does_not_change_real_token_logits(arch, dtype, tol) -> None:
    # Tiny random models give logits with std ~0.1 and a prompt effect ~0.2-0.4,
    # so these tolerances are well below the signal; fp32 measured ~6e-8.
    teacher = _teacher(arch, prompt_length=5, dtype=dtype)
    ids, mask = _left_padded([3, 7, 5], 7)
    batched, _ = teacher(ids, mask)
    assert batched.shape == (3, 7, VOCAB)
    for row, n in enumerate([3, 7, 5]):
        single, _ = teacher(ids[row:row + 1, -n:], torch.ones(1, n, dtype=torch.long))
        diff = (batched[row, -n:].float() - single[0].float()).abs().max().item()
        assert diff <= tol, f"row {row}: max diff {diff}"
    # The prompt matters: without it the logits differ.
    plain, _ = teacher(ids, mask, use_prompt=False)
    assert (plain.float() - batched.float()).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_only_prompt_gets_gradients(arch: str) -> None:
    teacher = _teacher(arch, prompt_length=3, dtype=torch.bfloat16)
    teacher.train()  # the prompt step's mode: dropout may be on, the weights stay frozen
    assert teacher.base.training and teacher.training
    assert teacher.prompt.dtype == torch.float32
    assert all(not p.requires_grad for p in teacher.base.parameters())
    assert all(p.dtype == torch.bfloat16 for p in teacher.base.parameters())
    ids, mask = _left_padded([2, 5], 5)
    logits, _ = teacher(ids, mask)
    assert logits.dtype == torch.bfloat16
    logits.float().logsumexp(-1)[mask.bool()].sum().backward()
    assert all(p.grad is None for p in teacher.base.parameters())
    assert teacher.prompt.grad is not None and teacher.prompt.grad.dtype == torch.float32
    assert teacher.prompt.grad.abs().sum() > 0


def test_adamw_step_moves_prompt_only() -> None:
    teacher = _teacher("llama", prompt_length=3, dtype=torch.bfloat16)
    before = {k: v.clone() for k, v in teacher.base.state_dict().items()}
    prompt_before = teacher.prompt.detach().clone()
    opt = torch.optim.AdamW([teacher.prompt], lr=1e-2, weight_decay=0.01)
    ids = _ids(2, 4)
    logits, _ = teacher(ids, torch.ones_like(ids))
    logits.float().sum().backward()
    opt.step()
    after = teacher.base.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(prompt_before, teacher.prompt.detach())


def test_unprompted_forward_equals_the_base_model() -> None:
    teacher = _teacher("gpt2", prompt_length=4)
    ids = _ids(2, 6)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        out, _ = teacher(ids, mask, use_prompt=False)
    assert torch.equal(out, teacher.base(input_ids=ids, attention_mask=mask).logits)


def test_train_mode_switches_the_base_dropout() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1))
    teacher = PromptedTeacher(base, prompt_length=3, init="random", dtype=torch.float32)
    assert not any(m.training for m in teacher.base.modules())  # starts in eval mode
    ids = _ids(2, 6)
    mask = torch.ones_like(ids)
    assert torch.equal(teacher(ids, mask)[0], teacher(ids, mask)[0])
    assert teacher.train() is teacher
    assert all(m.training for m in teacher.base.modules())
    assert not torch.equal(teacher(ids, mask)[0], teacher(ids, mask)[0])  # dropout is on
    teacher.eval()
    assert not any(m.training for m in teacher.base.modules())


def test_checkpointed_layers_stay_flagged_in_eval_mode() -> None:
    from promptkd.models.teacher import checkpoint_frozen_layers

    teacher = _teacher("llama", prompt_length=2)
    checkpoint_frozen_layers(teacher.base)
    teacher.train()
    teacher.eval()
    layers = [m for m in teacher.base.modules() if getattr(m, "gradient_checkpointing", False)]
    assert layers and all(m.training for m in layers)  # HF checkpoints only flagged layers
    assert not teacher.base.training


# ---------------------------------------------------------------- KV cache


def _decode_and_compare(teacher: PromptedTeacher, use_prompt: bool, tol: float) -> None:
    lengths, total, start = [4, 9, 6], 9, 5
    ids, mask = _left_padded(lengths, total, seed=3)
    full, _ = teacher(ids, mask, use_prompt=use_prompt)
    step_logits, cache = teacher(
        ids[:, :start], mask[:, :start], use_prompt=use_prompt, use_cache=True
    )
    assert torch.allclose(step_logits, full[:, :start], atol=tol)
    prefix = teacher.prompt_length if use_prompt else 0
    assert cache.get_seq_length() == prefix + start
    for t in range(start, total):
        step_logits, cache = teacher(
            ids[:, t:t + 1], mask[:, :t + 1], use_prompt=use_prompt,
            past_key_values=cache, use_cache=True,
        )
        assert step_logits.shape == (3, 1, VOCAB)
        diff = (step_logits[:, 0] - full[:, t]).abs().max().item()
        assert diff <= tol, f"step {t}: max diff {diff}"


@pytest.mark.parametrize("arch", ARCHS)
def test_incremental_decoding_matches_full_forward(arch: str) -> None:
    teacher = _teacher(arch, prompt_length=4)
    with torch.no_grad():
        _decode_and_compare(teacher, use_prompt=True, tol=1e-5)
        _decode_and_compare(teacher, use_prompt=False, tol=1e-5)


def test_cache_with_wrong_use_prompt_or_mask_raises() -> None:
    teacher = _teacher("llama", prompt_length=4)
    ids = _ids(1, 5)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        _, cache = teacher(ids, mask, use_cache=True)
        with pytest.raises(ValueError, match="same use_prompt"):
            teacher(ids[:, :1], torch.ones(1, 6, dtype=torch.long), use_prompt=False,
                    past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match="cache holds 9"):
            teacher(ids[:, :1], mask, past_key_values=cache, use_cache=True)


# ---------------------------------------------------------------- init and state


def test_text_init_copies_embedding_rows() -> None:
    tok = _tokenizer()
    text_ids = tok("Suppose you are a student.", add_special_tokens=False)["input_ids"]
    assert text_ids == [2, 3, 4, 5, 6]
    for length, expected in [(7, [2, 3, 4, 5, 6, 2, 3]), (3, [2, 3, 4]), (5, text_ids)]:
        teacher = PromptedTeacher(_tiny("llama"), prompt_length=length, init="text",
                                  tokenizer=tok, dtype=torch.bfloat16)
        emb = teacher.base.get_input_embeddings().weight
        assert teacher.prompt.dtype == torch.float32
        assert torch.equal(teacher.prompt.detach(), emb[expected].float())
    with pytest.raises(ValueError, match="tokenizer"):
        PromptedTeacher(_tiny("llama"), prompt_length=3, init="text", tokenizer=None)
    with pytest.raises(ValueError, match="no tokens"):
        PromptedTeacher(_tiny("llama"), prompt_length=3, init="text", init_text="", tokenizer=tok)
    with pytest.raises(ValueError, match="zeros"):
        PromptedTeacher(_tiny("llama"), prompt_length=3, init="zeros")


def test_random_init_is_seeded() -> None:
    a = _teacher("llama", prompt_length=6, seed=1).prompt.detach()
    b = _teacher("llama", prompt_length=6, seed=1).prompt.detach()
    c = _teacher("llama", prompt_length=6, seed=2).prompt.detach()
    assert torch.equal(a, b) and not torch.equal(a, c)
    emb_std = _tiny("llama").get_input_embeddings().weight.float().std().item()
    assert 0.5 * emb_std < a.std().item() < 2.0 * emb_std


def test_save_and_load_prompt_round_trip(tmp_path) -> None:
    teacher = _teacher("gpt2", prompt_length=4)
    with torch.no_grad():
        teacher.prompt.add_(1.5)
    teacher.save_prompt(str(tmp_path), teacher_id="tiny/gpt2")
    assert sorted(os.listdir(tmp_path)) == sorted([PROMPT_WEIGHTS, PROMPT_META])
    meta = json.loads((tmp_path / PROMPT_META).read_text())
    assert meta == {"prompt_length": 4, "init": "random", "init_text": teacher.init_text,
                    "teacher": "tiny/gpt2", "hidden_size": 32}
    loaded = load_prompt(str(tmp_path))
    assert loaded.dtype == torch.float32 and torch.equal(loaded, teacher.prompt.detach())

    fresh = _teacher("gpt2", prompt_length=4, seed=9)
    assert not torch.equal(fresh.prompt.detach(), loaded)
    fresh.load_prompt_state({"prompt": loaded})
    assert torch.equal(fresh.prompt.detach(), loaded)
    state = teacher.prompt_state()
    assert torch.equal(state["prompt"], loaded) and not state["prompt"].requires_grad
    with pytest.raises(ValueError, match="does not match"):
        _teacher("gpt2", prompt_length=3).load_prompt_state(state)
    with pytest.raises(ValueError, match=PROMPT_WEIGHTS):
        load_prompt(str(tmp_path / "missing"))


def test_a_prompt_of_another_teacher_is_a_config_error_naming_both(tmp_path) -> None:
    """Evaluating with a prompt learned for a teacher of another hidden size: exit 2 (ConfigError), one line."""
    from promptkd.config import ConfigError
    from promptkd.models.teacher import TeacherSpec, load_teacher

    _teacher("gpt2", prompt_length=4).save_prompt(str(tmp_path / "prompt"), teacher_id="tiny/gpt2")
    torch.manual_seed(0)
    build_tiny("gpt2", layers=1, hidden=48, heads=4, vocab_size=VOCAB, max_positions=64).save_pretrained(
        tmp_path / "wide")
    with pytest.raises(ConfigError) as info:
        load_teacher(TeacherSpec.learned(str(tmp_path / "wide"), torch.float32, str(tmp_path / "prompt")))
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "prompt") in message and str(tmp_path / "wide") in message
    assert "(4, 32)" in message and "(4, 48)" in message
    with pytest.raises(ConfigError, match=PROMPT_WEIGHTS):
        load_prompt(str(tmp_path / "missing"))


def test_load_prompt_reads_an_export_dir(tmp_path) -> None:
    """An export keeps the prompt in teacher_prompt/; the export dir itself is accepted."""
    teacher = _teacher("gpt2", prompt_length=4)
    teacher.save_prompt(str(tmp_path / PROMPT_DIR), teacher_id="tiny/gpt2")
    (tmp_path / "model.safetensors").write_bytes(b"")   # the student's weights sit beside it, alone
    assert torch.equal(load_prompt(str(tmp_path)), teacher.prompt.detach())
    assert torch.equal(load_prompt(str(tmp_path / PROMPT_DIR)), teacher.prompt.detach())
