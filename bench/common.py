"""Shared helpers of the benchmarks: interleaved timing, tiny runs, and (from bench/output.py) JSON output.

Every bench script prints ONE JSON line and writes the same object to
``bench/results/<name>.json`` (and to ``$BENCH_OUT/<name>.json`` when set).
Ratios are always measured in one process, interleaved (A B A B ...), with
medians over the repeats, because the machines here are small and shared.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from bench.output import REPO, RESULTS, emit  # noqa: F401 (the benches import them from here)

os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")


def set_threads(n: int) -> int:
    """Intra-op threads; OMP_NUM_THREADS too, so no library (accelerate, promptkd) resets it."""
    os.environ["OMP_NUM_THREADS"] = str(max(1, n))
    torch.set_num_threads(max(1, n))
    return torch.get_num_threads()


# ----------------------------------------------------------------------------- timing

def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], cpu: Optional[list] = None) -> tuple[float, Any]:
    """Wall seconds of ``fn()`` (device synced); its process CPU seconds are appended to ``cpu``."""
    sync()
    start, start_cpu = time.perf_counter(), time.process_time()
    out = fn()
    sync()
    if cpu is not None:
        cpu.append(time.process_time() - start_cpu)
    return time.perf_counter() - start, out


def interleave(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1,
               cpu_times: Optional[dict[str, list[float]]] = None) -> dict[str, list[float]]:
    """Run the functions A B A B ... ``repeats`` times after ``warmup`` rounds; wall seconds per call.

    ``cpu_times``, if given, receives the process CPU seconds per call: with one thread it is the
    work done, whatever other tenants of a shared machine do to the wall clock.
    """
    for _ in range(warmup):
        for fn in fns.values():
            timed(fn)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, None if cpu_times is None else cpu_times.setdefault(name, []))[0])
    return times


def traced_peak(fn: Callable[[], Any]) -> tuple[Any, int, int]:
    """(fn(), peak live bytes, bytes still live at the end) of torch's CPU allocations during ``fn``.

    From the profiler's allocator trace (profile_memory): every allocation and free in time order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        value = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return value, peak, live


def stats(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0]] * 3
    return {"median": statistics.median(s), "min": s[0], "max": s[-1], "q1": q[0], "q3": q[2], "n": len(s)}


def ratio(num: list[float], den: list[float]) -> dict[str, float]:
    """Median of the per-round ratios (pairs taken back to back) and the ratio of medians."""
    per_round = [a / b for a, b in zip(num, den)]
    return {"median_of_round_ratios": statistics.median(per_round),
            "ratio_of_medians": statistics.median(num) / statistics.median(den),
            "round_ratios": [round(r, 4) for r in per_round]}


# ----------------------------------------------------------------------------- tiny PromptKD runs

@dataclass
class RunSizes:
    """Models and batch of a benchmark run (defaults: the CPU ≈5x teacher/student pair)."""

    arch: str = "llama"
    teacher_layers: int = 4
    teacher_hidden: int = 256
    teacher_heads: int = 8
    student_layers: int = 2
    student_hidden: int = 144
    student_heads: int = 4
    teacher_dtype: str = "fp32"      # bf16 matmuls are ~10x slower than fp32 on these CPUs
    precision: str = "fp32"          # student
    batch: int = 16
    max_new_tokens: int = 32
    max_prompt_length: int = 64
    max_length: int = 128
    n_train: int = 400
    tokenizer_vocab: int = 2000       # what BPE is asked for; the synthetic text gives ~1040
    max_positions: int = 512
    loss_chunk_size: int = 0
    vocab: int = 0                    # > 0: pad the tokenizer with never-used tokens to this size (e.g. 32000)
    extra: dict = field(default_factory=dict)


def make_workspace(sizes: RunSizes, root: Optional[str] = None) -> dict[str, str]:
    """Synthetic data + a trained BPE tokenizer in a temp dir (no hub needed)."""
    from promptkd.data import load_examples, make_synthetic_splits, train_tokenizer

    root = root or tempfile.mkdtemp(prefix="pkd_bench_")
    files = make_synthetic_splits(os.path.join(root, "data"), sizes.n_train, 5, 5, seed=3)
    tok_dir = os.path.join(root, f"tokenizer_v{sizes.vocab}" if sizes.vocab else "tokenizer")
    if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        texts = [e.prompt + " " + e.references[0] for e in load_examples(files["train"])]
        tok = train_tokenizer(texts, sizes.tokenizer_vocab, tok_dir)
        if sizes.vocab:
            pad_vocab(tok, sizes.vocab, tok_dir)
    return {"root": root, "train": files["train"], "tokenizer": tok_dir}


