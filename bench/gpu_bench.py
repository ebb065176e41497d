"""The GPU benchmark (run by bench/gpu.sh on a lent H100/H200: under 9 minutes, no network).

    bash bench/gpu.sh              # on the GPU machine -> bench/results/gpu_<GPU name>.json (+ $OUT)
    bash bench/gpu.sh --dry-run    # here, on CPU, tiny sizes -> bench/results/gpu_dryrun.json

Each section runs in its own subprocess (its own process group) with its own timeout, in this order,
the most important first, and the whole run has one budget (TOTAL_S): a section that hangs or fails is
recorded and the next one starts. Every section's full output goes to its own log file (in ``$BENCH_OUT``,
the device tool's ``$OUT``, when set), and the summary JSON, rewritten after each section, gives each
one's status (ok | failed | timeout | skipped | no_time), seconds, exit code, log file and result.

1. ``launcher``: the quickstart pipeline end to end through the real launcher (``launcher/main.py``, as
   users run it): synthetic data, SFT of a teacher and of a GPT-2-base-size student, PromptKD distillation
   with a bf16 teacher and a bf16 ZeRO-2 student, then the sampled evaluation (the paper's protocol) of
   all of them. No code path of this project had run on a GPU before: this is where the first lent GPU
   shows the CUDA-path bugs. Recorded: the stages started, the exit code, whether the results were
   written, the distillation's median step time (the PromptKD iteration).
2. ``mfu``: the student update (forward, reverse KL against fixed teacher logits, backward, optimizer
   step) of a GPT-2-medium-size student (24 layers, d=1024, vocab 50257) through ``build_student_engine``
   in bf16, ZeRO-0. FLOPs = 6 * N * tokens (the tied embedding counted once); MFU against the card's
   dense bf16 peak and against a measured 8192^3 bf16 matmul.
3. ``phases``: bench/phases.py's breakdown with a GPT-2-XL-size bf16 teacher (48 layers, d=1600) and the
   GPT-2-medium-size student (the paper's medium <- XL pair), 256 new tokens.
4. ``plan``: the memory planner (``stage=plan``) against ``torch.cuda.max_memory_allocated``:
   bench/plan_check.py's bf16 ZeRO-1/2 cases, GPT-2-large-size teacher, GPT-2-medium-size student,
   batch 8, 512 tokens (``peak_phase``: the allocator's peak above the resident bytes vs the plan's
   largest phase; ``total_without_overhead``: its absolute peak vs the plan's total).
5. ``rollout``: bench/rollout.py's comparison (ours vs HF ``generate``) on the GPT-2-medium-size student
   in bf16, 256 new tokens.
6. ``vllm_rollout``, 7. ``launcher_vllm``: the vLLM engine (bench/rollout.py --engine vllm; the launcher
   with rollout.engine/eval.engine=vllm). Skipped, and said so, where vLLM is not installed: the lent
   image has none, and its GPU wheel is far over what a call can carry.

The dry run adds ``timeout_probe`` after the first section: a child that outlives its 2 s timeout, which
shows that a timeout is caught and recorded and that the next section still runs. Every run records the
distributions the sections imported and any that are neither on the GPU image (bench/gpu_image.txt) nor
carried as wheels (bench/gpu_wheels.txt): ``not_on_image_nor_carried``, empty when the wheels are complete.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.common import (REPO, RunSizes, emit, init_dist, make_config, make_workspace, n_params, quiet,  # noqa: E402
                          set_threads, stats, timed)

# Dense bf16 tensor-core peaks (no sparsity), from the vendor's data sheets.
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989.4e12), ("H200", 989.4e12),
             ("GH200", 989.4e12), ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12))

SECTIONS = ("launcher", "mfu", "phases", "plan", "rollout", "vllm_rollout", "launcher_vllm")
# Seconds each section may run before its process group is killed, and the whole run's budget. bench/gpu.sh
# gives this script TOTAL_S + 30 s after installing the carried wheels, so the call ends under 9 minutes.
TIMEOUT_S = {"launcher": 210, "mfu": 60, "phases": 90, "plan": 75, "rollout": 60, "vllm_rollout": 90,
             "launcher_vllm": 150}
TOTAL_S = 480
DRY_TIMEOUT_S = {**{name: 120 for name in SECTIONS}, "timeout_probe": 2}
DRY_TOTAL_S = 170   # CI runs the dry run: well under 3 minutes on 2 shared cores
MIN_SECTION_S = 10  # a section is not started with less than this left of the budget
WHEEL_LIST = os.path.join(REPO, "bench", "gpu_wheels.txt")
IMAGE_LIST = os.path.join(REPO, "bench", "gpu_image.txt")
RANK_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
OWN_MODULES = {"bench", "launcher", "promptkd", "tests"}

FULL = {
    "mfu": {"layers": 24, "hidden": 1024, "heads": 16, "vocab": 50257, "batch": 8, "seq": 512, "repeats": 6},
    "rollout": {"layers": 24, "hidden": 1024, "heads": 16, "vocab": 50257, "batch": 16, "new": 256, "repeats": 3},
    "phases": RunSizes(arch="gpt2", teacher_layers=48, teacher_hidden=1600, teacher_heads=25, student_layers=24,
                       student_hidden=1024, student_heads=16, teacher_dtype="bf16", precision="bf16", batch=16,
                       max_new_tokens=256, max_prompt_length=256, max_length=512, max_positions=1024),
    "phases_repeats": 3, "matmul_n": 8192,
    # rollout.engine=vllm vs our loop on a GPT-2-base-size student, 256 new tokens, batch 32
    "vllm_rollout": {"arch": "gpt2", "layers": 12, "hidden": 768, "heads": 12, "batch": 32, "new": 256, "repeats": 3},
    # the quickstart pipeline through the launcher: bf16 teacher, bf16 ZeRO-2 GPT-2-base-size student, batch 32,
    # up to 256 new tokens, sampled evaluation over 2 seeds (its step time: the PromptKD iteration)
    "launcher": {"teacher_sft_steps": 150, "student_sft_steps": 80, "steps": 20, "n_train": 2000, "n_dev": 50,
                 "n_test": 100, "seeds": "[10,20]", "new": 256, "batch": 32, "max_prompt_length": 64,
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
    "launcher": {"teacher_sft_steps": 2, "student_sft_steps": 2, "steps": 2, "n_train": 64, "n_dev": 4, "n_test": 8,
                 "seeds": "[10]", "new": 6, "batch": 4, "max_prompt_length": 64,
                 "student": "{arch: llama, layers: 1, hidden: 64, heads: 2}",
                 "teacher": "{arch: llama, layers: 1, hidden: 64, heads: 2}"},  # bf16 matmuls are slow on CPU
}
# the memory planner vs torch.cuda.max_memory_allocated: bench/plan_check.py's cases at GPU size
PLAN_SIZES = {"full": dict(teacher_layers=36, teacher_hidden=1280, teacher_heads=20, student_layers=24,
                           student_hidden=1024, student_heads=16, batch=8, max_new_tokens=256, max_prompt_length=256,
                           max_length=512, n_train=64, tokenizer_vocab=800, max_positions=1024),
              "dry": None}


def plan_section(dry: bool) -> dict[str, Any]:
    """The plan of two PromptKD configs (ZeRO-1 and ZeRO-2, bf16) beside what one step measured."""
    from bench import plan_check

    ws = make_workspace(RunSizes(**plan_check.SIZES))
    sizes = PLAN_SIZES["dry" if dry else "full"]
    cases = ("zero2_bf16",) if dry else ("zero1_bf16", "zero2_bf16")  # the dry run checks the path, once
    return {"cases": [plan_check.measure_case(name, ws, ws["root"], sizes) for name in cases]}


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
        loss, _ = reverse_kl(s_logits, teacher=t_logits, mask=mask)
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


def gpu_name() -> Optional[str]:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None




# ----------------------------------------------------------------------------- the launcher sections

PIPELINE_STAGES = ("pipeline 1/4", "pipeline 2/4", "pipeline 3/4", "pipeline 4/4")


def launcher_args(p: dict, engine: str, run_dir: str) -> list[str]:
    """configs/quickstart.yaml (the pipeline) through launcher/main.py at the bench's sizes: bf16 teacher and student,
    ZeRO-2, sampled evaluation, rollouts and evaluation on ``engine``."""
    return [os.path.join(REPO, "launcher", "main.py"), f"output.dir={run_dir}",
            "model.teacher.dtype=bf16", "train.precision=bf16", "deepspeed=ds_configs/zero2.json",
            f"rollout.engine={engine}", f"eval.engine={engine}", "eval.no_repeat_ngram_size=0", "eval.do_sample=true",
            f"pipeline.teacher_sft_steps={p['teacher_sft_steps']}",
            f"pipeline.student_sft_steps={p['student_sft_steps']}", f"train.max_steps={p['steps']}",
            f"data.synthetic.n_train={p['n_train']}", f"data.synthetic.n_dev={p['n_dev']}",
            f"data.synthetic.n_test={p['n_test']}", f"eval.seeds={p['seeds']}", f"rollout.max_new_tokens={p['new']}",
            f"eval.max_new_tokens={p['new']}", f"model.student.init={p['student']}",
            f"train.micro_batch_size={p['batch']}", f"data.max_prompt_length={p['max_prompt_length']}",
            f"data.max_length={p['max_prompt_length'] + p['new']}", "logging.progress_bar=false",
            *([f"model.teacher.init={p['teacher']}"] if p.get("teacher") else [])]  # else the quickstart's


def launcher_result(run_dir: str, log_path: str) -> dict[str, Any]:
    """What a launcher section got to: the stages it started, the results written, the PromptKD step time."""
    with open(log_path, errors="replace") as fh:
        log = fh.read()
    steps = []
    metrics = os.path.join(run_dir, "distill", "metrics.jsonl")
    if os.path.isfile(metrics):
        with open(metrics) as fh:
            steps = [r["perf/step_seconds"] for r in map(json.loads, fh) if "perf/step_seconds" in r]
    results = os.path.join(run_dir, "eval", "results.json")
    out = {"stages_started": [s for s in PIPELINE_STAGES if s in log], "eval_written": os.path.isfile(results),
           "promptkd_step_seconds_median": statistics.median(steps) if steps else None}
    if out["eval_written"]:
        with open(results) as fh:
            out["eval_models"] = sorted(json.load(fh).get("models", {}))
    return out


# ----------------------------------------------------------------------------- one section, in its own process

def child(section: str, dry: bool, result_path: str) -> None:
    """Run one measuring section in this (child) process and write its result JSON."""
    if section == "timeout_probe":  # the dry run's check that a hung section is killed and the next one runs
        time.sleep(3600)
    plan = DRY if dry else FULL
    init_dist()
    ws = make_workspace(RunSizes(n_train=plan["phases"].n_train))
    if section == "mfu":
        peak = matmul_tflops(plan["matmul_n"])
        res = {"matmul_bf16_tflops_measured": peak, **mfu_section(ws, plan["mfu"], peak)}
    elif section == "phases":
        res = phases_section(ws, plan["phases"], plan["phases_repeats"])
    elif section == "plan":
        res = plan_section(dry)
    elif section == "rollout":
        res = rollout_section(ws, plan["rollout"])
    elif section == "vllm_rollout":
        res = vllm_rollout_section(ws, plan["vllm_rollout"])
    else:
        raise SystemExit(f"gpu_bench.py: unknown section {section!r}")
    res["gpu_name"] = gpu_name()
    with open(result_path, "w") as fh:
        json.dump(res, fh, default=str)


def record_imports(path: str) -> None:
    """Append every top-level module this process imports (those already imported first) to ``path``."""
    seen: set[str] = set()
    fh = open(path, "a", buffering=1)  # line-buffered: complete even when the process ends with os._exit

    def note(name: str) -> None:
        top = name.partition(".")[0]
        if top and top not in seen:
            seen.add(top)
            fh.write(top + "\n")

    for name in list(sys.modules):
        note(name)
    sys.addaudithook(lambda event, args: note(args[0]) if event == "import" and args and args[0] else None)


def launch(argv: list[str]) -> None:
    """Run launcher/main.py in this process (it ends the process itself, with the launch's exit code)."""
    import runpy

    sys.argv = list(argv)
    runpy.run_path(argv[0], run_name="__main__")


# ----------------------------------------------------------------------------- the runner

def section_command(section: str, dry: bool, work: str, threads: int) -> tuple[list[str], Optional[str]]:
    """The child's command line, and the launcher's run dir for a launcher section."""
    me = [sys.executable, os.path.abspath(__file__), "--imports", os.path.join(work, f"{section}.imports")]
    if section.startswith("launcher"):
        run_dir = os.path.join(work, section)
        plan = (DRY if dry else FULL)["launcher"]
        return me + ["--launch", *launcher_args(plan, "vllm" if section == "launcher_vllm" else "hf", run_dir)], run_dir
    extra = (["--dry-run"] if dry else []) + (["--threads", str(threads)] if threads else [])
    return me + ["--child", section, "--result", os.path.join(work, f"{section}.json"), *extra], None


def run_logged(cmd: list[str], log_path: str, timeout_s: float, threads: int) -> tuple[Optional[int], bool]:
    """(exit code, timed out): ``cmd`` in its own process group, all its output into ``log_path``."""
    env = {k: v for k, v in os.environ.items() if k not in RANK_ENV}  # this process's world must not leak
    env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1", PYTHONUNBUFFERED="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=timeout_s), False
        except subprocess.TimeoutExpired:
            log.write(f"\n[gpu_bench] killed after {timeout_s:.0f} s, the section's timeout\n")
            return None, True
        finally:  # a timeout, or this runner stopped (SIGTERM from bench/gpu.sh's outer timeout): no orphans
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def run_section(section: str, dry: bool, timeout_s: float, log_dir: str, work: str, threads: int) -> dict[str, Any]:
    """One section in its own process: its status, seconds, exit code, log file and result."""
    if section in ("vllm_rollout", "launcher_vllm") and vllm_missing():
        return {"status": "skipped", "reason": vllm_missing(), "seconds": 0.0, "log": None}
    if timeout_s < min(MIN_SECTION_S, DRY_TIMEOUT_S.get(section, MIN_SECTION_S)):
        return {"status": "no_time", "reason": f"{timeout_s:.0f} s left of the budget", "seconds": 0.0, "log": None}
    log_path = os.path.join(log_dir, f"gpu_{section}.log")
    cmd, run_dir = section_command(section, dry, work, threads)
    start = time.perf_counter()
    rc, timed_out = run_logged(cmd, log_path, timeout_s, threads)
    entry: dict[str, Any] = {"status": "timeout" if timed_out else ("ok" if rc == 0 else "failed"),
                             "seconds": round(time.perf_counter() - start, 1), "rc": rc,
                             "timeout_s": round(timeout_s), "log": log_path}
    result_path = os.path.join(work, f"{section}.json")
    if run_dir is not None:
        entry["result"] = launcher_result(run_dir, log_path)
    elif os.path.isfile(result_path):
        with open(result_path) as fh:
            entry["result"] = json.load(fh)
    if entry["status"] != "ok":
        with open(log_path, errors="replace") as fh:
            entry["log_tail"] = fh.read()[-2000:]
    return entry


