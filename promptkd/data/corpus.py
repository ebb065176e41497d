"""A plain-text pretraining corpus for an auxiliary LM loss (MiniLLM's ``method.minillm.lm_*``).

Documents: a ``.jsonl`` file with a string ``"text"`` field per line, or any
other file read as plain text, one document per non-empty line. The texts are
held in memory and tokenized only when drawn (cheap next to the forward).

Order: an endless stream of epochs, each a permutation of the documents seeded
by ``(seed, epoch)`` alone. Rank r's k-th draw is stream position
``k · world + r``, so ranks read disjoint documents within an epoch and the whole
position is the single counter ``consumed`` (every rank draws the same number
per step). Resuming restores it; a different world size still resumes
deterministically, just with a different split of the documents.
"""
from __future__ import annotations

import json
from typing import Callable

import torch

from promptkd.data.formats import DataError
from promptkd.seeding import derive_seed

Encode = Callable[[list[str]], list[list[int]]]


def read_texts(path: str) -> list[str]:
    """Documents of ``path`` (see the module docstring); a bad line is an error naming file:line."""
    texts = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            if not path.endswith(".jsonl"):
                texts.append(line.rstrip("\r\n"))
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise DataError(f"{path}:{lineno}: expected an object with a string 'text' field")
            if row["text"].strip():
                texts.append(row["text"])
    if not texts:
        raise DataError(f"{path}: no documents")
    return texts


class LMCorpus:
    """Deterministic, resumable per-rank draws of tokenized documents."""

    def __init__(self, texts: list[str], encode: Encode, eos_id: int, max_length: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        if not texts:
            raise DataError("LM corpus: no documents")
        self.texts, self.encode, self.eos_id, self.max_length = texts, encode, eos_id, max_length
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.consumed = 0
        self._perm: tuple[int, list[int]] = (-1, [])

    def __len__(self) -> int:
        return len(self.texts)

    def _order(self, epoch: int) -> list[int]:
        if self._perm[0] != epoch:
            g = torch.Generator(device="cpu").manual_seed(derive_seed(self.seed, "lm_corpus", index=epoch))
            self._perm = (epoch, torch.randperm(len(self.texts), generator=g, device="cpu").tolist())
        return self._perm[1]

    def next_indices(self, n: int) -> list[int]:
        """Document indices of this rank's next ``n`` draws (advances the position)."""
        out = []
        for k in range(self.consumed, self.consumed + n):
            pos = k * self.world_size + self.rank
            out.append(self._order(pos // len(self.texts))[pos % len(self.texts)])
        self.consumed += n
        return out

    def draw(self, n: int) -> list[list[int]]:
        """This rank's next ``n`` documents as token ids ending in EOS, cut to ``max_length``."""
        ids = self.encode([self.texts[i] for i in self.next_indices(n)])
        return [(list(x) + [self.eos_id])[:self.max_length] for x in ids]

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "n_docs": len(self.texts)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("n_docs", len(self.texts)) != len(self.texts):
            raise DataError(f"LM corpus: the checkpoint was taken with {state['n_docs']} documents, the file now "
                            f"holds {len(self.texts)}; the data order cannot be resumed")
        self.consumed = int(state["consumed"])


def collate_lm(seqs: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask, long [B, T]; every real token is a loss token."""
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        input_ids[row, :len(s)] = torch.tensor(s, dtype=torch.long)
        attention_mask[row, :len(s)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}
