"""Bundled synthetic instruction data in Dolly format.

The CPU quickstart and the tests cannot download Dolly, so they train on this.
It has to satisfy two needs at once:
- tiny LMs (1-5M params, a few hundred CPU steps) must be able to learn it, so
  prompts and responses are short and the vocabulary is a few hundred words;
- a larger student must clearly beat a smaller one, so besides algorithmic
  families there is a closed-book table of 150 made-up facts that rewards
  memorization capacity.
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
from typing import Callable, Iterable

logger = logging.getLogger(__name__)

# The fact table must be identical for every split and every caller seed, or
# test questions would ask about facts that training never stated.
_WORLD_SEED = 1729
_N_ENTITIES = 50

NOUNS = (
    "apple", "bird", "boat", "book", "bread", "cake", "car", "cat", "chair", "cloud",
    "coat", "cup", "desk", "dog", "door", "drum", "egg", "fish", "flag", "frog",
    "hat", "horse", "key", "kite", "lamp", "leaf", "lion", "map", "moon", "nest",
    "pen", "pig", "plate", "ring", "rock", "rose", "shoe", "sock", "spoon", "star",
    "stone", "sun", "table", "tree", "train", "wheel", "window", "wolf",
)
COLORS = (
    "red", "blue", "green", "yellow", "orange", "purple",
    "black", "white", "brown", "pink", "gray", "silver",
)
FOODS = (
    "apples", "berries", "bread", "cheese", "fish", "grass",
    "honey", "leaves", "nuts", "rice", "seeds", "soup",
)
PLACES = (
    "forest", "desert", "river", "mountains", "city",
    "cave", "ocean", "swamp", "valley", "village",
)

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "gl", "st", "tr")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "b", "d", "g", "k", "l", "m", "n", "r", "s", "t", "x")

Record = dict[str, str]


def _make_entities(rng: random.Random, count: int) -> list[str]:
    """Pronounceable made-up names (e.g. 'zorblat'), unique and not real list words."""
    names: list[str] = []
    taken = set(NOUNS) | set(COLORS) | set(FOODS) | set(PLACES)
    while len(names) < count:
        name = "".join(rng.choice(part) for part in (_ONSETS, _VOWELS, _CODAS, _ONSETS, _VOWELS, _CODAS))
        if 5 <= len(name) <= 9 and name not in taken:
            taken.add(name)
            names.append(name)
    return names


def _make_fact_table() -> list[tuple[str, str, str]]:
    """150 (entity, attribute, value) facts, fixed for the whole package."""
    rng = random.Random(_WORLD_SEED)
    facts = []
    for entity in _make_entities(rng, _N_ENTITIES):
        facts.append((entity, "color", rng.choice(COLORS)))
        facts.append((entity, "food", rng.choice(FOODS)))
        facts.append((entity, "home", rng.choice(PLACES)))
    return facts


FACTS: tuple[tuple[str, str, str], ...] = tuple(_make_fact_table())


def _fact_record(entity: str, attribute: str, value: str) -> tuple[str, str, str]:
    if attribute == "color":
        return f"What is the color of the {entity}?", "", f"The {entity} is {value}."
    if attribute == "food":
        return f"What does the {entity} eat?", "", f"The {entity} eats {value}."
    return f"Where does the {entity} live?", "", f"The {entity} lives in the {value}."


class _FactDeck:
    """Deals facts in shuffled rounds so any split with >= 150 fact items covers every fact."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._cards: list[tuple[str, str, str]] = []

    def draw(self) -> tuple[str, str, str]:
        if not self._cards:
            self._cards = list(FACTS)
            self._rng.shuffle(self._cards)
        return self._cards.pop()


def _word_list(rng: random.Random, low: int, high: int) -> list[str]:
    return rng.sample(NOUNS, rng.randint(low, high))


# Sizes of the algorithmic families per difficulty level. Level 1 is the quickstart's suite; level 2 has
# longer lists and two-digit sums, which a 1-2 layer student cannot fully learn from SFT while a 4-layer
# teacher can (the quality benchmark needs that gap).
LEVELS: dict[int, dict[str, tuple[int, int]]] = {
    1: {"reverse": (3, 5), "sort": (3, 5), "sort_max": (30, 30), "add": (0, 20), "repeat": (2, 5),
        "count": (2, 7), "first_last": (3, 6)},
    2: {"reverse": (5, 8), "sort": (5, 8), "sort_max": (99, 99), "add": (10, 99), "repeat": (3, 8),
        "count": (4, 10), "first_last": (4, 9)},
}


def _reverse(rng: random.Random, lv: dict) -> tuple[str, str, str]:
    words = _word_list(rng, *lv["reverse"])
    return "Reverse the order of these words.", " ".join(words), " ".join(reversed(words))


def _sort(rng: random.Random, lv: dict) -> tuple[str, str, str]:
    nums = rng.sample(range(lv["sort_max"][0] + 1), rng.randint(*lv["sort"]))
    return (
        "Sort these numbers from smallest to largest.",
        " ".join(map(str, nums)),
        " ".join(map(str, sorted(nums))),
    )