def _rows(path: str) -> list[list[str]]:
    with open(path) as fh:
        return [line.split("#", 1)[0].split() for line in fh if line.strip() and not line.startswith("#")]


def _norm(dist_name: str) -> str:
    return re.sub(r"[-_.]+", "-", dist_name).lower()


def carried(how: tuple[str, ...] = ("build", "download")) -> dict[str, str]:
    """{import name: distribution} of bench/gpu_wheels.txt: what the image lacks and bench/.whl carries
    (how="not-needed": what the bench imports here and does not need there)."""
    return {row[0]: row[1] for row in _rows(WHEEL_LIST) if row[2] in how}


def wheel_status() -> dict[str, str]:
    """Where each carried module imports from here (the wheels' install dir on the GPU machine), or MISSING."""
    import importlib.util

    out = {}
    for module in carried():
        spec = importlib.util.find_spec(module)
        out[module] = spec.origin if spec is not None and spec.origin else "MISSING"
    return out


def import_report(work: str) -> tuple[list[str], list[str]]:
    """(distributions the sections imported, those neither on the GPU image nor carried as wheels)."""
    from importlib.metadata import packages_distributions

    tops: set[str] = set()
    for name in os.listdir(work):
        if name.endswith(".imports"):
            tops |= {row[0] for row in _rows(os.path.join(work, name))}
    owners = packages_distributions()
    listed = carried(("build", "download", "not-needed")).values()
    available = {_norm(row[0]) for row in _rows(IMAGE_LIST)} | {_norm(d) for d in listed}
    used, missing = set(), set()
    for top in tops - OWN_MODULES:
        dists = {_norm(d) for d in owners.get(top, [])} - {"promptkd"}
        used |= dists
        if dists and not dists & available:  # a namespace shared by several distributions: one available will do
            missing |= dists
    return sorted(used), sorted(missing)


