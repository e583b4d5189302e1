r"""`megatron-inpo evaluate`: win rate of one policy against another on held-out prompts, by any judge.

    megatron-inpo evaluate --policy HF_DIR --baseline HF_DIR --prompts eval.jsonl \
        [--judge-function megatron_inpo.task.oracle:prob_a_beats_b | --judge-config judge.yaml] \
        [--out DIR] [--samples 1] [--max-new-tokens 256] [--temperature 1.0] [--seed 4242] [--limit N]
        [--config rollout.yaml] [--key=value | key=value ...]

The config is the RolloutConfig of both policies' sampling (default: local engine; prompts go through the
tokenizer's chat template when it has one, as in `rollout` and `run`; --config, alias --rollout-config, is a
RolloutConfig YAML); overrides name its fields. See megatron_inpo/evaluate.py for
how responses are judged and what is written to --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from megatron_inpo.cli.loader import Command, run_command
from megatron_inpo.rollout.engine import RolloutConfig

PROG = "megatron-inpo evaluate"


def _arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--policy", required=True, help="HF directory of the evaluated policy")
    ap.add_argument("--baseline", required=True, help="HF directory of the policy it is compared with")
    ap.add_argument("--prompts", required=True, help="held-out prompt JSONL ({\"id\", \"prompt\", ...})")
    ap.add_argument("--judge-function", help="'module:function' P(a beats b | prompt) (programmatic judge)")
    ap.add_argument("--judge-config", help="YAML of a JudgeConfig (pairwise PM / BT RM, local or SGLang)")
    ap.add_argument("--out", default="eval_out", help="output directory")
    ap.add_argument("--samples", type=int, default=1, help="responses per prompt and policy")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=4242)
    ap.add_argument("--limit", type=int, default=0, help="first N prompts only")
    ap.add_argument("--one-order", action="store_true", help="judge (policy, baseline) only, not both orders")


def _base(args: argparse.Namespace) -> RolloutConfig:
    # RolloutConfig's own defaults (the chat template on when the tokenizer has one, as in every command)
    return RolloutConfig(model_path=getattr(args, "policy", "") or "")


def command() -> Command:
    return Command(prog=PROG, config=RolloutConfig, doc=__doc__ or "", base=_base, arguments=_arguments,
                   config_aliases=("--rollout-config",))


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING)
    return run_command(command(), argv, _run)


def _run(rcfg: Any, args: argparse.Namespace) -> int:
    import yaml

    from megatron_inpo.config import ConfigError, from_dict, load_yaml
    from megatron_inpo.data.prompts import read_prompts
    from megatron_inpo.evaluate import evaluate_pair
    from megatron_inpo.judge.base import JudgeConfig, make_judge
    from megatron_inpo.rollout.engine import SamplingConfig, load_tokenizer, prompt_limits

    # bad input, a full disk, Ctrl-C, ...: loader.guard's one-line message (exit 2, 130)
    for flag, path in (("--policy", args.policy), ("--baseline", args.baseline)):
        if not (Path(path) / "config.json").exists():
            raise ConfigError(f"{flag} {path}: not an HF model directory (no config.json)")
    if bool(args.judge_function) == bool(args.judge_config):
        raise ConfigError("give exactly one of --judge-function and --judge-config")
    if args.judge_function:
        jcfg = JudgeConfig(kind="programmatic", function=args.judge_function)
    else:
        try:
            with open(args.judge_config, encoding="utf-8") as f:
                loaded = load_yaml(f) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"--judge-config {args.judge_config}: not readable YAML ({type(e).__name__})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"--judge-config {args.judge_config}: not a mapping of JudgeConfig fields")
        jcfg = from_dict(JudgeConfig, loaded, where=args.judge_config)
    sampling = SamplingConfig(n=args.samples, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                              seed=args.seed)
    sampling.validate()
    read_prompts(args.prompts, limit=args.limit or None)  # malformed lines first, before any tokenizer loads
    # then against both models' vocabularies and positions, before either model loads
    limits = {}
    for path in (args.policy, args.baseline):
        cfg = dataclasses.replace(rcfg, model_path=path, sampling=sampling)
        for k, v in prompt_limits(cfg, load_tokenizer(cfg.tokenizer_path or path)).items():
            limits[k] = v if limits.get(k) is None else (limits[k] if v is None else min(limits[k], v))
    prompts = read_prompts(args.prompts, limit=args.limit or None, **limits)
    judge = make_judge(jcfg)
    res = evaluate_pair(rcfg, judge, args.policy, args.baseline, prompts, args.samples, sampling, args.out,
                        both_orders=not args.one_order)
    pl, bl = res["policy_length"], res["baseline_length"]
    print(f"win rate of {args.policy} vs {args.baseline}: {res['win_rate']:.4f} +- {res['stderr']:.4f} "
          f"(n={res['n']}, judge {res['judge']}); mean length {pl['mean_tokens']:.2f} vs {bl['mean_tokens']:.2f} "
          f"tokens; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
