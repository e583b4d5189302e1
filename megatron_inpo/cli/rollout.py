"""`megatron-inpo rollout`: sample K responses per prompt, judge them and append preference pairs (resumable).

  megatron-inpo rollout --prompts prompts.jsonl --out prefs.jsonl [--recipe RUN_RECIPE] [--config stage.yaml]
      [--key=value | key=value ...]

--recipe takes a run recipe (megatron_inpo/driver/recipes.py) and keeps its rollout, judge, pair selection
(algorithm.selection) and rollout_batch_size; rollout.model_path must then be given (a run's 'auto' is the
driver's export). Overrides name any field of RolloutStageConfig, e.g. rollout.model_path=hf_dir
rollout.sampling.n=8 judge.kind=pairwise judge.model_path=pm_dir method=tournament iteration=2. Writes OUT,
OUT.dropped.jsonl, OUT.config.yaml and OUT.stats.json.
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from megatron_inpo.cli.loader import Command, run_command
from megatron_inpo.config import ConfigError
from megatron_inpo.judge.base import JudgeConfig
from megatron_inpo.rollout.engine import RolloutConfig

PROG = "megatron-inpo rollout"


@dataclass
class RolloutStageConfig:
    """One rollout + judging stage: prompts in, preference pairs out."""

    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """The policy sampler (engine, model, servers, sampling)."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """The oracle that orders responses."""
    method: str = "auto"
    """Pair selection: auto (tournament for pairwise judges, best_worst for reward models), tournament,
    best_worst or all_pairs (SPPO win rates)."""
    iteration: int = 1
    """INPO iteration t (recorded in every pair; part of the sampling seed)."""
    model_version: str = ""
    """Name of the policy checkpoint (recorded in every pair); default: rollout.model_path."""
    batch_size: int = 64
    """Prompts per generate -> judge -> append step (the unit of resumption)."""
    limit: int = 0
    """Use only the first `limit` prompts (0: all)."""
    wait_healthy_s: float = 600.0
    """SGLang: wait this long for every server's /health before starting."""

    def validate(self) -> None:
        from megatron_inpo.judge.tournament import METHODS, check_method, resolve_method

        if self.method not in METHODS:
            raise ConfigError(f"method: must be auto, tournament, best_worst or all_pairs, got {self.method!r}")
        if self.iteration < 1:
            raise ConfigError(f"iteration: must be >= 1, got {self.iteration}")
        if self.batch_size < 1 or self.limit < 0:
            raise ConfigError("batch_size must be >= 1 and limit >= 0")
        check_method(resolve_method(self.method, self.judge.kind), self.rollout.sampling.n)


def from_run_config(run: Any) -> RolloutStageConfig:
    """The rollout stage of a RunConfig: its rollout (model_path 'auto' -> '', to be given), judge, resolved pair
    selection and rollout_batch_size."""
    from megatron_inpo.judge.tournament import resolve_method

    model_path = "" if run.rollout.model_path == "auto" else run.rollout.model_path
    method = resolve_method(run.algorithm.selection, run.judge.kind, run.algorithm.objective.name)
    return RolloutStageConfig(rollout=replace(run.rollout, model_path=model_path), judge=run.judge, method=method,
                              batch_size=run.rollout_batch_size)


def recipes() -> dict[str, Callable[[], RolloutStageConfig]]:
    """The run recipes (driver/recipes.py), each seen through from_run_config."""
    from megatron_inpo.driver.recipes import RECIPES, get_recipe

    return {name: (lambda name=name: from_run_config(get_recipe(name))) for name in RECIPES}


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", required=True, help="prompt JSONL: {\"id\", \"prompt\", ...} per line")
    p.add_argument("--out", required=True, help="preference JSONL to append to (resumed if it exists)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def command() -> Command:
    return Command(prog=PROG, config=RolloutStageConfig, doc=__doc__ or "", recipes=recipes(), arguments=_arguments)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return run_command(command(), argv, _run)


def _run(cfg: RolloutStageConfig, args: argparse.Namespace) -> int:
    from megatron_inpo.config import save_yaml
    from megatron_inpo.data.preferences import DataError
    from megatron_inpo.data.prompts import read_prompts
    from megatron_inpo.files import atomic_write_json
    from megatron_inpo.judge.base import make_judge
    from megatron_inpo.rollout.engine import make_engine
    from megatron_inpo.rollout.pipeline import generate_preferences

    try:
        prompts = read_prompts(args.prompts, limit=cfg.limit or None)
    except DataError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    save_yaml(cfg, out.with_name(out.name + ".config.yaml"))
    engine = make_engine(cfg.rollout)
    judge = make_judge(cfg.judge)
    try:
        if cfg.rollout.backend == "sglang" and cfg.wait_healthy_s > 0:
            engine.pool.wait_healthy(cfg.wait_healthy_s)  # type: ignore[attr-defined]
        stats = generate_preferences(prompts, engine, judge, out, method=cfg.method, iteration=cfg.iteration,
                                     model_version=cfg.model_version or cfg.rollout.model_path,
                                     batch_size=cfg.batch_size, progress=not args.no_progress)
    finally:
        engine.close()
        judge.close()
    stats["engine"] = engine.meter.summary()
    atomic_write_json(out.with_name(out.name + ".stats.json"), stats)
    print(f"{out}: {stats['pairs']} pairs, {stats['dropped']} dropped, {stats['skipped']} skipped (done before); "
          f"{stats['prompts_per_s']:.2f} prompts/s, {stats['tokens_per_s']:.1f} tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