def run(dry: bool, name: Optional[str] = None, sections=SECTIONS, threads: int = 0, probe: bool = True,
        timeouts: Optional[dict[str, float]] = None, total_s: Optional[float] = None) -> dict[str, Any]:
    """Every section in order, each in its own process; the summary JSON is rewritten after each one."""
    timeouts = {**(DRY_TIMEOUT_S if dry else TIMEOUT_S), **(timeouts or {})}
    end = time.monotonic() + (total_s or (DRY_TOTAL_S if dry else TOTAL_S))
    order = list(sections)
    if dry and probe:
        order.insert(1, "timeout_probe")
    name = name or ("gpu_dryrun" if dry else "gpu_" + re.sub(r"[^A-Za-z0-9]+", "_", gpu_name() or "none").strip("_"))
    log_dir = os.environ.get("BENCH_OUT") or tempfile.mkdtemp(prefix="gpu_bench_logs_")
    os.makedirs(log_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="gpu_bench_work_")
    result: dict[str, Any] = {"dry_run": dry, "gpu_name": gpu_name(), "nvidia_smi": os.environ.get("NVIDIA_SMI", ""),
                              "order": order, "budget_s": round(end - time.monotonic()), "log_dir": log_dir,
                              "wheels": wheel_status(), "sections": {}}
    for i, section in enumerate(order):
        left = end - time.monotonic()
        result["sections"][section] = run_section(section, dry, min(timeouts[section], left), log_dir, work, threads)
        result["imported_distributions"], result["not_on_image_nor_carried"] = import_report(work)
        _write(name, result, final=i == len(order) - 1)
    return result


