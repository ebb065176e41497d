"""Alpaca-style prompt template used by the PromptKD data pipeline (DESIGN.md §1).

Two headers, as Stanford Alpaca and MiniLLM's data processing (``tools/process_data_dolly.py``, used by the
official PromptKD code too) write them: a prompt with an input says so in its first sentence.
MiniLLM's released checkpoints were trained on exactly these strings.
"""

from __future__ import annotations

PROMPT_HEADER = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
)
INPUT_HEADER = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
)
RESPONSE_MARKER = "### Response:\n"


def build_prompt(instruction: str, context: str | None = None) -> str:
    """Return the templated prompt; the model's response is appended right after it.

    The `### Input:` block appears only when `context` has visible text, so that
    examples with an empty Dolly `context` field look like context-free ones.
    """
    has_input = context is not None and bool(context.strip())
    parts = [INPUT_HEADER if has_input else PROMPT_HEADER, "### Instruction:\n", instruction, "\n\n"]
    if has_input:
        parts += ["### Input:\n", context, "\n\n"]
    parts.append(RESPONSE_MARKER)
    return "".join(parts)
