"""vLLM rollouts and evaluation on a chat family (issue 21): a tiny Qwen3 (ChatML template, ``<|im_end|>`` end of
turn, generation_config EOS list [<|im_end|>, <|endoftext|>]; hidden 128 / 4 heads = head_dim 32 for vLLM's CPU
attention). One process, two vLLM engines (the rollouts' and eval's), run by the test below:

    .venv-vllm/bin/python tests/engine_vllm/test_chat_vllm.py OUT_DIR      -> OUT_DIR/chat_vllm.json

The student's end-of-turn logit is raised (its tied embedding row moved along a random direction, the size picked
with our loop) until some greedy rows stop on ``<|im_end|>`` and some run to the length limit: both endings are
compared, not only the forced one. Its blocks' output projections are scaled up first (a tied tiny model otherwise
repeats its last prompt token, "\n\n", and every answer is empty).

Qwen3 ties its embeddings: the greedy comparison is also the regression check for the rollout engine's tied LM
head after a weight sync (``promptkd.rollout.vllm.retie_lm_head``; without it vLLM's CPU head kept decoding with
its placeholder weights).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

if __name__ == "__main__":
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import pytest  # noqa: E402

_SPEC = importlib.util.find_spec("vllm")
pytestmark = pytest.mark.skipif(_SPEC is None or _SPEC.origin in (None, "namespace"),
                                reason="vLLM is not installed here (bash scripts/install.sh --vllm)")
MAX_NEW = 16
STIR = 20.0


def _rows(rollouts, stops):
    """(response ids in the loss mask, mask is a prefix, no stop before its last token) per row."""
    out = []
    for r in rollouts:
        for row, mask in zip(r.input_ids[:, r.prompt_len:], r.loss_mask[:, r.prompt_len:]):
            n = int(mask.sum())
            resp = row[:n].tolist()
            prefix = bool(mask[:n].all()) and not bool(mask[n:].any())
            out.append((resp, prefix and n > 0 and not any(t in stops for t in resp[:-1])))
    return out


def _end_of_turn_bias(ctx, batches, stops: tuple[int, ...]):
    """Move the (tied) end-of-turn embedding row until greedy rows of our loop end both ways; the rows' lengths."""
    import torch

    from tests.engine_vllm.vllm_checks import hf_greedy

    module = ctx.engine.module
    with torch.no_grad():   # a tied tiny model repeats its last input token (here "\n\n": empty answers); the
        for name, p in module.named_parameters():   # blocks' outputs scaled up, it writes varied text
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_(STIR)
    head, end = module.get_output_embeddings().weight, stops[0]
    g = torch.Generator().manual_seed(5)
    direction = torch.randn(head.shape[1], generator=g)
    direction /= direction.norm()
    base = head[end].detach().clone()
    for alpha in (0.1, 0.2, 0.4, 0.8, 1.6, 3.2):
        with torch.no_grad():
            head[end] = base + alpha * direction
        lengths = [len(resp) for resp, _ in _rows(hf_greedy(ctx, batches), stops)]
        if min(lengths) < MAX_NEW and max(lengths) == MAX_NEW:
            return alpha, lengths
    raise AssertionError(f"no end-of-turn bias ends some rows early and not others: {lengths}")


def rollout_checks(run, batches) -> dict:
    """Greedy vLLM rollouts equal our loop's token for token; sampled ones end on a stop, mask through it."""
    from promptkd.methods.base import student_rollouts
    from tests.engine_vllm.vllm_checks import hf_greedy, same, vllm_greedy

    ctx, tok = run.method.ctx, run.tokenizer
    stops = tuple(ctx.eos_id) if not isinstance(ctx.eos_id, int) else (ctx.eos_id,)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert stops[0] == end, stops
    alpha, lengths = _end_of_turn_bias(ctx, batches, stops)
    vl, hf = vllm_greedy(ctx, batches), hf_greedy(ctx, batches)
    rows = _rows(vl, stops)
    sampled = _rows(student_rollouts(ctx, batches), stops)
    return {"stops": tok.convert_ids_to_tokens(list(stops)), "stop_ids": list(stops), "alpha": alpha, "hf_lengths": lengths,
            "vllm_lengths": [len(r) for r, _ in rows],
            "greedy_equal": same(vl, hf),
            # every row ends on a stop; a row cut at the length limit on the forced end-of-turn token
            "greedy_masks_ok": all(ok and r[-1] in stops for r, ok in rows)
            and all(r[-1] == end for r, _ in rows if len(r) == MAX_NEW),
            "greedy_some_stop_early": any(len(r) < MAX_NEW for r, _ in rows),
            "sampled_masks_ok": all(ok and r[-1] in stops for r, ok in sampled)}


