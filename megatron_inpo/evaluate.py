"""`megatron-inpo evaluate`: win rate of one policy against another on held-out prompts, by any judge.

    megatron-inpo evaluate --policy HF_DIR --baseline HF_DIR --prompts eval.jsonl \
        [--judge-function megatron_inpo.task.oracle:prob_a_beats_b | --judge-config judge.yaml] \
        [--out DIR] [--samples 1] [--max-new-tokens 256] [--temperature 1.0] [--seed 4242] [--limit N]
        [--config rollout.yaml] [--key=value ...]   (the command: megatron_inpo/cli/evaluate.py)

Each prompt gets `samples` responses from each policy (seeded: the same command gives the same numbers); response
i of the policy is judged against response i of the baseline in BOTH orders, P = (P(a>b) + 1 - P(b>a)) / 2, which
cancels a judge's position bias. The win rate is the mean of P with its binomial standard error
sqrt(w (1 - w) / n). Writes into --out: generations of both policies (JSONL), an AlpacaEval-format JSON of the
policy's generations ([{"instruction", "output", "generator", "dataset"}]), and result.json (win rate, SE, length
statistics of both policies).
"""
from __future__ import annotations

import dataclasses
import json
import math
import statistics
from pathlib import Path
from typing import Any, Sequence

from megatron_inpo.files import atomic_write_json, atomic_write_text


def generate(rollout_cfg: Any, model_path: str, prompts: Sequence[Any], samples: int, sampling: Any,
             cache: str | Path | None = None, progress: bool = False) -> list[dict]:
    """`samples` responses per prompt from the HF policy at model_path: [{"id", "prompt", "outputs", "output_ids"}].

    With `cache`, the generations are written there (atomically) and re-read on the next call (resumption). With
    `progress`, a bar counts the prompts (generated a batch of the engine's size at a time: each sample's seed
    depends on its prompt only, so the batches do not change the text)."""
    if cache is not None and Path(cache).exists():
        return [json.loads(line) for line in open(cache, encoding="utf-8") if line.strip()]
    from megatron_inpo.rollout.engine import make_engine

    sampling = dataclasses.replace(sampling, n=samples)
    cfg = dataclasses.replace(rollout_cfg, model_path=str(model_path), sampling=sampling)
    engine = make_engine(cfg)
    try:
        if cfg.backend == "sglang":
            engine.update_weights(str(model_path), version=Path(model_path).name)
        # iteration 0: evaluation seeds never coincide with the training rollouts' seeds
        step = max(1, rollout_cfg.max_batch_sequences // samples) if progress else max(1, len(prompts))
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(prompts), desc=f"eval {Path(model_path).name}", unit="prompt", leave=False)
        rollouts = []
        for i in range(0, len(prompts), step):
            rollouts += engine.rollout(list(prompts[i:i + step]), iteration=0, sampling=sampling)
            if bar is not None:
                bar.update(len(prompts[i:i + step]))
        if bar is not None:
            bar.close()
    finally:
        engine.close()
    out = [{"id": r.prompt.id, "prompt": r.prompt.prompt, "outputs": [c.text for c in r.completions],
            "output_ids": [c.token_ids for c in r.completions]} for r in rollouts]
    if cache is not None:
        atomic_write_text(cache, "".join(json.dumps(o) + "\n" for o in out))
    return out


def win_rate(judge: Any, gens_a: list[dict], gens_b: list[dict], both_orders: bool = True) -> dict:
    """Mean P(a beats b) over aligned generations, with the binomial standard error."""
    from megatron_inpo.judge.base import Comparison

    if [g["id"] for g in gens_a] != [g["id"] for g in gens_b]:
        raise ValueError("win_rate: the two generation sets cover different prompts")
    items = []
    for a, b in zip(gens_a, gens_b):
        for ta, tb, ia, ib in zip(a["outputs"], b["outputs"], a["output_ids"], b["output_ids"]):
            items.append(Comparison(prompt=a["prompt"], a=ta, b=tb, a_ids=ia, b_ids=ib))
    if not items:
        raise ValueError("win_rate: no comparisons")
    p_ab = judge.compare(items)
    if both_orders:
        swapped = [Comparison(prompt=c.prompt, a=c.b, b=c.a, a_ids=c.b_ids, b_ids=c.a_ids) for c in items]
        p_ba = judge.compare(swapped)
        probs = [(x + 1.0 - y) / 2.0 for x, y in zip(p_ab, p_ba)]
    else:
        probs = list(p_ab)
    n = len(probs)
    w = sum(probs) / n
    return {"win_rate": w, "stderr": math.sqrt(max(w * (1 - w), 0.0) / n), "n": n,
            "wins": sum(p > 0.5 for p in probs), "ties": sum(p == 0.5 for p in probs),
            "losses": sum(p < 0.5 for p in probs), "both_orders": both_orders}


def length_stats(gens: list[dict]) -> dict:
    """Response length in tokens (mean, median, p90, max) and in words (mean)."""
    toks = sorted(len(ids) for g in gens for ids in g["output_ids"])
    words = [len(t.split()) for g in gens for t in g["outputs"]]
    if not toks:
        return {"mean_tokens": 0.0, "median_tokens": 0.0, "p90_tokens": 0, "max_tokens": 0, "mean_words": 0.0}
    return {"mean_tokens": statistics.fmean(toks), "median_tokens": statistics.median(toks),
            "p90_tokens": toks[min(len(toks) - 1, int(0.9 * len(toks)))], "max_tokens": toks[-1],
            "mean_words": statistics.fmean(words)}


def alpaca_eval_records(gens: list[dict], generator: str, dataset: str = "megatron-inpo") -> list[dict]:
    """AlpacaEval's model_outputs.json format (first sample of each prompt)."""
    return [{"instruction": g["prompt"], "output": g["outputs"][0], "generator": generator, "dataset": dataset}
            for g in gens]


def evaluate_pair(rollout_cfg: Any, judge: Any, policy: str, baseline: str, prompts: Sequence[Any], samples: int,
                  sampling: Any, out_dir: str | Path, policy_name: str = "policy", baseline_name: str = "baseline",
                  both_orders: bool = True, baseline_cache: str | Path | None = None, progress: bool = False) -> dict:
    """Generate (or reuse cached generations), judge, and write result.json + AlpacaEval JSON into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result_path = out_dir / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    ga = generate(rollout_cfg, policy, prompts, samples, sampling, out_dir / f"{policy_name}.generations.jsonl",
                  progress)
    gb = generate(rollout_cfg, baseline, prompts, samples, sampling,
                  baseline_cache or out_dir / f"{baseline_name}.generations.jsonl", progress)
    res = win_rate(judge, ga, gb, both_orders)
    res.update({"policy": str(policy), "baseline": str(baseline), "judge": getattr(judge, "name", "judge"),
                "policy_length": length_stats(ga), "baseline_length": length_stats(gb)})
    atomic_write_json(out_dir / f"{policy_name}.alpaca_eval.json", alpaca_eval_records(ga, policy_name))
    atomic_write_json(result_path, res)
    return res
