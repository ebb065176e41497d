"""The paper's five test sets: MiniLLM's released layout, where each set's raw files live, and ``prepare all``.

    python -m promptkd.data.prepare all --out data/eval [--raw ROOT] [--dolly PATH ...] [--no-hub]

PromptKD (gmkim-ai/PromptKD) evaluates on the test files MiniLLM (microsoft/LMOps ``minillm``) released, not on
the upstream datasets: its ``download_requirements.sh`` unpacks MiniLLM's ``data.tar`` into ``data/``, and its
``scripts/gpt2/eval/eval_main_*.sh`` read (``--data-dir``, split ``valid``):

    data/dolly/valid.jsonl        Dolly test (500); data/dolly/raw.jsonl is train + dev (first 1,000 lines = dev)
    data/self-inst/valid.jsonl    Self-Instruct user-oriented
    data/vicuna/valid.jsonl       Vicuna (80)
    data/sinst/11_/valid.jsonl    S-NI, responses of >= 11 tokens
    data/uinst/11_/valid.jsonl    UnNI, responses of >= 11 tokens; the eval reads the first 10,000 (--dev-num 10000)

MiniLLM's README also publishes each as a hub dataset repo with the same files (``MiniLLM/dolly``,
``MiniLLM/self-inst``, ``MiniLLM/Vicuna``, ``MiniLLM/sinst``, ``MiniLLM/uinst``). A ``valid.jsonl`` record is
``{instruction, prompt, input, output}`` (``output`` a string or a list of references). ``prepare`` reads this
layout as well as the upstream raw layouts of ``promptkd.data.prepare`` (a dir holding ``valid.jsonl``, or
``11_/valid.jsonl``, is the MiniLLM layout).

``all`` looks for each set, in order: ``--<set> PATH`` (a raw file/dir or hub id, as ``--source``), then under
``--raw ROOT`` (``ROOT/<MiniLLM dir>``, then ``ROOT/<set name>`` in either layout), then MiniLLM's hub repo
(``huggingface_hub.snapshot_download``; skipped by ``--no-hub``; ``HF_HUB_OFFLINE=1`` reads only the local cache).
Every set found is converted in memory first; any bad raw file, or a ``--<set>`` path that does not exist,
stops the whole run with one ``file:line`` error (exit 2) before anything is written. Each set is then written to a temp dir and renamed into place. The summary
names every set it could not get and where to put its files. Exit 0 when at least one set is in ``--out``
(prepared now or by an earlier run), else 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

from promptkd.data.formats import DataError
from promptkd.data.template import build_prompt

log = logging.getLogger(__name__)

OFFICIAL_FILE = "valid.jsonl"
DOLLY_TRAIN_FILE = "raw.jsonl"
Row = dict[str, Any]


@dataclass(frozen=True)
class PaperSet:
    name: str            # our set name: <out>/<name>/, the eval.sets key
    official_dir: str    # its dir in MiniLLM's data/ layout
    hub_repo: str        # MiniLLM's hub dataset repo holding that dir's files at its root
    upstream: str        # the upstream raw layout promptkd.data.prepare also reads


PAPER_SETS = (
    PaperSet("dolly", "dolly", "MiniLLM/dolly",
             "databricks-dolly-15k.jsonl (instruction, context, response, category)"),
    PaperSet("selfinst", "self-inst", "MiniLLM/self-inst",
             "Self-Instruct human_eval/user_oriented_instructions.jsonl"),
    PaperSet("vicuna", "vicuna", "MiniLLM/Vicuna",
             "FastChat llm_judge/data/vicuna_bench/ (question.jsonl + reference_answer/*.jsonl)"),
    PaperSet("sni", "sinst/11_", "MiniLLM/sinst",
             "the Super-NaturalInstructions repo (tasks/*.json + splits/default/test_tasks.txt)"),
    PaperSet("unni", "uinst/11_", "MiniLLM/uinst", "Unnatural Instructions core_data.jsonl"),
)
BY_NAME = {s.name: s for s in PAPER_SETS}


# ----------------------------------------------------------------------------- MiniLLM's layout

def official_dir(dataset: str, source: str) -> Optional[str]:
    """The dir holding ``valid.jsonl`` when ``source`` is in MiniLLM's layout, else None."""
    if os.path.isfile(source):
        return os.path.dirname(source) or "." if os.path.basename(source) == OFFICIAL_FILE else None
    if not os.path.isdir(source):
        return None
    leaf = os.path.basename(BY_NAME[dataset].official_dir)  # "11_" for sni/unni: the repo root holds 11_/
    for candidate in (source, os.path.join(source, leaf)):
        if os.path.isfile(os.path.join(candidate, OFFICIAL_FILE)):
            return candidate
    return None


def _rows(path: str) -> Iterator[tuple[str, Row]]:
    from promptkd.data.prepare import _jsonl_rows  # deferred: prepare imports this module lazily too

    return _jsonl_rows(path)