def eval_checks(run, out_dir: str, test_file: str) -> dict:
    """stage=eval's decoding of chat-templated test prompts: vLLM (greedy, and sampled with top_k 1) equals our
    loop's greedy answers; the answers are the response text only."""
    import dataclasses

    import torch

    from promptkd.config import with_overrides
    from promptkd.data import Template
    from promptkd.evaluation import evaluate
    from promptkd.evaluation.core import load_sets
    from promptkd.stages import model_decoder
    from promptkd.training.checkpoint import export_student

    export = os.path.join(out_dir, "export")
    export_student(run.engine, run.tokenizer, export)   # the biased student, with its generation_config EOS list
    cfg = run.cfg
    sets, _ = load_sets({"chat": test_file}, "messages", run.tokenizer, cfg.data.max_prompt_length,
                        cfg.data.max_length, Template.of(cfg.data))
    examples = sets["chat"]
    ev = dataclasses.replace(cfg.eval, do_sample=False, seeds=[10], max_new_tokens=MAX_NEW, no_repeat_ngram_size=0,
                             max_examples=8)
    hf_gen = model_decoder(export, run.tokenizer, torch.float32, "", cfg)
    hf = evaluate(hf_gen, run.tokenizer, examples, ev)["seeds"][0]["answers"]
    gen = model_decoder(export, run.tokenizer, torch.float32, "",
                        with_overrides(cfg, {"eval.engine": "vllm", "eval.no_repeat_ngram_size": 0}))
    greedy = evaluate(gen, run.tokenizer, examples, ev)["seeds"][0]["answers"]
    top1 = evaluate(gen, run.tokenizer, examples, dataclasses.replace(ev, do_sample=True, top_k=1, top_p=1.0))
    sampled = dataclasses.replace(ev, do_sample=True, seeds=[10, 20])
    s1, s2 = evaluate(gen, run.tokenizer, examples, sampled), evaluate(gen, run.tokenizer, examples, sampled)
    text = json.dumps([hf, greedy, [s["answers"] for s in s1["seeds"]]])
    prompt = run.tokenizer.decode(examples[0].prompt_ids)
    return {"eval_prompt": prompt, "eval_hf": hf, "eval_vllm": greedy,
            "eval_chat_prompts": prompt.startswith("<|im_start|>") and prompt.endswith("</think>\n\n"),
            "eval_eos": list(hf_gen.eos_id) if not isinstance(hf_gen.eos_id, int) else [hf_gen.eos_id],
            "eval_greedy_equal": hf == greedy and len(hf) == 8,
            "eval_top1_sampled_equal": top1["seeds"][0]["answers"] == hf,
            "eval_sampled_repeatable": [s["answers"] for s in s1["seeds"]] == [s["answers"] for s in s2["seeds"]],
            "eval_response_text_only": not any(t in text for t in ("<|im_end|>", "<|im_start|>", "<think>",
                                                                   "<|endoftext|>"))}


def main(out_dir: str) -> None:
    import torch

    from promptkd import distributed as dist
    from promptkd.data import load_tokenizer
    from promptkd.training.run import build_run
    from tests.distributed.chat_scenarios import family_cfg, write_messages
    from tests.fixtures.shipped import save_tiny_chat_model

    dist.init(timeout_s=600)
    torch.manual_seed(0)
    data = write_messages(out_dir)
    cfg = family_cfg(out_dir, data, "qwen3")          # trains the ChatML tokenizer (Qwen's special tokens)
    tok = load_tokenizer(cfg.tokenizer.path)
    student = save_tiny_chat_model("qwen3", 128, tok, os.path.join(out_dir, "student"), seed=2, vocab_multiple=0)
    cfg = family_cfg(out_dir, data, "qwen3", **{
        "model.student.path": str(student), "model.student.attn_implementation": "sdpa", "method.name": "rkl",
        "rollout.engine": "vllm", "rollout.max_new_tokens": MAX_NEW, "output.dir": os.path.join(out_dir, "run")})
    run = build_run(cfg, train=False, total_steps=4, rollout_seed=100)
    batches = [run.splits.train[i:i + 3] for i in range(0, 12, 3)]
    res = rollout_checks(run, batches)
    res.update(eval_checks(run, out_dir, data))
    with open(os.path.join(out_dir, "chat_vllm.json"), "w") as fh:
        json.dump(res, fh, indent=2)
    print(json.dumps(res))
    dist.shutdown(0)


def test_vllm_rollouts_and_eval_on_a_qwen3_chat_model(tmp_path):
    from tests.fixtures.cli import cli_env

    env = cli_env(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((tmp_path / "chat_vllm.json").read_text())
    assert res["stops"] == ["<|im_end|>", "<|endoftext|>"], res          # end of turn first, then the model's EOS
    assert res["eval_eos"] == res["stop_ids"], res                       # eval stops where rollouts stop
    failed = [k for k in ("greedy_equal", "greedy_masks_ok", "greedy_some_stop_early", "sampled_masks_ok",
                          "eval_chat_prompts", "eval_greedy_equal", "eval_top1_sampled_equal",
                          "eval_sampled_repeatable", "eval_response_text_only") if res[k] is not True]
    assert not failed, (failed, res)
    assert min(len(a) for a in res["eval_hf"]) < max(len(a) for a in res["eval_hf"]), res   # answers end early too


if __name__ == "__main__":
    main(sys.argv[1])
