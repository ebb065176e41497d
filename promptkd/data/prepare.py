"""Convert the paper's five test sets from their public raw layouts into promptkd JSONL.

    python -m promptkd.data.prepare <dataset> --source <hub id | raw file | raw dir> --out <root>
    python -m promptkd.data.prepare all --out <root> [--raw ROOT] [--<dataset> PATH ...] [--no-hub]

(``all``: every set it can find, one summary; see ``promptkd.data.paper_sets``.)

writes ``<root>/<dataset>/{test,dev,train}.jsonl`` (dev/train for dolly only) and
``<root>/<dataset>/meta.json`` (source, parameters, counts). ``<root>`` can then be
given whole to ``eval.sets=[<root>]``. No launcher, no process group.

Output records (``load_examples`` reads both):
- dolly: the ``dolly`` format ``{id, instruction, context, response, category}``;
- the others: the ``prompt_output`` format ``{id, prompt, output: [refs...],
  category, instruction, input}``, with ``prompt`` already templated (so an input
  block survives) and ``output`` always a list (several references where the raw
  data has several).

"tokens" in the length filters are whitespace-separated words (``len(text.split())``),
independent of any model tokenizer, so the same files serve every model family.

Raw layouts and choices (README "Test sets"). Every dataset also reads MiniLLM's released layout, the files
the paper evaluates on: a dir (or file) with ``valid.jsonl`` (``promptkd.data.paper_sets``). The upstream ones:
- dolly: ``databricks-dolly-15k.jsonl`` (instruction, context, response, category).
  Ids are ``dolly-<0-based line index>``. Split: ``random.Random(seed).shuffle`` of the
  indices (seed 42); the first 500 are test, the next 1000 dev, the rest train; each
  split keeps the raw order.
- selfinst: ``user_oriented_instructions.jsonl`` of Self-Instruct (id, motivation_app,
  instruction, instances: [{input, output}]). One example per instance, id
  ``<task id>-<j>``, category = motivation_app.
- vicuna: FastChat ``llm_judge/data/vicuna_bench``: ``question.jsonl`` (question_id,
  category, turns) + ``reference_answer/*.jsonl`` (question_id, choices[0].turns). The
  older ``eval/table`` layout (``text`` instead of ``turns``) is read too, with
  ``--references`` naming the answer files. Each answer file gives one reference;
  questions without any reference are dropped (counted in meta.json).
- sni: Super-NaturalInstructions repo: ``tasks/<task>.json`` (Definition, Categories,
  Instances: [{id, input, output: [...]}]) for the tasks of
  ``splits/default/test_tasks.txt``; the first 100 instances per task (the benchmark's
  own evaluation protocol); references shorter than 11 words are dropped, and an
  instance with none left is dropped.
- unni: Unnatural Instructions ``core_data.jsonl`` (instruction, instances:
  [{instruction_with_input, input, constraints, output}]): instances in file order,
  those whose output has >= 11 words, the first 10,000 of them. Prompt = instruction +
  input (constraints are kept in the record, not in the prompt).
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import random
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional

from promptkd.data.formats import DataError, _iter_jsonl
from promptkd.data.template import build_prompt

log = logging.getLogger(__name__)

DATASETS = ("dolly", "selfinst", "vicuna", "sni", "unni")
DOLLY_SEED, DOLLY_TEST, DOLLY_DEV = 42, 500, 1000
MIN_WORDS = 11
SNI_PER_TASK = 100
UNNI_LIMIT = 10_000
Row = dict[str, Any]


@dataclass
class Prepared:
    splits: dict[str, list[Row]]
    fmt: str                                   # dolly | prompt_output
    stats: dict[str, Any] = field(default_factory=dict)


def word_count(text: str) -> int:
    return len(text.split())


def _record(ex_id: str, instruction: str, inp: str, refs: list[str], category: str, **extra: Any) -> Row:
    return {"id": ex_id, "prompt": build_prompt(instruction, inp), "output": refs, "category": category,
            "instruction": instruction, "input": inp, **extra}


def _str(row: Row, key: str, where: str, required: bool = True) -> str:
    value = row.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def _instances(row: Row, where: str) -> list[Row]:
    """``instances`` as a list of dicts; hub datasets store a list of dicts as a dict of lists."""
    inst = row.get("instances")
    if isinstance(inst, dict):
        keys = list(inst)
        n = len(inst[keys[0]]) if keys else 0
        return [{k: inst[k][i] for k in keys} for i in range(n)]
    if not isinstance(inst, list) or not all(isinstance(i, dict) for i in inst):
        raise DataError(f"{where}: field 'instances' must be a list of objects")
    return inst


# ----------------------------------------------------------------------------- converters

def convert_dolly(rows: Iterable[tuple[str, Row]], seed: int = DOLLY_SEED, test_size: int = DOLLY_TEST,
                  dev_size: int = DOLLY_DEV) -> Prepared:
    records = []
    for i, (where, row) in enumerate(rows):
        records.append({"id": f"dolly-{i}", "instruction": _str(row, "instruction", where),
                        "context": _str(row, "context", where, required=False),
                        "response": _str(row, "response", where),
                        "category": _str(row, "category", where, required=False)})
    if test_size + dev_size >= len(records):
        raise DataError(f"dolly: {len(records)} examples cannot hold test={test_size} + dev={dev_size} + train")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    test, dev = set(order[:test_size]), set(order[test_size:test_size + dev_size])
    splits = {"test": [r for i, r in enumerate(records) if i in test],
              "dev": [r for i, r in enumerate(records) if i in dev],
              "train": [r for i, r in enumerate(records) if i not in test and i not in dev]}
    return Prepared(splits, "dolly", {"raw": len(records), "seed": seed})


def convert_selfinst(rows: Iterable[tuple[str, Row]]) -> Prepared:
    out, tasks = [], 0
    for where, row in rows:
        tasks += 1
        task_id = str(row.get("id", f"selfinst-{tasks - 1}"))
        instruction = _str(row, "instruction", where)
        for j, inst in enumerate(_instances(row, where)):
            out.append(_record(f"{task_id}-{j}", instruction, _str(inst, "input", where, required=False),
                               [_str(inst, "output", where)], _str(row, "motivation_app", where, required=False)))
    return Prepared({"test": out}, "prompt_output", {"tasks": tasks})


def _answer_text(row: Row, where: str) -> str:
    if "choices" in row:  # llm_judge layout
        choices = row["choices"]
        if not isinstance(choices, list) or not choices or not isinstance(choices[0].get("turns"), list):
            raise DataError(f"{where}: field 'choices' must be a non-empty list of {{turns: [...]}}")
        text = choices[0]["turns"][0] if choices[0]["turns"] else None
        if not isinstance(text, str):
            raise DataError(f"{where}: choices[0].turns[0] must be a string")
        return text
    return _str(row, "text", where)  # older eval/table layout


def _question_text(row: Row, where: str) -> str:
    if "turns" in row:
        turns = row["turns"]
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], str):
            raise DataError(f"{where}: field 'turns' must be a non-empty list of strings")
        return turns[0]  # single-turn evaluation: only the first turn is asked
    return _str(row, "text", where)


def convert_vicuna(questions: Iterable[tuple[str, Row]], answer_files: list[Iterable[tuple[str, Row]]]) -> Prepared:
    refs: dict[str, list[str]] = {}
    for rows in answer_files:
        for where, row in rows:
            refs.setdefault(str(row.get("question_id")), []).append(_answer_text(row, where))
    out, missing = [], []
    for where, row in questions:
        qid = row.get("question_id")
        if qid is None:
            raise DataError(f"{where}: missing field 'question_id'")
        text = _question_text(row, where)
        if str(qid) not in refs:
            missing.append(qid)
            continue
        out.append(_record(f"vicuna-{qid}", text, "", refs[str(qid)], _str(row, "category", where, required=False)))
    if missing:
        log.warning("vicuna: %d questions have no reference answer and are dropped: %s", len(missing), missing)
    return Prepared({"test": out}, "prompt_output", {"questions": len(out) + len(missing),
                                                     "dropped_no_reference": missing})


def _long_refs(outputs: Any, where: str, min_words: int) -> list[str]:
    outputs = [outputs] if isinstance(outputs, str) else outputs
    if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
        raise DataError(f"{where}: field 'output' must be a string or a list of strings")
    return [o for o in outputs if word_count(o) >= min_words]


def convert_sni(tasks: Iterable[tuple[str, str, Row]], max_per_task: int = SNI_PER_TASK,
                min_words: int = MIN_WORDS) -> Prepared:
    """``tasks``: (where, task name, task JSON) in test-list order."""
    out, seen, n_tasks = [], 0, 0
    for where, name, task in tasks:
        n_tasks += 1
        definition = task.get("Definition")
        definition = definition[0] if isinstance(definition, list) and definition else definition
        if not isinstance(definition, str):
            raise DataError(f"{where}: field 'Definition' must be a string or a list of strings")
        cats = task.get("Categories") or [name]
        instances = task.get("Instances")
        if not isinstance(instances, list):
            raise DataError(f"{where}: field 'Instances' must be a list")
        for inst in instances[:max_per_task] if max_per_task else instances:
            seen += 1
            refs = _long_refs(inst.get("output"), where, min_words)
            if refs:
                out.append(_record(str(inst.get("id", f"{name}-{seen}")), definition,
                                   _str(inst, "input", where, required=False), refs, cats[0], task=name))
    return Prepared({"test": out}, "prompt_output", {"tasks": n_tasks, "instances_seen": seen,
                                                     "min_words": min_words, "max_per_task": max_per_task})


def sni_from_flat_rows(rows: Iterable[tuple[str, Row]]) -> Iterator[tuple[str, str, Row]]:
    """Hub copies of S-NI hold one instance per row (task_name, id, definition, inputs, targets)."""
    tasks: dict[str, Row] = {}
    for where, row in rows:
        name = _str(row, "task_name", where)
        task = tasks.setdefault(name, {"Definition": _str(row, "definition", where), "Instances": [], "where": where})
        task["Instances"].append({"id": row.get("id"), "input": _str(row, "inputs", where),
                                  "output": row.get("targets")})
    for name, task in tasks.items():
        yield task.pop("where"), name, task


def convert_unni(rows: Iterable[tuple[str, Row]], limit: int = UNNI_LIMIT, min_words: int = MIN_WORDS) -> Prepared:
    out, seen = [], 0
    for line, (where, row) in enumerate(rows, start=1):
        instruction = _str(row, "instruction", where)
        for j, inst in enumerate(_instances(row, where)):
            seen += 1
            output = _str(inst, "output", where)
            if word_count(output) < min_words:
                continue
            out.append(_record(f"unni-{line}-{j}", instruction, _str(inst, "input", where, required=False), [output],
                               "", constraints=inst.get("constraints")))
            if len(out) == limit:
                break
        if len(out) == limit:
            break
    return Prepared({"test": out}, "prompt_output", {"instances_seen": seen, "min_words": min_words, "limit": limit})


# ----------------------------------------------------------------------------- reading raw sources

def _hub_rows(source: str, split: str, config: Optional[str]) -> Iterator[tuple[str, Row]]:
    import datasets  # deferred: slow to import, and only hub sources need it

    args = (source, config) if config else (source,)
    try:
        rows = datasets.load_dataset(*args, split=split)
    except Exception as err:  # noqa: BLE001 - any hub failure becomes one readable DataError
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise DataError(f"{source}[{split}]:0: cannot load dataset: {type(err).__name__}: {first}") from err
    for i, row in enumerate(rows):
        yield f"{source}[{split}]:{i}", dict(row)


def _jsonl_rows(path: str) -> Iterator[tuple[str, Row]]:
    if not os.path.isfile(path):
        raise DataError(f"{path}:0: file not found")
    for line_no, obj in _iter_jsonl(path):
        yield f"{path}:{line_no}", obj


def _find(source: str, candidates: tuple[str, ...]) -> str:
    """``source`` itself when it is a file, else the first candidate inside the dir."""
    if os.path.isfile(source):
        return source
    if os.path.isdir(source):
        for rel in candidates:
            if os.path.isfile(os.path.join(source, rel)):
                return os.path.join(source, rel)
        raise DataError(f"{source}:0: none of {', '.join(candidates)} in this directory")
    raise DataError(f"{source}:0: no such file or directory")


def _is_hub(source: str) -> bool:
    from promptkd.data.formats import _looks_like_hub_id

    return _looks_like_hub_id(source)


def _rows(source: str, candidates: tuple[str, ...], split: str, config: Optional[str]) -> Iterator[tuple[str, Row]]:
    return _hub_rows(source, split, config) if _is_hub(source) else _jsonl_rows(_find(source, candidates))


def _sni_tasks(root: str, tasks_file: str) -> Iterator[tuple[str, str, Row]]:
    listing = tasks_file or os.path.join(root, "splits", "default", "test_tasks.txt")
    if not os.path.isfile(listing):
        raise DataError(f"{listing}:0: test task list not found (pass --tasks FILE)")
    with open(listing, encoding="utf-8") as fh:
        names = [line.strip() for line in fh if line.strip()]
    for name in names:
        path = os.path.join(root, "tasks", name if name.endswith(".json") else name + ".json")
        if not os.path.isfile(path):
            raise DataError(f"{path}:0: task file of '{name}' (listed in {listing}) not found")
        with open(path, encoding="utf-8") as fh:
            try:
                task = json.load(fh)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from err
        yield path, name.removesuffix(".json"), task


def _vicuna_answer_files(source: str, references: list[str]) -> list[str]:
    if references:
        return references
    base = source if os.path.isdir(source) else os.path.dirname(source)
    found = sorted(glob.glob(os.path.join(base, "reference_answer", "*.jsonl")))
    if not found:
        raise DataError(f"{source}:0: no reference_answer/*.jsonl next to the questions (pass --references FILE...)")
    return found


def prepare(dataset: str, source: str, split: str = "", config: Optional[str] = None, references: Optional[list[str]] = None,
            tasks_file: str = "", seed: int = DOLLY_SEED, test_size: int = DOLLY_TEST, dev_size: int = DOLLY_DEV,
            min_words: int = MIN_WORDS, max_per_task: int = SNI_PER_TASK, limit: int = UNNI_LIMIT) -> Prepared:
    """Read ``source`` (hub id, raw file or raw dir) and convert it; see the module docstring."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    from promptkd.data.paper_sets import convert_official, official_dir  # deferred: it imports this module

    minillm_dir = None if _is_hub(source) else official_dir(dataset, source)
    if minillm_dir:
        return convert_official(dataset, minillm_dir, dev_size, limit)
    if dataset == "dolly":
        rows = _rows(source, ("databricks-dolly-15k.jsonl",), split or "train", config)
        return convert_dolly(rows, seed, test_size, dev_size)
    if dataset == "selfinst":
        rows = _rows(source, ("user_oriented_instructions.jsonl", "human_eval/user_oriented_instructions.jsonl"),
                     split or "train", config)
        return convert_selfinst(rows)
    if dataset == "vicuna":
        questions = _rows(source, ("question.jsonl",), split or "train", config)
        answers = [_jsonl_rows(p) for p in _vicuna_answer_files(source, references or [])]
        return convert_vicuna(questions, answers)
    if dataset == "sni":
        tasks = sni_from_flat_rows(_hub_rows(source, split or "test", config)) if _is_hub(source) \
            else _sni_tasks(source, tasks_file)
        return convert_sni(tasks, max_per_task, min_words)
    if dataset == "unni":
        rows = _rows(source, ("core_data.jsonl", "data/core_data.jsonl"), split or "train", config)
        return convert_unni(rows, limit, min_words)
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")


