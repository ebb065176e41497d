"""Exposure bias: ExAccErr (Arora et al., 2022), as PromptKD and MiniLLM measure it.

For every prompt x, draw k samples y ~ p_S(.|x) and k samples y ~ p_T(.|x) by pure
ancestral sampling (temperature 1, no top-k / top-p / n-gram ban), N new tokens at most.
On each sample, at each response position t (up to and including its first EOS):

    e_t = KL(p_T(.|x, y_<t) ‖ p_S(.|x, y_<t))        (full vocabulary, fp32)

Per prompt i, a_i(t) is the mean of e_t over the student's samples still alive at t
(0 when none is: a finished sample makes no more errors), and b_i(t) the same over the
teacher's samples. Accumulated over the first l positions and averaged over prompts:

    R(l) = mean_i sum_{t<=l} a_i(t)      ε(l) = mean_i sum_{t<=l} b_i(t)
    ExAccErr(l) = 100 · (R(l) − ε(l)) / ε(l)

ε(l) is the accumulated error under oracle (teacher) contexts, i.e. Arora et al.'s l·ε(l).
The per-position mean over alive samples follows the official evaluate_exposure_bias.py.
The teacher is the prompted one when ``exposure.prompt_path`` is set, else the plain one.

Standard error: prompts are the independent units (the k samples of a prompt share it),
and ExAccErr is a ratio of two paired means over prompts, so the delta method gives

    Var(R/ε) ≈ (1/n) [ s_A²/ε² − 2 R s_AB/ε³ + R² s_B²/ε⁴ ]
    SE(ExAccErr) = 100 · sqrt(Var(R/ε))

with A_i = sum_{t<=l} a_i(t), B_i likewise, and sample (co)variances over prompts
(ddof 1). ``bootstrap_se`` (resampling prompts) agrees to within its own noise.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from promptkd import distributed as dist
from promptkd.data import TokenizedExample, collate_prompts
from promptkd.evaluation.core import shard_indices
from promptkd.rollout import SamplingParams, StepFn, generate, hf_step_fn, position_ids, teacher_step_fn
from promptkd.rollout.stops import StopIds
from promptkd.seeding import derive_seed

log = logging.getLogger(__name__)

LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class LM:
    """A model as ExAccErr needs it: a sampling step function and full-sequence logits."""

    step_fn: StepFn
    logits: LogitsFn     # (ids [B, T], mask [B, T]) -> next-token logits [B, T-1, V]


def hf_lm(model: torch.nn.Module) -> LM:
    def logits(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)
        return out.logits[:, :-1]

    return LM(hf_step_fn(model), logits)


def teacher_lm(teacher: torch.nn.Module) -> LM:
    """A PromptedTeacher, with its prompt when it has one."""
    use_prompt = teacher.prompt_length > 0

    def logits(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return teacher(ids, mask, use_prompt=use_prompt)[0][:, :-1]

    return LM(teacher_step_fn(teacher, use_prompt), logits)


def token_kl(t_logits: torch.Tensor, s_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_T ‖ p_S) per position: [B, T, V] x2 -> [B, T], fp32; tokens with p_T = 0 add 0."""
    t_logp = torch.log_softmax(t_logits.float(), -1)
    s_logp = torch.log_softmax(s_logits.float(), -1)
    terms = t_logp.exp() * (t_logp - s_logp)
    return torch.where(t_logp.isneginf(), torch.zeros_like(terms), terms).sum(-1)


# ----------------------------------------------------------------------------- per-prompt curves

