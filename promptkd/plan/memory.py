"""Bytes per rank of each memory term of a training step, from model shapes only (no weights).

Every function is a written-out formula; ``promptkd.plan.core`` adds them into phases.
Notation: N parameters, W data-parallel ranks, e bytes per element of the compute dtype,
B micro-batch, T sequence length, K logit positions (response length + 1), V vocabulary,
L layers, h hidden, i MLP width, a heads.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Union

# fp32 elements of one automatic loss chunk: on CPU, and the cap on an accelerator (promptkd.losses.fused)
from promptkd.losses.fused import DEVICE_CHUNK_ELEMENTS, FUSED_CHUNK_ELEMENTS
from promptkd.plan.arch import Arch

FP32 = 4
ADAM_MOMENTS = 2 * FP32   # exp_avg and exp_avg_sq, fp32 per parameter
# fp32 [rows, V] buffers a fused loss chunk keeps alive at once (two log-softmaxes, p, one more in
# the prompt loss's three-way KL)
LOSS_CHUNK_BUFFERS = 4
# fp32 [rows, V] buffers the fused LM head + loss (promptkd.losses.fused_head) holds at once on an accelerator,
# where a chunk's divergence runs over the whole chunk: one logits workspace per side, plus the divergence's
# temporaries. Student step (2 sides, KL): log p_S, log p_T, p_S. Prompt step (3 sides): log p_T^θ, p_T^θ and
# their difference with log p_S (teacher_student; student_teacher also holds p_S and the gradient), then the
# plain teacher's log-softmax with log p_S gone.
FUSED_HEAD_BUFFERS = {"student": 2 + 3, "prompt_teacher_student": 3 + 4, "prompt_student_teacher": 3 + 5}
# fp32 [N, V] tensors an autograd loss (log-softmax of an fp32 copy, CE, skew KL, JSD, TVD) holds at its peak
UNFUSED_FP32_COPIES = 3

# Storage bytes per token per decoder layer saved for backward, for Hugging Face's modules under
# sdpa attention, as (bytes per hidden unit, bytes per MLP unit). Measured on transformers 5.24 with
# torch.autograd.graph.saved_tensors_hooks (tests/unit/test_plan.py re-measures every entry).
# "frozen": weights without grad, the input needs grad (the teacher under the prompt's backward):
# linear layers then keep no input. Keys: (family, bytes per element).
LAYER_SAVED = {
    ("llama", 4): {"trainable": (40, 16), "frozen": (24, 12), "dropout": (0, 0)},
    ("llama", 2): {"trainable": (24, 8), "frozen": (16, 6), "dropout": (0, 0)},
    ("gpt2", 4): {"trainable": (32, 20), "frozen": (24, 16), "dropout": (8, 8)},
    ("gpt2", 2): {"trainable": (16, 10), "frozen": (12, 8), "dropout": (4, 4)},
    ("opt", 4): {"trainable": (32, 4), "frozen": (24, 4), "dropout": (8, 8)},
    ("opt", 2): {"trainable": (16, 2), "frozen": (12, 2), "dropout": (4, 4)},
}
# bytes per hidden unit per token saved outside the layers (embeddings, final norm), same keys;
# plus at most REST_CONSTANT bytes per token (position ids, norm statistics)
REST_SAVED = {
    ("llama", 4): {"trainable": 10, "frozen": 6}, ("llama", 2): {"trainable": 7, "frozen": 5},
    ("gpt2", 4): {"trainable": 4, "frozen": 4}, ("gpt2", 2): {"trainable": 2, "frozen": 2},
    ("opt", 4): {"trainable": 4, "frozen": 4}, ("opt", 2): {"trainable": 2, "frozen": 2},
}
REST_CONSTANT = 16
LSE_PER_HEAD = 4          # sdpa's fp32 log-sum-exp per head and token


def norm_stats(family: str, e: int) -> int:
    """Bytes per token per layer of the two norms' statistics: RMSNorm's fp32 rsqrt, LayerNorm's mean and
    rstd in the input dtype (CPU kernels; CUDA keeps them in fp32, 8 bytes more per token and layer)."""
    return 8 if family == "llama" else 4 * e


@dataclass(frozen=True)
class Shape:
    """One forward: B sequences of T tokens, K of them through the LM head."""

    batch: int
    seq: int
    keep: int


def _family(arch: Arch, e: int) -> tuple[str, int]:
    return arch.family, (FP32 if e >= FP32 else 2)


def layer_saved(arch: Arch, s: Shape, e: int, frozen: bool, dropout: bool) -> float:
    """Bytes one decoder layer keeps for backward (the attention mask of [B, 1, T, T] included)."""
    table = LAYER_SAVED[_family(arch, e)]
    ch, ci = table["frozen" if frozen else "trainable"]
    if dropout and arch.dropout > 0:
        ch += table["dropout"][1 if frozen else 0]
    per_token = (ch * arch.hidden + ci * arch.intermediate + LSE_PER_HEAD * arch.heads + norm_stats(arch.family, e)
                 + s.seq * e)
    return float(s.batch * s.seq * per_token)


def activations(arch: Arch, s: Shape, e: int, frozen: bool, dropout: bool, checkpointing: bool) -> float:
    """Bytes a whole forward saves for backward.

    Without checkpointing: every layer's saved tensors, the final norm's and the embeddings', and the LM
    head's input (trainable weights only). With it: each layer keeps only its input (the recomputation is
    ``backward_working``).
    """
    rest = s.batch * s.seq * (REST_SAVED[_family(arch, e)]["frozen" if frozen else "trainable"] * arch.hidden
                              + REST_CONSTANT)
    head_input = 0.0 if frozen else s.batch * s.keep * arch.hidden * e
    if checkpointing:
        return arch.layers * s.batch * s.seq * arch.hidden * e + rest + head_input
    return arch.layers * layer_saved(arch, s, e, frozen, dropout) + rest + head_input


def backward_working(arch: Arch, s: Shape, e: int, frozen: bool, dropout: bool, checkpointing: bool) -> float:
    """What backward holds beyond the saved tensors: one layer's gradients being formed (about its saved
    bytes), and with checkpointing also that layer's recomputed activations."""
    layer = layer_saved(arch, s, e, frozen, dropout)
    return 2 * layer if checkpointing else layer


