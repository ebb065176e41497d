"""Fidelity to the official PromptKD code (gmkim-ai/PromptKD) where users compare (issue 19, item 4).

- dev selection: per-epoch dev evaluation, sampled with one seed, on eval.dev_max_examples;
- the official SFT schedule: cosine decay to a floor lr (optim.*.min_lr), as torch's CosineAnnealingLR;
- prompt init from ``tokenizer(text)`` with its special tokens (OPT, LLaMA: row 0 is BOS).
"""
from __future__ import annotations

import glob
import os
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from tokenizers.processors import TemplateProcessing
from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

from promptkd.config import ConfigError, OptimConfig, load_config
from promptkd.methods.base import StepResult
from promptkd.models import PromptedTeacher, build_tiny
from promptkd.optim import lr_factor
from promptkd.training import run as run_mod
from promptkd.training.trainer import LoopState, MicroBatches, Trainer, epoch_micro_batches

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE = ["data.train_file=unused.jsonl"]


# ----------------------------------------------------------------------------- config keys

def test_new_eval_and_optim_keys_parse_and_validate():
    cfg = load_config(None, BASE + ["eval.dev_interval_epochs=1", "eval.dev_do_sample=true",
                                    "eval.dev_max_examples=1000", "optim.student.min_lr=1e-7",
                                    "train.early_stop_patience=2"])
    assert (cfg.eval.dev_interval_epochs, cfg.eval.dev_do_sample, cfg.eval.dev_max_examples) == (1, True, 1000)
    assert cfg.optim.student.min_lr == 1e-7 and cfg.optim.prompt.min_lr == 0.0
    assert cfg.model.teacher.prompt_init_special_tokens is True    # the official tokenization by default
    for bad, key in [("eval.dev_interval_epochs=-1", "eval.dev_interval_epochs"),
                     ("eval.dev_max_examples=-5", "eval.dev_max_examples"),
                     ("optim.student.min_lr=-1e-7", "optim.student.min_lr"),
                     ("optim.student.min_lr=1.0", "optim.student.min_lr"),     # above the peak lr
                     ("eval.dev_do_sample=maybe", "eval.dev_do_sample")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, BASE + [bad])
    # early stopping counts dev evaluations: either cadence provides them, none is an error
    with pytest.raises(ConfigError, match="early_stop_patience"):
        load_config(None, BASE + ["train.early_stop_patience=2"])


PAPER = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.yaml"))
               if os.path.basename(p).startswith("sft_") or "_to_" in os.path.basename(p))


@pytest.mark.parametrize("path", PAPER, ids=os.path.basename)
def test_paper_configs_select_like_the_official_code(path):
    """Every paper config (7 distillation + 10 SFT): dev every epoch, sampled, 1,000 examples, no step cadence."""
    cfg = load_config(path, [])
    ev = cfg.eval
    assert (ev.dev_interval_epochs, ev.dev_interval, ev.dev_do_sample) == (1, 0, True)
    assert ev.dev_max_examples == 1000
    if cfg.data.format == "dolly":  # MiniLLM's split, prepared: the 1,000 dev examples, and no test example in train
        assert (cfg.data.train_file, cfg.data.dev_file) == ("data/eval/dolly/train.jsonl", "data/eval/dolly/dev.jsonl")
    else:
        assert cfg.data.dev_size == 1000
    assert (ev.top_p, ev.top_k, ev.temperature) == (1.0, 0, 1.0)
    assert cfg.seed == 10                                  # the official scripts' SEED