def pad_vocab(tok: Any, size: int, out_dir: str) -> None:
    """Grow the tokenizer to ``size`` with tokens no text contains, as real LMs' 32k-150k vocabularies.

    The synthetic text only supports a ~1k BPE; with a real-size vocabulary the LM head, the
    sampling and the full-vocabulary losses weigh as they do on real models. Every system in a
    comparison sees the same padded tokenizer, so the models' heads and losses are equally wide.
    """
    if size < len(tok):
        raise ValueError(f"--vocab {size} is smaller than the trained tokenizer ({len(tok)})")
    tok.add_tokens([f"<unused_{i}>" for i in range(size - len(tok))])
    tok.save_pretrained(out_dir)


def make_config(ws: dict[str, str], sizes: RunSizes, method: str, **extra: Any):
    from promptkd.config import load_config, with_overrides

    s = sizes
    over = {
        "stage": "train", "deepspeed": os.path.join(REPO, "ds_configs", "zero0.json"), "seed": 7,
        "tokenizer.path": ws["tokenizer"], "data.train_file": ws["train"], "data.dev_size": 0,
        "data.max_length": s.max_length, "data.max_prompt_length": s.max_prompt_length,
        "model.teacher.dtype": s.teacher_dtype,
        "model.teacher.init": {"arch": s.arch, "layers": s.teacher_layers, "hidden": s.teacher_hidden,
                               "heads": s.teacher_heads, "max_positions": s.max_positions},
        "model.student.init": {"arch": s.arch, "layers": s.student_layers, "hidden": s.student_hidden,
                               "heads": s.student_heads, "max_positions": s.max_positions},
        "method.name": method, "method.loss_chunk_size": s.loss_chunk_size,
        "rollout.max_new_tokens": s.max_new_tokens, "train.micro_batch_size": s.batch, "train.grad_accum": 1,
        "train.precision": s.precision, "optim.student.warmup_steps": 0, "optim.prompt.warmup_steps": 0,
        "optim.student.lr": 1e-4, "optim.prompt.lr": 1e-4, "logging.progress_bar": False,
        "output.dir": os.path.join(ws["root"], f"run_{method}"),
    }
    over.update(s.extra)
    over.update(extra)
    base = load_config(None, ["stage=train", f"data.train_file={ws['train']}"])
    return with_overrides(base, over)


def build_run(cfg, method_name: str, total_steps: int = 1000, seed: int = 100):
    """(method, splits, tokenizer) of ``cfg`` through the project's one run builder, without a trainer."""
    from promptkd.config import with_overrides
    from promptkd.training.run import build_run as build

    run = build(with_overrides(cfg, {"method.name": method_name}), train=False, total_steps=total_steps,
                rollout_seed=seed)
    return run.method, run.splits, run.tokenizer


def batches(splits, batch: int, n: int) -> list[list]:
    """``n`` micro-batches of ``batch`` training examples (cycled), fixed for the whole bench."""
    items = splits.train
    return [[items[(i * batch + j) % len(items)] for j in range(batch)] for i in range(n)]


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def init_dist() -> None:
    """A world of one through the project's own init (gloo on CPU, nccl on GPU)."""
    from promptkd import distributed as dist

    if not dist.is_initialized():
        dist.init(timeout_s=600)


def quiet() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    for name in ("DeepSpeed", "deepspeed", "promptkd", "transformers", "torch.distributed", "trl", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def step_bench_args(description: str) -> argparse.ArgumentParser:
    """The options every step benchmark takes (phases, promptkd_overhead, vs_trl)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--vocab", type=int, default=0,
                   help="pad the tokenizer to this many tokens (e.g. 32000, like Llama); writes <bench>_vocab<N>.json")
    return p


def step_bench_main(name: str, description: str, run: Callable[..., dict[str, Any]],
                    argv: Optional[list[str]] = None) -> dict[str, Any]:
    """The shared ``main`` of phases / promptkd_overhead: parse, pin threads, run, emit."""
    args = step_bench_args(description).parse_args(argv)
    quiet()
    load = list(os.getloadavg())
    init_dist()
    set_threads(args.threads)
    sizes = RunSizes(batch=args.batch, max_new_tokens=args.max_new_tokens, vocab=args.vocab)
    res = run(sizes, repeats=args.repeats, warmup=args.warmup)
    return emit(result_name(name, args), res, load_before=load)


def result_name(bench: str, args: argparse.Namespace) -> str:
    return f"{bench}_vocab{args.vocab}" if getattr(args, "vocab", 0) else bench
