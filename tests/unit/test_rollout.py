"""promptkd.rollout: filtering, n-gram bans, the KV-cache decode loop, EOS forcing and loss masks."""

from __future__ import annotations

import pytest
import torch
from transformers import NoRepeatNGramLogitsProcessor

from promptkd.models import PromptedTeacher, build_tiny
from promptkd.rollout import (
    SamplingParams,
    banned_ngram_tokens,
    filter_logits,
    generate,
    hf_step_fn,
    position_ids,
    rollout_from_responses,
    teacher_step_fn,
)

VOCAB = 64
PAD = 0
NO_EOS = 10_000  # outside the vocabulary: never sampled, so rows never finish


def _model(seed: int = 0, arch: str = "llama") -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_tiny(arch, 2, 32, 4, vocab_size=VOCAB).eval()
    if arch == "gpt2":
        # A random tiny GPT-2 (tied embeddings, std-0.02 positions) mostly echoes its
        # last input token; loud position embeddings make greedy output depend on them.
        with torch.no_grad():
            model.transformer.wpe.weight.normal_(0.0, 1.0)
    return model


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return _model()


PROMPTS = [[5, 9, 13, 2, 40, 7], [33, 21], [8, 8, 50, 3]]


def _left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    return ids, mask


class ScriptedStep:
    """Step-function stub: row b emits scripts[b][k] at step k (the last entry repeats).

    Records every call so tests can check what the loop feeds back.
    """

    def __init__(self, scripts: list[list[int]], vocab: int = VOCAB) -> None:
        self.scripts, self.vocab = scripts, vocab
        self.calls: list[tuple[torch.Tensor, torch.Tensor, object]] = []

    def __call__(self, ids, mask, past):
        step = len(self.calls)
        self.calls.append((ids.clone(), mask.clone(), past))
        logits = torch.zeros(len(self.scripts), self.vocab)
        for row, script in enumerate(self.scripts):
            logits[row, script[min(step, len(script) - 1)]] = 10.0
        return logits, ("past", step)


# ----------------------------------------------------------------------------- filter_logits

def test_top_k_keeps_exactly_k_largest():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    for k in (1, 3, 17, 49):
        out = filter_logits(logits, top_k=k, top_p=1.0)
        finite = torch.isfinite(out)
        assert finite.sum(-1).tolist() == [k] * 4
        top = torch.topk(logits, k, dim=-1).indices
        assert finite.gather(-1, top).all()
        assert torch.equal(out[finite], logits[finite])  # kept entries unchanged


def _nucleus_by_hand(row: torch.Tensor, p: float) -> set[int]:
    probs = row.double().softmax(-1).tolist()
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept, mass = set(), 0.0
    for i in order:
        kept.add(i)
        mass += probs[i]
        if mass >= p:
            break
    return kept


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.8, 0.95])
def test_top_p_keeps_smallest_prefix_reaching_p(p):
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(1)) * 2.0
    out = filter_logits(logits, top_k=0, top_p=p)
    for row in range(logits.shape[0]):
        kept = set(torch.nonzero(torch.isfinite(out[row])).squeeze(-1).tolist())
        assert kept == _nucleus_by_hand(logits[row], p)
        kept_idx = sorted(kept)
        assert torch.equal(out[row, kept_idx], logits[row, kept_idx])


def test_top_p_always_keeps_the_argmax():
    logits = torch.tensor([[5.0, 0.0, 0.0, 0.0]])  # argmax alone has mass ~0.98
    out = filter_logits(logits, top_k=0, top_p=0.01)
    assert torch.isfinite(out).tolist() == [[True, False, False, False]]


def test_top_p_then_top_k_combined():
    logits = torch.randn(3, 30, generator=torch.Generator().manual_seed(2))
    out = filter_logits(logits, top_k=5, top_p=0.6)
    kept = torch.isfinite(out)
    assert (kept.sum(-1) <= 5).all() and (kept.sum(-1) >= 1).all()
    # nucleus over the top-5 renormalised distribution
    for row in range(3):
        only_k = filter_logits(logits[row:row + 1], top_k=5, top_p=1.0)[0]
        assert set(torch.nonzero(kept[row]).squeeze(-1).tolist()) == _nucleus_by_hand(only_k, 0.6)


def test_identity_filters():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(3))
    assert torch.equal(filter_logits(logits, top_k=0, top_p=1.0), logits)
    assert torch.equal(filter_logits(logits, top_k=20, top_p=1.0), logits)


