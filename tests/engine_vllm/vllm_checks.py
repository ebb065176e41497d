"""rollout.engine=vllm against our decode loop, in one process (world size 1), printing JSON.

    .venv-vllm/bin/python tests/engine_vllm/vllm_checks.py OUT_DIR

Needs vLLM (scripts/install.sh --vllm). Tiny Llama student with head_dim 32 (vLLM's CPU attention has no
kernel for 16), fp32. tests/engine_vllm/test_vllm.py runs it and asserts on the JSON.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from promptkd import distributed as dist  # noqa: E402
from promptkd.config import load_config, with_overrides  # noqa: E402
from promptkd.data import collate_prompts, load_examples, make_synthetic_splits, train_tokenizer  # noqa: E402
from promptkd.methods.base import student_rollout, student_rollouts, to_device  # noqa: E402
from promptkd.rollout import SamplingParams, generate, hf_step_fn  # noqa: E402
from promptkd.training.run import build_run  # noqa: E402


def tiny_run(root: str, **extra):
    data = make_synthetic_splits(os.path.join(root, "data"), 64, 4, 4, seed=3)
    tok_dir = os.path.join(root, "tok")
    if not os.path.isdir(tok_dir):
        train_tokenizer([e.prompt + " " + e.references[0] for e in load_examples(data["train"])], 500, tok_dir)
    over = {"stage": "train", "deepspeed": "ds_configs/zero0.json", "seed": 7, "tokenizer.path": tok_dir,
            "data.train_file": data["train"], "data.dev_size": 0, "data.max_length": 128,
            "data.max_prompt_length": 96, "model.teacher.dtype": "fp32",
            "model.teacher.init": {"arch": "llama", "layers": 2, "hidden": 64, "heads": 2},
            "model.student.init": {"arch": "llama", "layers": 2, "hidden": 64, "heads": 2},
            "rollout.max_new_tokens": 16, "train.micro_batch_size": 3, "train.grad_accum": 2,
            "optim.student.warmup_steps": 0, "optim.prompt.warmup_steps": 0, "optim.student.lr": 1e-2,
            "logging.progress_bar": False, "output.dir": os.path.join(root, "run"), "rollout.engine": "vllm",
            "method.name": "rkl", **extra}
    cfg = with_overrides(load_config(None, ["stage=train", f"data.train_file={data['train']}"]), over)
    return build_run(cfg, train=False, total_steps=10)


def hf_greedy(ctx, micro_batches):
    greedy = SamplingParams(max_new_tokens=ctx.sampling.max_new_tokens, do_sample=False)
    out = []
    for mb in micro_batches:
        p = to_device(collate_prompts(mb, ctx.pad_id))
        out.append(generate(hf_step_fn(ctx.engine.module), p["input_ids"], p["attention_mask"], greedy, ctx.eos_id,
                            ctx.pad_id, ctx.vocab_size, sync=ctx.sync_rollout))
    return out


def same(a, b) -> bool:
    return all(torch.equal(x.input_ids, y.input_ids) and torch.equal(x.loss_mask, y.loss_mask)
               and torch.equal(x.attention_mask, y.attention_mask) and x.prompt_len == y.prompt_len
               for x, y in zip(a, b)) and len(a) == len(b)


def vllm_greedy(ctx, micro_batches):
    greedy = SamplingParams(max_new_tokens=ctx.sampling.max_new_tokens, do_sample=False)
    return student_rollouts(dataclasses.replace(ctx, sampling=greedy), micro_batches)


def mask_ok(r, eos: int) -> bool:
    """Mask = response tokens up to and including the first EOS; every row ends on EOS (forced if needed)."""
    for row, mask in zip(r.input_ids, r.loss_mask):
        resp, m = row[r.prompt_len:], mask[r.prompt_len:]
        n = int(m.sum())
        if n == 0 or not bool(m[:n].all()) or bool(m[n:].any()) or int(resp[n - 1]) != eos:
            return False
        if bool((resp[:n - 1] == eos).any()):
            return False
    return True


def export_loads(run, out_dir: str) -> bool:
    """A PromptKD export (student + teacher_prompt/) loads in vLLM and greedy-decodes as the student does."""
    from vllm import LLM, SamplingParams as VSP

    from promptkd.models import load_prompt
    from promptkd.training.checkpoint import export_student

    pk = tiny_run(os.path.join(out_dir, "pk"), **{"method.name": "promptkd", "rollout.engine": "hf"})
    export = os.path.join(out_dir, "export")
    export_student(pk.engine, pk.tokenizer, export, extra=pk.method.export)
    prompt_ok = load_prompt(export).shape == pk.teacher.prompt.shape
    llm = LLM(model=export, dtype="float32", max_model_len=128, enforce_eager=True)
    mb = pk.splits.train[:2]
    ids = [ex.prompt_ids for ex in mb]
    got = [list(o.outputs[0].token_ids) for o in llm.generate(
        [{"prompt_token_ids": p} for p in ids], VSP(temperature=0.0, max_tokens=8, detokenize=False), use_tqdm=False)]
    ctx = pk.method.ctx
    p = to_device(collate_prompts(mb, ctx.pad_id))
    ref = generate(hf_step_fn(ctx.engine.module), p["input_ids"], p["attention_mask"],
                   SamplingParams(max_new_tokens=8, do_sample=False), ctx.eos_id, ctx.pad_id, ctx.vocab_size,
                   force_eos=False)
    want = [row[ref.prompt_len:][m[ref.prompt_len:].bool()].tolist() for row, m in zip(ref.input_ids, ref.loss_mask)]
    print(json.dumps({"export_got": got, "export_want": want, "prompt_ok": prompt_ok}), file=sys.stderr)
    return prompt_ok and got == want


def eval_engines_agree(run, out_dir: str) -> dict:
    """stage=eval's decoding: greedy answers through vLLM equal ours; sampled ones repeat per seed."""
    import dataclasses

    from promptkd.evaluation import evaluate
    from promptkd.stages import model_decoder
    from promptkd.training.checkpoint import export_student

    export = os.path.join(out_dir, "eval_export")
    export_student(run.engine, run.tokenizer, export)
    ev = dataclasses.replace(run.cfg.eval, do_sample=False, seeds=[10], max_new_tokens=16, no_repeat_ngram_size=0,
                             max_examples=6)
    examples = run.splits.train[:6]
    hf = evaluate(model_decoder(export, run.tokenizer, torch.float32), run.tokenizer, examples, ev)
    vcfg = with_overrides(run.cfg, {"eval.engine": "vllm", "eval.no_repeat_ngram_size": 0})
    gen = model_decoder(export, run.tokenizer, torch.float32, "", vcfg)
    vl = evaluate(gen, run.tokenizer, examples, ev)
    sampled = dataclasses.replace(ev, do_sample=True, seeds=[10, 20])
    s1, s2 = evaluate(gen, run.tokenizer, examples, sampled), evaluate(gen, run.tokenizer, examples, sampled)
    return {"eval_greedy_answers_equal": hf["seeds"][0]["answers"] == vl["seeds"][0]["answers"],
            "eval_greedy_rouge_equal": hf["rougeL"] == vl["rougeL"],
            "eval_sampled_repeatable": [r["answers"] for r in s1["seeds"]] == [r["answers"] for r in s2["seeds"]],
            "eval_sampled_seeds_differ": s1["seeds"][0]["answers"] != s1["seeds"][1]["answers"]}


