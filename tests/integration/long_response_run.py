"""One PromptKD step at data.max_length = 8192 on CPU, through build_run (issue 22, item 2's test).

    python tests/integration/long_response_run.py OUT_DIR

A world of one (``promptkd.distributed.init`` sets it up). Tiny models (hidden 16/32, one layer), the test's own
small tokenizer; the student's EOS is made impossible in its rollout (a hook on the head's output for the last
position only, which is all a rollout computes), so the response fills the whole max_new_tokens. The prompt step and the student step run under a dispatch mode that records the largest tensor
with a vocabulary as its last dimension. Writes OUT_DIR/result.json.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

MAX_LENGTH, PROMPT_MAX, CHUNK = 8192, 64, 1024


class VocabRows(TorchDispatchMode):
    """The most rows of any tensor an op makes whose last dimension is a vocabulary (head weights' [H, V] aside)."""

    def __init__(self, vocabs: set[int], hidden: set[int]) -> None:
        super().__init__()
        self.vocabs, self.hidden, self.most = vocabs, hidden, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (list, tuple)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] in self.vocabs \
                    and not (t.dim() == 2 and t.shape[0] in self.hidden):
                self.most = max(self.most, t.numel() // t.shape[-1])
        return out


def config(out: str):
    from promptkd.config import load_config
    from promptkd.data import load_examples, make_synthetic_splits, train_tokenizer

    files = make_synthetic_splits(os.path.join(out, "data"), 16, 1, 1, seed=2)
    texts = [e.prompt + " " + e.references[0] for e in load_examples(files["train"])]
    train_tokenizer(texts, 320, os.path.join(out, "tok"))
    positions = MAX_LENGTH + 64   # the teacher's soft prompt comes on top of the sequence
    return load_config(None, [
        "stage=train", "seed=3", f"tokenizer.path={os.path.join(out, 'tok')}",
        f"data.train_file={files['train']}", "data.dev_size=0", "data.template=none",
        f"data.max_length={MAX_LENGTH}", f"data.max_prompt_length={PROMPT_MAX}",
        "model.teacher.dtype=fp32",
        f"model.teacher.init={{arch: llama, layers: 1, hidden: 32, heads: 2, max_positions: {positions}}}",
        f"model.student.init={{arch: llama, layers: 1, hidden: 16, heads: 2, max_positions: {positions}}}",
        "train.micro_batch_size=1", "train.grad_accum=1", "optim.student.warmup_steps=0",
        "optim.prompt.warmup_steps=0", f"method.loss_chunk_size={CHUNK}", "logging.progress_bar=false",
        f"output.dir={os.path.join(out, 'run')}",
        # the logits path, for comparison by hand: LONG_RESPONSE_FUSED_HEAD=false
        f"method.fused_head={os.environ.get('LONG_RESPONSE_FUSED_HEAD', 'true')}",
    ])


def main(out: str) -> None:
    from promptkd import distributed as dist
    from promptkd.training.run import build_run

    dist.init(timeout_s=120)
    cfg = config(out)
    run = build_run(cfg, train=False, total_steps=2)
    m, ctx = run.method, run.method.ctx
    eos = ctx.eos_id if isinstance(ctx.eos_id, int) else ctx.eos_id[0]

    def no_eos(_module, _inputs, logits):
        # rollouts only, whose forwards all keep the last position's logits (the fused loss never reads the head's
        # output; the logits path's loss forwards keep more positions)
        if logits.shape[-2] != 1:
            return logits
        logits = logits.clone()
        logits[..., eos] = float("-inf")
        return logits

    student = ctx.engine.module
    hook = student.get_output_embeddings().register_forward_hook(no_eos)
    vocabs = {ctx.vocab_size, student.get_output_embeddings().weight.shape[0],
              ctx.teacher.base.get_output_embeddings().weight.shape[0]}
    mode = VocabRows(vocabs, {16, 32})
    phases = {}
    for name in ("prompt_update", "student_update"):
        real = getattr(m, name)

        def timed(*args, __real=real, __name=name, **kwargs):
            start = time.perf_counter()
            with mode:
                result = __real(*args, **kwargs)
            phases[__name] = time.perf_counter() - start
            return result

        setattr(m, name, timed)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    prompt_before = ctx.teacher.prompt.detach().clone()
    start = time.perf_counter()
    result = m.step([run.splits.train[:1]], 0)
    seconds = time.perf_counter() - start
    hook.remove()
    r = result.rollouts[0]
    out_json = {
        "fused_head": ctx.fused_head, "metrics": result.metrics, "seq_len": int(r.input_ids.shape[1]),
        "prompt_len": int(r.prompt_len), "response_tokens": int(r.loss_mask.sum()),
        "max_new_tokens": ctx.sampling.max_new_tokens, "vocab": ctx.vocab_size, "chunk": CHUNK,
        "most_vocab_rows": mode.most, "step_s": seconds, "phases_s": phases,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "student_moved": max(float((p.detach() - before[n]).abs().max()) for n, p in student.named_parameters()),
        "prompt_moved": float((ctx.teacher.prompt.detach() - prompt_before).abs().max()),
    }
    with open(os.path.join(out, "result.json"), "w") as fh:
        json.dump(out_json, fh)
    dist.shutdown(0)


if __name__ == "__main__":
    main(sys.argv[1])
