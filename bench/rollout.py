"""Rollout tokens/s: ``promptkd.rollout.generate`` (+ ``hf_step_fn``) vs Hugging Face ``model.generate``.

    .venv/bin/python bench/rollout.py     # -> bench/results/rollout.json
    .venv-vllm/bin/python bench/rollout.py --engine vllm    # -> bench/results/rollout_vllm.json

Same model, same left-padded prompts, same max_new_tokens, same sampling
(do_sample, temperature 1, top_p 1, top_k 0 -- HF's default top_k=50 is
overridden), KV cache on in both. The EOS id is set to one outside the sampled
vocabulary in both, so every row decodes exactly max_new_tokens and both sides
do the same work: tokens/s = batch * max_new_tokens / seconds. Calls are
interleaved A B A B ...; the ratio is ours / HF in tokens/s (> 1: ours faster).
A third interleaved variant, ``ours_full_logits``, is our loop without
``logits_to_keep=1`` in the prefill: it measures that optimization (and checks
it samples the very same tokens).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.common import (RunSizes, emit, interleave, make_workspace, n_params, quiet, ratio,  # noqa: E402
                          set_threads, stats)

TARGET = 1.0


def load_prompts(ws: dict, batch: int, max_prompt_length: int, device: torch.device):
    from promptkd.data import collate_prompts, load_examples, load_tokenizer, tokenize_examples

    tok = load_tokenizer(ws["tokenizer"])
    ex, _ = tokenize_examples(load_examples(ws["train"])[:batch], tok, max_prompt_length, max_prompt_length + 1)
    p = collate_prompts(ex, tok.pad_token_id)
    return tok, p["input_ids"].to(device), p["attention_mask"].to(device)


def full_logits_step_fn(model: torch.nn.Module):
    """hf_step_fn as it was before logits_to_keep: the LM head runs on every prefill position."""
    from promptkd.models.forward import cache_kwarg, output_cache
    from promptkd.rollout.core import position_ids

    kwarg = cache_kwarg(model)

    def step(ids, mask, past):
        pos = position_ids(mask)[:, -ids.shape[1]:]
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{kwarg: past})
        return out.logits[:, -1], output_cache(out)

    return step


def run(sizes: RunSizes, repeats: int = 5, warmup: int = 1, ws: dict | None = None,
        model: torch.nn.Module | None = None, dtype: torch.dtype = torch.float32,
        model_vocab: int = 0) -> dict[str, Any]:
    """model_vocab > 0: build the model with that vocabulary (e.g. 32000, as real LMs) instead of the tokenizer's."""
    from promptkd.models import build_tiny
    from promptkd.rollout import SamplingParams, generate, hf_step_fn

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    ws = ws or make_workspace(sizes)
    tok, ids, mask = load_prompts(ws, sizes.batch, sizes.max_prompt_length, device)
    vocab = len(tok)
    if model is None:
        torch.manual_seed(0)
        model = build_tiny(sizes.arch, sizes.student_layers, sizes.student_hidden, sizes.student_heads,
                           vocab_size=max(vocab, model_vocab), max_positions=sizes.max_positions,
                           pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id)
    model = model.to(device=device, dtype=dtype).eval()
    vocab = model.config.vocab_size  # both sides sample over the whole model vocabulary
    no_eos = model.config.vocab_size + 1000  # never sampled: every row runs max_new_tokens
    n_new = sizes.max_new_tokens
    params = SamplingParams(max_new_tokens=n_new, do_sample=True, temperature=1.0, top_p=1.0, top_k=0)
    gen_ours = torch.Generator(device=device).manual_seed(1)
    out_len: dict[str, list[int]] = {"ours": [], "hf": []}

    def ours() -> None:
        r = generate(hf_step_fn(model), ids, mask, params, eos_id=no_eos, pad_id=tok.pad_token_id,
                     vocab_size=vocab, generator=gen_ours, force_eos=False)
        out_len["ours"].append(r.input_ids.shape[1] - ids.shape[1])

    def hf() -> None:
        with torch.no_grad():
            seq = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                                 top_k=0, max_new_tokens=n_new, min_new_tokens=0, use_cache=True,
                                 eos_token_id=no_eos, pad_token_id=tok.pad_token_id)
        out_len["hf"].append(seq.shape[1] - ids.shape[1])

    full_step = full_logits_step_fn(model)
    gen_full = torch.Generator(device=device).manual_seed(1)

    def ours_full_logits() -> None:
        generate(full_step, ids, mask, params, eos_id=no_eos, pad_id=tok.pad_token_id, vocab_size=vocab,
                 generator=gen_full, force_eos=False)

    same = [generate(fn, ids, mask, params, eos_id=no_eos, pad_id=tok.pad_token_id, vocab_size=vocab,
                     generator=torch.Generator(device=device).manual_seed(3)).input_ids for fn in
            (hf_step_fn(model), full_step)]
    times = interleave({"ours": ours, "hf": hf, "ours_full_logits": ours_full_logits}, repeats=repeats,
                       warmup=warmup)
    assert set(out_len["ours"]) == {n_new} and set(out_len["hf"]) == {n_new}, out_len
    tokens = sizes.batch * n_new
    tps = {k: [tokens / t for t in v] for k, v in times.items()}
    r = ratio(times["hf"], times["ours"])  # time_hf / time_ours == tokens/s ours / tokens/s hf
    return {
        "model": {"arch": model.config.model_type, "layers": model.config.num_hidden_layers,
                  "hidden": model.config.hidden_size,
                  "params": n_params(model), "dtype": str(dtype).replace("torch.", ""), "vocab": vocab},
        "batch": sizes.batch, "prompt_width": ids.shape[1], "max_new_tokens": n_new,
        "tokens_per_s": {k: stats(v) for k, v in tps.items()},
        "seconds": {k: stats(v) for k, v in times.items()},
        "ratio_ours_over_hf_tokens_per_s": r["median_of_round_ratios"], "ratio_detail": r,
        "target": TARGET, "meets_target": r["median_of_round_ratios"] >= TARGET,
        "logits_to_keep_effect": {
            "what": "hf_step_fn asks for the last position's logits only (logits_to_keep=1); "
                    "'ours_full_logits' is the same loop computing every prompt position's logits in prefill",
            "same_tokens": bool(torch.equal(same[0], same[1])),
            "speedup_full_over_keep": ratio(times["ours_full_logits"], times["ours"])["median_of_round_ratios"]},
        "repeats": repeats, "warmup": warmup,
    }