# config -> (official script, per-GPU batch, accumulation, lr, epochs, student activation checkpointing), read from
# gmkim-ai/PromptKD's scripts/{gpt2,opt,llama}/{sft,promptkd}/*.sh
OFFICIAL = {
    "sft_gpt2": ("scripts/gpt2/sft/sft_base.sh", 2, 2, 5e-4, 20, False),
    "sft_gpt2-medium": ("scripts/gpt2/sft/sft_medium.sh", 2, 2, 1e-4, 20, False),
    "sft_gpt2-large": ("scripts/gpt2/sft/sft_large.sh", 2, 2, 1e-4, 10, False),
    "sft_gpt2-xl": ("scripts/gpt2/sft/sft_xlarge.sh", 2, 2, 5e-5, 10, False),
    "sft_opt-1.3b": ("scripts/opt/sft/sft_1.3B.sh", 8, 1, 5e-5, 10, False),
    "sft_opt-2.7b": ("scripts/opt/sft/sft_2.7B.sh", 8, 1, 5e-5, 10, False),
    "sft_opt-6.7b": ("scripts/opt/sft/sft_6.7B.sh", 8, 1, 1e-5, 10, True),
    "sft_opt-13b": ("scripts/opt/sft/sft_13B.sh", 2, 4, 1e-5, 10, True),
    "sft_llama-7b": ("scripts/llama/sft/sft_7B.sh", 4, 2, 1e-5, 10, True),
    "sft_llama-13b": ("scripts/llama/sft/sft_13B.sh", 2, 4, 1e-5, 10, True),
    "gpt2-xl_to_gpt2-base": ("scripts/gpt2/promptkd/promptkd_base.sh", 2, 16, 5e-5, 20, False),
    "gpt2-xl_to_gpt2-medium": ("scripts/gpt2/promptkd/promptkd_medium.sh", 2, 4, 1e-5, 20, False),
    "gpt2-xl_to_gpt2-large": ("scripts/gpt2/promptkd/promptkd_large.sh", 2, 4, 5e-6, 15, False),
    "opt-13b_to_opt-1.3b": ("scripts/opt/promptkd/promptkd_1.3B.sh", 16, 1, 5e-6, 10, True),
    "opt-13b_to_opt-2.7b": ("scripts/opt/promptkd/promptkd_2.7B.sh", 16, 1, 5e-6, 10, True),
    "opt-13b_to_opt-6.7b": ("scripts/opt/promptkd/promptkd_6.7B.sh", 16, 1, 5e-6, 10, True),
    "llama-13b_to_llama-7b": ("scripts/llama/promptkd/promptkd_7B.sh", 16, 1, 5e-6, 10, True),
    # the chat configs (issue 21) take the OPT setups of their sizes: ~10B teacher, ~1B student
    "sft_qwen3-8b": ("scripts/opt/sft/sft_13B.sh", 2, 4, 1e-5, 10, True),
    "sft_llama-3.1-8b": ("scripts/opt/sft/sft_13B.sh", 2, 4, 1e-5, 10, True),
    "sft_qwen3-0.6b": ("scripts/opt/sft/sft_1.3B.sh", 8, 1, 5e-5, 10, False),
    "sft_llama-3.2-1b": ("scripts/opt/sft/sft_1.3B.sh", 8, 1, 5e-5, 10, False),
    "qwen3-8b_to_qwen3-0.6b": ("scripts/opt/promptkd/promptkd_1.3B.sh", 16, 1, 5e-6, 10, True),
    "llama-3.1-8b_to_llama-3.2-1b": ("scripts/opt/promptkd/promptkd_1.3B.sh", 16, 1, 5e-6, 10, True),
}


def test_every_paper_config_is_in_the_official_table():
    assert sorted(os.path.basename(p)[:-5] for p in PAPER) == sorted(OFFICIAL)


@pytest.mark.parametrize("path", PAPER, ids=os.path.basename)
def test_paper_configs_carry_the_official_hyperparameters(path):
    name = os.path.basename(path)[:-5]
    script, mb, ga, lr, epochs, ckpt = OFFICIAL[name]
    cfg = load_config(path, [])
    header = open(path).read().split("\nstage:")[0]
    assert f"Mirrors the official {script}" in header
    assert (cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.train.epochs) == (mb, ga, epochs)
    assert cfg.optim.student.lr == lr and cfg.optim.student.weight_decay == 0.01 and cfg.train.grad_clip == 1.0
    assert cfg.model.student.gradient_checkpointing is ckpt
    assert (cfg.data.max_length, cfg.data.max_prompt_length) == (512, 256)
    gpt2 = "gpt2" in name
    assert cfg.deepspeed == ("ds_configs/zero1.json" if gpt2 else "ds_configs/zero2_offload.json")
    s = cfg.optim.student
    if name.startswith("sft_"):
        assert (s.warmup_steps, s.schedule, s.min_lr) == (0, "cosine", 1e-7)     # CosineAnnealingLR(eta_min=1e-7)
        return
    assert (s.warmup_steps, s.schedule) == (100, "constant") and cfg.optim.prompt == s   # teacher lr = lr
    t = cfg.model.teacher
    assert (t.prompt_length, t.prompt_init, t.prompt_init_text) == (7, "text", "Suppose you are a student.")
    assert t.prompt_init_special_tokens and t.gradient_checkpointing is (not gpt2)  # the official flag reaches both
    assert "model.student.path=" in header and "model.teacher.path=" in header   # how to start from MiniLLM's inits


# ----------------------------------------------------------------------------- lr floor

def test_cosine_to_min_lr_matches_torch_cosine_annealing():
    """The official SFT schedule: CosineAnnealingLR(T_max=total_iters, eta_min=lr_min), no warm-up."""
    total, lr, floor = 40, 1e-4, 1e-7
    opt = OptimConfig(lr=lr, warmup_steps=0, schedule="cosine", min_lr=floor)
    ours = lr_factor(opt, total)
    p = torch.nn.Parameter(torch.zeros(1))
    sgd = torch.optim.SGD([p], lr=lr)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(sgd, T_max=total, eta_min=floor)
    for step in range(total):
        assert lr * ours(step) == pytest.approx(ref.get_last_lr()[0], rel=1e-9, abs=1e-15)
        sgd.step()
        ref.step()
    assert lr * ours(total) == pytest.approx(floor)        # ends at the floor, not at 0
    assert lr * ours(10 * total) == pytest.approx(floor)


