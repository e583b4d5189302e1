"""`megatron-inpo run`: T iterations of INPO (or iterative DPO / SPPO / INPO w/o KL), resumable.

    megatron-inpo run --recipe tiny_cpu                         # the embedded default (2 CPU cores, minutes)
    megatron-inpo run --recipe tiny_cpu --algorithm.objective.name=dpo --run_dir=runs/dpo
    megatron-inpo run --config my_run.yaml [--key=value ...]
    megatron-inpo run --recipe llama3_8b_h100 --print-config > run.yaml

Overrides are dotted RunConfig fields, as `--a.b=value`, `--a.b value` or `a.b=value`. Rerunning the same command
after a crash (or Ctrl-C, or SIGKILL) continues where the run stopped; a different config for the same run_dir is
refused. Recipes: tiny_cpu, llama3_8b_h100, llama3_70b_h100 (driver/recipes.py).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def parse_args(argv: list[str]):
    from megatron_inpo.config import parse_override_args

    ap = argparse.ArgumentParser(prog="megatron-inpo run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", help="recipe name (tiny_cpu, llama3_8b_h100, llama3_70b_h100)")
    ap.add_argument("--config", help="YAML with RunConfig fields (applied on top of --recipe, if given)")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm bars (stage lines are still printed)")
    args, rest = ap.parse_known_args(argv)
    overrides = parse_override_args(rest)
    return args, overrides


def resolve_config(recipe: str | None, config: str | None, overrides: list[str]):
    """Recipe (default tiny_cpu when neither recipe nor config is given), then YAML, then overrides; validated."""
    from megatron_inpo.config import apply_overrides, merge_yaml, validate_all
    from megatron_inpo.driver.config import RunConfig
    from megatron_inpo.driver.recipes import get_recipe

    cfg = get_recipe(recipe) if recipe else (RunConfig() if config else get_recipe("tiny_cpu"))
    if config:
        cfg = merge_yaml(cfg, config)
    cfg = apply_overrides(cfg, overrides)
    validate_all(cfg)
    return cfg


def main(argv: list[str] | None = None) -> int:
    import yaml

    from megatron_inpo.config import ConfigError, to_dict
    from megatron_inpo.data.preferences import DataError

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, overrides = parse_args(argv)
        cfg = resolve_config(args.recipe, args.config, overrides)
    except ConfigError as e:
        print(f"megatron-inpo run: config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    _quiet_libraries()
    from megatron_inpo.driver.loop import Driver, format_table, plot
    from megatron_inpo.driver.stages import StageError

    driver = Driver(cfg, progress=not args.no_progress, out=lambda s: print(s, flush=True))
    print(f"megatron-inpo run: {cfg.iterations} iteration(s) of {cfg.algorithm.objective.name} "
          f"(engine {cfg.engine}) in {driver.run_dir}", flush=True)
    try:
        rows = driver.run()
    except (ConfigError, DataError) as e:
        print(f"megatron-inpo run: error: {e}", file=sys.stderr)
        return 2
    except StageError as e:
        print(f"megatron-inpo run: {e}\nrerun the same command to resume", file=sys.stderr)
        return 1
    table = format_table(rows)
    png = plot(rows, driver.run_dir / "win_rate.png")
    from megatron_inpo.files import atomic_write_text

    atomic_write_text(driver.run_dir / "table.txt", table + "\n")
    print("\n" + table)
    print(f"\nrun directory: {driver.run_dir}  (results.json, table.txt"
          f"{', ' + Path(png).name if png else ''}, tensorboard/)")
    return 0


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