def seqkd_through_vllm(out_dir: str) -> dict:
    """SeqKD's teacher responses from vLLM: greedy equal to our loop's, cached under a key of their own."""
    from promptkd.methods.seqkd import SeqKD

    res = {}
    for engine in ("hf", "vllm"):
        run = tiny_run(os.path.join(out_dir, "seqkd_" + engine), **{"method.name": "seqkd", "rollout.engine": engine})
        m = run.method
        configured = m.ctx  # the cache key was made with its sampling
        greedy = SamplingParams(max_new_tokens=configured.sampling.max_new_tokens, do_sample=False)
        m.ctx = dataclasses.replace(configured, sampling=greedy)
        res[engine] = ([ex.response_ids for ex in m.teacher_examples(run.splits.train[:4])], m.cache.dir)
        if engine == "vllm":
            m.ctx = configured
            again = SeqKD.from_config(run.cfg, m.ctx)  # the same key: from the cache, no engine starts
            again_rows = [ex.response_ids for ex in again.teacher_examples(run.splits.train[:4])]
            print(json.dumps({"seqkd_again": again_rows, "first": res[engine][0],
                              "llm_started": again.teacher_llm is not None}), file=sys.stderr)
            res["cached"] = again_rows == res[engine][0] and again.teacher_llm is None
    return {"seqkd_greedy_equal": res["hf"][0] == res["vllm"][0],
            "seqkd_own_cache": os.path.basename(res["hf"][1]) != os.path.basename(res["vllm"][1]),
            "seqkd_cached": res["cached"]}


