"""`megatron-inpo rollout`: sample K responses per prompt, judge them and append preference pairs (resumable).

  megatron-inpo rollout --prompts prompts.jsonl --out prefs.jsonl [--recipe RUN_RECIPE] [--config stage.yaml]
      [--key=value | key=value ...]

--recipe takes a run recipe (megatron_inpo/driver/recipes.py) and keeps its rollout, judge, pair selection
(algorithm.selection) and rollout_batch_size; rollout.model_path must then be given (a run's 'auto' is the
driver's export). Overrides name any field of RolloutStageConfig, e.g. rollout.model_path=hf_dir
rollout.sampling.n=8 judge.kind=pairwise judge.model_path=pm_dir method=tournament iteration=2. Writes OUT,
OUT.dropped.jsonl, OUT.config.yaml, OUT.identity.json and OUT.stats.json.

Resuming into an existing OUT needs the same config identity: every field but RESUME_MUTABLE (where the servers
are and how long to wait for them, wait_healthy_s, limit), which cannot change a pair. Another sampling, model,
judge, pair selection, batch size or iteration is refused with the differing fields listed, also when
OUT.config.yaml was deleted (OUT.identity.json keeps the fields and their digest; rollout/pipeline.claim_output).
Bad input, an unreachable server, a full disk exit 2 with a one-line message; Ctrl-C exits 130.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from megatron_inpo.cli.loader import Command, run_command
from megatron_inpo.config import ConfigError
from megatron_inpo.judge.base import JudgeConfig
from megatron_inpo.rollout.engine import RolloutConfig
from megatron_inpo.serving.pool import TRANSPORT_FIELDS

PROG = "megatron-inpo rollout"
# Fields that may differ between an output and its resumption: where the servers are, how long to wait for them,
# how many prompts to take (each prompt's pairs do not depend on it). Everything else is the output's identity.
RESUME_MUTABLE = frozenset({"wait_healthy_s", "limit"} |
                           {f"{section}.{f}" for section in ("rollout", "judge") for f in TRANSPORT_FIELDS})


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
    batch_size: int = 0
    """Prompts per generate -> judge -> append step: the unit of resumption and of progress (each batch's pairs are
    on disk when it ends). 0: one engine batch, so that output appears early without slowing generation:
    rollout.max_batch_sequences // rollout.sampling.n prompts for the local engine (at least 1),
    rollout.concurrency x rollout.request_prompts for SGLang."""
    limit: int = 0
    """Use only the first `limit` prompts (0: all)."""
    wait_healthy_s: float = 600.0
    """SGLang: wait this long for every server's /health before starting."""

    def prompts_per_batch(self) -> int:
        """batch_size, or (0) the prompts of one engine batch (see batch_size)."""
        if self.batch_size:
            return self.batch_size
        r = self.rollout
        if r.backend == "sglang":
            return max(1, r.concurrency * r.request_prompts)
        return max(1, r.max_batch_sequences // max(1, r.sampling.n))

    def validate(self) -> None:
        from megatron_inpo.judge.tournament import METHODS, check_method, resolve_method

        if self.method not in METHODS:
            raise ConfigError(f"method: must be auto, tournament, best_worst or all_pairs, got {self.method!r}")
        if self.iteration < 1:
            raise ConfigError(f"iteration: must be >= 1, got {self.iteration}")
        if self.batch_size < 0 or self.limit < 0:
            raise ConfigError("batch_size must be >= 0 (0: one engine batch) and limit >= 0")
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
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar: one line per prompt batch instead (prompts done, pairs, tokens/s, ETA)")


def command() -> Command:
    return Command(prog=PROG, config=RolloutStageConfig, doc=__doc__ or "", recipes=recipes(), arguments=_arguments)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return run_command(command(), argv, _run)


def _run(cfg: RolloutStageConfig, args: argparse.Namespace) -> int:
    # Bad prompts, another config's output, an unreachable server, a full disk, Ctrl-C: loader.guard's message.
    from megatron_inpo.data.prompts import read_prompts
    from megatron_inpo.cli.loader import hold_output
    from megatron_inpo.files import atomic_write_json
    from megatron_inpo.judge.base import make_judge
    from megatron_inpo.rollout.engine import load_tokenizer, make_engine, prompt_limits
    from megatron_inpo.rollout.pipeline import claim_output, generate_preferences

    prompts = read_prompts(args.prompts, limit=cfg.limit or None)
    out = Path(args.out)
    # before any model loads: another config's output is refused at once (recorded below, once all checks passed)
    claim_output(out, cfg, RESUME_MUTABLE, record=False)
    # so are prompts outside the tokenizer's vocabulary or the model's positions: the tokenizer loads in a second,
    # the model may take minutes
    tok_path = cfg.rollout.tokenizer_path or cfg.rollout.model_path
    tokenizer = load_tokenizer(tok_path) if tok_path else None
    read_prompts(args.prompts, limit=cfg.limit or None, **prompt_limits(cfg.rollout, tokenizer))
    engine = make_engine(cfg.rollout, tokenizer=tokenizer)
    judge = make_judge(cfg.judge)
    with contextlib.ExitStack() as held:
        try:
            if cfg.rollout.backend == "sglang" and cfg.wait_healthy_s > 0:
                _wait_healthy(engine.pool, cfg.wait_healthy_s)  # type: ignore[attr-defined]
            # one command per output (OUT.lock, taken once every check passed): a second would append the same
            # prompts' pairs again
            held.enter_context(hold_output(out, "the output"))
            claim_output(out, cfg, RESUME_MUTABLE)  # the output is this config's from now on
            stats = generate_preferences(prompts, engine, judge, out, method=cfg.method, iteration=cfg.iteration,
                                         model_version=cfg.model_version or cfg.rollout.model_path,
                                         batch_size=cfg.prompts_per_batch(), progress=not args.no_progress)
        finally:
            engine.close()
            judge.close()
        stats["engine"] = engine.meter.summary()
        atomic_write_json(out.with_name(out.name + ".stats.json"), stats)
    print(f"{out}: {stats['pairs']} pairs, {stats['dropped']} dropped, {stats['skipped']} skipped (done before); "
          f"{stats['prompts_per_s']:.2f} prompts/s, {stats['tokens_per_s']:.1f} tokens/s")
    return 0


def _wait_healthy(pool: Any, timeout_s: float) -> None:
    logging.getLogger(__name__).info("waiting up to %.0f s for SGLang server(s) %s", timeout_s, pool.urls)
    try:
        pool.wait_healthy(timeout_s)
    except TimeoutError as e:
        raise ConfigError(f"rollout.server_urls: {e} (unreachable? start them, fix the URLs or raise "
                          "wait_healthy_s)") from None


if __name__ == "__main__":
    sys.exit(main())
