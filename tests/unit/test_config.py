"""promptkd.config: YAML + dotted overrides, strict validation, DeepSpeed merge, help, launcher CLI."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from promptkd import config as C
from promptkd.config import (
    MOVED,
    Config,
    ConfigError,
    build_ds_config,
    help_lines,
    load_config,
    load_ds_json,
    max_new_tokens,
    validate,
    with_overrides,
)

REPO = Path(__file__).resolve().parents[2]
DATA = ["data.train_file=train.jsonl"]  # stage=train (the default) needs data


def _yaml(tmp_path: Path, text: str, name: str = "run.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _ds_json(tmp_path: Path, obj: dict, name: str = "ds.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(obj))
    return str(path)


def _leaves(obj, prefix: str = ""):
    """(dotted key, default) for every leaf of the dataclass tree."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, prefix + f.name + ".")
        else:
            yield prefix + f.name, value


def _error(path=None, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return str(info.value)


# ----------------------------------------------------------------------------- defaults / precedence

def test_defaults_validate_once_data_is_given():
    cfg = load_config(None, DATA)
    expected = Config()
    expected.data.train_file = "train.jsonl"
    assert cfg == expected
    validate(cfg)
    # paper defaults
    assert cfg.model.teacher.prompt_length == 7
    assert cfg.optim.student.weight_decay == 0.01
    assert (cfg.data.max_length, cfg.data.max_prompt_length) == (512, 256)


def test_bare_defaults_demand_training_data():
    # stage=train without any data is the one thing the bare defaults cannot run
    with pytest.raises(ConfigError, match=r"^data\.train_file"):
        validate(Config())
    validate(dataclasses.replace(Config(), stage="pipeline"))


def test_precedence_defaults_yaml_overrides(tmp_path):
    path = _yaml(tmp_path, """
seed: 7
data: {train_file: a.jsonl}
train: {micro_batch_size: 4, grad_accum: 3}
optim:
  student: {lr: 1.0e-4}
""")
    cfg = load_config(path, ["train.micro_batch_size=8", "optim.student.lr=2e-5"])
    assert cfg.seed == 7                               # YAML over default
    assert cfg.train.grad_accum == 3                   # YAML kept (no override)
    assert cfg.train.micro_batch_size == 8             # override over YAML
    assert cfg.optim.student.lr == pytest.approx(2e-5)  # "2e-5" coerced to float
    assert isinstance(cfg.optim.student.lr, float)
    assert cfg.train.epochs == 1                       # default kept
    assert cfg.optim.prompt.lr == pytest.approx(5e-5)  # sibling section untouched


def test_nested_partial_mapping_merges_over_field_defaults(tmp_path):
    path = _yaml(tmp_path, """
data: {train_file: a.jsonl}
model:
  teacher:
    init: {hidden: 128}
""")
    cfg = load_config(path)
    init = cfg.model.teacher.init
    assert init.hidden == 128
    # The teacher's own field defaults (layers=4, heads=8), not TinyInit's (2, 4)
    assert (init.layers, init.heads, init.arch) == (4, 8, "llama")
    assert cfg.model.teacher.prompt_length == 7
    assert cfg.model.student.init == Config().model.student.init


def test_override_into_nested_section_keeps_siblings():
    cfg = load_config(None, DATA + ["model.teacher.init.layers=6"])
    assert cfg.model.teacher.init.layers == 6
    assert cfg.model.teacher.init.hidden == 256


def test_override_value_parsing():
    cfg = load_config(None, DATA + ["eval.seeds=[1, 2]", "eval.do_sample=false", "output.dir=runs/x=y",
                                    "model.teacher.path="])
    assert cfg.eval.seeds == [1, 2]
    assert cfg.eval.do_sample is False
    assert cfg.output.dir == "runs/x=y"  # split on the first '=' only
    assert cfg.model.teacher.path == ""


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("overrides, key", [
    (["foo=1"], "foo"),
    (["model.teacher.bogus=1"], "model.teacher.bogus"),
    (["train.micro_batch_size=abc"], "train.micro_batch_size"),
    (["train.micro_batch_size=true"], "train.micro_batch_size"),
    (["train.micro_batch_size=1.5"], "train.micro_batch_size"),
    (["train.micro_batch_size={a: 1}"], "train.micro_batch_size"),
    (["method.promptkd.reg_weight=true"], "method.promptkd.reg_weight"),
    (["optim.student.lr=abc"], "optim.student.lr"),
    (["optim.student.lr=-1e-4"], "optim.student.lr"),
    (["optim.prompt.lr=0"], "optim.prompt.lr"),
    (["train.grad_clip=-1"], "train.grad_clip"),
    (["method.name=ppo"], "method.name"),
    (["train.precision=fp8"], "train.precision"),
    (["rollout.top_p=1.5"], "rollout.top_p"),
    (["data.max_prompt_length=512"], "data.max_prompt_length"),
    (["data.max_prompt_length=600"], "data.max_prompt_length"),
    (["model.student.init.hidden=30"], "model.student.init.hidden"),
    (["model.teacher.init.heads=3"], "model.teacher.init.hidden"),
    (["eval.seeds=[]"], "eval.seeds"),
    (["optim.student.betas=[0.9]"], "optim.student.betas"),
    (["train=5"], "train"),
    (["train.early_stop_patience=3"], "train.early_stop_patience"),       # no dev evaluations to count
    (["train.early_stop_patience=-1"], "train.early_stop_patience"),
    (["eval.models=[runs/a/export]"], "eval.models"),                    # not name=path
    (["eval.models=[a=runs/x,a=runs/y]"], "eval.models"),                # one name twice
    (["pipeline.student_sft_patience=-2"], "pipeline.student_sft_patience"),
])
def test_override_errors_name_the_key(overrides, key):
    msg = _error(None, DATA + overrides)
    assert msg.startswith(key + ":"), msg
    assert "\n" not in msg


def test_bad_choice_lists_allowed_values():
    msg = _error(None, DATA + ["method.name=ppo"])
    assert "promptkd" in msg and "'ppo'" in msg


def test_unknown_nested_key_lists_known_keys_from_yaml(tmp_path):
    path = _yaml(tmp_path, "data: {train_file: a.jsonl}\nmodel:\n  teacher:\n    init: {hiden: 64}\n")
    msg = _error(path)
    assert msg.startswith("model.teacher.init.hiden: unknown config key"), msg
    assert "hidden" in msg  # the known keys help spot the typo


@pytest.mark.parametrize("text, key", [
    ("foo: 1\n", "foo"),
    ("train: {micro_batch_size: '4'}\n", "train.micro_batch_size"),
    ("train: {micro_batch_size: true}\n", "train.micro_batch_size"),
    ("train: {micro_batch_size: {a: 1}}\n", "train.micro_batch_size"),
    ("seed: [1]\n", "seed"),
    ("model: {teacher: 3}\n", "model.teacher"),
    ("eval: {do_sample: 1}\n", "eval.do_sample"),
    ("optim: {student: {lr: -0.1}}\n", "optim.student.lr"),
])
def test_yaml_errors_name_the_key(tmp_path, text, key):
    path = _yaml(tmp_path, "data: {train_file: a.jsonl}\n" + text)
    msg = _error(path)
    assert msg.startswith(key + ":"), msg


def test_missing_config_file(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    msg = _error(missing)
    assert msg.startswith("--config") and missing in msg


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = _yaml(tmp_path, "seed: 1\ntrain:\n  epochs: 2\n  micro_batch_size: [1, 2\nstage: train\n")
    msg = _error(path)
    assert msg.startswith(path + ":"), msg
    line = int(msg[len(path) + 1:].split(":")[0])
    assert 4 <= line <= 5
    assert "invalid YAML" in msg


def test_yaml_top_level_must_be_mapping(tmp_path):
    path = _yaml(tmp_path, "- 1\n- 2\n")
    assert _error(path).startswith(path)


def test_override_without_equals():
    msg = _error(None, ["train.max_steps"])
    assert msg.startswith("train.max_steps:") and "key=value" in msg


def test_override_through_a_leaf_is_rejected():
    msg = _error(None, DATA + ["train.micro_batch_size.x=1"])
    assert msg.startswith("train.micro_batch_size.x:")


# ----------------------------------------------------------------------------- method sections

def test_method_sections_load_from_yaml_and_overrides(tmp_path):
    path = _yaml(tmp_path, """
data: {train_file: a.jsonl}
method:
  name: gkd
  gkd: {lmbda: 0.3, divergence: tvd}
  promptkd:
    reg_schedule: constant
""")
    cfg = load_config(path, ["method.gkd.beta=0.2", "method.distillm.window=4", "method.promptkd.reg_weight=0.5"])
    m = cfg.method
    assert (m.name, m.gkd.lmbda, m.gkd.divergence, m.gkd.beta) == ("gkd", 0.3, "tvd", 0.2)
    assert m.gkd.skew_alpha == 0.1                         # a key the partial mapping leaves out keeps its default
    assert (m.promptkd.reg_schedule, m.promptkd.reg_weight, m.promptkd.guidance) == ("constant", 0.5,
                                                                                     "teacher_student")
    assert m.distillm.window == 4 and m.imitkd == Config().method.imitkd
    assert with_overrides(cfg, {"method.minillm.clip_weight": 5}).method.minillm.clip_weight == 5.0
    assert load_config(_yaml(tmp_path, C.to_yaml(cfg), "again.yaml")) == cfg


def test_sections_of_two_configs_share_nothing():
    a = Config()
    a.method.gkd.lmbda = 0.9
    a.model.teacher.init.layers = 9
    assert Config().method.gkd.lmbda == 0.5 and Config().model.teacher.init.layers == 4


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_flat_method_key_says_where_it_moved(old, tmp_path):
    want = f"{old}: unknown config key; it is now {MOVED[old]}"
    assert _error(None, DATA + [f"{old}=1"]) == want
    leaf = old.split(".", 1)[1]
    assert _error(_yaml(tmp_path, f"data: {{train_file: a.jsonl}}\nmethod: {{{leaf}: 1}}\n")) == want
    with pytest.raises(ConfigError) as info:
        with_overrides(load_config(None, DATA), {old: 1})
    assert str(info.value) == want
    # the hint names keys that exist
    for new in MOVED[old].replace(",", " ").split():
        if new.startswith("method."):
            C.get(Config(), new)


@pytest.mark.parametrize("key", ["method.kd.lmbda", "method.gkd.clip_weight", "method.promptkd.loss",
                                 "method.minillm.divergence"])
def test_misplaced_method_key_is_unknown_and_named(key, tmp_path):
    msg = _error(None, DATA + [f"{key}=1"])
    assert msg == f"{key}: unknown config key", msg
    section, leaf = key.split(".")[1:]
    msg = _error(_yaml(tmp_path, f"data: {{train_file: a.jsonl}}\nmethod: {{{section}: {{{leaf}: 1}}}}\n"))
    assert msg.startswith(f"{key}: unknown config key (known: ") and "\n" not in msg
    with pytest.raises(ConfigError, match="^" + key.replace(".", r"\.") + ": unknown config key$"):
        with_overrides(load_config(None, DATA), {key: 1})


@pytest.mark.parametrize("override, message", [
    ("method.imitkd.divergence=auto", "method.imitkd.divergence: must be one of fkl, rkl, jsd, tvd, sfkl, srkl "
                                      "(got 'auto')"),
    ("method.minillm.clip_weight=0", "method.minillm.clip_weight: must be > 0 (got 0.0)"),
    ("method.distillm.replay_capacity=-3", "method.distillm.replay_capacity: must be > 0 (got -3)"),
    ("method.minillm.lm_coef=-0.5", "method.minillm.lm_coef: must be >= 0 (got -0.5)"),
    ("method.loss_chunk_size=-1", "method.loss_chunk_size: must be >= 0 (got -1)"),
    ("method.gkd.lmbda=1.01", "method.gkd.lmbda: must be in [0, 1] (got 1.01)"),
    ("method.minillm.teacher_mix=1", "method.minillm.teacher_mix: must be in [0, 1) (got 1.0)"),
    ("method.minillm.teacher_mix=1.5", "method.minillm.teacher_mix: must be in [0, 1] (got 1.5)"),
    ("eval.top_p=0", "eval.top_p: must be > 0 (got 0.0)"),
    ("eval.top_p=1.2", "eval.top_p: must be in (0, 1] (got 1.2)"),
    ("optim.prompt.betas=[0.9, 1.0]", "optim.prompt.betas: must be two numbers in [0, 1) (got [0.9, 1.0])"),
    ("data.synthetic.level=3", "data.synthetic.level: must be 1 or 2 (got 3)"),
])
def test_constraint_messages(override, message):
    assert _error(None, DATA + [override]) == message


def test_cross_field_checks_name_the_nested_key(tmp_path):
    assert _error(None, DATA + ["method.minillm.lm_coef=0.5"]).startswith(
        "method.minillm.lm_data: required when method.minillm.lm_coef > 0")
    missing = str(tmp_path / "corpus.txt")
    assert _error(None, DATA + ["method.minillm.lm_coef=0.5", f"method.minillm.lm_data={missing}"]) \
        == f"method.minillm.lm_data: file not found: {missing}"
    # another stage may validate the config on a machine without the corpus
    load_config(None, DATA + ["stage=eval", "method.minillm.lm_coef=0.5", f"method.minillm.lm_data={missing}"])


# ----------------------------------------------------------------------------- deepspeed merge

@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_build_ds_config_merges_run_settings(precision):
    cfg = load_config(None, DATA + ["train.micro_batch_size=3", "train.grad_accum=5", "train.grad_clip=0.5",
                                    f"train.precision={precision}", "deepspeed=ds_configs/zero2.json"])
    ds = build_ds_config(cfg, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 5
    assert ds["train_batch_size"] == 3 * 5 * 4
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] == (precision == "bf16")
    assert ds["bf16"]["check_grad_overflow"] is True  # non-finite bf16 ZeRO steps are skipped
    assert ds["fp16"] == {"enabled": precision == "fp16"}
    assert ds["zero_optimization"]["stage"] == 2  # the JSON's ZeRO settings survive
    assert C.zero_stage(ds) == 2
    assert "optimizer" not in ds and "scheduler" not in ds


def test_build_ds_config_explicit_batch_arguments_win():
    cfg = load_config(None, DATA + ["train.micro_batch_size=3", "train.grad_accum=5"])
    ds = build_ds_config(cfg, world_size=2, micro_batch_size=7, grad_accum=1)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) \
        == (7, 1, 14)


def test_build_ds_config_does_not_modify_the_json(tmp_path):
    original = {"zero_optimization": {"stage": 1}}
    path = _ds_json(tmp_path, original)
    cfg = load_config(None, DATA + [f"deepspeed={path}"])
    build_ds_config(cfg, world_size=2)
    assert json.loads(Path(path).read_text()) == original


@pytest.mark.parametrize("key", ["train_batch_size", "optimizer", "gradient_accumulation_steps", "bf16"])
def test_ds_json_with_run_config_key_is_rejected(tmp_path, key):
    path = _ds_json(tmp_path, {"zero_optimization": {"stage": 0}, key: {"type": "AdamW"} if key == "optimizer" else 4})
    cfg = load_config(None, DATA + [f"deepspeed={path}"])
    with pytest.raises(ConfigError) as info:
        build_ds_config(cfg, world_size=1)
    msg = str(info.value)
    assert path in msg and f"'{key}'" in msg


def test_ds_json_zero_stage_5_is_rejected(tmp_path):
    path = _ds_json(tmp_path, {"zero_optimization": {"stage": 5}})
    with pytest.raises(ConfigError, match="zero_optimization.stage") as info:
        load_ds_json(path)
    assert path in str(info.value)


def test_ds_json_missing_path_is_rejected(tmp_path):
    cfg = load_config(None, DATA + [f"deepspeed={tmp_path / 'missing.json'}"])
    with pytest.raises(ConfigError, match=r"^deepspeed: file not found") as info:
        build_ds_config(cfg, world_size=1)
    assert "missing.json" in str(info.value)


def test_ds_json_invalid_json_names_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "zero_optimization": {"stage": 1,}\n}\n')
    with pytest.raises(ConfigError) as info:
        load_ds_json(str(path))
    assert str(info.value).startswith(f"{path}:2")