def _refs(row: Row, where: str) -> list[str]:
    out = row.get("output")
    out = [out] if isinstance(out, str) else out
    if not isinstance(out, list) or not out or not all(isinstance(o, str) for o in out):
        raise DataError(f"{where}: field 'output' must be a string or a non-empty list of strings")
    return out


def _text(row: Row, key: str, where: str) -> str:
    value = row.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def _official_record(name: str, index: int, row: Row, where: str) -> Row:
    """A prompt_output record. The prompt is rebuilt from instruction + input with this project's template, the
    one training uses; a record without ``instruction`` keeps its ``prompt`` (MiniLLM's ``<n>`` = newline)."""
    instruction, inp = _text(row, "instruction", where), _text(row, "input", where)
    if instruction:
        prompt = build_prompt(instruction, inp)
    else:
        prompt = _text(row, "prompt", where).replace("<n>", "\n")
        if not prompt:
            raise DataError(f"{where}: neither 'instruction' nor 'prompt' is given")
    ex_id = row.get("id")
    return {"id": str(ex_id) if isinstance(ex_id, (str, int)) and not isinstance(ex_id, bool) else f"{name}-{index}",
            "prompt": prompt, "output": _refs(row, where), "category": _text(row, "category", where),
            "instruction": instruction, "input": inp}


def _dolly_record(ex_id: str, row: Row, where: str) -> Row:
    refs = _refs(row, where)
    return {"id": ex_id, "instruction": _text(row, "instruction", where), "context": _text(row, "input", where),
            "response": refs[0], "category": _text(row, "category", where)}


def convert_official(dataset: str, directory: str, dev_size: int, limit: int) -> Any:
    """MiniLLM's files -> Prepared. Dolly: valid.jsonl is test; raw.jsonl, when present, gives dev (its first
    ``dev_size`` lines, MiniLLM's --dev-num rule) and train (the rest). UnNI: the first ``limit`` records (the
    official eval's --dev-num 10000). No length filter: the 11_ dirs are filtered already."""
    from promptkd.data.prepare import Prepared

    test_path = os.path.join(directory, OFFICIAL_FILE)
    if dataset == "dolly":
        splits = {"test": [_dolly_record(f"dolly-test-{i}", r, w) for i, (w, r) in enumerate(_rows(test_path))]}
        raw = os.path.join(directory, DOLLY_TRAIN_FILE)
        if os.path.isfile(raw):
            rows = [_dolly_record(f"dolly-raw-{i}", r, w) for i, (w, r) in enumerate(_rows(raw))]
            if dev_size >= len(rows):
                raise DataError(f"{raw}:0: {len(rows)} examples cannot hold dev={dev_size} + train")
            splits |= {"dev": rows[:dev_size], "train": rows[dev_size:]}
        else:
            log.warning("dolly: %s not found: test only (no train/dev split)", raw)
        return Prepared(splits, "dolly", {"layout": "minillm", "dev_size": dev_size})
    records = []
    for i, (where, row) in enumerate(_rows(test_path)):
        if dataset == "unni" and limit and len(records) == limit:
            break
        records.append(_official_record(dataset, i, row, where))
    stats = {"layout": "minillm"} | ({"limit": limit} if dataset == "unni" else {})
    return Prepared({"test": records}, "prompt_output", stats)


# ----------------------------------------------------------------------------- finding each set

@dataclass
class Found:
    name: str
    source: str = ""       # what prepare() reads; empty: not found
    origin: str = ""       # given | raw | hub | kept (already in --out)
    why: str = ""          # why not found, when not


def hub_snapshot(repo: str, patterns: list[str]) -> str:
    """Download ``patterns`` of MiniLLM's dataset repo ``repo``; returns its local dir. Offline (HF_HUB_OFFLINE)
    it reads the local cache only, so an unreachable hub fails at once rather than after retries."""
    from huggingface_hub import snapshot_download  # deferred: only the hub path needs it

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return snapshot_download(repo, repo_type="dataset", allow_patterns=patterns, local_files_only=offline,
                             etag_timeout=10)


def _hub_patterns(spec: PaperSet) -> list[str]:
    leaf = spec.official_dir.split("/", 1)[1] + "/" if "/" in spec.official_dir else ""
    return [leaf + OFFICIAL_FILE] + ([DOLLY_TRAIN_FILE] if spec.name == "dolly" else [])


def _under_raw(spec: PaperSet, raw: str) -> Optional[str]:
    for rel in dict.fromkeys((spec.official_dir, spec.name)):
        path = os.path.join(raw, rel)
        if os.path.isdir(path) and os.listdir(path):
            return path
    return None


