"""promptkd entry point: parse config -> init distributed -> run stage -> exit code.

Works as ``deepspeed launcher/main.py``, ``torchrun launcher/main.py``,
``srun python launcher/main.py`` and plain ``python launcher/main.py``.
With no ``--config`` it runs the embedded CPU quickstart (configs/quickstart.yaml).
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from promptkd.config import ConfigError, help_lines, load_config, load_ds_json  # noqa: E402

DEFAULT_CONFIG = os.path.join(REPO, "configs", "quickstart.yaml")
EXIT_BAD_INPUT = 2


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="launcher/main.py", add_help=False,
        description="PromptKD distillation on DeepSpeed. Overrides are dotted key=value pairs.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="run config YAML (default: configs/quickstart.yaml)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("-h", "--help", action="store_true", help="show keys, defaults and meanings")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=10")
    return parser.parse_args(argv)


def print_help() -> None:
    print(__doc__.strip())
    print("\nusage: deepspeed launcher/main.py [--config FILE] [--debug] [key=value ...]\n")
    print("config keys (key, default, meaning):")
    print("\n".join(help_lines()))


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.help:
        print_help()
        return 0
    try:
        cfg = load_config(args.config or DEFAULT_CONFIG, args.overrides)
        load_ds_json(cfg.deepspeed)  # fail on a bad DeepSpeed JSON before any process group exists
    except ConfigError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from promptkd.stages import STAGES

    stage = STAGES[cfg.stage]
    if not stage.distributed:  # stage=plan: before launch, on any machine: no process group, no weights
        return run(cfg, args.config or DEFAULT_CONFIG, args.debug)
    from promptkd import distributed as dist

    dist.init(cfg.dist_timeout_s)
    code = run(cfg, args.config or DEFAULT_CONFIG, args.debug)
    dist.shutdown(code)
    return code  # not reached: shutdown exits


def bad_input(exc: Exception, debug: bool) -> int:
    """One line naming what is wrong (the traceback with --debug); exit code 2."""
    if debug:
        traceback.print_exc()
    print(f"error: {exc}".splitlines()[0], file=sys.stderr)
    return EXIT_BAD_INPUT


def run(cfg, config_path: str, debug: bool) -> int:
    """Run ``cfg.stage`` through ``STAGES``; its outcome as the exit code."""
    from promptkd.data import DataError
    from promptkd.metrics import setup_logging
    from promptkd.training.signals import EXIT_ABORTED, EXIT_PREEMPTED, Preempted, TrainingAborted
    from promptkd.stages import STAGES

    stage = STAGES[cfg.stage]
    if stage.distributed:  # plan prints its table and nothing else
        setup_logging()
    try:
        stage(cfg, config_path)
        return 0
    except Preempted as exc:
        print(f"preempted: {exc}; checkpoint saved, exit code {EXIT_PREEMPTED}", file=sys.stderr)
        return EXIT_PREEMPTED
    except TrainingAborted as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ABORTED
    except (ConfigError, DataError) as exc:  # a bug's ValueError or a full disk's OSError is not bad input
        return bad_input(exc, debug)
    except Exception:
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