DS_JSONS = sorted(glob.glob(str(REPO / "ds_configs" / "*.json")))


def test_ds_configs_exist():
    names = {os.path.basename(p) for p in DS_JSONS}
    assert {"zero0.json", "zero1.json", "zero2.json", "zero3.json"} <= names


@pytest.mark.parametrize("path", DS_JSONS, ids=os.path.basename)
def test_every_ds_json_loads_and_merges(path):
    ds = load_ds_json(path)
    assert C.zero_stage(ds) in (0, 1, 2, 3)
    cfg = load_config(None, DATA + [f"deepspeed={path}"])
    merged = build_ds_config(cfg, world_size=2)
    assert merged["train_batch_size"] == cfg.train.micro_batch_size * cfg.train.grad_accum * 2


def test_ds_relative_path_resolves_against_repo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repo root
    cfg = load_config(None, DATA + ["deepspeed=ds_configs/zero1.json"])
    assert C.zero_stage(build_ds_config(cfg, world_size=1)) == 1


# ----------------------------------------------------------------------------- help

def test_help_lines_cover_every_leaf_with_its_default():
    lines = help_lines()
    by_key = {line.split()[0]: line for line in lines}
    leaves = list(_leaves(Config()))
    assert len(lines) == len(leaves)
    for key, default in leaves:
        assert key in by_key, key
        shown = (default or '""') if isinstance(default, str) else json.dumps(default)
        rest = by_key[key].split(None, 1)[1]
        assert rest.startswith(shown), (key, by_key[key])
    assert "model.teacher.prompt_length" in by_key
    assert by_key["method.name"].rstrip().endswith("]") or "|" in by_key["method.name"]


