"""Model construction and the prompted teacher."""

from promptkd.models.loading import DTYPES, build_tiny, check_vocab, load_pretrained, missing_local_dir, tiny_config
from promptkd.models.prompted_teacher import (
    PROMPT_DIR,
    PROMPT_META,
    PROMPT_WEIGHTS,
    PromptedTeacher,
    load_prompt,
)
from promptkd.models.teacher import TeacherSpec, load_teacher

__all__ = [
    "DTYPES",
    "PROMPT_DIR",
    "PROMPT_META",
    "PROMPT_WEIGHTS",
    "PromptedTeacher",
    "TeacherSpec",
    "build_tiny",
    "check_vocab",
    "load_pretrained",
    "load_prompt",
    "load_teacher",
    "missing_local_dir",
    "tiny_config",
]
