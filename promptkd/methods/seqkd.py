"""SeqKD (Kim & Rush 2016): SFT on teacher-generated responses.

Generation is lazy, per micro-batch: the examples of a micro-batch that the
cache lacks are sampled from the plain teacher (``teacher_step_fn(teacher,
use_prompt=False)``, the rollout settings ``rollout.*``) through
``promptkd.rollout.generate``, then the student takes a cross-entropy step on
prompt + teacher response, normalised by the step's global token count.

Rank-synchronous: whether a micro-batch needs the teacher is all-reduced. If
any rank does, every rank decodes with synced stopping (a rank with nothing
missing decodes one row and drops it), so a ZeRO-3 partitioned teacher, whose
forwards are collectives, works as well as a replicated one.

Cache: ``<method.seqkd.cache_dir or output.dir/seqkd_cache>/<key>/part-r<rank>.jsonl``,
one line ``{"id", "prompt_sha", "response_ids"}`` per generated example. ``key``
hashes what determines the samples (``cache_fields``): the teacher (path plus a
size/mtime fingerprint of its files, or the tiny init plus the seed that makes
its weights), its dtype, the training data file and format, the vocabulary /
EOS / pad ids and the decoding settings (temperature, top_p, top_k,
max_new_tokens). Any change gives a new key, i.e. an empty cache. Lines are
looked up by example id and used only if the prompt's token ids hash to the
stored ``prompt_sha`` (an edited example is regenerated). Each rank appends to
its own part file and every part is read at start-up, so reruns (any world size)
reuse all of it. The sampling seed is not part of the key: a rerun with another
``seed`` and a pretrained teacher reuses the samples (the data set stays fixed).
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import logging
import os
from typing import Any, Callable, Optional


from promptkd import distributed as dist
from promptkd.config import Config, REGISTRY
from promptkd.data import TokenizedExample, collate_prompts
from promptkd.methods.base import Method, MicroBatch, StepContext, StepResult, to_device
from promptkd.methods.sft import ce_step
from promptkd.rollout import Rollout, generate, teacher_step_fn
from promptkd.rollout.core import gathered

log = logging.getLogger(__name__)


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _fingerprint(path: str) -> list:
    """(name, size, mtime) of a local model dir's files: a retrained teacher at the same path is a new key."""
    if not os.path.isdir(path):
        return []
    out = []
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.isfile(full):
            st = os.stat(full)
            out.append([name, st.st_size, st.st_mtime_ns])
    return out


def cache_fields(cfg: Config, ctx: StepContext) -> dict:
    """Everything that determines the teacher's samples (hashed into the cache key)."""
    t = cfg.model.teacher
    teacher = ({"path": os.path.abspath(t.path) if os.path.exists(t.path) else t.path, "files": _fingerprint(t.path)}
               if t.path else {"init": dataclasses.asdict(t.init), "seed": cfg.seed})
    data = cfg.data.train_file
    return {
        "teacher": {**teacher, "dtype": t.dtype},
        "data": {"train_file": os.path.abspath(data) if os.path.exists(data) else data, "format": cfg.data.format},
        "tokens": {"vocab": ctx.vocab_size, "eos": ctx.eos_id, "pad": ctx.pad_id},
        "decoding": dataclasses.asdict(ctx.sampling),
    }


class TeacherCache:
    """Teacher responses by example id, on disk as per-rank JSONL parts."""

    def __init__(self, root: str, fields: dict):
        self.key = _sha(fields)
        self.dir = os.path.join(root, self.key)
        os.makedirs(self.dir, exist_ok=True)
        meta = os.path.join(self.dir, "meta.json")
        if dist.is_main() and not os.path.exists(meta):
            with open(meta + ".tmp", "w") as fh:
                json.dump(fields, fh, indent=1)
            os.replace(meta + ".tmp", meta)
        self.entries: dict[str, tuple[str, list[int]]] = {}
        for part in sorted(glob.glob(os.path.join(self.dir, "part-r*.jsonl"))):
            self._read(part)
        self.path = os.path.join(self.dir, f"part-r{dist.rank()}.jsonl")
        self._end_partial_line()

    def _end_partial_line(self) -> None:
        # after a crash mid-write, new lines must not be glued onto the broken one
        if os.path.exists(self.path) and os.path.getsize(self.path):
            with open(self.path, "rb+") as fh:
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    fh.write(b"\n")

    def _read(self, part: str) -> None:
        with open(part) as fh:
            for line in fh:
                try:
                    row = json.loads(line)
                    self.entries[str(row["id"])] = (row["prompt_sha"], list(row["response_ids"]))
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by a crash: regenerated when needed

    @staticmethod
    def prompt_sha(ex: TokenizedExample) -> str:
        return _sha(ex.prompt_ids)

    def get(self, ex: TokenizedExample) -> Optional[list[int]]:
        hit = self.entries.get(ex.id)
        return hit[1] if hit is not None and hit[0] == self.prompt_sha(ex) else None

    def put(self, items: list[tuple[TokenizedExample, list[int]]]) -> None:
        lines = []
        for ex, resp in items:
            self.entries[ex.id] = (self.prompt_sha(ex), resp)
            lines.append(json.dumps({"id": ex.id, "prompt_sha": self.prompt_sha(ex), "response_ids": resp}) + "\n")
        with open(self.path, "a") as fh:
            fh.writelines(lines)