# ----------------------------------------------------------------------------- shipped configs

YAMLS = sorted(glob.glob(str(REPO / "configs" / "*.yaml")))


def test_configs_exist():
    assert any(p.endswith("quickstart.yaml") for p in YAMLS)


@pytest.mark.parametrize("path", YAMLS, ids=os.path.basename)
def test_every_shipped_yaml_loads_and_builds_ds(path, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    overrides = []
    if os.path.basename(path) in ("quality.yaml", "quality_multi.yaml"):  # bench/quality.py strips its bench: first
        from bench.quality import load_bench

        path = load_bench(path, str(tmp_path), smoke=False)[1]
        overrides = ["data.train_file=train.jsonl"]  # set per run by bench/quality.py
    cfg = load_config(path, overrides)
    ds = build_ds_config(cfg, world_size=2)
    assert ds["train_batch_size"] == cfg.train.micro_batch_size * cfg.train.grad_accum * 2
    assert C.zero_stage(ds) in (0, 1, 2, 3)


def test_quickstart_is_the_pipeline():
    cfg = load_config(str(REPO / "configs" / "quickstart.yaml"))
    assert cfg.stage == "pipeline"
    assert cfg.data.synthetic.enabled and cfg.tokenizer.train
    assert cfg.model.teacher.path == "" and cfg.model.student.path == ""  # no downloads


# ----------------------------------------------------------------------------- helpers

def test_with_overrides_returns_validated_copy():
    cfg = load_config(None, DATA)
    before = C.asdict(cfg)
    new = with_overrides(cfg, {"train.max_steps": 5, "model.teacher.init.layers": 3})
    assert new.train.max_steps == 5 and new.model.teacher.init.layers == 3
    assert new.model.teacher.init.hidden == cfg.model.teacher.init.hidden
    assert C.asdict(cfg) == before  # original unchanged
    assert new is not cfg


def test_with_overrides_validates():
    cfg = load_config(None, DATA)
    with pytest.raises(ConfigError, match=r"^train\.max_steps"):
        with_overrides(cfg, {"train.max_steps": -1})
    with pytest.raises(ConfigError, match=r"^train\.micro_batch_size"):
        with_overrides(cfg, {"train.micro_batch_size": "two"})
    # unknown keys at any depth, and paths through a leaf, are ConfigErrors naming the key
    for key in ("train.bogus", "foo.bar", "train.epochs.x", "model.teacher.nope.layers"):
        with pytest.raises(ConfigError, match="^" + key.replace(".", r"\.") + ": unknown config key"):
            with_overrides(cfg, {key: 1})
    assert cfg.train.max_steps == 0


def test_max_new_tokens_default_and_explicit():
    cfg = load_config(None, DATA + ["data.max_length=100", "data.max_prompt_length=30"])
    assert cfg.rollout.max_new_tokens == 0
    assert max_new_tokens(cfg) == 70
    assert max_new_tokens(with_overrides(cfg, {"rollout.max_new_tokens": 9})) == 9


def test_to_yaml_round_trips(tmp_path):
    cfg = load_config(None, DATA + ["train.max_steps=3", "model.student.init.arch=gpt2"])
    path = _yaml(tmp_path, C.to_yaml(cfg))
    assert load_config(path) == cfg


# ----------------------------------------------------------------------------- launcher CLI

def _launch(capsys, *args: str) -> SimpleNamespace:
    """``launcher/main.py ARGS`` in process: these fail (or print help) before any process group exists.
    tests/integration/test_bad_inputs.py launches the real process once for the exit code and the format."""
    import launcher.main as launcher

    capsys.readouterr()
    code = launcher.main(list(args))
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


def test_launcher_unknown_key_exits_2(capsys):
    proc = _launch(capsys, "foo.bar=1")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "foo" in lines[0] and "unknown config key" in lines[0]


def test_launcher_bad_type_exits_2(capsys):
    proc = _launch(capsys, "train.micro_batch_size=abc")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "train.micro_batch_size" in lines[0]


def test_launcher_help_lists_keys(capsys):
    proc = _launch(capsys, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "model.teacher.prompt_length" in proc.stdout
    assert "train.micro_batch_size" in proc.stdout
    assert "method.gkd.lmbda" in proc.stdout and "method.promptkd.reg_schedule" in proc.stdout


def test_launcher_old_method_key_exits_2_with_the_new_key(capsys):
    old = next(k for k, v in MOVED.items() if v == "method.gkd.lmbda")  # the flat key of earlier versions
    proc = _launch(capsys, f"{old}=0.3")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].endswith(f"{old}: unknown config key; it is now method.gkd.lmbda"), lines[0]


def test_yaml_words_on_off_stay_strings(tmp_path):
    """YAML 1.1 reads `off` as false; the config reads YAML 1.2 booleans, so choices like `off` work unquoted."""
    path = tmp_path / "c.yaml"
    path.write_text("method:\n  promptkd:\n    reg_schedule: off\neval:\n  do_sample: false\n")
    cfg = load_config(str(path), DATA + ["method.promptkd.guidance=student_teacher"])
    assert cfg.method.promptkd.reg_schedule == "off" and cfg.eval.do_sample is False
    assert load_config(None, DATA + ["method.promptkd.reg_schedule=off"]).method.promptkd.reg_schedule == "off"
    assert _error(None, DATA + ["eval.do_sample=yes"]).startswith("eval.do_sample: expected bool")


def test_rollout_engine_vllm_needs_vllm_and_no_minillm(monkeypatch):
    import importlib.util

    base = ["data.train_file=x.jsonl", "rollout.engine=vllm"]
    with pytest.raises(ConfigError, match=r"^rollout\.engine: vllm cannot sample minillm's teacher-student mixture"):
        load_config(None, base + ["method.name=minillm"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ConfigError, match=r"^rollout\.engine=vllm: vLLM is not installed.*install\.sh --vllm"):
        load_config(None, base)
    cfg = load_config(None, base + ["method.name=sft"])  # no student rollouts: the engine does not matter
    assert cfg.rollout.engine == "vllm" and cfg.rollout.vllm.gpu_memory_utilization == 0.3
    with pytest.raises(ConfigError, match=r"^rollout\.vllm\.dtype: must be one of"):
        load_config(None, ["data.train_file=x.jsonl", "rollout.vllm.dtype=fp8"])