def find(spec: PaperSet, given: str, raw: str, hub: bool, out: str,
         snapshot: Callable[[str, list[str]], str]) -> Found:
    """Where ``spec``'s raw files are: given > under --raw > hub > already in --out."""
    if given:
        return Found(spec.name, given, "given")
    why = []
    if raw:
        path = _under_raw(spec, raw)
        if path:
            return Found(spec.name, path, "raw")
        why.append(f"not under --raw {raw}")
    if hub:
        try:
            path = snapshot(spec.hub_repo, _hub_patterns(spec))
            if official_dir(spec.name, path):
                return Found(spec.name, path, "hub")
            why.append(f"hub {spec.hub_repo} has no {_hub_patterns(spec)[0]}")
        except Exception as err:  # noqa: BLE001 - any hub failure is "not reachable", said in one line
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            why.append(f"hub {spec.hub_repo} not reachable ({type(err).__name__}: {first})")
    else:
        why.append("hub skipped (--no-hub)")
    if os.path.isfile(os.path.join(out, spec.name, "test.jsonl")):
        return Found(spec.name, os.path.join(out, spec.name), "kept", "; ".join(why))
    return Found(spec.name, why="; ".join(why))


def where_to_put(spec: PaperSet, raw: str) -> str:
    root = raw or "<ROOT>"
    files = f"{root}/{spec.official_dir}/{OFFICIAL_FILE}" + \
        (f" (+ {root}/dolly/{DOLLY_TRAIN_FILE} for train/dev)" if spec.name == "dolly" else "")
    return (f"put MiniLLM's files at {files} (huggingface-cli download {spec.hub_repo} --repo-type dataset "
            f"--local-dir {root}/{spec.official_dir.split('/')[0]}), or {spec.upstream} in {root}/{spec.name}/, "
            f"then rerun with --raw {root}; or pass --{spec.name} PATH")


# ----------------------------------------------------------------------------- the command

def parse_args(argv: list[str]) -> argparse.Namespace:
    from promptkd.data.prepare import add_conversion_args

    p = argparse.ArgumentParser(prog="python -m promptkd.data.prepare all", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", required=True, help="root dir: each set goes to <out>/<set>/ (eval.sets=[<out>])")
    p.add_argument("--raw", default="", help="root of raw files: MiniLLM's data/ layout, or <set name>/ dirs")
    for spec in PAPER_SETS:
        p.add_argument(f"--{spec.name}", default="", metavar="PATH",
                       help=f"{spec.name}: raw file/dir (MiniLLM's {spec.official_dir}/ or {spec.upstream}) or hub id")
    p.add_argument("--no-hub", action="store_true", help="do not try MiniLLM's hub repos for the sets not found")
    add_conversion_args(p)
    return p.parse_args(argv)


def _convert_all(found: list[Found], args: argparse.Namespace) -> dict[str, Any]:
    """Every found set converted in memory; the first bad raw file raises (nothing written yet)."""
    from promptkd.data.prepare import conversion_params, prepare

    from promptkd.data.formats import _looks_like_hub_id

    out = {}
    for f in found:
        if f.origin == "given" and not os.path.exists(f.source) and not _looks_like_hub_id(f.source):
            raise DataError(f"{f.source}:0: --{f.name}: no such file or directory")
        out[f.name] = prepare(f.name, f.source, **conversion_params(args))
        empty = [s for s, records in out[f.name].splits.items() if not records]
        if empty:
            raise DataError(f"{f.source}:0: {f.name}: the {empty[0]} split is empty after conversion")
    return out


def _summary(found: list[Found], prepared: dict[str, Any], args: argparse.Namespace) -> list[str]:
    lines = []
    for f in found:
        if f.name in prepared:
            counts = ", ".join(f"{s} {len(r)}" for s, r in prepared[f.name].splits.items())
            lines.append(f"prepared  {f.name:<8} {counts}  <- {f.source} ({f.origin})")
        elif f.origin == "kept":
            lines.append(f"kept      {f.name:<8} {f.source} from an earlier run (no raw source now: {f.why})")
    missing = [f for f in found if not f.source]
    for f in missing:
        lines.append(f"MISSING   {f.name:<8} {f.why}")
        lines.append(f"          {where_to_put(BY_NAME[f.name], args.raw)}")
    ready = [f.name for f in found if f.source]
    lines.append(f"eval.sets=[{args.out}] evaluates: {', '.join(ready) or 'nothing'}"
                 + (f"; missing: {', '.join(f.name for f in missing)}" if missing else ""))
    return lines


def main(argv: list[str], snapshot: Optional[Callable[[str, list[str]], str]] = None) -> int:
    from promptkd.data.prepare import conversion_params, write_prepared

    args = parse_args(argv)
    found = [find(s, getattr(args, s.name), args.raw, not args.no_hub, args.out, snapshot or hub_snapshot)
             for s in PAPER_SETS]
    todo = [f for f in found if f.origin in ("given", "raw", "hub")]
    try:
        prepared = _convert_all(todo, args)
        for f in todo:
            write_prepared(args.out, f.name, prepared[f.name], {"source": f.source, "origin": f.origin,
                                                                "params": conversion_params(args)})
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(_summary(found, prepared, args)))
    if not any(f.source for f in found):
        print("error: prepare all: none of the five sets could be found; put their raw files where the lines "
              "above say and rerun", file=sys.stderr)
        return 2
    return 0