def sample_errors(sampler: LM, teacher: LM, student: LM, batch: dict[str, torch.Tensor], n_pos: int, vocab: int,
                  eos_id: StopIds, pad_id: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample per prompt from ``sampler``; returns (e_t [B, N], alive [B, N]), zero-padded to N."""
    params = SamplingParams(max_new_tokens=n_pos, do_sample=True)
    out = generate(sampler.step_fn, batch["input_ids"], batch["attention_mask"], params, eos_id, pad_id, vocab,
                   generator=generator, force_eos=False)
    p = out.prompt_len
    # logits at position p-1+j predict response token j
    t = teacher.logits(out.input_ids, out.attention_mask)[:, p - 1:, :vocab]
    s = student.logits(out.input_ids, out.attention_mask)[:, p - 1:, :vocab]
    alive = out.loss_mask[:, p:].float()
    err = token_kl(t, s) * alive
    pad = n_pos - err.shape[1]
    return torch.nn.functional.pad(err, (0, pad)), torch.nn.functional.pad(alive, (0, pad))


def per_prompt_curve(err: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """[k, B, N] errors and alive masks of k samples -> accumulated per-prompt curve [B, N].

    Position t contributes the mean error over the samples alive at t (0 if none is).
    """
    count = alive.sum(0)
    mean = torch.where(count > 0, err.sum(0) / count.clamp(min=1), torch.zeros_like(count))
    return mean.double().cumsum(-1)


@torch.no_grad()
def prompt_curves(student: LM, teacher: LM, examples: list[TokenizedExample], n_pos: int, samples: int, vocab: int,
                  eos_id: StopIds, pad_id: int, batch_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(A [n, N], B [n, N]): accumulated errors on student / teacher samples, every prompt once, all ranks."""
    slots = shard_indices(len(examples), dist.rank(), dist.world_size())
    local = sorted(((i, examples[i if i >= 0 else 0]) for i in slots), key=lambda item: len(item[1].prompt_ids))
    # on the device of the batches it samples for
    gen = torch.Generator(device=dist.device()).manual_seed(derive_seed(seed, "eval", rank=dist.rank()))
    mine: list[tuple[int, list[float], list[float]]] = []
    for start in range(0, len(local), batch_size):
        chunk = local[start:start + batch_size]
        batch = {k: v.to(dist.device()) for k, v in collate_prompts([ex for _, ex in chunk], pad_id).items()}
        curves = []
        for sampler in (student, teacher):
            runs = [sample_errors(sampler, teacher, student, batch, n_pos, vocab, eos_id, pad_id, gen)
                    for _ in range(samples)]
            curves.append(per_prompt_curve(torch.stack([e for e, _ in runs]), torch.stack([a for _, a in runs])))
        for row, (idx, _) in enumerate(chunk):
            if idx >= 0:
                mine.append((idx, curves[0][row].tolist(), curves[1][row].tolist()))
    merged = {i: (a, b) for part in dist.all_gather_object(mine) for i, a, b in part}
    order = range(len(examples))
    return np.array([merged[i][0] for i in order]), np.array([merged[i][1] for i in order])


# ----------------------------------------------------------------------------- statistics

def _nan_to_none(values: np.ndarray) -> list[Optional[float]]:
    return [None if not math.isfinite(v) else float(v) for v in values]


def exacc_stats(a: np.ndarray, b: np.ndarray) -> dict[str, list[Optional[float]]]:
    """ExAccErr(l) and its delta-method SE from per-prompt curves A, B [n, N] (see module docstring).

    Positions where ε(l) = 0 have no ExAccErr (None).
    """
    n = a.shape[0]
    r, e = a.mean(0), b.mean(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(e > 0, r / e, np.nan)
        if n > 1:
            var_a, var_b = a.var(0, ddof=1), b.var(0, ddof=1)
            cov = ((a - r) * (b - e)).sum(0) / (n - 1)
            var = (var_a / e**2 - 2 * r * cov / e**3 + r**2 * var_b / e**4) / n
            se = np.where(e > 0, 100 * np.sqrt(np.maximum(var, 0.0)), np.nan)
        else:
            se = np.full_like(r, np.nan)
    return {"R": r.tolist(), "eps": e.tolist(), "exacc_err": _nan_to_none(100 * (ratio - 1)),
            "se": _nan_to_none(se)}


def bootstrap_se(a: np.ndarray, b: np.ndarray, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """SE of ExAccErr(l) by resampling prompts with replacement (a cross-check of the delta method)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.shape[0], size=(n_boot, a.shape[0]))
    with np.errstate(divide="ignore", invalid="ignore"):
        draws = 100 * (a[idx].mean(1) / b[idx].mean(1) - 1)
    return draws.std(0, ddof=1)


# ----------------------------------------------------------------------------- stage=exposure

def report_positions(n_pos: int) -> list[int]:
    """Columns of the markdown table: powers of two up to N, and N."""
    cols = [2 ** i for i in range(int(math.log2(n_pos)) + 1)] if n_pos >= 1 else []
    return cols + ([n_pos] if n_pos not in cols else [])


def exposure_table(rows: list[dict[str, Any]], n_pos: int) -> str:
    """One row per student checkpoint: ExAccErr(l) ± SE (%) at the report positions."""
    cols = report_positions(n_pos)
    lines = ["| student | prompts | " + " | ".join(f"l={c}" for c in cols) + " |", "|" + "---|" * (2 + len(cols))]
    for r in rows:
        cells = []
        for c in cols:
            v, se = r["exacc_err"][c - 1], r["se"][c - 1]
            cells.append("–" if v is None else f"{v:.1f}" + ("" if se is None else f" ± {se:.1f}"))
        lines.append(f"| {r['student']} | {r['n_prompts']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def check_inputs(cfg: Any) -> tuple[list[str], str]:
    """The students' and the teacher's dirs, each checked to exist before anything loads (bad input: exit 2).

    The config-only checks (a teacher and prompts are set) run when the config is validated.
    """
    from promptkd.config import ConfigError
    from promptkd.models import PROMPT_WEIGHTS, missing_local_dir
    from promptkd.models.prompted_teacher import prompt_files_dir

    ex = cfg.exposure
    students = ex.students or [cfg.eval.model_path or os.path.join(cfg.output.dir, "export")]
    key = "exposure.students" if ex.students else ("eval.model_path" if cfg.eval.model_path else "output.dir")
    teacher_path = ex.teacher_path or cfg.model.teacher.path
    for k, path in [(key, s) for s in students] + [("exposure.teacher_path", teacher_path)]:
        if missing_local_dir(path):
            raise ConfigError(f"{k}: no such directory: {path}")
    prompt = ex.prompt_path
    if prompt and not os.path.isfile(os.path.join(prompt_files_dir(prompt), PROMPT_WEIGHTS)):
        raise ConfigError(f"exposure.prompt_path: no {PROMPT_WEIGHTS} in {prompt}")
    return students, teacher_path


def measure(students: list[tuple[str, Callable[[], torch.nn.Module]]], teacher: torch.nn.Module,
            examples: list[TokenizedExample], n_pos: int, samples: int, vocab: int, eos_id: StopIds, pad_id: int,
            batch_size: int, seed: int) -> list[dict[str, Any]]:
    """ExAccErr rows, one per student: ``students`` are (name, loader) pairs (one student in memory at a time)."""
    t_lm = teacher_lm(teacher)
    rows = []
    for name, load in students:
        a, b = prompt_curves(hf_lm(load()), t_lm, examples, n_pos, samples, vocab, eos_id, pad_id, batch_size, seed)
        rows.append({"student": name, "n_prompts": len(examples), **exacc_stats(a, b)})
        last = rows[-1]["exacc_err"][-1]
        log.info("exposure %s: ExAccErr(%d) = %s", name, n_pos, "n/a" if last is None else f"{last:.2f}%")
    return rows


def write_report(out_dir: str, result: dict[str, Any], n_prompts: int, samples: int) -> None:
    """results.json and results.md (the table) in ``out_dir``, by rank 0; all ranks call."""
    if dist.is_main():
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "results.json"), "w") as fh:
            json.dump(result, fh, indent=2)
        table = exposure_table(result["students"], result["positions"])
        with open(os.path.join(out_dir, "results.md"), "w") as fh:
            fh.write(f"# ExAccErr (%), mean ± SE over {n_prompts} prompts, k={samples}\n\n{table}")
        print(table, flush=True)
    dist.barrier()
