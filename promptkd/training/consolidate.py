"""Consolidate a saved checkpoint (any ZeRO stage) into a Hugging Face model dir, offline.

    python -m promptkd.consolidate runs/x/checkpoints/step_1000 out/hf_student

Runs in one process without GPUs or a process group: ZeRO partitions are merged
from the checkpoint files. The teacher prompt, when the run trained one, is
written beside the model as teacher_prompt/teacher_prompt.safetensors, as an export has it. A LoRA
student's adapters are merged into its weights and written beside them in adapter/, as an export has them.
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys

import torch

from promptkd.models import lora


def student_state_dict(ckpt: str) -> dict[str, torch.Tensor]:
    """fp32 weights of the student from ``<ckpt>/ds``: merged ZeRO partitions, or the plain module."""
    ds_dir = os.path.join(ckpt, "ds")
    if glob.glob(os.path.join(ds_dir, "*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(ckpt, tag="ds")
    states = torch.load(os.path.join(ds_dir, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in states["module"].items()}


def _with_adapters(model: torch.nn.Module, ckpt: str, state: dict[str, torch.Tensor]) -> bool:
    """Inject a LoRA student's adapters into ``model`` (in place) when ``state`` holds them."""
    if not any(".lora_A." in key for key in state):
        return False
    from promptkd.training.checkpoint import ADAPTER_CONFIG_DIR

    adapter_dir = os.path.join(ckpt, ADAPTER_CONFIG_DIR)
    if not os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
        raise ValueError(f"{ckpt}: the checkpoint holds LoRA adapters but no {ADAPTER_CONFIG_DIR}/adapter_config.json "
                         "(saved before consolidation knew adapters): use the run's export/ instead")
    lora.inject_saved_adapter(model, adapter_dir)
    return True


def consolidate(ckpt: str, out_dir: str) -> None:
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from promptkd.training.checkpoint import MARKER

    if not os.path.exists(os.path.join(ckpt, MARKER)):
        raise ValueError(f"{ckpt}: not a complete checkpoint (no {MARKER} marker)")
    config = AutoConfig.from_pretrained(os.path.join(ckpt, "hf_config.json"))
    model = AutoModelForCausalLM.from_config(config)
    state = student_state_dict(ckpt)
    adapted = _with_adapters(model, ckpt, state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in getattr(model, "_tied_weights_keys", {}) and "rotary" not in k]
    if missing or unexpected:
        raise ValueError(f"{ckpt}: checkpoint does not match its config (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if adapted:  # the plain HF model with the adapters merged, and the adapter beside it (export/'s layout)
        merged = lora.export_state(model, {k: v.detach() for k, v in model.state_dict().items()}, tmp)
        plain = AutoModelForCausalLM.from_config(config)
        if plain.load_state_dict(merged, strict=False).unexpected_keys:  # every merged key is a plain HF name
            raise ValueError(f"{ckpt}: merged LoRA weights do not match the model's names")
        model = plain
    model.save_pretrained(tmp, is_main_process=True)
    if os.path.isdir(os.path.join(ckpt, "tokenizer")):
        for name in os.listdir(os.path.join(ckpt, "tokenizer")):
            shutil.copy(os.path.join(ckpt, "tokenizer", name), tmp)
    from promptkd.training.checkpoint import read_state

    prompt = read_state(ckpt).get("method", {}).get("prompt")  # older layouts are moved where it lives now
    if prompt:
        from promptkd.models import PROMPT_DIR, PROMPT_WEIGHTS

        os.makedirs(os.path.join(tmp, PROMPT_DIR))
        save_file({"prompt": prompt["prompt"]["prompt"].float().contiguous()},
                  os.path.join(tmp, PROMPT_DIR, PROMPT_WEIGHTS))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m promptkd.consolidate", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a checkpoints/step_N dir (with its COMPLETE marker)")
    parser.add_argument("out_dir", help="where to write the HF model")
    args = parser.parse_args(argv)
    try:
        consolidate(args.checkpoint, args.out_dir)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    print(f"wrote {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
