"""`megatron-inpo run`: T iterations of INPO (or iterative DPO / SPPO / INPO w/o KL), resumable.

    megatron-inpo run --recipe tiny_cpu                         # the embedded default (2 CPU cores, minutes)
    megatron-inpo run --recipe tiny_cpu --algorithm.objective.name=dpo --run_dir=runs/dpo
    megatron-inpo run --config my_run.yaml [--key=value ...]
    megatron-inpo run --recipe llama3_8b_h100 --print-config > run.yaml

Overrides are dotted RunConfig fields, as `--a.b=value`, `--a.b value` or `a.b=value`. Rerunning the same command
after a crash (or Ctrl-C, or SIGKILL) continues where the run stopped; a different config for the same run_dir is
refused, also when config.yaml was deleted (see driver/manifest.py; a moved run directory resumes). Bad input or
a broken environment exits 2 with a one-line message, Ctrl-C exits 130 (cli/loader.guard). Recipes:
megatron_inpo/driver/recipes.py (tiny_cpu when neither --recipe nor --config is given).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from megatron_inpo.cli.loader import Command, run_command
from megatron_inpo.cli.loader import resolve_config as _resolve

PROG = "megatron-inpo run"


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars (stage lines are still printed)")


def command() -> Command:
    from megatron_inpo.driver.config import RunConfig
    from megatron_inpo.driver.recipes import RECIPES

    return Command(prog=PROG, config=RunConfig, doc=__doc__ or "", recipes=RECIPES, default_recipe="tiny_cpu",
                   arguments=_arguments)


def resolve_config(recipe: str | None, config: str | None, overrides: list[str]) -> Any:
    """RunConfig from a recipe (tiny_cpu when neither recipe nor config is given), YAML and overrides; validated."""
    return _resolve(command(), recipe, config, overrides)


def main(argv: list[str] | None = None) -> int:
    return run_command(command(), argv, _run)


def _run(cfg: Any, args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    _quiet_libraries()
    from megatron_inpo.driver.loop import Driver
    from megatron_inpo.driver.report import format_table, plot
    from megatron_inpo.driver.launcher import StageError

    driver = Driver(cfg, progress=not args.no_progress, out=lambda s: print(s, flush=True))
    print(f"{PROG}: {cfg.iterations} iteration(s) of {cfg.algorithm.objective.name} "
          f"(trainer {cfg.trainer}) in {driver.run_dir}", flush=True)
    try:  # bad input, a full disk, Ctrl-C, ...: loader.guard's one-line message (exit 2, 130)
        rows = driver.run()
    except StageError as e:
        print(f"{PROG}: {e}\nrerun the same command to resume", file=sys.stderr)
        return 1
    table = format_table(rows)
    png = plot(rows, driver.run_dir / "win_rate.png")
    from megatron_inpo.files import atomic_write_text

    atomic_write_text(driver.run_dir / "table.txt", table + "\n")
    print("\n" + table)
    print("\n" + stage_time_line(driver.manifest.stage_seconds()))
    print(f"run directory: {driver.run_dir}  (results.json, table.txt"
          f"{', ' + Path(png).name if png else ''}, tensorboard/)")
    return 0


def stage_time_line(seconds: dict[str, float]) -> str:
    """The run's time by stage kind (iterations summed; a resumed run counts the attempts recorded), e.g.
    'stage time: rollout 571 s (2x), train 180 s (2x), ...; total 1024 s'. Not part of table.txt: times differ
    between runs, the table does not."""
    kinds: dict[str, list[float]] = {}
    for key, dt in seconds.items():
        kinds.setdefault(key.split("/")[-1], []).append(dt)
    parts = [f"{k} {sum(v):.0f} s" + (f" ({len(v)}x)" if len(v) > 1 else "")
             for k, v in sorted(kinds.items(), key=lambda kv: -sum(kv[1]))]
    return f"stage time: {', '.join(parts)}; total {sum(seconds.values()):.0f} s"


def _quiet_libraries() -> None:
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except Exception:  # noqa: BLE001 - cosmetics only
        pass


if __name__ == "__main__":
    sys.exit(main())
