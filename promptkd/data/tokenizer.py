"""Training a small byte-level BPE tokenizer, and loading any HF tokenizer.

No hub is reachable in tests or the CPU quickstart, so tiny runs train their own
tokenizer on the shipped text and save it in HF format; real runs load one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from promptkd.config import ConfigError
from promptkd.data.formats import DataError

logger = logging.getLogger(__name__)

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)


@dataclass(frozen=True)
class ChatStyle:
    """The special tokens and chat template of a model family, for tokenizers trained here (tests, quickstart).

    The templates follow their families' layouts (ChatML for Qwen2/Qwen3, header/eot for Llama-3) in a short
    form: Qwen3's ``enable_thinking=false`` writes the empty think block, as Qwen3's own template does.
    """

    special: tuple[str, ...]      # registered as special tokens (never split, dropped when decoding)
    added: tuple[str, ...]        # added but not special (Qwen3's <think>: kept in decoded text)
    pad: str
    eos: str
    bos: Optional[str]
    template: str
    generation_eos: tuple[str, ...]   # what the family's generation_config lists as eos_token_id


_CHATML = (
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)
_LLAMA3 = (
    "{{- bos_token }}{%- for m in messages %}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)
CHAT_STYLES = {
    # Qwen2.5 / Qwen3: no BOS; <|endoftext|> pads; instruct checkpoints end on <|im_end|> (their EOS)
    "chatml": ChatStyle(("<|endoftext|>", "<|im_start|>", "<|im_end|>"), ("<think>", "</think>"),
                        pad="<|endoftext|>", eos="<|im_end|>", bos=None, template=_CHATML,
                        generation_eos=("<|im_end|>", "<|endoftext|>")),
    # Llama-3: the tokenizer's EOS is <|end_of_text|> (base), the turn ends on <|eot_id|>; generation_config of
    # the 3.1 instruct models lists all three
    "llama3": ChatStyle(("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                         "<|eot_id|>", "<|eom_id|>", "<|finetune_right_pad_id|>"), (),
                        pad="<|finetune_right_pad_id|>", eos="<|end_of_text|>", bos="<|begin_of_text|>",
                        template=_LLAMA3, generation_eos=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")),
}
# the tiny model archs and the chat style of their family
ARCH_CHAT = {"qwen2": "chatml", "qwen3": "chatml", "llama3": "llama3"}


def _build_bpe(texts: Iterable[str], vocab_size: int, special: Sequence[str] = SPECIAL_TOKENS) -> Tokenizer:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    minimum = len(alphabet) + len(special)
    if vocab_size <= minimum:
        raise ValueError(f"vocab_size={vocab_size} must exceed {minimum} (256 bytes + special tokens)")
    tok = Tokenizer(models.BPE(unk_token=UNK))
    # Byte-level pieces make every string encodable and decoding an exact inverse.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # Deliberately no post-processor: an auto-inserted BOS would break the
    # prompt_ids + response_ids concatenation the data pipeline relies on.
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str, chat: str = "") -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts`, save it to `out_dir` in HF format, and return it.

    chat: "" (the plain <pad>/<s>/</s> tokenizer) or a key of CHAT_STYLES: that family's special tokens and
    chat template. `AutoTokenizer.from_pretrained(out_dir)` reloads the same tokenizer.
    """
    if chat:
        return _train_chat(texts, vocab_size, out_dir, chat)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=_build_bpe(texts, vocab_size),
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        # Clean-up would glue " ." to "." and break exact round trips.
        clean_up_tokenization_spaces=False,
    )
    wrapped.save_pretrained(out_dir)
    logger.info("trained byte-level BPE tokenizer (vocab %d) saved to %s", len(wrapped), out_dir)
    return wrapped


def _train_chat(texts: Iterable[str], vocab_size: int, out_dir: str, chat: str) -> PreTrainedTokenizerFast:
    if chat not in CHAT_STYLES:
        raise ValueError(f"unknown chat style {chat!r}; expected one of {', '.join(CHAT_STYLES)}")
    style = CHAT_STYLES[chat]
    tok = _build_bpe(texts, vocab_size - len(style.added), style.special + ("<unk>",))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=style.pad, eos_token=style.eos,
                                      bos_token=style.bos, unk_token="<unk>", clean_up_tokenization_spaces=False)
    if style.added:
        wrapped.add_tokens(list(style.added))
    wrapped.chat_template = style.template
    wrapped.save_pretrained(out_dir)
    logger.info("trained %s chat tokenizer (vocab %d) saved to %s", chat, len(wrapped), out_dir)
    return wrapped


def generation_eos_ids(tokenizer: PreTrainedTokenizerBase, chat: str) -> list[int]:
    """The ids a model of the chat family lists in its generation_config (eos_token_id)."""
    return [tokenizer.convert_tokens_to_ids(t) for t in CHAT_STYLES[chat].generation_eos]


def load_tokenizer(path_or_id: str, key: str = "") -> PreTrainedTokenizerBase:
    """Load a tokenizer by local path or hub id; fall back to EOS as the pad token.

    Raises OSError naming `path_or_id` if it cannot be loaded (ConfigError naming
    `key` too when given: the config key it came from, a CLI's bad input), and
    DataError if it has neither a pad nor an EOS token (batching would be impossible).
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(path_or_id)
    except Exception as err:  # noqa: BLE001 - transformers raises many types; report one
        detail = " ".join(str(err).split())[:300]
        message = f"cannot load tokenizer from {path_or_id!r}: {type(err).__name__}: {detail}"
        raise (ConfigError(f"{key}: {message}") if key else OSError(message)) from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise DataError(f"tokenizer {path_or_id!r} has neither a pad token nor an EOS token")
        # Decoder-only LMs (GPT-2, LLaMA) ship without pad; pad positions are masked anyway.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
