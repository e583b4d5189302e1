"""`megatron-inpo rollout`: sample K responses per prompt, judge them and append preference pairs (resumable).

  megatron-inpo rollout --prompts prompts.jsonl --out prefs.jsonl [--config stage.yaml] [KEY=VALUE ...]

KEY=VALUE overrides any field of RolloutStageConfig, e.g. rollout.model_path=hf_dir rollout.sampling.n=8
judge.kind=pairwise judge.model_path=pm_dir method=tournament iteration=2. Writes OUT, OUT.dropped.jsonl,
OUT.config.yaml and OUT.stats.json.
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from megatron_inpo.config import ConfigError, apply_overrides, merge_yaml, save_yaml, to_dict, validate_all
from megatron_inpo.files import atomic_write_json
from megatron_inpo.judge.base import JudgeConfig
from megatron_inpo.rollout.engine import RolloutConfig, SamplingConfig


@dataclass
class RolloutStageConfig:
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
        if self.method not in ("auto", "tournament", "best_worst", "all_pairs"):
            raise ConfigError(f"method: must be auto, tournament, best_worst or all_pairs, got {self.method!r}")
        if self.iteration < 1:
            raise ConfigError(f"iteration: must be >= 1, got {self.iteration}")
        if self.batch_size < 1 or self.limit < 0:
            raise ConfigError("batch_size must be >= 1 and limit >= 0")
        if self.method == "tournament" and (self.rollout.sampling.n < 2 or
                                            self.rollout.sampling.n & (self.rollout.sampling.n - 1)):
            raise ConfigError(f"rollout.sampling.n: the tournament needs a power of two, got "
                              f"{self.rollout.sampling.n}")


def tiny_cpu() -> RolloutStageConfig:
    """Smoke runs on a CPU: the in-process engine, K=4 short responses, a programmatic judge (set judge.function)."""
    return RolloutStageConfig(
        rollout=RolloutConfig(backend="local", max_batch_sequences=64,
                              sampling=SamplingConfig(n=4, temperature=1.0, max_new_tokens=32)),
        judge=JudgeConfig(kind="programmatic"), method="tournament", batch_size=16, wait_healthy_s=0.0)


def inpo_paper() -> RolloutStageConfig:
    """The paper's setting (section 4.1): K=8 samples at temperature 1.0 from SGLang servers, RLHFlow's pairwise
    preference model on its own SGLang servers, the 11-comparison tournament. Set rollout.model_path,
    rollout.server_urls, judge.model_path and judge.server_urls (see launch/sglang_servers.py)."""
    return RolloutStageConfig(
        rollout=RolloutConfig(backend="sglang", concurrency=64, request_prompts=4, dtype="bfloat16",
                              sampling=SamplingConfig(n=8, temperature=1.0, top_p=1.0, max_new_tokens=2048)),
        judge=JudgeConfig(kind="pairwise", backend="sglang", batch_size=32, concurrency=64, dtype="bfloat16"),
        method="tournament", batch_size=512)


def inpo_paper_rm() -> RolloutStageConfig:
    """As inpo_paper, judged by a Bradley-Terry reward model (an --is-embedding server): best/worst-of-8."""
    cfg = inpo_paper()
    cfg.judge.kind = "reward"
    cfg.method = "best_worst"
    return cfg


RECIPES = {"default": RolloutStageConfig, "tiny_cpu": tiny_cpu, "inpo_paper": inpo_paper,
           "inpo_paper_rm": inpo_paper_rm}


def load_config(path: str | None, overrides: list[str], recipe: str = "default") -> RolloutStageConfig:
    if recipe not in RECIPES:
        raise ConfigError(f"--recipe: unknown recipe {recipe!r}; known: {sorted(RECIPES)}")
    cfg = RECIPES[recipe]()
    if path:
        cfg = merge_yaml(cfg, path)
    cfg = apply_overrides(cfg, overrides)
    validate_all(cfg)
    return cfg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="megatron-inpo rollout", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", required=True, help="prompt JSONL: {\"id\", \"prompt\", ...} per line")
    ap.add_argument("--out", required=True, help="preference JSONL to append to (resumed if it exists)")
    ap.add_argument("--recipe", default="default", help=f"base config: {', '.join(RECIPES)}")
    ap.add_argument("--config", help="YAML with RolloutStageConfig fields (applied on top of the recipe)")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load_config(args.config, args.overrides, args.recipe)
    except (ConfigError, OSError) as e:
        print(f"megatron-inpo rollout: config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0

    from megatron_inpo.data.preferences import DataError
    from megatron_inpo.data.prompts import read_prompts
    from megatron_inpo.judge.base import make_judge
    from megatron_inpo.rollout.engine import make_engine
    from megatron_inpo.rollout.pipeline import generate_preferences

    try:
        prompts = read_prompts(args.prompts, limit=cfg.limit or None)
    except DataError as e:
        print(f"megatron-inpo rollout: {e}", file=sys.stderr)
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
