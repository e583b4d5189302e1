"""The resumable rollout + judge stage: prompts -> K samples -> pair selection -> preference JSONL.

Each prompt batch is generated, judged and appended to the output with one write + fsync; prompts whose pair was
dropped (the tournament's final check) are recorded in `<out>.dropped.jsonl`. A re-run skips every prompt found in
either file, so a crash never duplicates or loses a pair; a torn last line is repaired first.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from megatron_inpo.data.preferences import append_jsonl, read_done_ids

if TYPE_CHECKING:
    from megatron_inpo.data.prompts import PromptRecord
    from megatron_inpo.judge.base import Judge
    from megatron_inpo.rollout.engine import RolloutEngine

log = logging.getLogger(__name__)


def dropped_path(out_path: str | Path) -> Path:
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".dropped.jsonl")


def _check_same_iteration(path: Path, iteration: int) -> None:
    """Refuse to resume into a file of another iteration: pairs of pi_t and pi_{t+1} must not mix."""
    from megatron_inpo.data.preferences import DataError, iter_jsonl

    if not path.exists():
        return
    for lineno, obj in iter_jsonl(path):
        if isinstance(obj, dict) and obj.get("iteration", iteration) != iteration:
            raise DataError(f"{path}:{lineno}: pair of iteration {obj.get('iteration')}, but this run is iteration "
                            f"{iteration}; write each iteration to its own file")


def generate_preferences(prompts: Sequence["PromptRecord"], engine: "RolloutEngine", judge: "Judge",
                         out_path: str | Path, method: str = "auto", iteration: int = 1, model_version: str = "",
                         batch_size: int = 64, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the stage; returns counts and throughput (prompts/s, tokens/s, comparisons)."""
    from megatron_inpo.judge.tournament import build_preferences

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out_path = Path(out_path)
    drop_path = dropped_path(out_path)
    done = read_done_ids(out_path) | read_done_ids(drop_path)
    if done:
        _check_same_iteration(out_path, iteration)
    todo = [p for p in prompts if p.id not in done]
    summary: dict[str, Any] = {"prompts": len(prompts), "skipped": len(prompts) - len(todo), "pairs": 0,
                               "dropped": 0, "comparisons": 0, "judge_calls": 0, "tokens": 0}
    if summary["skipped"]:
        log.info("resuming %s: %d of %d prompts already done", out_path, summary["skipped"], len(prompts))
    gen_s = judge_s = 0.0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc=f"rollout+judge it{iteration}", unit="prompt")
    t_all = time.perf_counter()
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        t0 = time.perf_counter()
        rollouts = engine.rollout(batch, iteration=iteration)
        t1 = time.perf_counter()
        pairs, dropped, stats = build_preferences(rollouts, judge, method, iteration, model_version)
        t2 = time.perf_counter()
        # pairs first: a crash between the two writes only re-judges this batch's dropped prompts
        append_jsonl(out_path, [p.to_json() for p in pairs])
        append_jsonl(drop_path, [json.dumps({"prompt_id": d, "iteration": iteration, "model_version": model_version})
                                 for d in dropped])
        gen_s += t1 - t0
        judge_s += t2 - t1
        summary["pairs"] += len(pairs)
        summary["dropped"] += len(dropped)
        summary["comparisons"] += stats["comparisons"]
        summary["judge_calls"] += stats["judge_calls"]
        summary["tokens"] += sum(len(c.token_ids) for r in rollouts for c in r.completions)
        if bar is not None:
            bar.update(len(batch))
            bar.set_postfix(pairs=summary["pairs"], dropped=summary["dropped"],
                            tok_s=f"{summary['tokens'] / max(gen_s, 1e-9):.0f}")
    if bar is not None:
        bar.close()
    n = len(todo)
    summary.update({"generated": n, "generate_seconds": gen_s, "judge_seconds": judge_s,
                    "seconds": time.perf_counter() - t_all,
                    "prompts_per_s": n / max(gen_s, 1e-9), "tokens_per_s": summary["tokens"] / max(gen_s, 1e-9)})
    log.info("stage %s: %d prompts generated (%d skipped), %d pairs, %d dropped; generation %.2f prompts/s "
             "%.1f tokens/s; %d comparisons in %.2f s", out_path, n, summary["skipped"], summary["pairs"],
             summary["dropped"], summary["prompts_per_s"], summary["tokens_per_s"], summary["comparisons"], judge_s)
    return summary