def main(out_dir: str) -> None:
    dist.init(timeout_s=600)
    torch.manual_seed(0)
    run = tiny_run(out_dir)
    m, ctx = run.method, run.method.ctx
    batches = [run.splits.train[0:3], run.splits.train[3:6]]
    res = {"initial_greedy_equal": same(vllm_greedy(ctx, batches), hf_greedy(ctx, batches))}
    step = m.step(batches, 0)                      # a real optimizer step, rollouts through vLLM
    res["step_tokens"] = step.metrics["tokens"]
    res["student_moved"] = int(ctx.engine.global_steps) == 1
    res["after_step_greedy_equal"] = same(vllm_greedy(ctx, batches), hf_greedy(ctx, batches))
    sampled = student_rollouts(ctx, batches)
    res["sampled_masks_ok"] = all(mask_ok(r, ctx.eos_id) for r in sampled)
    again = student_rollouts(ctx, batches)         # same step, same request seeds: the same draws
    res["sampled_repeatable"] = same(sampled, again)
    hf = [student_rollout(ctx, mb) for mb in batches]
    res["prompt_len_like_hf"] = [r.prompt_len for r in sampled] == [r.prompt_len for r in hf]
    res["export_loads"] = export_loads(run, out_dir)
    res.update(eval_engines_agree(run, out_dir))
    with open(os.path.join(out_dir, "vllm_checks.json"), "w") as fh:
        json.dump(res, fh, indent=2)
    print(json.dumps(res))


def main_zero3(out_dir: str) -> None:
    """2 ranks, ZeRO-3 student: each rank's vLLM engine decodes as the sharded student does, before and after a step."""
    dist.init(timeout_s=600)
    r = dist.rank()
    run = tiny_run(os.path.join(out_dir, f"rank{r}"), deepspeed="ds_configs/zero3_tiny_test.json")
    ctx = run.method.ctx
    batches = [run.splits.train[6 * r:6 * r + 3], run.splits.train[6 * r + 3:6 * r + 6]]  # other prompts per rank
    res = {"zero3_initial_greedy_equal": same(vllm_greedy(ctx, batches), hf_greedy(ctx, batches))}
    run.method.step(batches, 0)
    res["zero3_after_step_greedy_equal"] = same(vllm_greedy(ctx, batches), hf_greedy(ctx, batches))
    with open(os.path.join(out_dir, f"vllm_zero3.rank{r}.json"), "w") as fh:
        json.dump(res, fh)


if __name__ == "__main__":
    if sys.argv[1] == "--zero3":
        main_zero3(sys.argv[2])
    elif sys.argv[1] == "--seqkd":  # its own process: DeepSpeed cannot start after a vLLM engine was freed
        dist.init(timeout_s=600)
        with open(os.path.join(sys.argv[2], "vllm_seqkd.json"), "w") as fh:
            json.dump(seqkd_through_vllm(sys.argv[2]), fh)
    else:
        main(sys.argv[1])
    dist.shutdown(0)