def run_vllm(sizes: RunSizes, repeats: int = 5, warmup: int = 1, ws: dict | None = None,
             model_spec: tuple[str, int, int, int] = ("llama", 2, 128, 4), dtype: torch.dtype = torch.float32,
             gpu_memory_utilization: float = 0.3) -> dict[str, Any]:
    """rollout.engine=vllm's engine against our loop at equal work: same weights, prompts, sampling, length.

    The default student is 2 layers d=128, 4 heads (vLLM's CPU attention needs head_dim >= 32); model_spec =
    (arch, layers, hidden, heads). EOS is ignored on the vLLM side and never sampled on ours, so both decode
    batch x max_new_tokens tokens. On CPU this checks correctness and cost, it is not a speed claim.
    """
    import tempfile

    from promptkd.models import build_tiny
    from promptkd.rollout import SamplingParams, generate, hf_step_fn
    from promptkd.rollout.vllm import eval_llm, release

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    ws = ws or make_workspace(sizes)
    tok, ids, mask = load_prompts(ws, sizes.batch, sizes.max_prompt_length, device)
    torch.manual_seed(0)
    arch, layers, hidden, heads = model_spec
    model = build_tiny(arch, layers, hidden, heads, vocab_size=len(tok), max_positions=sizes.max_positions,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id).to(device=device, dtype=dtype).eval()
    model_dir = tempfile.mkdtemp(prefix="bench_vllm_")
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    llm = eval_llm(model_dir, str(dtype).removeprefix("torch."), sizes.max_prompt_length + sizes.max_new_tokens + 8,
                   gpu_memory_utilization)
    from vllm import SamplingParams as VSP
    from vllm.inputs import TokensPrompt

    n_new, vocab = sizes.max_new_tokens, model.config.vocab_size
    prompts = [TokensPrompt(prompt_token_ids=row[m.bool()].tolist()) for row, m in zip(ids, mask)]
    vsp = VSP(max_tokens=n_new, temperature=1.0, top_p=1.0, top_k=-1, ignore_eos=True, seed=1, detokenize=False)
    params = SamplingParams(max_new_tokens=n_new, do_sample=True, temperature=1.0, top_p=1.0, top_k=0)
    gen = torch.Generator(device=device).manual_seed(1)
    lengths: dict[str, list[int]] = {"ours": [], "vllm": []}

    def ours() -> None:
        r = generate(hf_step_fn(model), ids, mask, params, eos_id=vocab + 1000, pad_id=tok.pad_token_id,
                     vocab_size=vocab, generator=gen, force_eos=False)
        lengths["ours"].append(r.input_ids.shape[1] - ids.shape[1])

    def vllm() -> None:
        outs = llm.generate(prompts, vsp, use_tqdm=False)
        lengths["vllm"].extend({len(o.outputs[0].token_ids) for o in outs})

    times = interleave({"ours": ours, "vllm": vllm}, repeats=repeats, warmup=warmup)
    release(llm)
    assert set(lengths["ours"]) == {n_new} and set(lengths["vllm"]) == {n_new}, lengths
    tokens = sizes.batch * n_new
    r = ratio(times["ours"], times["vllm"])  # time_ours / time_vllm == tokens/s vllm / tokens/s ours
    return {"model": {"arch": arch, "layers": layers, "hidden": hidden, "heads": heads, "params": n_params(model),
                      "dtype": str(dtype).removeprefix("torch."), "vocab": vocab},
            "batch": sizes.batch, "max_new_tokens": n_new,
            "tokens_per_s": {k: stats([tokens / t for t in v]) for k, v in times.items()},
            "seconds": {k: stats(v) for k, v in times.items()},
            "ratio_vllm_over_ours_tokens_per_s": r["median_of_round_ratios"], "ratio_detail": r,
            "note": "CPU: a correctness-and-cost check of rollout.engine=vllm, not a speed claim",
            "repeats": repeats, "warmup": warmup}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--model-vocab", type=int, default=0,
                   help="model vocabulary (default: the tokenizer's ~1k); writes rollout_vocab<N>.json")
    p.add_argument("--engine", choices=["hf", "vllm"], default="hf",
                   help="vllm: rollout.engine=vllm's engine against our loop (needs .venv-vllm); writes rollout_vllm.json")
    args = p.parse_args(argv)
    quiet()
    load = list(os.getloadavg())
    set_threads(args.threads)
    if args.engine == "vllm":
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        res = run_vllm(RunSizes(batch=args.batch, max_new_tokens=args.max_new_tokens), repeats=args.repeats,
                       warmup=args.warmup)
        return emit("rollout_vllm", res, load_before=load)
    res = run(RunSizes(batch=args.batch, max_new_tokens=args.max_new_tokens), repeats=args.repeats,
              warmup=args.warmup, model_vocab=args.model_vocab)
    return emit(f"rollout_vocab{args.model_vocab}" if args.model_vocab else "rollout", res, load_before=load)


if __name__ == "__main__":
    main()
