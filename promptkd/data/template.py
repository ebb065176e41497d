"""Alpaca-style prompt template used by the PromptKD data pipeline (DESIGN.md §1)."""

from __future__ import annotations

PROMPT_HEADER = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
)
RESPONSE_MARKER = "### Response:\n"


def build_prompt(instruction: str, context: str | None = None) -> str:
    """Return the templated prompt; the model's response is appended right after it.

    The `### Input:` block appears only when `context` has visible text, so that
    examples with an empty Dolly `context` field look like context-free ones.
    """
    parts = [PROMPT_HEADER, "### Instruction:\n", instruction, "\n\n"]
    if context is not None and context.strip():
        parts += ["### Input:\n", context, "\n\n"]
    parts.append(RESPONSE_MARKER)
    return "".join(parts)
