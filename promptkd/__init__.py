"""PromptKD: distillation of generative LMs with a prompted teacher, on DeepSpeed."""

__version__ = "0.1.0"
