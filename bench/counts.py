"""Host syncs, collectives and ZeRO-3 parameter all-gathers per optimizer step, counted (not timed).

    .venv/bin/python bench/counts.py --label before   # -> bench/results/counts_before.json

Runs PromptKD and RKL optimizer steps through the project's own ``build_run`` on tiny models and
counts, per step and per phase (rollout / prompt_step / student_step / other):

- host syncs: ``aten._local_scalar_dense`` (``.item()``, ``float(t)``, ``bool(t)``, ``int(t)``) and
  ``Tensor.tolist``; nonzero-like ops (``nonzero``, boolean-mask ``index``/``index_put_``,
  ``masked_select``) separately. On CUDA each one waits for the device;
- torch.distributed collectives by name (patched before the process group exists, so DeepSpeed's
  comm backend calls the counting wrappers too), and the bytes the all-gathers return;
- under ZeRO-3 at 2 ranks: all-gathers (and their bytes) per decoded rollout token, and per
  decoded token of a dev evaluation.

Three parts: world 1 ZeRO-0 (``loss_chunk_size`` 0 = automatic, and 4 = the many-chunk regime of the
OPT/LLaMA shapes, where the automatic chunk is 4M elements); then this script relaunches itself with
2 ranks (torch.distributed.run) for ZeRO-3. Counts do not depend on the machine's speed.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import traceback
from typing import Any, Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from bench.common import REPO, RunSizes, emit, make_config, make_workspace, quiet, set_threads  # noqa: E402

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "_all_gather_base", "reduce_scatter",
               "reduce_scatter_tensor", "_reduce_scatter_base", "broadcast", "reduce", "all_gather_object",
               "broadcast_object_list", "barrier", "all_to_all_single", "all_gather_coalesced")
GATHERS = ("all_gather", "all_gather_into_tensor", "_all_gather_base", "all_gather_coalesced")
SIZES = RunSizes(teacher_layers=2, teacher_hidden=64, teacher_heads=4, student_layers=2, student_hidden=32,
                 student_heads=4, batch=4, max_new_tokens=16, max_prompt_length=64, max_length=96, n_train=64,
                 tokenizer_vocab=500)


class Counter:
    """Counts keyed by (phase, kind); the phase follows the method's PhaseTimer."""

    def __init__(self) -> None:
        self.counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.where: collections.Counter = collections.Counter()
        self.phase = "other"
        self.enabled = False
        self.decode_steps = 0

    def add(self, kind: str, n: float = 1, where: bool = False) -> None:
        if not self.enabled:
            return
        self.counts[self.phase][kind] += n
        if where:
            self.where[f"{self.phase}:{kind}:{_caller()}"] += 1

    def reset(self) -> dict[str, dict[str, float]]:
        out = {p: dict(c) for p, c in self.counts.items()}
        self.counts = collections.defaultdict(collections.Counter)
        return out


C = Counter()


def _caller() -> str:
    """The innermost frame in promptkd/, deepspeed/ or transformers/ (where a sync comes from)."""
    for frame in reversed(traceback.extract_stack(limit=40)[:-3]):
        f = frame.filename
        for pkg in ("promptkd", "deepspeed", "transformers"):
            if f"/{pkg}/" in f and "bench/" not in f:
                return f"{f.split(f'/{pkg}/')[-1]}:{frame.lineno}({frame.name})"
    return "?"


def _is_bool(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)


