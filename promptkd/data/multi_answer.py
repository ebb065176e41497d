"""A synthetic suite where every prompt has several equally valid answers.

Why it exists (issue 23, bench/README.md "quality_multi"): on the bundled suite each prompt has one
correct answer, so the training reference is as good a target as any teacher can be, and continued
SFT is hard to beat. Distillation exists for the other case: the teacher's distribution carries what
one reference lacks. Here each prompt has k >= 2 valid answers (an order that is free, a choice among
items, several phrasings of the same answer); the training split gives ONE uniformly sampled answer per
prompt, so SFT on references fits the mixture of all of them (mode-covering), while a good teacher puts
its mass on valid answers only and reverse-KL/on-policy methods may settle on whichever valid mode the
student reaches most easily. Dev and test records carry every valid answer in ``references`` (Dolly
format plus that list; ``promptkd.data.formats`` reads it) and are scored as the max ROUGE-L over them,
as MiniLLM's evaluation does for sets with several answers.

Families (the answer set is exact, so the max over references is the real score):
- ``colors``: name the three colours of one of 16 made-up creatures, in any order (closed book, 6 orders);
- ``sum_pair``: name two numbers that add up to n, 4 <= n <= 14 (every pair "a and n-a", a >= 1, is valid);
- ``letter``: name a word of the suite's nouns that starts with a given letter (closed book, 2-6 valid);
- ``add``: a sum of two numbers in 0..10, in one of 3 phrasings;
- ``count``: the length of a 2-7 word list, in one of 3 phrasings (the only held-out prompts).
An earlier draft had open-book families (list the given words in any order, name one word of a list); a 2x128
teacher had not learned to copy from the input after 750 SFT steps (5 ROUGE-L on them), which this run's budget
could not wait for (bench/README.md).
"""

from __future__ import annotations

import itertools
import logging
import random
from typing import Callable

from promptkd.data.synthetic import COLORS, NOUNS, _make_entities, check_split_sizes, write_splits

logger = logging.getLogger(__name__)

Record = dict

# Letters with at least two nouns: a one-answer letter would be a single-answer prompt.
_BY_LETTER: dict[str, tuple[str, ...]] = {}
for _noun in NOUNS:
    _BY_LETTER[_noun[0]] = _BY_LETTER.get(_noun[0], ()) + (_noun,)
LETTERS: tuple[str, ...] = tuple(sorted(k for k, v in _BY_LETTER.items() if len(v) >= 2))

# A closed-book table of made-up creatures with three colours each, fixed for every split and caller seed.
_WORLD_SEED = 4242


def _make_color_table(count: int = 16) -> dict[str, tuple[str, str, str]]:
    rng = random.Random(_WORLD_SEED)
    return {name: tuple(rng.sample(COLORS, 3)) for name in _make_entities(rng, count)}


COLOR_TABLE: dict[str, tuple[str, str, str]] = _make_color_table()
_CREATURES: tuple[str, ...] = tuple(COLOR_TABLE)


def _colors(rng: random.Random) -> tuple[str, str, list[str]]:
    name = rng.choice(_CREATURES)
    return f"Name the colors of the {name}.", "", [" ".join(p) for p in itertools.permutations(COLOR_TABLE[name])]


def _sum_pair(rng: random.Random) -> tuple[str, str, list[str]]:
    n = rng.randint(4, 14)
    return f"Name two numbers that add up to {n}.", "", [f"{a} and {n - a}" for a in range(1, n)]


def _letter(rng: random.Random) -> tuple[str, str, list[str]]:
    letter = rng.choice(LETTERS)
    return f"Name a word that starts with the letter {letter}.", "", list(_BY_LETTER[letter])


def _add(rng: random.Random) -> tuple[str, str, list[str]]:
    a, b = rng.randint(0, 10), rng.randint(0, 10)
    s = a + b
    return f"What is {a} plus {b}?", "", [f"{a} plus {b} is {s}.", f"The sum is {s}.", f"It is {s}."]


def _count(rng: random.Random) -> tuple[str, str, list[str]]:
    words = rng.sample(NOUNS, rng.randint(2, 7))
    n = len(words)
    return ("How many items are in this list?", ", ".join(words),
            [f"There are {n} items.", f"The list has {n} items.", f"I count {n} items."])


_FAMILIES: dict[str, Callable[[random.Random], tuple[str, str, list[str]]]] = {
    "colors": _colors,
    "sum_pair": _sum_pair,
    "letter": _letter,
    "add": _add,
    "count": _count,
}
FAMILIES: tuple[str, ...] = tuple(_FAMILIES)
# Prompt spaces too small to hold out (16 creatures, 11 sums, 13 letters, 121 additions): dev and test repeat
# training prompts, and what they test is whether the answers' distribution was learned. `count` is held out.
_RECALL_FAMILIES = frozenset({"colors", "sum_pair", "letter", "add"})
_MAX_DRAWS = 50


def _record(family: str, rng: random.Random, with_references: bool) -> Record:
    instruction, context, answers = _FAMILIES[family](rng)
    # The one reference a training record shows: uniform over the valid answers.
    record: Record = {"instruction": instruction, "context": context, "response": rng.choice(answers),
                      "category": family}
    if with_references:
        record["references"] = answers
    return record


def generate_multi_answer(n: int, rng: random.Random, with_references: bool,
                          avoid: set[tuple[str, str]] | None = None) -> list[Record]:
    """``n`` records, families balanced and shuffled; with ``avoid``, skip (instruction, context) already in it."""
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    families = [FAMILIES[i % len(FAMILIES)] for i in range(n)]
    rng.shuffle(families)
    records = []
    for family in families:
        record = _record(family, rng, with_references)
        if avoid is not None and family not in _RECALL_FAMILIES:
            for _ in range(_MAX_DRAWS):  # bounded: a small prompt space may be exhausted
                if (record["instruction"], record["context"]) not in avoid:
                    break
                record = _record(family, rng, with_references)
            avoid.add((record["instruction"], record["context"]))
        records.append(record)
    return records


def make_multi_answer_splits(out_dir: str, n_train: int, n_dev: int, n_test: int, seed: int) -> dict[str, str]:
    """Write train/dev/test JSONL under ``out_dir`` (train: one sampled answer; dev/test: every valid answer in
    ``references``); return {split: path}. Deterministic per seed."""
    check_split_sizes(n_train, n_dev, n_test)
    train = generate_multi_answer(n_train, random.Random(f"promptkd-multi:{seed}:train"), with_references=False)
    seen = {(r["instruction"], r["context"]) for r in train}
    splits = {
        "train": train,
        "dev": generate_multi_answer(n_dev, random.Random(f"promptkd-multi:{seed}:dev"), True, seen),
        "test": generate_multi_answer(n_test, random.Random(f"promptkd-multi:{seed}:test"), True, seen),
    }
    return write_splits(out_dir, splits, "multi-answer")


def main(argv: list[str] | None = None) -> int:
    """``python -m promptkd.data.multi_answer OUT_DIR [--train N --dev N --test N --seed S]``."""
    import argparse

    p = argparse.ArgumentParser(description="write the multi-answer synthetic suite (Dolly + references)")
    p.add_argument("out_dir")
    p.add_argument("--train", type=int, default=6000)
    p.add_argument("--dev", type=int, default=200)
    p.add_argument("--test", type=int, default=400)
    p.add_argument("--seed", type=int, default=1234)
    a = p.parse_args(argv)
    for split, path in make_multi_answer_splits(a.out_dir, a.train, a.dev, a.test, a.seed).items():
        print(f"{split}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