class SeqKD(Method):
    spec = REGISTRY["seqkd"]
    progress_keys = ("loss/ce",)

    def __init__(self, ctx: StepContext, cache: "TeacherCache", max_length: int,
                 teacher_llm: Optional[Callable[[], Any]] = None):
        super().__init__(ctx)
        self.cache = cache
        self.max_length = max_length  # data.max_length: a teacher response is cut to fit beside its prompt
        self.generated = 0        # examples whose response the teacher produced
        self.make_teacher_llm = teacher_llm  # rollout.engine=vllm: starts a vLLM engine on the teacher (lazily)
        self.teacher_llm: Any = None
        log.info("seqkd: teacher cache %s (%d responses)", self.cache.dir, len(self.cache.entries))

    @classmethod
    def from_config(cls, cfg: Config, ctx: StepContext) -> "SeqKD":
        root = ctx.opts.cache_dir or os.path.join(cfg.output.dir, "seqkd_cache")
        fields = cache_fields(cfg, ctx)
        make_llm = None
        if cfg.rollout.engine == "vllm":
            fields["engine"] = "vllm"  # its samples are not our loop's: a cache of their own
            make_llm = functools.partial(teacher_vllm, cfg, ctx)
        return cls(ctx, TeacherCache(root, fields), cfg.data.max_length, make_llm)

    def train_step(self, micro_batches: list[MicroBatch], step: int) -> StepResult:
        ctx = self.ctx
        with ctx.timer.phase("teacher_generate"):
            examples = [self.teacher_examples(mb) for mb in micro_batches]
        tally = ce_step(ctx, examples)
        tally.values.update({"seqkd/generated": float(self.generated), "seqkd/cached": float(len(self.cache.entries))})
        return StepResult(tally)

    def teacher_examples(self, micro_batch: MicroBatch) -> MicroBatch:
        """The micro-batch with each response replaced by the teacher's (cached or generated now)."""
        missing = [ex for ex in micro_batch if self.cache.get(ex) is None]
        if dist.any_true(bool(missing)):
            rollout = self._teacher_generate(missing or micro_batch[:1])
            if missing:
                self.cache.put(list(zip(missing, _responses(rollout))))
                self.generated += len(missing)
        budget = self.max_length
        return [dataclasses.replace(ex, response_ids=self.cache.get(ex)[:budget - len(ex.prompt_ids)])
                for ex in micro_batch]

    def close(self) -> None:
        if self.teacher_llm is not None:
            from promptkd.rollout.vllm import release

            release(self.teacher_llm)
            self.teacher_llm = None

    def _teacher_generate(self, examples: MicroBatch) -> Rollout:
        ctx = self.ctx
        prompts = to_device(collate_prompts(examples, ctx.pad_id))
        if self.make_teacher_llm is not None:
            from promptkd.rollout import rollout_from_responses
            from promptkd.rollout.vllm import vllm_answers
            from promptkd.seeding import derive_seed

            if self.teacher_llm is None:
                self.teacher_llm = self.make_teacher_llm()
            # each request's seed follows its example (id), so a rerun or resume samples the same response
            seeds = [derive_seed(ctx.seed, "request", index=int(hashlib.sha256(ex.id.encode()).hexdigest()[:7], 16))
                     for ex in examples]
            rows = vllm_answers(self.teacher_llm, [ex.prompt_ids for ex in examples], seeds, ctx.sampling,
                                ctx.eos_id, ctx.vocab_size)
            return rollout_from_responses(prompts["input_ids"], prompts["attention_mask"], rows, ctx.eos_id,
                                          ctx.pad_id, ctx.sampling.max_new_tokens)
        # a ZeRO-3 teacher is gathered once for the loop, not layer by layer per token
        with gathered(ctx.teacher, ctx.gather_student, "teacher decoding", engine=ctx.teacher.zero3_engine):
            return generate(teacher_step_fn(ctx.teacher, use_prompt=False), prompts["input_ids"],
                            prompts["attention_mask"], ctx.sampling, ctx.eos_id, ctx.pad_id, ctx.vocab_size,
                            generator=ctx.generator, sync=True)


def teacher_vllm(cfg: Config, ctx: StepContext) -> Any:
    """A vLLM engine on the plain teacher: its HF dir, or (tiny from config) a copy saved for it."""
    import tempfile

    from promptkd.rollout.vllm import eval_llm

    t = cfg.model.teacher
    path = t.path
    if not path:  # a zero3-placed teacher built from config has no whole copy to save: the config check refuses it
        path = tempfile.mkdtemp(prefix="promptkd_vllm_teacher_")  # every rank its own copy, on its own disk
        ctx.teacher.base.save_pretrained(path)
        ctx.tokenizer.save_pretrained(path)
    dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[t.dtype]
    return eval_llm(path, dtype, cfg.rollout.vllm.max_model_len or cfg.data.max_length,
                    cfg.rollout.vllm.gpu_memory_utilization)


def _responses(r: Rollout) -> list[list[int]]:
    p = r.prompt_len
    return [row[p:][mask[p:].bool()].tolist() for row, mask in zip(r.input_ids, r.loss_mask)]
