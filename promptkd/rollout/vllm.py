"""vLLM as the student's rollout engine: one colocated, in-process engine per rank, on the rank's device.

The engine holds its own copy of the student. It starts from the student's config and
tokenizer with placeholder weights, and ``sync`` pushes the training weights into it,
one parameter at a time through a generator that vLLM consumes (under ZeRO-3 each one
gathered, copied, released), so no rank holds a second full copy of the student beside
vLLM's. A rollout syncs first whenever the student has taken an optimizer step since the
last sync.

The output has the same meaning as ``promptkd.rollout.generate``'s: left-padded prompts,
right-padded responses, the loss mask up to and including the first EOS, an unfinished
response ending on a forced EOS. Sampling maps the paper's settings onto vLLM's (top_k 0 =
off, top_p, temperature, max_new_tokens, EOS as the stop token); each request gets its
own seed derived from (seed, step, rank, index), so a resumed run draws what an
uninterrupted one draws.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Iterator, Optional

import torch

from promptkd import distributed as dist
from promptkd.config import VLLM_INSTALL, ConfigError, VLLMConfig
from promptkd.models.lora import has_lora, merged_parameters
from promptkd.rollout.core import Rollout, SamplingParams, rollout_from_responses
from promptkd.rollout.stops import stop_tuple
from promptkd.seeding import derive_seed

log = logging.getLogger(__name__)

def require_vllm(key: str) -> None:
    """A one-line ConfigError naming ``key`` when vLLM cannot be imported."""
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"{key}=vllm: vLLM cannot be imported here ({exc}); {VLLM_INSTALL}") from None


def vllm_sampling(params: SamplingParams, eos_id: int, vocab_size: int, model_vocab: int, seed: Optional[int]):
    from vllm import SamplingParams as VSP

    kwargs: dict[str, Any] = {"max_tokens": params.max_new_tokens, "stop_token_ids": list(stop_tuple(eos_id)),
                              "seed": seed,
                              "skip_special_tokens": False, "detokenize": False}
    if params.do_sample:
        kwargs.update(temperature=params.temperature, top_p=params.top_p,
                      top_k=params.top_k if params.top_k > 0 else -1)
    else:
        kwargs.update(temperature=0.0)
    if vocab_size < model_vocab:  # padded model vocabularies: sample among the tokenizer's tokens only
        kwargs["allowed_token_ids"] = list(range(vocab_size))
    return VSP(**kwargs)


def _parameters(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full fp32/bf16 copy) of every parameter, gathered one at a time under ZeRO-3."""
    import deepspeed

    for name, param in module.named_parameters():
        if hasattr(param, "ds_id"):
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                yield name, param.detach().clone()
        else:
            yield name, param.detach()


def retie_lm_head(worker: Any) -> int:
    """Re-process a tied LM head after a weight reload (run inside vLLM's worker, via ``collective_rpc``).

    A tied model's weights hold no ``lm_head.weight`` (the loader skips it: the head is the embedding), so a
    layerwise reload leaves the head's layer "not loaded" and puts back its kernel tensors from the last
    processing. On CPU those include a packed copy of the weight for the GEMM: the head kept computing logits
    from the placeholder weights while the embedding held the student's (Qwen3 0.6B-4B and Llama-3.2 tie).
    Processing the head again repacks it from the shared, reloaded weight; where processing keeps no copy
    (GPU) it does nothing. Returns how many heads were re-processed.
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    model = worker.get_model()
    embeddings = [m.weight for m in model.modules()
                  if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)]
    heads = [m for m in model.modules() if isinstance(m, ParallelLMHead) and any(m.weight is w for w in embeddings)]
    for head in heads:
        head.quant_method.process_weights_after_loading(head)
    return len(heads)


def placement(world_size: int) -> dict[str, Any]:
    """Where a colocated engine runs: with several ranks, on each rank's own device.

    One process per rank already exists (our launcher). vLLM's default single-process executor takes
    local rank 0, so every rank's engine would land on cuda:0; the external launcher (as TRL's and
    verl's colocated modes use it) takes RANK/LOCAL_RANK from the environment instead. Tensor
    parallelism 1: each rank's engine holds the whole model and decodes its own prompts. Every rank
    must build its engine at the same time (vLLM reduces the free memory over ranks on start).
    """
    return {"distributed_executor_backend": "external_launcher", "tensor_parallel_size": 1} if world_size > 1 else {}


def eval_llm(path: str, dtype: str, max_model_len: int, gpu_memory_utilization: float) -> Any:
    """A vLLM engine on an HF model dir, for evaluation (eval.engine=vllm)."""
    require_vllm("eval.engine")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM

    return LLM(model=path, dtype=dtype, max_model_len=max_model_len, enforce_eager=True,
               gpu_memory_utilization=gpu_memory_utilization, **placement(dist.world_size()))


def release(llm: Any) -> None:
    """Shut an engine down before the next one starts (vLLM keeps its parallel groups in global state).

    The process group of torch.distributed is ours and stays.
    """
    import gc

    from vllm.distributed.parallel_state import destroy_model_parallel

    core = getattr(llm.llm_engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    del llm
    gc.collect()
    destroy_model_parallel()


def vllm_answers(llm: Any, prompts: list[list[int]], seeds: list[int], params: SamplingParams, eos_id: int,
                 vocab_size: int) -> list[list[int]]:
    """Token ids of each prompt's response, request i sampled with ``seeds[i]`` (unused when greedy)."""
    from vllm.inputs import TokensPrompt

    model_vocab = int(llm.llm_engine.model_config.get_vocab_size())
    sampling = [vllm_sampling(params, eos_id, vocab_size, model_vocab, seed if params.do_sample else None)
                for seed in seeds]
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sampling, use_tqdm=False)
    return [list(out.outputs[0].token_ids) for out in outputs]