def _add(rng: random.Random, lv: dict) -> tuple[str, str, str]:
    a, b = rng.randint(*lv["add"]), rng.randint(*lv["add"])
    return f"What is {a} plus {b}?", "", f"{a} plus {b} is {a + b}."


def _uppercase(rng: random.Random, lv: dict) -> tuple[str, str, str]:
    word = rng.choice(NOUNS)
    return f"Write the word {word} in capital letters.", "", word.upper()


def _repeat(rng: random.Random, lv: dict) -> tuple[str, str, str]:
    word, times = rng.choice(NOUNS), rng.randint(*lv["repeat"])
    return f"Repeat the word {word} {times} times.", "", " ".join([word] * times)


def _count(rng: random.Random, lv: dict) -> tuple[str, str, str]:
    words = _word_list(rng, *lv["count"])
    return "How many items are in this list?", ", ".join(words), f"There are {len(words)} items."


def _first_last(rng: random.Random, lv: dict) -> tuple[str, str, str]:
    words = _word_list(rng, *lv["first_last"])
    which = rng.choice(("first", "last"))
    item = words[0] if which == "first" else words[-1]
    return f"What is the {which} item in this list?", ", ".join(words), f"The {which} item is {item}."


_ALGORITHMIC: dict[str, Callable[[random.Random, dict], tuple[str, str, str]]] = {
    "reverse": _reverse,
    "sort": _sort,
    "add": _add,
    "uppercase": _uppercase,
    "repeat": _repeat,
    "count": _count,
    "first_last": _first_last,
}
FAMILIES: tuple[str, ...] = ("fact", *_ALGORITHMIC)

# Closed-book questions are meant to repeat training prompts: that is what they test.
_RECALL_FAMILIES = frozenset({"fact"})
_MAX_DRAWS = 50


def _draw(family: str, rng: random.Random, deck: _FactDeck, level: int = 1) -> Record:
    if family == "fact":
        instruction, context, response = _fact_record(*deck.draw())
    else:
        instruction, context, response = _ALGORITHMIC[family](rng, LEVELS[level])
    return {"instruction": instruction, "context": context, "response": response, "category": family}


def _key(record: Record) -> tuple[str, str]:
    return record["instruction"], record["context"]


def _generate(n: int, rng: random.Random, avoid: set[tuple[str, str]] | None, level: int = 1) -> list[Record]:
    """Balanced families in random order; with `avoid`, skip prompts already in it."""
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    if level not in LEVELS:
        raise ValueError(f"level={level}: must be one of {sorted(LEVELS)}")
    families = [FAMILIES[i % len(FAMILIES)] for i in range(n)]
    rng.shuffle(families)
    deck = _FactDeck(rng)
    records = []
    for family in families:
        record = _draw(family, rng, deck, level)
        if avoid is not None and family not in _RECALL_FAMILIES:
            # Bounded retries: a small prompt space (e.g. uppercase) may be exhausted.
            for _ in range(_MAX_DRAWS):
                if _key(record) not in avoid:
                    break
                record = _draw(family, rng, deck, level)
            avoid.add(_key(record))
        records.append(record)
    return records


def generate_synthetic(n: int, seed: int, level: int = 1) -> list[Record]:
    """`n` Dolly-style records (instruction, context, response, category); deterministic per seed and level."""
    return _generate(n, random.Random(seed), avoid=None, level=level)


def write_jsonl(path: str, records: Iterable[dict]) -> None:
    """Write one JSON object per line, atomically (temp file in the same dir, then rename)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=".tmp-", suffix=".jsonl", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        raise


def check_split_sizes(n_train: int, n_dev: int, n_test: int) -> dict[str, int]:
    """{split: size}; every split needs at least one example."""
    sizes = {"train": n_train, "dev": n_dev, "test": n_test}
    for name, size in sizes.items():
        if size < 1:
            raise ValueError(f"n_{name}={size} must be >= 1")
    return sizes


def write_splits(out_dir: str, splits: dict[str, list[dict]], what: str) -> dict[str, str]:
    """``out_dir/<split>.jsonl`` for each split (each written atomically); returns {split: path}."""
    paths = {}
    for name, records in splits.items():
        paths[name] = os.path.join(out_dir, f"{name}.jsonl")
        write_jsonl(paths[name], records)
    logger.info("wrote %s splits to %s (%s)", what, out_dir, {k: len(v) for k, v in splits.items()})
    return paths


def make_synthetic_splits(out_dir: str, n_train: int, n_dev: int, n_test: int, seed: int,
                          level: int = 1) -> dict[str, str]:
    """Write train/dev/test JSONL under `out_dir`; return {split: path}.

    Dev and test avoid exact train prompts (and each other's) where the family's
    prompt space allows, except closed-book fact questions, which must repeat.
    """
    check_split_sizes(n_train, n_dev, n_test)
    train = generate_synthetic(n_train, seed, level)
    seen = {_key(r) for r in train}
    # String seeds hash deterministically (sha512) and keep the split streams apart.
    splits = {
        "train": train,
        "dev": _generate(n_dev, random.Random(f"promptkd-synthetic:{seed}:dev"), seen, level),
        "test": _generate(n_test, random.Random(f"promptkd-synthetic:{seed}:test"), seen, level),
    }
    return write_splits(out_dir, splits, "synthetic")
