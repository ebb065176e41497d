"""The entry points that only read, convert and write files start without torch.

``promptkd.config`` (every launch parses its config first), ``python -m promptkd.data.prepare``, and
bench/quality.py's driver with its SLURM stages (data, a stamp per finished job, the report) import neither
torch nor transformers: a SLURM chain's stamp job is one file write, and ~3 s of imports on each would be
most of its time. The tokenizer, tokenize/collate and a result's machine info load torch when first used.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HEAVY = {"torch", "numpy", "transformers", "tokenizers", "deepspeed", "datasets"}
# imported one after another in one interpreter: each must add no heavy module
LIGHT = ("promptkd.config", "promptkd.data", "promptkd.data.prepare", "bench.output", "bench.quality",
         "bench.quality_slurm")

PROBE = r"""
import importlib, json, sys
heavy = set(sys.argv[1].split(","))
added = {}
for name in sys.argv[2:]:
    importlib.import_module(name)
    added[name] = sorted(heavy & {m.split(".")[0] for m in sys.modules})
print(json.dumps(added))
"""


def test_light_entry_points_import_no_torch():
    out = subprocess.run([sys.executable, "-c", PROBE, ",".join(sorted(HEAVY)), *LIGHT], cwd=REPO,
                         capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 0, out.stderr
    heavy_after = json.loads(out.stdout.strip().splitlines()[-1])
    assert list(heavy_after) == list(LIGHT)
    assert all(found == [] for found in heavy_after.values()), heavy_after


def test_the_data_package_still_hands_out_its_torch_names():
    """The lazily loaded names are the submodules' own objects, and an unknown name is an AttributeError."""
    import pytest

    import promptkd.data as data
    from promptkd.data import dataset, tokenizer

    assert data.collate_full is dataset.collate_full and data.TokenizedExample is dataset.TokenizedExample
    assert data.load_tokenizer is tokenizer.load_tokenizer and data.train_tokenizer is tokenizer.train_tokenizer
    assert set(data._HEAVY) <= set(data.__all__)
    with pytest.raises(AttributeError, match="no_such_name"):
        data.no_such_name  # noqa: B018
