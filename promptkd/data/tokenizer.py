"""Training a small byte-level BPE tokenizer, and loading any HF tokenizer.

No hub is reachable in tests or the CPU quickstart, so tiny runs train their own
tokenizer on the shipped text and save it in HF format; real runs load one.
"""

from __future__ import annotations

import logging
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from promptkd.config import ConfigError
from promptkd.data.formats import DataError

logger = logging.getLogger(__name__)

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)


def _build_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    minimum = len(alphabet) + len(SPECIAL_TOKENS)
    if vocab_size <= minimum:
        raise ValueError(f"vocab_size={vocab_size} must exceed {minimum} (256 bytes + special tokens)")
    tok = Tokenizer(models.BPE(unk_token=UNK))
    # Byte-level pieces make every string encodable and decoding an exact inverse.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # Deliberately no post-processor: an auto-inserted BOS would break the
    # prompt_ids + response_ids concatenation the data pipeline relies on.
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts`, save it to `out_dir` in HF format, and return it.

    `AutoTokenizer.from_pretrained(out_dir)` reloads the same tokenizer.
    """
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
