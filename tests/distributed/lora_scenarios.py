"""2-rank checks of LoRA students (issue 22, item 4). The suite runs them as the ``lora`` scenario of the session's
one 2-rank launch (tests/distributed/scenarios.py, tests/distributed/conftest.py); alone:

    torchrun --nproc_per_node 2 tests/distributed/lora_scenarios.py --out DIR

Writes ``DIR/lora.rank<r>.json`` (one entry per scenario); tests/distributed/test_lora_ranks.py asserts on it.
The helpers (tiny config, run builder, per-rank batches) are tests/distributed/scenarios.py's.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from promptkd import distributed as dist  # noqa: E402
from tests.distributed import scenarios as sc  # noqa: E402

LORA = {"model.student.lora.r": 8, "model.student.lora.alpha": 16.0}
METHODS = ("rkl", "gkd", "seqkd", "imitkd", "distillm", "minillm", "kd", "sft")


def split_digests(module: torch.nn.Module) -> dict[str, str]:
    """Digests of the frozen base and of the adapters (gathered under ZeRO-3)."""
    state = sc.full_state(module)
    base = [v.flatten() for n, v in state.items() if ".lora_" not in n]
    adapters = [v.flatten() for n, v in state.items() if ".lora_" in n]
    return {"base": sc.digest(torch.cat(base)), "adapters": sc.digest(torch.cat(adapters)),
            "n_adapter_tensors": len(adapters)}


def optimizer_numel(engine) -> int:
    """Elements of this rank's AdamW first moments (ZeRO wraps the client optimizer: it holds the fp32
    partitions' states)."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    return sum(st["exp_avg"].numel() for st in inner.state.values() if "exp_avg" in st)


def scenario_promptkd_zero3_teacher() -> dict:
    """PromptKD with a ZeRO-3 student (LoRA) and a ZeRO-3 teacher: the base stays bitwise, the loss falls."""
    from promptkd.models.lora import trainable_summary
    from promptkd.rollout.core import gathered

    cfg = sc.tiny_cfg(sc.ZERO3, **sc.ZERO3_TEACHER, **LORA, **{"optim.student.lr": 5e-3, "optim.prompt.lr": 5e-3})
    m, splits, tok = sc.build_run(cfg, "promptkd")
    module = m.ctx.engine.module
    with gathered(module, m.ctx.gather_student, "lora test", engine=m.ctx.engine) as rollouts_gather_once:
        pass  # the rollouts of the steps below take the same gather (auto: it fits)
    before = split_digests(module)
    losses = []
    batches = sc.rank_batches(splits, 0, cfg)  # the same prompts every step: the loss should fall
    for step in range(4):
        losses.append(m.step(batches, step).metrics)
    after = split_digests(module)
    counts = trainable_summary(module)
    return {"before": before, "after": after, "metrics": losses, "counts": counts,
            "optimizer_numel": optimizer_numel(m.ctx.engine), "gathered_once": rollouts_gather_once,
            "partitioned": all(hasattr(p, "ds_id") for p in module.parameters())}


def scenario_merged_sync_and_export_zero3() -> dict:
    """vLLM's merged stream under ZeRO-3 equals the merged full state; export/ loads with plain transformers."""
    from transformers import AutoModelForCausalLM

    from promptkd.methods.base import lm_logits
    from promptkd.models.lora import ADAPTER_DIR, merge_state_dict, merged_parameters
    from promptkd.training.checkpoint import export_student

    cfg = sc.tiny_cfg(sc.ZERO3, **LORA, **{"optim.student.lr": 5e-3})
    m, splits, tok = sc.build_run(cfg, "rkl")
    for step in range(2):
        m.step(sc.rank_batches(splits, step, cfg), step)
    module = m.ctx.engine.module
    streamed = {n: t.float() for n, t in merged_parameters(module)}
    merged = merge_state_dict(module, sc.full_state(module))
    sync_err = max(float((streamed[n] - merged[n]).abs().max()) for n in merged)
    out_dir = os.path.join(sc.SHARED, "lora_export")
    export_student(m.ctx.engine, tok, out_dir)
    batch = sc._fixed_rollouts(splits, tok, step=1)[0]
    ids, mask = sc.broadcast_object((batch.input_ids, batch.attention_mask))
    module.eval()
    with torch.no_grad():
        live = lm_logits(module, ids, mask, m.ctx.vocab_size)
        loaded = AutoModelForCausalLM.from_pretrained(out_dir).eval()
        again = lm_logits(loaded, ids, mask, m.ctx.vocab_size)
    return {"sync_names": sorted(streamed) == sorted(merged), "sync_err": sync_err,
            "export_err": float((live - again).abs().max()), "scale": float(live.abs().max()),
            "adapter_files": sorted(os.listdir(os.path.join(out_dir, ADAPTER_DIR))),
            "top_files": sorted(os.listdir(out_dir))}


def method_run(method: str, ds_json: str) -> dict:
    extra = {"method.name": method}
    if method == "seqkd":
        extra["method.seqkd.cache_dir"] = os.path.join(sc.SHARED, f"lora_seqkd_{os.path.basename(ds_json)}")
    cfg = sc.tiny_cfg(ds_json, **LORA, **extra, **{"optim.student.lr": 5e-3})
    m, splits, tok = sc.build_run(cfg, method)
    before = split_digests(m.ctx.engine.module)
    metrics = [m.step(sc.rank_batches(splits, 0, cfg), 0).metrics]  # one optimizer step moves every adapter
    after = split_digests(m.ctx.engine.module)
    return {"before": before, "after": after, "metrics": metrics}


def scenario_methods_zero3() -> dict:
    """Every other method trains its adapters at ZeRO-3 and leaves the base alone."""
    return {name: sc.guarded(method_run, name, sc.ZERO3) for name in METHODS}


def scenario_promptkd_zero0_to_2() -> dict:
    return {ds: sc.guarded(method_run, "promptkd", f"ds_configs/{ds}.json") for ds in ("zero0", "zero1", "zero2")}


SCENARIOS = {name[len("scenario_"):]: fn for name, fn in globals().items() if name.startswith("scenario_")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init(timeout_s=60)
    sc.SHARED = sc.broadcast_object(tempfile.mkdtemp(prefix="pkd_lora_") if dist.is_main() else None)
    sc.prepare_shared()
    result: dict = {"ok": True}
    for name, fn in SCENARIOS.items():
        result[name] = sc.guarded(fn)
        dist.barrier()
    sc.record(args.out, "lora", result)
    dist.shutdown(0)


if __name__ == "__main__":
    main()