# ----------------------------------------------------------------------------- n-gram bans

@pytest.mark.parametrize("seq, n, banned", [
    ([1, 2, 3, 1, 2], 3, {3}),           # (1, 2) was followed by 3
    ([1, 2, 3, 1, 2, 4, 1, 2], 3, {3, 4}),
    ([1, 2, 1, 3, 1], 2, {2, 3}),         # every token that followed a 1
    ([1, 2, 3, 4], 2, set()),             # last token 4 never seen before
    ([4, 5, 6], 1, {4, 5, 6}),            # unigrams: nothing seen may repeat
    ([1, 2], 3, set()),                   # shorter than n
    ([1, 2, 1, 2], 0, set()),             # off
    ([7, 7, 7], 2, {7}),
    ([1, 2, 3, 1, 2, 3], 4, {1}),         # the trigram (1, 2, 3) was followed by 1
])
def test_banned_ngram_tokens_by_hand(seq, n, banned):
    assert banned_ngram_tokens([seq], n) == [banned]


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_banned_ngram_tokens_match_transformers(n):
    g = torch.Generator().manual_seed(n)
    seqs = torch.randint(0, 3, (8, 20), generator=g)  # small alphabet: many repeats
    ours = banned_ngram_tokens(seqs.tolist(), n)
    scores = NoRepeatNGramLogitsProcessor(n)(seqs, torch.zeros(8, 3))
    theirs = [set(torch.nonzero(torch.isinf(r)).squeeze(-1).tolist()) for r in scores]
    assert ours == theirs
    assert any(ours)


# ----------------------------------------------------------------------------- positions

def test_position_ids_skip_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]]


# ----------------------------------------------------------------------------- decode loop

# RoPE (llama) is blind to a constant position offset; GPT-2's absolute positions
# are not, so gpt2 is what catches left padding leaking into the positions.
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_left_padded_batch_matches_hf_generate_per_row(arch):
    model = _model(arch=arch)
    ids, mask = _left_pad(PROMPTS)
    n_new = 6
    params = SamplingParams(max_new_tokens=n_new, do_sample=False)
    out = generate(hf_step_fn(model), ids, mask, params, eos_id=NO_EOS, pad_id=PAD, vocab_size=VOCAB,
                   force_eos=False)
    assert out.prompt_len == ids.shape[1]
    assert out.response_ids.shape == (len(PROMPTS), n_new)
    assert torch.equal(out.input_ids[:, :ids.shape[1]], ids)
    for row, prompt in enumerate(PROMPTS):
        single = torch.tensor([prompt])
        ref = model.generate(single, attention_mask=torch.ones_like(single), max_new_tokens=n_new,
                             min_new_tokens=n_new, do_sample=False, pad_token_id=PAD)
        assert out.response_ids[row].tolist() == ref[0, len(prompt):].tolist(), row
    assert out.loss_mask[:, ids.shape[1]:].all()
    assert out.attention_mask[:, ids.shape[1]:].all()


def test_loss_mask_and_forced_eos():
    eos = 3
    ids, mask = _left_pad([[11, 12, 13], [14, 15]])
    # row 0 emits EOS at step 2 then would keep talking; row 1 never emits EOS
    stub = ScriptedStep([[20, 21, eos, 22, 23], [30, 31, 32, 33, 34]])
    out = generate(stub, ids, mask, SamplingParams(max_new_tokens=5, do_sample=False), eos_id=eos,
                   pad_id=PAD, vocab_size=VOCAB, force_eos=True)
    tp = ids.shape[1]
    assert out.response_ids.tolist() == [[20, 21, eos, PAD, PAD], [30, 31, 32, 33, eos]]
    assert out.loss_mask.tolist() == [[0, 0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 1, 1]]
    assert out.attention_mask[:, tp:].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert out.attention_mask[:, :tp].tolist() == mask.tolist()
    assert out.response_lengths.tolist() == [3, 5]


def test_without_force_eos_unfinished_rows_keep_their_tokens():
    eos = 3
    ids, mask = _left_pad([[11, 12], [14, 15]])
    stub = ScriptedStep([[20, eos], [30, 31, 32]])
    out = generate(stub, ids, mask, SamplingParams(max_new_tokens=4, do_sample=False), eos_id=eos,
                   pad_id=PAD, vocab_size=VOCAB, force_eos=False)
    assert out.response_ids.tolist() == [[20, eos, PAD, PAD], [30, 31, 32, 32]]
    assert out.loss_mask[:, 2:].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