class SyncCounter(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D401
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense":
            C.add("host_sync", where=True)
        elif name in ("nonzero", "masked_select", "nonzero_static"):
            C.add("nonzero_like", where=True)
        elif name in ("index", "index_put", "index_put_", "_index_put_impl_") and len(args) > 1 \
                and any(_is_bool(i) for i in (args[1] or []) if i is not None):
            C.add("nonzero_like", where=True)
        return func(*args, **(kwargs or {}))


def patch_tolist() -> None:
    original = torch.Tensor.tolist

    def tolist(self):  # type: ignore[no-untyped-def]
        C.add("host_sync", where=True)
        return original(self)

    torch.Tensor.tolist = tolist  # type: ignore[method-assign]


def patch_collectives() -> None:
    """Wrap torch.distributed's collectives (before init: DeepSpeed's backend keeps references)."""
    import torch.distributed as tdist

    for name in COLLECTIVES:
        fn = getattr(tdist, name, None)
        if fn is None:
            continue

        def wrapper(*args, __fn=fn, __name=name, **kwargs):
            C.add(f"collective/{__name}")
            if __name in GATHERS:
                out = args[0] if args else kwargs.get("output_tensor", kwargs.get("tensor_list"))
                tensors = out if isinstance(out, (list, tuple)) else [out]
                C.add("allgather_bytes", sum(t.numel() * t.element_size() for t in tensors
                                             if isinstance(t, torch.Tensor)))
            return __fn(*args, **kwargs)

        setattr(tdist, name, wrapper)


def patch_phases_and_decoding() -> None:
    from promptkd import metrics, rollout
    from promptkd.rollout import core

    original_phase = metrics.PhaseTimer.phase

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        before, C.phase = C.phase, name
        try:
            with original_phase(self, name):
                yield
        finally:
            C.phase = before

    metrics.PhaseTimer.phase = phase  # type: ignore[method-assign]
    original_step_fn = core.hf_step_fn

    def hf_step_fn(model):  # every decode step of every loop that decodes with an HF model
        step = original_step_fn(model)

        def counted(ids, mask, past):
            C.add("decode_steps")
            return step(ids, mask, past)

        return counted

    for mod in (core, rollout):
        mod.hf_step_fn = hf_step_fn
    import promptkd.methods.base as base
    import promptkd.training.run as run_mod

    base.hf_step_fn = hf_step_fn
    run_mod.hf_step_fn = hf_step_fn


def per_step(counts: list[dict[str, dict[str, float]]]) -> dict[str, Any]:
    """Mean per step, per phase and in total."""
    n = len(counts)
    phases: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for c in counts:
        for p, kinds in c.items():
            phases[p].update(kinds)
    out: dict[str, Any] = {p: {k: v / n for k, v in sorted(kinds.items())} for p, kinds in sorted(phases.items())}
    total: collections.Counter = collections.Counter()
    for kinds in phases.values():
        total.update(kinds)
    out["total"] = {k: v / n for k, v in sorted(total.items())}
    roll = phases.get("rollout", {})
    if roll.get("decode_steps"):
        gathers = sum(v for k, v in roll.items() if k.startswith("collective/") and k.split("/", 1)[1] in GATHERS)
        out["rollout_per_decode_step"] = {"allgathers": gathers / roll["decode_steps"],
                                          "allgather_bytes": roll.get("allgather_bytes", 0) / roll["decode_steps"],
                                          "collectives": sum(v for k, v in roll.items() if k.startswith("collective/"))
                                          / roll["decode_steps"]}
    return out


def run_method(ws: dict, method: str, steps: int, ds_json: str, chunk: int) -> dict[str, Any]:
    from promptkd import distributed as dist
    from promptkd.training.run import build_run

    cfg = make_config(ws, SIZES, method, **{
        "deepspeed": os.path.join(REPO, ds_json), "method.loss_chunk_size": chunk, "logging.interval": 10,
        "output.dir": os.path.join(ws["root"], f"run_{method}_{chunk}")})
    run = build_run(cfg, train=False, total_steps=100, rollout_seed=100)
    items = run.splits.train
    rank, world, bs = dist.rank(), dist.world_size(), SIZES.batch
    counts = []
    with SyncCounter():
        for step in range(steps + 1):  # step 0 warms up (lazy inits) and is not counted
            mb = [items[((step * world + rank) * bs + j) % len(items)] for j in range(bs)]
            C.enabled = step > 0
            result = run.method.step([mb], step)
            reduce_logged(result, step)
            C.enabled = False
            if step > 0:
                counts.append(C.reset())
    C.reset()
    return {"per_step": per_step(counts), "steps": steps}


def reduce_logged(result: Any, step: int) -> None:
    """What the trainer does with a step's metrics (reduce them on logging steps only, when it can)."""
    reduce = getattr(result, "reduce", None)
    if reduce is not None:
        if (step + 1) % 10 == 0:
            reduce()
    else:
        _ = result.metrics  # before: every step's metrics were already global floats


def dev_eval_counts(ws: dict, ds_json: str, n_examples: int) -> dict[str, Any]:
    """Collectives per decoded token of one greedy dev evaluation of the student."""
    from promptkd.config import EvalConfig
    from promptkd.training.run import build_run, dev_eval_fn

    cfg = make_config(ws, SIZES, "rkl", **{"deepspeed": os.path.join(REPO, ds_json),
                                          "output.dir": os.path.join(ws["root"], "run_eval")})
    run = build_run(cfg, train=False, total_steps=100, rollout_seed=100)
    ev = EvalConfig(batch_size=4, max_new_tokens=SIZES.max_new_tokens)
    fn = dev_eval_fn(ev, run.engine, run.tokenizer, run.vocab_size, run.splits.train[:n_examples])
    C.phase, C.enabled = "rollout", True
    with SyncCounter():
        fn(0)
    C.enabled, C.phase = False, "other"
    return per_step([C.reset()])


def world_one(ws: dict, steps: int) -> dict[str, Any]:
    out = {}
    for method in ("promptkd", "rkl"):
        for chunk in (0, 4):
            out[f"{method}_zero0_chunk{chunk}"] = run_method(ws, method, steps, "ds_configs/zero0.json", chunk)
    return out


def ranks_main(args: argparse.Namespace) -> None:
    """One rank of the 2-rank ZeRO-3 part: writes its counts to args.out/rank<r>.json."""
    from promptkd import distributed as dist

    dist.init(timeout_s=300)
    ws = make_workspace(SIZES, root=args.ws)
    zero3 = "ds_configs/zero3_tiny_test.json"
    res = {f"{m}_zero3": run_method(ws, m, args.steps, zero3, 0) for m in ("promptkd", "rkl")}
    res["dev_eval_zero3"] = dev_eval_counts(ws, zero3, 8)
    res["where_top"] = dict(C.where.most_common(25))
    with open(os.path.join(args.out, f"rank{dist.rank()}.json"), "w") as fh:
        json.dump(res, fh)
    dist.shutdown(0)


def two_ranks(steps: int) -> dict[str, Any]:
    out = tempfile.mkdtemp(prefix="pkd_counts_")
    ws = make_workspace(SIZES)  # the workspace (data + tokenizer) is made once, before the launch
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    cmd = ["timeout", "900", sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           os.path.abspath(__file__), "--rank-part", "--out", out, "--ws", ws["root"], "--steps", str(steps)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"2-rank part failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    with open(os.path.join(out, "rank0.json")) as fh:
        return json.load(fh)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--label", default="after", help="written to bench/results/counts_<label>.json")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rank-part", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    p.add_argument("--ws", default="", help=argparse.SUPPRESS)
    p.add_argument("--skip-ranks", action="store_true", help="only the world-1 part")
    args = p.parse_args(argv)
    quiet()
    patch_collectives()
    patch_tolist()
    patch_phases_and_decoding()
    set_threads(1)
    if args.rank_part:
        ranks_main(args)
        return {}
    from bench.common import init_dist

    init_dist()
    ws = make_workspace(SIZES)
    res: dict[str, Any] = {"label": args.label, "sizes": SIZES, "world1": world_one(ws, args.steps)}
    res["where_top_world1"] = dict(C.where.most_common(25))
    C.where.clear()
    if not args.skip_ranks:
        res["world2"] = two_ranks(args.steps)
    return emit(f"counts_{args.label}", res)


if __name__ == "__main__":
    main()
