"""Our on-policy reverse-KL step (method ``rkl``) vs TRL's ``GKDTrainer`` (lmbda=1, beta=1).

    bench/.venv-trl/bin/python bench/vs_trl.py    # -> bench/results/vs_trl.json
    (bench/setup_trl_venv.sh creates that venv; run from the main venv, this
    script re-executes itself there.)

TRL's convention, read from its source (trl/experimental/gkd/gkd_trainer.py,
``generalized_jsd_loss``): beta=0 is ``F.kl_div(student_logp, teacher_logp)`` =
KL(teacher || student), forward KL; beta=1 is ``F.kl_div(teacher_logp,
student_logp)`` = KL(student || teacher), reverse KL -- our ``rkl``. lmbda=1
makes every step on-policy (student samples with do_sample, top_k=0, top_p=1;
temperature set to 1 like ours, TRL's default is 0.9).

Both run in ONE process (the TRL venv holds the same torch / transformers /
deepspeed versions as the main venv; the JSON records them): same student
initial weights, same frozen teacher module, same tokenizer, the same fixed
micro-batches of prompts in the same order, batch size, max_new_tokens, lr,
clipping. TRL's trainer drives the loop; a callback times each TRL step from
``on_step_begin`` to ``on_step_end`` (generation, forwards, loss, backward,
clipping, optimizer) and then runs and times one step of ours, so the two
alternate A B A B ... The ratio is ours / TRL per step (< 1: ours faster).
"""
from __future__ import annotations

import contextlib
import copy
import os
import statistics
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
TRL_PY = os.path.join(REPO, "bench", ".venv-trl", "bin", "python")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # GKDTrainer lives in trl.experimental

TARGET = 0.8


def unavailable_reason() -> str:
    return (f"trl is not importable by {sys.executable} and {TRL_PY} does not exist: "
            "run `bash bench/setup_trl_venv.sh` first (TRL lives in that separate venv only)")


def trl_available() -> bool:
    try:
        import importlib

        importlib.import_module("trl.experimental.gkd").GKDTrainer
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return False
    return True