def test_loop_feeds_back_tokens_and_grows_the_mask():
    eos = 3
    ids, mask = _left_pad([[11, 12, 13], [14, 15]])
    stub = ScriptedStep([[20, eos, 22], [30, 31, 32]])
    generate(stub, ids, mask, SamplingParams(max_new_tokens=3, do_sample=False), eos_id=eos, pad_id=PAD,
             vocab_size=VOCAB)
    (ids0, mask0, past0), (ids1, mask1, past1), (ids2, mask2, past2) = stub.calls
    assert torch.equal(ids0, ids) and torch.equal(mask0, mask) and past0 is None
    assert ids1.tolist() == [[20], [30]] and past1 == ("past", 0)
    assert mask1[:, 3:].tolist() == [[1], [1]]
    assert ids2.tolist() == [[eos], [31]] and past2 == ("past", 1)
    assert mask2[:, 3:].tolist() == [[1, 1], [1, 1]]  # the EOS itself is a real token


def test_finished_rows_are_fed_pad_and_masked():
    eos = 3
    ids, mask = _left_pad([[11], [14]])
    stub = ScriptedStep([[eos, 40], [30, 31, 32, 33]])
    generate(stub, ids, mask, SamplingParams(max_new_tokens=4, do_sample=False), eos_id=eos, pad_id=PAD,
             vocab_size=VOCAB)
    last_ids, last_mask, _ = stub.calls[-1]
    assert last_ids[0].tolist() == [PAD]
    assert last_mask[0].tolist() == [1, 1, 0, 0]  # prompt, EOS, then masked padding


def test_early_stop_when_every_row_has_finished():
    eos = 3
    ids, mask = _left_pad([[11, 12], [14, 15]])
    stub = ScriptedStep([[20, 21, eos, 22], [eos, 31]])
    out = generate(stub, ids, mask, SamplingParams(max_new_tokens=10, do_sample=False), eos_id=eos,
                   pad_id=PAD, vocab_size=VOCAB)
    assert len(stub.calls) == 3
    assert out.response_ids.tolist() == [[20, 21, eos], [eos, PAD, PAD]]
    assert out.loss_mask[:, 2:].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_vocab_size_slices_padded_model_vocabulary():
    ids, mask = _left_pad([[11, 12]])

    def step(ids_, mask_, past):
        logits = torch.zeros(1, VOCAB)
        logits[0, VOCAB - 1] = 100.0  # a padded, non-tokenizer id
        logits[0, 7] = 1.0
        return logits, None

    out = generate(step, ids, mask, SamplingParams(max_new_tokens=2, do_sample=False), eos_id=NO_EOS,
                   pad_id=PAD, vocab_size=VOCAB - 1, force_eos=False)
    assert out.response_ids.tolist() == [[7, 7]]


def test_no_repeat_ngram_in_the_loop():
    ids, mask = _left_pad([[11, 12]])
    stub = ScriptedStep([[11, 12, 11, 12, 11]])  # would repeat the bigram (11, 12)
    params = SamplingParams(max_new_tokens=4, do_sample=False, no_repeat_ngram_size=2)
    out = generate(stub, ids, mask, params, eos_id=NO_EOS, pad_id=PAD, vocab_size=VOCAB, force_eos=False)
    full = out.input_ids[0].tolist()
    bigrams = list(zip(full, full[1:]))
    assert len(bigrams) == len(set(bigrams))