def test_min_lr_zero_keeps_the_old_schedules_and_linear_has_a_floor():
    for schedule in ("linear", "cosine"):
        new = lr_factor(OptimConfig(lr=1e-3, warmup_steps=5, schedule=schedule, min_lr=0.0), 50)
        assert new(50) == 0.0 and new(4) == 1.0            # warm-up untouched; decays to 0 without a floor
    lin = lr_factor(OptimConfig(lr=1e-3, warmup_steps=0, schedule="linear", min_lr=1e-4), 10)
    assert [round(lin(s), 12) for s in (0, 5, 10)] == [1.0, 0.55, 0.1]
    const = lr_factor(OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant", min_lr=1e-4), 10)
    assert const(9) == 1.0


# ----------------------------------------------------------------------------- dev cadence

class _Method:
    """A method whose step does nothing: the trainer's cadence is what is under test."""

    def __init__(self):
        engine = SimpleNamespace(get_lr=lambda: [0.0], get_global_grad_norm=lambda: None,
                                 module=torch.nn.Linear(1, 1))
        self.ctx = SimpleNamespace(engine=engine, timer=SimpleNamespace(pop=lambda: {}))
        self.micro_seen: list[list] = []

    def step(self, micro, step):
        self.micro_seen.append(micro)
        return StepResult({})


class _Logger:
    def scalars(self, step, values):
        pass

    def text(self, step, tag, text):
        pass


def _run(tmp_path, n: int, mb: int, ga: int, steps: int, overrides: list[str]) -> tuple[list[int], Trainer]:
    cfg = load_config(None, BASE + [f"train.micro_batch_size={mb}", f"train.grad_accum={ga}",
                                    "logging.progress_bar=false", "logging.interval=1000",
                                    "logging.sample_texts=0", *overrides])
    trainer = Trainer(cfg, str(tmp_path), _Method(), list(range(n)), steps, dev_eval=lambda s: {"rougeL": 0.0},
                      logger=_Logger())
    evals: list[int] = []
    trainer.run_dev_eval = lambda: evals.append(trainer.state.step) or 0.0
    trainer.run()
    return evals, trainer


@pytest.mark.parametrize("n,mb,ga,steps,every,expected", [
    (10, 2, 1, 12, 1, [5, 10]),        # 5 micro-batches an epoch, one per step
    (10, 2, 2, 8, 1, [3, 5, 8]),       # epochs end at micro-batches 5, 10, 15: inside steps 3, 5, 8
    (10, 2, 2, 8, 2, [5]),             # every second epoch: micro-batch 10 (step 5); 20 is past the run
    (9, 4, 1, 7, 1, [3, 6]),           # ragged: ceil(9 / 4) = 3 micro-batches an epoch
    (4, 2, 5, 3, 1, [1, 2, 3]),        # accumulation longer than an epoch: each step ends at least one
])
def test_dev_eval_runs_at_epoch_boundaries(tmp_path, n, mb, ga, steps, every, expected):
    evals, trainer = _run(tmp_path, n, mb, ga, steps, [f"eval.dev_interval_epochs={every}"])
    assert evals == expected
    # the arithmetic is the loop's own epoch length
    assert epoch_micro_batches(n, mb) == len(MicroBatches(list(range(n)), mb, 0))
    assert len(trainer.method.micro_seen) == steps and all(len(m) == ga for m in trainer.method.micro_seen)


def test_step_and_epoch_cadences_combine_without_double_evaluation(tmp_path):
    evals, _ = _run(tmp_path, 10, 2, 1, 12, ["eval.dev_interval_epochs=1", "eval.dev_interval=2"])
    assert evals == [2, 4, 5, 6, 8, 10, 12]
    evals, _ = _run(tmp_path, 10, 2, 1, 12, ["eval.dev_interval=4"])
    assert evals == [4, 8, 12]                            # the step cadence alone is unchanged


def test_epoch_cadence_continues_after_a_resume(tmp_path):
    """A resumed loop state (mid-epoch) keeps counting micro-batches where it stopped."""
    cfg = load_config(None, BASE + ["train.micro_batch_size=2", "train.grad_accum=2", "logging.progress_bar=false",
                                    "logging.interval=1000", "eval.dev_interval_epochs=1"])
    trainer = Trainer(cfg, str(tmp_path), _Method(), list(range(10)), 8, dev_eval=lambda s: {"rougeL": 0.0},
                      logger=_Logger())
    trainer.state = LoopState(step=4)
    trainer.batches.load_state_dict({"epoch": 1, "batch_in_epoch": 3})    # 8 micro-batches consumed
    evals: list[int] = []
    trainer.run_dev_eval = lambda: evals.append(trainer.state.step) or 0.0
    trainer.run()
    assert evals == [5, 8]


# ----------------------------------------------------------------------------- sampled dev eval

def test_dev_eval_config_sampled_with_the_run_seed():
    cfg = load_config(None, BASE + ["eval.do_sample=false", "eval.dev_do_sample=true", "eval.max_examples=300",
                                    "eval.dev_max_examples=1000", "eval.top_p=0.9", "seed=10"])
    dev = run_mod.dev_eval_config(cfg.eval, cfg.seed)
    assert dev.do_sample is True and dev.seeds == [10] and dev.max_examples == 1000 and dev.top_p == 0.9
    greedy = run_mod.dev_eval_config(load_config(None, BASE + ["eval.max_examples=300"]).eval, 10)
    assert greedy.do_sample is False and greedy.seeds == [10] and greedy.max_examples == 300


def test_dev_eval_fn_decodes_sampled_with_one_seed(monkeypatch):
    seen = []

    def fake_evaluate(gen, tokenizer, examples, ev, seeds=None):
        seen.append(ev)
        return {"rougeL": 12.5, "exact_match": 0.0}

    monkeypatch.setattr(run_mod, "evaluate", fake_evaluate)
    monkeypatch.setattr(run_mod, "student_decoder", lambda *a: None)
    cfg = load_config(None, BASE + ["eval.dev_do_sample=true", "eval.dev_max_examples=1000"])
    engine = SimpleNamespace(module=torch.nn.Linear(1, 1).train())
    fn = run_mod.dev_eval_fn(cfg.eval, engine, None, 8, [object()] * 3, seed=cfg.seed)
    assert fn(1) == {"rougeL": 12.5, "exact_match": 0.0} and fn(2)["rougeL"] == 12.5
    assert not engine.module.training                      # decoded in eval mode
    assert all(ev.do_sample and ev.seeds == [cfg.seed] and ev.max_examples == 1000 for ev in seen)


# ----------------------------------------------------------------------------- prompt init with special tokens

WORDS = ["<pad>", "<unk>", "<s>", "</s>", "Suppose", "you", "are", "a", "student."]
VOCAB = 64


def _tokenizer(bos: str | None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer; with ``bos`` its post-processor puts BOS first, as LLaMA's (<s>) and OPT's (</s>) do."""
    backend = Tokenizer(WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    if bos is not None:
        backend.post_processor = TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, WORDS.index(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token=bos,
                                   eos_token="</s>")


def _tiny_opt() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=4,
                    word_embed_proj_dim=32, max_position_embeddings=64, pad_token_id=0, bos_token_id=3,
                    eos_token_id=3)
    return OPTForCausalLM(cfg)


@pytest.mark.parametrize("family,bos", [("llama", "<s>"), ("opt", "</s>")])
def test_prompt_init_keeps_bos_like_the_official_code(family, bos):
    tok = _tokenizer(bos)
    base = _tiny_opt() if family == "opt" else build_tiny("llama", 1, 32, 4, vocab_size=VOCAB, max_positions=64)
    teacher = PromptedTeacher(base, prompt_length=7, init="text", tokenizer=tok, dtype=torch.float32)
    emb = teacher.base.get_input_embeddings().weight.detach()
    b = WORDS.index(bos)
    # tokenizer(text) = [BOS, Suppose, you, are, a, student.] (6 ids), repeated and cut to 7: BOS comes back
    expected = [b, 4, 5, 6, 7, 8, b]
    assert torch.equal(teacher.prompt.detach()[0], emb[b])          # row 0 is the BOS embedding
    assert torch.equal(teacher.prompt.detach(), emb[expected])
    old = PromptedTeacher(base, prompt_length=7, init="text", tokenizer=tok, dtype=torch.float32,
                          init_special_tokens=False)
    assert torch.equal(old.prompt.detach(), emb[[4, 5, 6, 7, 8, 4, 5]])   # the text only, when asked


def test_prompt_init_without_bos_is_unchanged():
    """GPT-2's tokenizer adds no special token: the rows are the text's, with or without the option."""
    tok = _tokenizer(None)
    base = build_tiny("gpt2", 1, 32, 4, vocab_size=VOCAB, max_positions=64)
    emb = base.get_input_embeddings().weight.detach().clone()
    for special in (True, False):
        teacher = PromptedTeacher(base, prompt_length=7, init="text", tokenizer=tok, dtype=torch.float32,
                                  init_special_tokens=special)
        assert torch.equal(teacher.prompt.detach(), emb[[4, 5, 6, 7, 8, 4, 5]])
