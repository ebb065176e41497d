"""2-rank ZeRO-3 checks of the device-discipline work (issue 19), run as the scenario ``export_gathers`` of
tests/distributed/scenarios.py (one launch for the session).

The export of a ZeRO-3 student, gathered one module at a time, equals the weights consolidated from a
checkpoint of the same engine (deepspeed's zero_to_fp32), and the most parameter elements gathered at
once are one module's; tests/distributed/test_device_ranks.py asserts on the result.
"""
from __future__ import annotations

import contextlib
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)


from promptkd import distributed as dist  # noqa: E402
from tests.distributed import scenarios as sc  # noqa: E402


@contextlib.contextmanager
def counting_gathers():
    """Wraps deepspeed.zero.GatheredParameters: the peak number of parameter elements gathered at once."""
    import deepspeed

    real, count = deepspeed.zero.GatheredParameters, {"now": 0, "peak": 0, "gathers": 0}

    @contextlib.contextmanager
    def counted(params, *args, **kwargs):
        params = list(params) if isinstance(params, (list, tuple)) else [params]
        with real(params, *args, **kwargs):
            n = sum(p.numel() for p in params)  # the full sizes while gathered
            count["now"] += n
            count["gathers"] += 1
            count["peak"] = max(count["peak"], count["now"])
            try:
                yield
            finally:
                count["now"] -= n

    deepspeed.zero.GatheredParameters = counted
    try:
        yield count
    finally:
        deepspeed.zero.GatheredParameters = real


def export_zero3(out: str) -> dict:
    from safetensors.torch import load_file

    from promptkd.training import checkpoint
    from promptkd.training.consolidate import student_state_dict

    cfg = sc.tiny_cfg(sc.ZERO3, **{"method.name": "sft"})
    m, splits, tok = sc.build_run(cfg, "sft")
    m.step(sc.rank_batches(splits, 0, cfg), 0)  # weights that differ from the init
    engine = m.ctx.engine
    module = engine.module
    partitioned = all(p.numel() == 0 for p in module.parameters())
    export = os.path.join(sc.SHARED, "export")
    with counting_gathers() as count:
        checkpoint.export_student(engine, tok, export)
    ckpt = checkpoint.save(os.path.join(sc.SHARED, "run"), 1, engine, {"trainer": checkpoint.Snapshot({"step": 1})})
    sizes = {n: sum(p.ds_numel for p in sub.parameters(recurse=False)) for n, sub in module.named_modules()}
    total = sum(p.ds_numel for p in module.parameters())
    result = {"partitioned": partitioned, "peak": count["peak"], "gathers": count["gathers"],
              "largest_module": max(sizes.values()), "total": total}
    if dist.is_main():
        exported = load_file(os.path.join(export, "model.safetensors"))
        consolidated = student_state_dict(ckpt)
        result["keys_equal"] = sorted(exported) == sorted(k for k in consolidated if k in exported)
        result["missing"] = sorted(set(consolidated) - set(exported))
        result["max_err"] = max(float((exported[k].float() - consolidated[k].float()).abs().max()) for k in exported)
        result["n_tensors"] = len(exported)
    return result