def test_sampling_is_reproducible_with_a_seeded_generator(model):
    ids, mask = _left_pad(PROMPTS)
    params = SamplingParams(max_new_tokens=8, do_sample=True, temperature=1.0)

    def run(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return generate(hf_step_fn(model), ids, mask, params, eos_id=NO_EOS, pad_id=PAD, vocab_size=VOCAB,
                        generator=g, force_eos=False).response_ids

    a, b, c = run(123), run(123), run(124)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_sampling_respects_top_k_1_as_greedy(model):
    ids, mask = _left_pad(PROMPTS)
    greedy = generate(hf_step_fn(model), ids, mask, SamplingParams(max_new_tokens=5, do_sample=False),
                      eos_id=NO_EOS, pad_id=PAD, vocab_size=VOCAB, force_eos=False)
    sampled = generate(hf_step_fn(model), ids, mask, SamplingParams(max_new_tokens=5, do_sample=True, top_k=1),
                       eos_id=NO_EOS, pad_id=PAD, vocab_size=VOCAB, force_eos=False,
                       generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy.response_ids, sampled.response_ids)


def test_zero_new_tokens_returns_the_prompt():
    ids, mask = _left_pad([[11, 12], [14]])
    out = generate(ScriptedStep([[5], [5]]), ids, mask, SamplingParams(max_new_tokens=0), eos_id=3, pad_id=PAD,
                   vocab_size=VOCAB)
    assert torch.equal(out.input_ids, ids)
    assert out.loss_mask.sum() == 0


# ----------------------------------------------------------------------------- prompted teacher

def test_teacher_step_fn_matches_full_forward_greedy():
    teacher = PromptedTeacher(_model(seed=5), prompt_length=3, init="random", dtype=torch.float32)
    ids, mask = _left_pad(PROMPTS)
    n_new = 5
    out = generate(teacher_step_fn(teacher, use_prompt=True), ids, mask,
                   SamplingParams(max_new_tokens=n_new, do_sample=False), eos_id=NO_EOS, pad_id=PAD,
                   vocab_size=VOCAB, force_eos=False)
    # by hand: re-run the full (prompted) sequence every step, no cache
    cur_ids, cur_mask = ids, mask
    with torch.no_grad():
        for _ in range(n_new):
            logits, _ = teacher(cur_ids, cur_mask, use_prompt=True)
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            cur_ids = torch.cat([cur_ids, nxt], dim=1)
            cur_mask = torch.cat([cur_mask, torch.ones_like(nxt)], dim=1)
    assert out.input_ids.tolist() == cur_ids.tolist()
    # and the prompt matters: the unprompted teacher decodes something else
    plain = generate(teacher_step_fn(teacher, use_prompt=False), ids, mask,
                     SamplingParams(max_new_tokens=n_new, do_sample=False), eos_id=NO_EOS, pad_id=PAD,
                     vocab_size=VOCAB, force_eos=False)
    assert not torch.equal(plain.response_ids, out.response_ids)


# ----------------------------------------------------------------------------- responses from another engine

def _equal(a, b) -> bool:
    return (a.prompt_len == b.prompt_len and torch.equal(a.input_ids, b.input_ids)
            and torch.equal(a.attention_mask, b.attention_mask) and torch.equal(a.loss_mask, b.loss_mask))


@pytest.mark.parametrize("force_eos", [True, False])
def test_responses_from_another_engine_match_the_loop(force_eos):
    """vLLM hands back token lists; the Rollout built from them is the one our loop builds for the same tokens."""
    eos = 3
    ids, mask = _left_pad([[11, 12, 13], [14, 15]])
    stub = ScriptedStep([[20, 21, eos, 22, 23], [30, 31, 32, 33, 34]])
    params = SamplingParams(max_new_tokens=5, do_sample=False)
    ours = generate(stub, ids, mask, params, eos_id=eos, pad_id=PAD, vocab_size=VOCAB, force_eos=force_eos)
    # an engine that keeps the stop token, and one that drops it
    for responses in ([[20, 21, eos], [30, 31, 32, 33, 34]], [[20, 21], [30, 31, 32, 33, 34]]):
        got = rollout_from_responses(ids, mask, responses, eos, PAD, max_new_tokens=5, force_eos=force_eos)
        assert _equal(got, ours), (responses, got)


def test_rows_of_a_merged_batch_equal_each_micro_batch_alone():
    """One vLLM call for the whole step, split back: each piece as if its micro-batch had been decoded alone."""
    from promptkd.methods.base import rows_of

    eos = 3
    prompts = [[11, 12, 13, 14], [15, 16], [17], [18, 19]]
    scripts = [[20, eos], [21, 22, 23, eos], [24, eos], [25, 26, eos]]
    params = SamplingParams(max_new_tokens=6, do_sample=False)
    ids, mask = _left_pad(prompts)
    merged = generate(ScriptedStep(scripts), ids, mask, params, eos_id=eos, pad_id=PAD, vocab_size=VOCAB)
    for start, n in ((0, 2), (2, 2), (1, 3)):
        alone_ids, alone_mask = _left_pad(prompts[start:start + n])
        alone = generate(ScriptedStep(scripts[start:start + n]), alone_ids, alone_mask, params, eos_id=eos,
                         pad_id=PAD, vocab_size=VOCAB)
        assert _equal(rows_of(merged, start, n, PAD), alone), (start, n)


def _python_banned(seq: list[int], n: int) -> set[int]:
    """The loop the tensor version replaced (per row, per token, on the host): the reference."""
    banned: set[int] = set()
    if n > 0 and len(seq) >= n:
        prefix = tuple(seq[len(seq) - n + 1:])
        for i in range(len(seq) - n + 1):
            if tuple(seq[i:i + n - 1]) == prefix:
                banned.add(seq[i + n - 1])
    return banned


@pytest.mark.parametrize("n", [1, 2, 3, 6])
def test_banned_ngram_mask_equals_python_reference_on_left_padded_rows(n):
    from promptkd.rollout import banned_ngram_mask

    g = torch.Generator().manual_seed(100 + n)
    vocab, batch, length = (2 if n >= 6 else 4), 16, 40
    for _ in range(5):
        ids = torch.randint(0, vocab, (batch, length), generator=g)   # small alphabet: many repeats
        start = torch.randint(0, length, (batch,), generator=g)
        start[0] = 0                                                   # one row without padding
        ids[torch.arange(length)[None, :] < start[:, None]] = vocab - 1  # padding tokens that must not count
        mask = banned_ngram_mask(ids, start, n, vocab)
        assert mask.shape == (batch, vocab) and mask.dtype == torch.bool
        for row in range(batch):
            want = _python_banned(ids[row, int(start[row]):].tolist(), n)
            assert set(torch.nonzero(mask[row]).squeeze(-1).tolist()) == want, (row, n)
        assert mask.any()


def test_generate_with_ngram_ban_never_repeats_an_ngram():
    model = _model()
    ids, mask = _left_pad(PROMPTS)
    n = 2
    params = SamplingParams(max_new_tokens=12, do_sample=False, no_repeat_ngram_size=n)
    out = generate(hf_step_fn(model), ids, mask, params, eos_id=NO_EOS, pad_id=PAD, vocab_size=VOCAB,
                   force_eos=False)
    plain = generate(hf_step_fn(model), ids, mask, SamplingParams(max_new_tokens=12, do_sample=False),
                     eos_id=NO_EOS, pad_id=PAD, vocab_size=VOCAB, force_eos=False)
    for row, prompt in enumerate(PROMPTS):
        seq = prompt + out.response_ids[row].tolist()
        grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
        assert len(grams) == len(set(grams)), (row, seq)
    assert not torch.equal(out.response_ids, plain.response_ids)  # the greedy rows did repeat: the ban acted


class _Offload:
    """DeepSpeed's ZeRO-3 parameter offload, reduced to what ``_zero3_hooks_off`` touches."""

    def __init__(self, module):
        self.module = module
        self.forward_hooks, self.backward_hooks, self.registered = [], [], 0
        self._register_deepspeed_module(module)

    def _register_deepspeed_module(self, module):
        self.registered += 1
        for sub in module.modules():
            self.forward_hooks.append(sub.register_forward_pre_hook(lambda m, a: self.calls.append("pre")))
            self.backward_hooks.append(sub.register_forward_hook(lambda m, a, o: self.calls.append("post")))
        self.calls = []


def test_zero3_hooks_are_off_inside_a_gathered_loop_and_back_after():
    from types import SimpleNamespace

    from promptkd.rollout.core import _zero3_hooks_off

    module = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    offload = _Offload(module)
    engine = SimpleNamespace(optimizer=SimpleNamespace(parameter_offload=offload))
    x = torch.randn(1, 3)
    module(x)
    assert len(offload.calls) == 6  # 3 modules x (pre + post)
    offload.calls.clear()
    with _zero3_hooks_off(engine, module) as off:
        module(x)
        assert off and offload.calls == [] and offload.forward_hooks == [] == offload.backward_hooks
    assert offload.registered == 2
    module(x)
    assert len(offload.calls) == 6  # registered again, once
    # another module, or an engine without ZeRO-3 offload: untouched
    other = torch.nn.Linear(3, 3)
    with _zero3_hooks_off(engine, other) as off:
        assert not off and len(offload.forward_hooks) == 3
    with _zero3_hooks_off(SimpleNamespace(optimizer=object()), module) as off:
        assert not off
    assert offload.registered == 2
    # a ZeRO-3 teacher: an engine without an optimizer (the offload is its optimizer), its module the base inside
    # a wrapper (the PromptedTeacher) that the loop runs
    wrapper = torch.nn.ModuleDict({"base": module})
    offload.calls.clear()
    with _zero3_hooks_off(SimpleNamespace(optimizer=offload), wrapper) as off:
        module(x)
        assert off and offload.calls == []
    assert offload.registered == 3
    module(x)
    assert len(offload.calls) == 6