def engine_kwargs(model_dir: str, dtype: str, max_model_len: int, seed: int, opts: VLLMConfig, rank: int,
                  world_size: int) -> dict[str, Any]:
    """``vllm.LLM`` arguments for the rank's colocated rollout engine (``placement``: on its own device).

    ``seed`` is the run's; the engine's differs per rank (the rank's rollout seed), so no two engines draw
    the same stream.
    """
    return {"model": model_dir, "load_format": "dummy", "dtype": dtype, "max_model_len": max_model_len,
            "enforce_eager": True, "seed": derive_seed(seed, "rollout", rank=rank),
            "gpu_memory_utilization": opts.gpu_memory_utilization, "enable_sleep_mode": opts.sleep,
            **placement(world_size)}


class VLLMRollouts:
    """The rank's vLLM engine and the bookkeeping that keeps its weights equal to the student's."""

    def __init__(self, module: torch.nn.Module, tokenizer: Any, vocab_size: int, opts: VLLMConfig,
                 max_length: int, seed: int, work_dir: str):
        require_vllm("rollout.engine")
        if opts.sleep and not torch.cuda.is_available():
            raise ConfigError("rollout.vllm.sleep: vLLM's sleep mode frees GPU memory and needs a GPU; set it to "
                              "false here")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine runs in this process
        from vllm import LLM

        self.vocab_size, self.seed = vocab_size, seed
        model_dir = os.path.join(work_dir, f"vllm_student_rank{dist.rank()}")
        os.makedirs(model_dir, exist_ok=True)
        module.config.save_pretrained(model_dir)  # the architecture only: the weights come through sync()
        tokenizer.save_pretrained(model_dir)
        self.opts = opts
        dtype = opts.dtype if opts.dtype != "auto" else str(next(module.parameters()).dtype).removeprefix("torch.")
        self.llm = LLM(**engine_kwargs(model_dir, dtype, opts.max_model_len or max_length, seed, opts, dist.rank(),
                                       dist.world_size()))
        self.synced: Optional[int] = None  # the student version (optimizer steps) vLLM holds
        self.asleep = False

    def close(self) -> None:
        release(self.llm)
        self.llm = None

    def _wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def sync(self, module: torch.nn.Module, version: int) -> None:
        """Push the student's weights, parameter by parameter (all ranks call: ZeRO-3 gathers are collective)."""
        self._wake()
        if self.synced == version:
            return
        # one reload with a generator: vLLM consumes the parameters as they are gathered, one at a time
        weights = merged_parameters(module) if has_lora(module) else _parameters(module)  # LoRA: W + scale·B·A
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        if getattr(module.config, "tie_word_embeddings", False):
            self.llm.collective_rpc(retie_lm_head)
        self.synced = version

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, params: SamplingParams, eos_id: int,
                 pad_id: int, step: int, force_eos: bool = True) -> Rollout:
        """One call for every prompt of the step (rows of the left-padded [B, Tp] batch)."""
        prompts = [row[m.bool()].tolist() for row, m in zip(input_ids, attention_mask)]
        seeds = [derive_seed(self.seed, "rollout_request", step=step, rank=dist.rank(), index=i)
                 for i in range(len(prompts))]
        self._wake()
        responses = vllm_answers(self.llm, prompts, seeds, params, eos_id, self.vocab_size)
        if self.opts.sleep:  # the KV cache goes while the student trains; weights are synced on waking
            self.llm.sleep(level=1)
            self.asleep = True
        return rollout_from_responses(input_ids, attention_mask, responses, eos_id, pad_id, params.max_new_tokens,
                                      force_eos)
