"""The GPU benchmark (run by bench/gpu.sh on a lent H100/H200, <= 9.5 minutes).

    bash bench/gpu.sh              # on the GPU machine -> bench/results/gpu_<GPU name>.json (+ $OUT)
    bash bench/gpu.sh --dry-run    # here, on CPU, tiny sizes -> bench/results/gpu_dryrun.json

Five sections, each written to the JSON as soon as it finishes (a timeout keeps
what was done):

1. ``mfu``: the student update (forward, reverse KL against fixed teacher
   logits, backward, optimizer step) of a GPT-2-medium-sized student built from
   config (24 layers, d=1024, 16 heads, vocab 50257) through the project's
   ``build_student_engine`` in bf16, ZeRO-0. FLOPs = 6 * N * tokens (N = all
   parameters, the tied embedding counted once since it is also the LM head);
   MFU against the card's dense bf16 peak, and against a measured 8192^3 bf16
   matmul.
2. ``rollout``: bench/rollout.py's comparison (ours vs HF ``generate``) on that
   student in bf16, 256 new tokens (the paper's max_length - max_prompt_length).
3. ``phases``: bench/phases.py's breakdown with a GPT-2-XL-sized bf16 teacher
   (48 layers, d=1600) and the GPT-2-medium-sized student (the paper's
   medium <- XL pair, ratio ~4.4x), 256 new tokens. The vocab there is the
   trained tokenizer's (~1k), so the LM heads are cheaper than GPT-2's.
4. ``vllm_rollout``: ``bench/rollout.py --engine vllm`` (rollout.engine=vllm's engine
   against our loop) on a GPT-2-base-size bf16 student, batch 32, 256 new tokens;
   skipped, and said so, where vLLM is not installed.
5. ``plan``: the memory planner (``stage=plan``) against ``torch.cuda.max_memory_allocated``:
   bench/plan_check.py's bf16 ZeRO-1/2 cases with a GPT-2-large-size teacher and GPT-2-medium-size
   student, batch 8, 512 tokens (``peak_phase``: the allocator's peak above the resident bytes vs the
   plan's largest phase; ``total_without_overhead``: its absolute peak vs the plan's total).
6. ``pipeline``: the quickstart pipeline end to end through the real launcher, once
   per engine (``rollout.engine``/``eval.engine`` hf, then vllm): bf16 teacher,
   ZeRO-2 student, export and eval; which stages started, the exit code, the
   distillation's median step time (the PromptKD iteration). No code path of this
   project has run on a GPU yet: this is where the first lent GPU shows every
   CUDA-path bug at once.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from typing import Any, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.common import (REPO, RunSizes, emit, init_dist, make_config, make_workspace, n_params, quiet,  # noqa: E402
                          set_threads, stats, sync, timed)

# Dense bf16 tensor-core peaks (no sparsity), from the vendor's data sheets.
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989.4e12), ("H200", 989.4e12),
             ("GH200", 989.4e12), ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12))

FULL = {
    "mfu": {"layers": 24, "hidden": 1024, "heads": 16, "vocab": 50257, "batch": 8, "seq": 512, "repeats": 6},
    "rollout": {"layers": 24, "hidden": 1024, "heads": 16, "vocab": 50257, "batch": 16, "new": 256, "repeats": 5},
    "phases": RunSizes(arch="gpt2", teacher_layers=48, teacher_hidden=1600, teacher_heads=25, student_layers=24,
                       student_hidden=1024, student_heads=16, teacher_dtype="bf16", precision="bf16", batch=16,
                       max_new_tokens=256, max_prompt_length=256, max_length=512, max_positions=1024),
    "phases_repeats": 5, "matmul_n": 8192,
    # rollout.engine=vllm vs our loop on a GPT-2-base-size student, 256 new tokens, batch 32
    "vllm_rollout": {"arch": "gpt2", "layers": 12, "hidden": 768, "heads": 12, "batch": 32, "new": 256, "repeats": 3},
    # the quickstart pipeline through the launcher, bf16 teacher, ZeRO-2 student, once per engine
    # ... with a GPT-2-base-size student, batch 32, up to 256 new tokens (its step time: the PromptKD iteration)
    "pipeline": {"teacher_sft_steps": 200, "student_sft_steps": 100, "steps": 30, "n_train": 2000, "n_dev": 50,
                 "n_test": 200, "seeds": "[10,20,30,40,50]", "new": 256, "batch": 32, "max_prompt_length": 64,
                 "student": "{arch: gpt2, layers: 12, hidden: 768, heads: 12, max_positions: 512}"},
}
DRY = {
    "mfu": {"layers": 2, "hidden": 64, "heads": 4, "vocab": 512, "batch": 2, "seq": 32, "repeats": 2},
    "rollout": {"layers": 2, "hidden": 64, "heads": 4, "vocab": 512, "batch": 4, "new": 8, "repeats": 2},
    "phases": RunSizes(arch="gpt2", teacher_layers=2, teacher_hidden=64, teacher_heads=4, student_layers=1,
                       student_hidden=32, student_heads=4, teacher_dtype="bf16", precision="bf16", batch=4,
                       max_new_tokens=8, max_prompt_length=64, max_length=128, max_positions=256, n_train=60),
    "phases_repeats": 2, "matmul_n": 256,
    "vllm_rollout": {"arch": "llama", "layers": 2, "hidden": 128, "heads": 4, "batch": 4, "new": 8, "repeats": 2},
    "pipeline": {"teacher_sft_steps": 2, "student_sft_steps": 2, "steps": 2, "n_train": 64, "n_dev": 4, "n_test": 8,
                 "seeds": "[10]", "new": 6, "batch": 4, "max_prompt_length": 64,
                 "student": "{arch: llama, layers: 1, hidden: 64, heads: 2}"},
}
SECTIONS = ("mfu", "rollout", "phases", "plan", "vllm_rollout", "pipeline")
# the memory planner vs torch.cuda.max_memory_allocated: bench/plan_check.py's cases at GPU size
PLAN_SIZES = {"full": dict(teacher_layers=36, teacher_hidden=1280, teacher_heads=20, student_layers=24,
                           student_hidden=1024, student_heads=16, batch=8, max_new_tokens=256, max_prompt_length=256,
                           max_length=512, n_train=64, tokenizer_vocab=800, max_positions=1024),
              "dry": None}


def plan_section(dry: bool) -> dict[str, Any]:
    """The plan of two PromptKD configs (ZeRO-0 and ZeRO-2, bf16) beside what one step measured."""
    from bench import plan_check

    ws = make_workspace(RunSizes(**plan_check.SIZES))
    sizes = PLAN_SIZES["dry" if dry else "full"]
    return {"cases": [plan_check.measure_case(name, ws, ws["root"], sizes) for name in ("zero1_bf16", "zero2_bf16")]}


def peak_flops(name: Optional[str]) -> Optional[float]:
    for key, value in PEAK_BF16:
        if name and key in name:
            return value
    return None


def matmul_tflops(n: int, repeats: int = 10) -> float:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sec, _ = timed(lambda: [a @ b for _ in range(repeats)])
    return 2 * n ** 3 * repeats / sec / 1e12


class VocabShim:
    """What build_student_engine reads from a tokenizer, for a GPT-2-sized vocabulary."""

    def __init__(self, size: int):
        self.size, self.pad_token_id, self.bos_token_id, self.eos_token_id = size, 0, 1, 2

    def __len__(self) -> int:
        return self.size


def mfu_section(ws: dict, p: dict, matmul_peak: float) -> dict[str, Any]:
    from promptkd.training.builders import build_student_engine
    from promptkd.losses import reverse_kl
    from promptkd.methods.base import lm_logits

    sizes = RunSizes(arch="gpt2", student_layers=p["layers"], student_hidden=p["hidden"], student_heads=p["heads"],
                     precision="bf16", batch=p["batch"], max_positions=max(1024, p["seq"]))
    cfg = make_config(ws, sizes, "rkl")
    engine, _ = build_student_engine(cfg, VocabShim(p["vocab"]), total_steps=1000)
    dev = next(engine.module.parameters()).device
    g = torch.Generator(device="cpu").manual_seed(0)
    b, t, v = p["batch"], p["seq"], p["vocab"]
    ids = torch.randint(3, v, (b, t), generator=g).to(dev)
    att = torch.ones(b, t, dtype=torch.long, device=dev)
    mask = torch.zeros(b, t - 1, dtype=torch.long, device=dev)
    mask[:, t // 2 - 1:] = 1  # the response half, as with 256 prompt + 256 response tokens
    t_logits = torch.randn(b, t - 1, v, generator=g, dtype=torch.bfloat16).to(dev)
    n_tok = float(mask.sum())

    def update() -> None:
        s_logits = lm_logits(engine, ids, att, v)
        loss, _ = reverse_kl(s_logits, t_logits, mask)
        engine.backward(loss / n_tok, scale_wrt_gas=False)
        engine.step()

    for _ in range(2):
        timed(update)
    secs = [timed(update)[0] for _ in range(p["repeats"])]
    med = statistics.median(secs)
    n = n_params(engine.module)
    layers, hidden = p["layers"], p["hidden"]
    flops = 6 * n * b * t
    attn_flops = 3 * 4 * layers * t * hidden * b * t  # QK^T and AV, fwd + bwd (x3), no causal discount
    peak = peak_flops(gpu_name())
    return {
        "model": {"arch": "gpt2", "layers": layers, "hidden": hidden, "heads": p["heads"], "vocab": v,
                  "params": n, "dtype": str(next(engine.module.parameters()).dtype)},
        "batch": b, "seq": t, "tokens_per_step": b * t, "step_seconds": stats(secs),
        "achieved_tflops_6N": flops / med / 1e12, "tokens_per_s": b * t / med,
        "peak_tflops_spec": peak / 1e12 if peak else None,
        "mfu_6N": flops / med / peak if peak else None,
        "mfu_6N_plus_attention": (flops + attn_flops) / med / peak if peak else None,
        "fraction_of_measured_matmul_peak": flops / med / 1e12 / matmul_peak,
        "zero_stage": 0, "precision": "bf16", "loss_chunk_size": 0,
    }


def rollout_section(ws: dict, p: dict) -> dict[str, Any]:
    from bench import rollout
    from promptkd.data import load_tokenizer
    from promptkd.models import build_tiny

    torch.manual_seed(0)
    vocab = max(p["vocab"], len(load_tokenizer(ws["tokenizer"])))  # the prompts' ids must exist in the model
    model = build_tiny("gpt2", p["layers"], p["hidden"], p["heads"], vocab_size=vocab, max_positions=1024,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    sizes = RunSizes(batch=p["batch"], max_new_tokens=p["new"], max_prompt_length=256)
    return rollout.run(sizes, repeats=p["repeats"], warmup=1, ws=ws, model=model, dtype=torch.bfloat16)


def phases_section(ws: dict, sizes: RunSizes, repeats: int) -> dict[str, Any]:
    from bench import phases

    return phases.run(sizes, repeats=repeats, warmup=1, ws=ws)


def vllm_missing() -> Optional[str]:
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    installed = spec is not None and spec.origin not in (None, "namespace")
    return None if installed else "vLLM is not installed here (pip install vllm)"


def vllm_rollout_section(ws: dict, p: dict) -> dict[str, Any]:
    """bench/rollout.py --engine vllm at GPU size (bf16 on a GPU)."""
    if vllm_missing():
        return {"skipped": vllm_missing()}
    from bench import rollout

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    sizes = RunSizes(batch=p["batch"], max_new_tokens=p["new"], max_prompt_length=256, max_positions=1024)
    return rollout.run_vllm(sizes, repeats=p["repeats"], warmup=1, ws=ws,
                            model_spec=(p["arch"], p["layers"], p["hidden"], p["heads"]), dtype=dtype)


PIPELINE_STAGES = ("pipeline 1/4", "pipeline 2/4", "pipeline 3/4", "pipeline 4/4")


def pipeline_section(p: dict) -> dict[str, Any]:
    """The quickstart pipeline end to end through the real launcher, per engine: which stages passed, how long.

    bf16 teacher, ZeRO-2 student, export and eval; on the GPU the student is GPT-2-base-sized (batch 32, up to 256
    new tokens), in the dry run 1 layer d=64 with 2 heads (head_dim 32, which vLLM's CPU kernels need). The
    distillation's median step time is the PromptKD iteration time of each engine.
    """
    import json
    import subprocess
    import sys
    import tempfile

    out: dict[str, Any] = {}
    for engine in ("hf", "vllm"):
        if engine == "vllm" and vllm_missing():
            out[engine] = {"skipped": vllm_missing()}
            continue
        run_dir = tempfile.mkdtemp(prefix=f"gpu_pipeline_{engine}_")
        cmd = [sys.executable, os.path.join(REPO, "launcher", "main.py"), f"output.dir={run_dir}",
               "model.teacher.dtype=bf16", "deepspeed=ds_configs/zero2.json", f"rollout.engine={engine}",
               f"eval.engine={engine}", "eval.no_repeat_ngram_size=0",
               f"pipeline.teacher_sft_steps={p['teacher_sft_steps']}",
               f"pipeline.student_sft_steps={p['student_sft_steps']}", f"train.max_steps={p['steps']}",
               f"data.synthetic.n_train={p['n_train']}", f"data.synthetic.n_dev={p['n_dev']}",
               f"data.synthetic.n_test={p['n_test']}", f"eval.seeds={p['seeds']}", f"rollout.max_new_tokens={p['new']}",
               f"eval.max_new_tokens={p['new']}", f"model.student.init={p['student']}",
               f"train.micro_batch_size={p['batch']}", f"data.max_prompt_length={p['max_prompt_length']}",
               f"data.max_length={p['max_prompt_length'] + p['new']}", "logging.progress_bar=false"]
        env = {k: v for k, v in os.environ.items()  # this process's own world must not leak into the launch
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
        log = proc.stdout + proc.stderr
        steps = []
        metrics = os.path.join(run_dir, "distill", "metrics.jsonl")
        if os.path.isfile(metrics):
            with open(metrics) as fh:
                steps = [r["perf/step_seconds"] for r in map(json.loads, fh) if "perf/step_seconds" in r]
        out[engine] = {"rc": proc.returncode, "seconds": round(time.perf_counter() - start, 1),
                       "stages_started": [s for s in PIPELINE_STAGES if s in log],
                       "eval_written": os.path.isfile(os.path.join(run_dir, "eval", "results.json")),
                       "promptkd_step_seconds_median": sorted(steps)[len(steps) // 2] if steps else None,
                       "last_line": log.strip().splitlines()[-1][-300:] if log.strip() else ""}
    return out


def gpu_name() -> Optional[str]:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def run(dry: bool, name: Optional[str] = None, sections=SECTIONS) -> dict[str, Any]:
    """All sections; the JSON is rewritten after each one. Returns the result."""
    plan = DRY if dry else FULL
    init_dist()
    name = name or ("gpu_dryrun" if dry else "gpu_" + re.sub(r"[^A-Za-z0-9]+", "_", gpu_name() or "none").strip("_"))
    ws = make_workspace(RunSizes(n_train=plan["phases"].n_train))
    result: dict[str, Any] = {"dry_run": dry, "gpu_name": gpu_name(), "nvidia_smi": os.environ.get("NVIDIA_SMI", ""),
                              "sections_done": [], "section_seconds": {}}
    result["matmul_bf16_tflops_measured"] = matmul_tflops(plan["matmul_n"])
    for section in sections:
        start = time.perf_counter()
        if section == "mfu":
            result["mfu"] = mfu_section(ws, plan["mfu"], result["matmul_bf16_tflops_measured"])
        elif section == "rollout":
            result["rollout"] = rollout_section(ws, plan["rollout"])
        elif section == "phases":
            result["phases"] = phases_section(ws, plan["phases"], plan["phases_repeats"])
        elif section == "plan":
            result["plan"] = plan_section(dry)
        elif section == "vllm_rollout":
            result["vllm_rollout"] = vllm_rollout_section(ws, plan["vllm_rollout"])
        elif section == "pipeline":
            result["pipeline"] = pipeline_section(plan["pipeline"])
        result["sections_done"].append(section)
        result["section_seconds"][section] = round(time.perf_counter() - start, 1)
        sync()
        emit(name, result, write=True) if section == sections[-1] else _write_partial(name, result)
    return result


def _write_partial(name: str, result: dict[str, Any]) -> None:
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # stdout stays one JSON line: the final one
        emit(name, result, write=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true",
                   help="tiny sizes on CPU: checks the code path, numbers mean nothing")
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = leave torch's default)")
    args = p.parse_args(argv)
    quiet()
    if args.threads:
        set_threads(args.threads)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("bench/gpu_bench.py: no CUDA device (use --dry-run on CPU)")
    return run(args.dry_run, sections=tuple(s for s in args.sections.split(",") if s))


if __name__ == "__main__":
    main()