def write_prepared(out_root: str, dataset: str, prepared: Prepared, meta: dict[str, Any]) -> dict[str, str]:
    """``<out_root>/<dataset>/<split>.jsonl`` + meta.json; returns {split: path}.

    The set is written whole into a temp dir beside it, then renamed into place (an older copy is moved aside
    first and removed after): a crash leaves the old set or the new one, never a half-written one.
    """
    from promptkd.data.synthetic import write_jsonl

    for split, records in prepared.splits.items():
        if not records:
            raise DataError(f"{dataset}: the {split} split is empty after conversion")
    os.makedirs(out_root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{dataset}.tmp-", dir=out_root)
    try:
        for split, records in prepared.splits.items():
            write_jsonl(os.path.join(tmp, f"{split}.jsonl"), records)
        info = {"dataset": dataset, "format": prepared.fmt, **meta, "stats": prepared.stats,
                "splits": {s: {"file": f"{s}.jsonl", "n": len(r)} for s, r in prepared.splits.items()}}
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as fh:
            json.dump(info, fh, indent=2)
        _swap_in(tmp, os.path.join(out_root, dataset))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {split: os.path.join(out_root, dataset, f"{split}.jsonl") for split in prepared.splits}


def _swap_in(new_dir: str, final: str) -> None:
    """Rename ``new_dir`` to ``final``; an existing ``final`` is renamed aside first, then removed."""
    old = None
    if os.path.exists(final):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.old-", dir=os.path.dirname(final))
        os.rmdir(old)
        os.rename(final, old)
    os.rename(new_dir, final)
    if old:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- CLI

def add_conversion_args(p: argparse.ArgumentParser) -> None:
    """The conversion parameters shared by ``<dataset>`` and ``all``."""
    p.add_argument("--seed", type=int, default=DOLLY_SEED, help="dolly: shuffle seed of the split")
    p.add_argument("--test-size", type=int, default=DOLLY_TEST, help="dolly: test examples")
    p.add_argument("--dev-size", type=int, default=DOLLY_DEV, help="dolly: dev examples")
    p.add_argument("--min-words", type=int, default=MIN_WORDS, help="sni/unni: minimum response length in words")
    p.add_argument("--max-per-task", type=int, default=SNI_PER_TASK, help="sni: instances per task (0 = all)")
    p.add_argument("--limit", type=int, default=UNNI_LIMIT, help="unni: keep the first N filtered examples")


def conversion_params(args: argparse.Namespace) -> dict[str, Any]:
    return {"seed": args.seed, "test_size": args.test_size, "dev_size": args.dev_size, "min_words": args.min_words,
            "max_per_task": args.max_per_task, "limit": args.limit}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m promptkd.data.prepare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="python -m promptkd.data.prepare all --help: every set at once")
    p.add_argument("dataset", choices=DATASETS)
    p.add_argument("--source", required=True, help="hub id (datasets.load_dataset), raw file or raw directory "
                                                   "(upstream layout, or MiniLLM's: a dir with valid.jsonl)")
    p.add_argument("--out", required=True, help="root dir: files go to <out>/<dataset>/")
    p.add_argument("--split", default="", help="hub split (default: test for sni, train otherwise)")
    p.add_argument("--config", default=None, help="hub config name (e.g. human_eval for yizhongw/self_instruct)")
    p.add_argument("--references", nargs="*", default=[], help="vicuna: reference answer JSONL files")
    p.add_argument("--tasks", default="", help="sni: task list (default <source>/splits/default/test_tasks.txt)")
    add_conversion_args(p)
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if argv[:1] == ["all"]:
        from promptkd.data.paper_sets import main as prepare_all

        return prepare_all(argv[1:])
    args = parse_args(argv)
    params = conversion_params(args)
    try:
        prepared = prepare(args.dataset, args.source, args.split, args.config, args.references, args.tasks, **params)
        paths = write_prepared(args.out, args.dataset, prepared, {"source": args.source, "params": params})
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for split, path in paths.items():
        print(f"{args.dataset} {split}: {len(prepared.splits[split])} examples -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