def _write(name: str, result: dict[str, Any], final: bool) -> None:
    import contextlib
    import io

    if final:
        emit(name, result, write=True)  # the one JSON line on stdout
        return
    with contextlib.redirect_stdout(io.StringIO()):
        emit(name, result, write=True)


def _stop(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through run_logged, which kills the running section's group


def main(argv: Optional[list[str]] = None) -> Optional[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true",
                   help="tiny sizes on CPU: checks the code path, numbers mean nothing")
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--threads", type=int, default=0, help="CPU threads per section (0 = leave torch's default)")
    p.add_argument("--timeout", action="append", default=[], metavar="SECTION=SECONDS",
                   help="override one section's timeout (the dry run's tests use it)")
    p.add_argument("--no-probe", action="store_true", help="dry run: leave out the timeout probe")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--imports", help=argparse.SUPPRESS)
    p.add_argument("--launch", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.imports:
        record_imports(args.imports)
    if args.launch:
        launch(args.launch)
        return None
    quiet()
    if args.threads:
        set_threads(args.threads)
    if args.child:
        child(args.child, args.dry_run, args.result)
        from promptkd import distributed as dist

        dist.shutdown(0)  # barrier -> destroy -> os._exit: gloo processes otherwise sometimes abort at exit
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("bench/gpu_bench.py: no CUDA device (use --dry-run on CPU)")
    signal.signal(signal.SIGTERM, _stop)
    timeouts = {k: float(v) for k, v in (t.split("=", 1) for t in args.timeout)}
    return run(args.dry_run, sections=tuple(s for s in args.sections.split(",") if s), threads=args.threads,
               probe=not args.no_probe, timeouts=timeouts)


if __name__ == "__main__":
    main()