def _collator(pad_id: int):
    import torch

    def collate(rows: list[dict]) -> dict:
        width = max(len(r["prompt_ids"]) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding, exactly as promptkd.data.collate_prompts
            n = len(r["prompt_ids"])
            ids[i, width - n:] = torch.tensor(r["prompt_ids"])
            mask[i, width - n:] = 1
        labels = ids.masked_fill(mask == 0, -100)  # replaced by the on-policy labels in training_step
        return {"prompts": ids, "prompt_attention_mask": mask, "input_ids": ids, "attention_mask": mask,
                "labels": labels}

    return collate


def _trl_args(sizes, ws: dict, torch, trl_defaults: bool = False):
    from trl.experimental.gkd import GKDConfig

    # TRL's SFTConfig turns gradient checkpointing on by default, and GKD then also samples
    # WITHOUT the KV cache (use_cache = not gradient_checkpointing). Ours uses the cache and no
    # recomputation, so the like-for-like comparison turns it off; --trl-defaults keeps TRL's.
    extra = {} if trl_defaults else {"gradient_checkpointing": False}
    # lr / weight decay / clipping / seed: the values bench.common.make_config gives our run
    return GKDConfig(**extra,
        output_dir=os.path.join(ws["root"], "trl_out"), per_device_train_batch_size=sizes.batch,
        gradient_accumulation_steps=1, max_steps=1, learning_rate=1e-4, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.01, max_grad_norm=1.0, optim="adamw_torch", logging_strategy="no",
        save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(), bf16=False, fp16=False,
        dataloader_num_workers=0, seed=7, lmbda=1.0, beta=1.0, temperature=1.0,
        max_new_tokens=sizes.max_new_tokens, disable_dropout=True, disable_tqdm=True)


class PassTimer:
    """Wall seconds in each model's forward passes outside generation, per side of the comparison.

    Forward hooks on the shared teacher, on our student and on TRL's student copy: the same few
    microseconds of hook on both sides. Forwards inside a generation are left to the generate phase.
    """

    def __init__(self) -> None:
        self.side = ""
        self.generating = False
        self.start: dict[str, float] = {}
        self.totals: dict[str, float] = {}

    def attach(self, module: Any, name: str) -> None:
        from bench.common import sync

        def pre(*_a: Any) -> None:
            if not self.generating:
                sync()
                self.start[name] = time.perf_counter()

        def post(*_a: Any) -> None:
            if not self.generating:
                sync()
                key = f"{self.side}:{name}"
                self.totals[key] = self.totals.get(key, 0.0) + time.perf_counter() - self.start[name]

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    def pop(self, side: str) -> dict[str, float]:
        out = {k.split(":", 1)[1]: v for k, v in self.totals.items() if k.startswith(side + ":")}
        self.totals = {k: v for k, v in self.totals.items() if not k.startswith(side + ":")}
        return out


def _pass_medians(per_step: list[dict], ours_phases: list[dict] | None) -> dict[str, float]:
    """Median seconds per step of each timed forward (and, for ours, the student step minus them)."""
    keys = sorted({k for d in per_step for k in d})
    out = {k: statistics.median(d.get(k, 0.0) for d in per_step) for k in keys}
    if ours_phases:
        out["student_step minus forwards (loss, backward, clip, optimizer, ...)"] = statistics.median(
            p["student_step"] - sum(d.values()) for p, d in zip(ours_phases, per_step))
    return out


def run(sizes, repeats: int = 5, warmup: int = 1, ws: dict | None = None, trl_defaults: bool = False) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDTrainer

    from bench.common import batches, build_run, init_dist, make_config, make_workspace, n_params, ratio, stats, sync

    ws = ws or make_workspace(sizes)
    args = None
    if not torch.distributed.is_initialized():
        # Built before the process group exists, accelerate sees a plain single process
        # (no DDP wrapper around TRL's student, no thread-count override).
        args = _trl_args(sizes, ws, torch, trl_defaults)
    init_dist()
    cfg = make_config(ws, sizes, "rkl")
    ours, splits, tok = build_run(cfg, "rkl")
    ctx = ours.ctx
    n_steps = warmup + repeats
    mbs = batches(splits, sizes.batch, n_steps)
    # TRL gets copies of the very same initial weights; the frozen teacher is shared.
    student = copy.deepcopy(ctx.engine.module).train()
    teacher = ctx.teacher.base
    data = Dataset.from_list([{"prompt_ids": ex.prompt_ids} for mb in mbs for ex in mb])
    args = args or _trl_args(sizes, ws, torch, trl_defaults)
    assert (args.learning_rate, args.weight_decay, args.max_grad_norm, args.seed) == (
        cfg.optim.student.lr, cfg.optim.student.weight_decay, cfg.train.grad_clip, cfg.seed)
    args.max_steps = n_steps
    times: dict[str, list[float]] = {"ours": [], "trl": []}
    tokens: dict[str, list[float]] = {"ours": [], "trl": []}
    orig_gen = GKDTrainer.generate_on_policy_outputs

    trl_phases: dict[str, list[float]] = {"generate": [], "compute_loss": []}
    ours_phases: list[dict] = []
    cpu: dict[str, list[float]] = {"ours": [], "trl": []}
    passes = PassTimer()
    passes.attach(teacher, "teacher_forward")
    passes.attach(ctx.engine.module, "student_forward")
    passes.attach(student, "student_forward")
    pass_times: dict[str, list[dict]] = {"ours": [], "trl": []}
    import promptkd.methods.promptkd as pk_method

    orig_rollouts = pk_method.student_rollouts

    def rollouts_unhooked(*a, **k):
        passes.generating = True
        try:
            return orig_rollouts(*a, **k)
        finally:
            passes.generating = False

    pk_method.student_rollouts = rollouts_unhooked

    def counting_gen(model, inputs, generation_config):
        sync()
        t0 = time.perf_counter()
        passes.generating = True
        try:
            out = orig_gen(model, inputs, generation_config)
        finally:
            passes.generating = False
        sync()
        trl_phases["generate"].append(time.perf_counter() - t0)
        tokens["trl"].append(float((out[2] != -100).sum()))
        return out

    orig_loss = GKDTrainer.compute_loss

    def timed_loss(self, *a, **k):
        t0 = time.perf_counter()
        out = orig_loss(self, *a, **k)
        sync()
        trl_phases["compute_loss"].append(time.perf_counter() - t0)
        return out

    class Interleave(TrainerCallback):
        def on_step_begin(self, *_a, **_k):
            passes.side = "trl"
            sync()
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args_, state, *_a, **_k):
            sync()
            times["trl"].append(time.perf_counter() - self.t0)
            cpu["trl"].append(time.process_time() - self.c0)
            pass_times["trl"].append(passes.pop("trl"))
            i = state.global_step - 1
            passes.side = "ours"
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            ctx.timer.pop()
            metrics = ours.step([mbs[i]], i).metrics
            sync()
            times["ours"].append(time.perf_counter() - t0)
            cpu["ours"].append(time.process_time() - c0)
            ours_phases.append(ctx.timer.pop())
            pass_times["ours"].append(passes.pop("ours"))
            tokens["ours"].append(metrics["tokens"])

    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                         processing_class=tok, data_collator=_collator(tok.pad_token_id), callbacks=[Interleave()])
    # Same batches in the same order as ours: no shuffling.
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(data)
    GKDTrainer.generate_on_policy_outputs = staticmethod(counting_gen)
    GKDTrainer.compute_loss = timed_loss
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # the trainer prints its summary: keep stdout one JSON line
            trainer.train()
    finally:
        GKDTrainer.generate_on_policy_outputs = staticmethod(orig_gen)
        GKDTrainer.compute_loss = orig_loss
        pk_method.student_rollouts = orig_rollouts
    assert torch.get_num_threads() == threads, "something changed the thread count during the bench"
    t = {k: v[warmup:] for k, v in times.items()}
    r = ratio(t["ours"], t["trl"])
    return {
        "sizes": sizes,
        "params": {"teacher": n_params(teacher), "student": n_params(student)},
        "batch": sizes.batch, "max_new_tokens": sizes.max_new_tokens,
        "trl_beta_convention": "beta=1 -> F.kl_div(teacher_logp, student_logp, log_target=True) = KL(student||teacher)"
                               " (reverse KL); beta=0 -> forward KL",
        "loss_tokens_per_step_median": {k: statistics.median(v[warmup:]) for k, v in tokens.items()},
        "step_seconds": {k: stats(v) for k, v in t.items()},
        "phase_seconds_median": {
            "ours": {k: statistics.median(p[k] for p in ours_phases[warmup:]) for k in ours_phases[-1]},
            "trl": {**{k: statistics.median(v[warmup:]) for k, v in trl_phases.items()},
                    "rest (backward, clip, optimizer, ...)": statistics.median(
                        a - b - c for a, b, c in zip(t["trl"], trl_phases["generate"][warmup:],
                                                     trl_phases["compute_loss"][warmup:]))}},
        "pass_seconds_median": {side: _pass_medians(pass_times[side][warmup:], phases)
                                for side, phases in (("ours", ours_phases[warmup:]), ("trl", None))},
        "step_cpu_seconds": {k: stats(v[warmup:]) for k, v in cpu.items()},
        "ratio_cpu_of_medians": statistics.median(cpu["ours"][warmup:]) / statistics.median(cpu["trl"][warmup:]),
        "ratio_ours_over_trl": r["median_of_round_ratios"], "ratio_detail": r,
        "target": TARGET, "meets_target": r["median_of_round_ratios"] <= TARGET,
        "repeats": repeats, "warmup": warmup, "same_process": True,
        "trl_setup": {"distributed_type": str(trainer.accelerator.distributed_type),
                      "model_wrapper": type(trainer.model_wrapped).__name__,
                      "gradient_checkpointing": bool(args.gradient_checkpointing),
                      "generation_use_cache": bool(trainer.generation_config.use_cache),
                      "trl_defaults": trl_defaults},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from bench.common import step_bench_args

    p = step_bench_args(__doc__.split("\n")[0])
    p.add_argument("--trl-defaults", action="store_true",
                   help="keep TRL's default gradient checkpointing (and so generation without KV cache); "
                        "writes vs_trl_defaults.json")
    args = p.parse_args(argv)
    if not trl_available():
        # venv pythons are symlinks to one interpreter: tell venvs apart by sys.prefix; the env guard stops loops
        if os.path.exists(TRL_PY) and not os.environ.get("PROMPTKD_BENCH_REEXEC"):
            os.environ["PROMPTKD_BENCH_REEXEC"] = "1"
            os.execv(TRL_PY, [TRL_PY, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:])])
        from bench.common import emit, result_name

        return emit(result_name("vs_trl", args), {"status": "unavailable", "reason": unavailable_reason()})
    from bench.common import RunSizes, emit, quiet, result_name, set_threads

    quiet()
    load = list(os.getloadavg())
    set_threads(args.threads)
    res = run(RunSizes(batch=args.batch, max_new_tokens=args.max_new_tokens, vocab=args.vocab), repeats=args.repeats,
              warmup=args.warmup, trl_defaults=args.trl_defaults)
    name = result_name("vs_trl_defaults" if args.trl_defaults else "vs_trl", args)
    return emit(name, {"status": "ok", **res}, load_before=load)


if __name__ == "__main__":
    main()