def nograd_forward(arch: Arch, s: Shape, e: int) -> float:
    """Bytes a forward without grad holds at once beyond its output: one layer's widest intermediates."""
    return float(s.batch * s.seq * (3 * arch.intermediate + 4 * arch.hidden + s.seq) * e)


def logits(s: Shape, vocab: int, e: int) -> float:
    """One [B, K, V] logits tensor in the model's dtype (the LM head runs on K positions only)."""
    return float(s.batch * s.keep * vocab * e)


def loss_chunk(s: Shape, vocab: int, chunk: int, fused: bool = True, elements: int = FUSED_CHUNK_ELEMENTS) -> float:
    """fp32 temporaries of the loss over [B * positions, V] rows: a fused loss (gradient made in the forward)
    holds ``LOSS_CHUNK_BUFFERS`` per chunk of ``chunk`` positions (0: automatic pieces of ``elements``, the
    device's rule: ``device_chunk_elements`` on a GPU); an autograd loss holds ``UNFUSED_FP32_COPIES`` over all K
    positions, or per chunk when ``chunk`` is set."""
    if fused:
        positions = chunk or max(1, elements // max(1, s.batch * vocab))
        return float(LOSS_CHUNK_BUFFERS * s.batch * min(positions, s.keep) * vocab * FP32)
    return float(UNFUSED_FP32_COPIES * s.batch * min(chunk or s.keep, s.keep) * vocab * FP32)


def device_chunk_elements(gpu_bytes: int) -> int:
    """Elements of the fused losses' automatic chunk on a GPU (``promptkd.losses.fused.chunk_elements``): 1/64 of
    the free memory in bytes, between the CPU size and DEVICE_CHUNK_ELEMENTS. Planned with the whole GPU free:
    an upper bound (the chunk only shrinks as memory fills); an 80 GB GPU gets the cap, 2^27."""
    return max(FUSED_CHUNK_ELEMENTS, min(DEVICE_CHUNK_ELEMENTS, int(gpu_bytes) // 64))


def head_input(s: Shape, hidden: int, e: int) -> float:
    """One model's last hidden states on the K logit positions, [B, K, h]: what the fused head takes instead of
    [B, K, V] logits (and the shape of its hidden-state gradient)."""
    return float(s.batch * s.keep * hidden * e)


def fused_head_chunk(s: Shape, vocab: int, chunk: int, elements: int, step: str, sub_elements: int = 0) -> float:
    """fp32 buffers of one chunk of the fused head: ``FUSED_HEAD_BUFFERS[step]`` x rows x V x 4, rows =
    ``chunk`` kept positions (0: ``elements`` // V, the automatic size), at most the B·K positions there are.
    ``sub_elements`` (CPU): the divergence runs over row sub-blocks of that size, so only the per-side logits
    workspaces are chunk-sized and the temporaries sub-block-sized."""
    rows = min(chunk or max(1, elements // max(1, vocab)), s.batch * s.keep)
    sides = 2 if step == "student" else 3
    temp_rows = min(rows, max(1, sub_elements // max(1, vocab))) if sub_elements else rows
    return float((sides * rows + (FUSED_HEAD_BUFFERS[step] - sides) * temp_rows) * vocab * FP32)


def head_weight_grad(vocab: int, hidden: int, e: int) -> float:
    """The fused head's trained head-weight gradient: summed over the chunks in fp32 [V, h], then cast to the
    weight's dtype (both alive at the cast when that is 16-bit)."""
    return float(vocab * hidden * (FP32 + (e if e != FP32 else 0)))


def kv_cache(arch: Arch, batch: int, seq: int, e: int) -> float:
    """Keys and values of every layer for B sequences of T tokens, plus one layer's copy while it grows."""
    per_layer = 2 * batch * seq * arch.kv_heads * arch.head_dim * e
    return float((arch.layers + 0.5) * per_layer)


# ----------------------------------------------------------------------------- model states

@dataclass(frozen=True)
class Zero:
    """What a DeepSpeed JSON says about memory."""

    stage: int = 0
    offload_optimizer: bool = False
    offload_param: bool = False
    reduce_bucket: int = 500_000_000       # elements (DeepSpeed's default)
    prefetch_bucket: int = 50_000_000
    persistence_threshold: int = 100_000
    max_live: int = 1_000_000_000
    # bf16 at ZeRO 1-3 accumulates gradients in fp32 (promptkd.config.deepspeed.set_fp32_grad_accum)
    fp32_grad_accum: bool = False

    @classmethod
    def from_json(cls, ds: dict, bf16: bool = False) -> "Zero":
        z = ds.get("zero_optimization", {})
        off_opt = z.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
        off_par = z.get("offload_param", {}).get("device", "none") not in ("none", None)
        stage = int(z.get("stage", 0))
        fp32_accum = bf16 and stage > 0 and ds.get("data_types", {}).get("grad_accum_dtype", "fp32") == "fp32"
        return cls(stage, off_opt, off_par, int(z.get("reduce_bucket_size", 500_000_000)),
                   int(z.get("stage3_prefetch_bucket_size", 50_000_000)),
                   int(z.get("stage3_param_persistence_threshold", 100_000)),
                   int(z.get("stage3_max_live_parameters", 1_000_000_000)), fp32_accum)

    @property
    def bf16_optimizer(self) -> bool:
        """ZeRO-1 without offload and with fp32 accumulation runs DeepSpeed's BF16_Optimizer: full fp32
        gradient buffers beside the bf16 ones, no reduce bucket, no fp32 copy at the step (measured)."""
        return self.fp32_grad_accum and self.stage == 1 and not self.offload_optimizer


def student_params(arch: Arch, z: Zero, e: int, world: int) -> float:
    """The student's weights in the compute dtype: all of them, or a 1/W partition under ZeRO-3."""
    if z.stage < 3:
        return float(arch.n_params * e)
    if z.offload_param:
        return 0.0
    return float(-(-arch.n_params // world) * e) + zero3_persistent(arch, z, e)


def zero3_persistent(arch: Arch, z: Zero, e: int) -> float:
    """ZeRO-3 keeps parameters smaller than the persistence threshold whole on every rank."""
    return float(sum(n for n in arch.param_sizes if n < z.persistence_threshold) * e)


def zero3_gathered(arch: Arch, z: Zero, e: int) -> float:
    """Parameters gathered at once under ZeRO-3: the layer in use plus the prefetch bucket, at most
    stage3_max_live_parameters."""
    return float(min(z.prefetch_bucket + arch.layer_params, z.max_live, arch.n_params) * e)


def zero3_live(arch: Arch, z: Zero, e: int) -> float:
    """A ZeRO-3 student's gathered parameters plus one layer's unreduced gradients in backward."""
    return zero3_gathered(arch, z, e) + float(arch.layer_params * e)


def student_grads(arch: Arch, z: Zero, e: int, world: int) -> float:
    """Gradients: the full set (ZeRO 0-1), a 1/W partition (ZeRO 2-3); under ZeRO-3 also its reduce bucket."""
    n = arch.n_params
    acc = FP32 if z.fp32_grad_accum else e  # the dtype gradients accumulate in
    if z.stage <= 1:
        if z.fp32_grad_accum:  # BF16_Optimizer: fp32 buffers beside the bf16 grads; offloaded: fp32 grad_accum only
            return float(n * FP32 + (0 if z.offload_optimizer else n * e))
        return float(n * e)
    part = -(-n // world) * acc
    if z.stage == 3:  # the bucket is allocated whole, whatever the model's size
        return float((0 if z.offload_optimizer else part) + z.reduce_bucket * e)
    return float(part) if not z.offload_optimizer else 0.0


def reduce_bucket(arch: Arch, z: Zero, e: int) -> float:
    """ZeRO 1-2: the contiguous bucket gradients are reduced through, alive during each backward."""
    return float(z.reduce_bucket * e) if z.stage in (1, 2) and not z.bf16_optimizer else 0.0


def student_optimizer(arch: Arch, z: Zero, e: int, world: int) -> float:
    """AdamW moments, plus fp32 master weights when the model computes in 16 bits or under ZeRO 1-3.

    ZeRO 1-3 keep a fp32 master partition (1/W) and its moments; ZeRO-0 keeps them whole. With the
    optimizer offloaded they live in CPU memory (``student_optimizer_cpu``).
    """
    if z.offload_optimizer:
        return 0.0
    return _optimizer_bytes(arch, z, e, world)


def student_optimizer_cpu(arch: Arch, z: Zero, e: int, world: int) -> float:
    return _optimizer_bytes(arch, z, e, world) if z.offload_optimizer else 0.0


def _optimizer_bytes(arch: Arch, z: Zero, e: int, world: int) -> float:
    n = arch.n_params if z.stage == 0 else -(-arch.n_params // world)
    master = FP32 if (z.stage > 0 or e != FP32) else 0
    return float(n * (ADAM_MOMENTS + master))


# fp32 temporaries per updated parameter that torch's multi-tensor AdamW holds at once (sqrt(v) and the
# update; measured on torch 2.13: bench/plan_check.py's optimizer_step)
ADAMW_TEMPORARIES = 2


def optimizer_step(arch: Arch, z: Zero, e: int, world: int) -> float:
    """What the optimizer step allocates beyond the states: AdamW's fp32 temporaries over the parameters it
    updates, and the fp32 copy of the gradients that 16-bit training and ZeRO 1-3 hand it. Offloaded, the
    step runs on the CPU."""
    if z.offload_optimizer:
        return 0.0
    n = arch.n_params if z.stage == 0 else -(-arch.n_params // world)
    fp32_grads = FP32 if (z.stage > 0 or e != FP32) else 0
    if z.fp32_grad_accum and z.stage in (1, 2):  # the accumulated gradients are fp32 already (measured)
        fp32_grads = 0
    return float(n * (ADAMW_TEMPORARIES * FP32 + fp32_grads))


def prompt_states(prompt_length: int, teacher_hidden: int) -> float:
    """The soft prompt [P, h_T]: fp32 weights, gradient and two AdamW moments."""
    return float(prompt_length * teacher_hidden * FP32 * 4)


def teacher_weights(arch: Arch, placement: str, e: int, world: int, offload: bool, z: Zero) -> float:
    """The frozen teacher at rest: a full copy (replicated), or a 1/W partition plus its persistent small
    parameters (zero3; what a forward gathers is ``zero3_gathered``, counted in the phases)."""
    if placement != "zero3":
        return float(arch.n_params * e)
    part = 0 if offload else -(-arch.n_params // world) * e
    return float(part) + zero3_persistent(arch, z, e)


# ----------------------------------------------------------------------------- LoRA students

def lora_shapes(arch: Arch) -> dict[str, list[tuple[int, int]]]:
    """(in, out) features of each linear layer of one decoder layer, by the module name PEFT matches."""
    h, i, kv = arch.hidden, arch.intermediate, arch.kv_heads * arch.head_dim
    if arch.family == "llama":
        return {"q_proj": [(h, h)], "k_proj": [(h, kv)], "v_proj": [(h, kv)], "o_proj": [(h, h)],
                "gate_proj": [(h, i)], "up_proj": [(h, i)], "down_proj": [(i, h)]}
    if arch.family == "gpt2":  # attention's c_proj and the MLP's c_proj share a name
        return {"c_attn": [(h, 3 * h)], "c_proj": [(h, h), (i, h)], "c_fc": [(h, i)]}
    return {"q_proj": [(h, h)], "k_proj": [(h, h)], "v_proj": [(h, h)], "out_proj": [(h, h)],
            "fc1": [(h, i)], "fc2": [(i, h)]}


def lora_params(arch: Arch, r: int, targets: Union[str, list[str]]) -> int:
    """Adapter parameters: r · (in + out) per adapted linear layer (A is [r, in], B is [out, r]).

    targets: "all-linear" (every linear layer of the decoder, not the LM head) or module names.
    """
    shapes = lora_shapes(arch)
    names = list(shapes) if targets == "all-linear" else list(targets)
    unknown = [n for n in names if n not in shapes]
    if unknown:
        from promptkd.config import ConfigError

        raise ConfigError(f"model.student.lora.target_modules: the planner knows no {', '.join(unknown)} in a "
                          f"{arch.family} layer (known: {', '.join(shapes)})")
    return arch.layers * sum(r * (fan_in + fan_out) for n in names for fan_in, fan_out in shapes[n])


def with_params(arch: Arch, n: int) -> Arch:
    """``arch`` holding ``n`` parameters (a LoRA student's trainable or total count) for the state formulas."""
    return replace(arch, n_params=n, layer_params=-(-n // max(1, arch.layers)))
