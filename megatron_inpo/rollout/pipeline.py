"""The resumable rollout and judge stages: prompts -> K samples -> pair selection -> preference JSONL.

Two ways through the same per-batch pieces (generate a batch, judge a batch and append its pairs):

- `generate_preferences` (the `megatron-inpo rollout` command): each prompt batch is generated, judged and
  appended to the output in one step.
- `rollout_stage` then `judge_stage` (the iteration driver): all samples are appended to rollouts.jsonl first,
  then judged batch by batch into the pairs file, so each stage is recorded (and resumed) on its own.

Progress: a tqdm bar per stage, or, with progress off, one log line (INFO) per batch: prompts done of the total,
pairs, tokens/s and the time left at the rate so far; each batch's output is on disk when its line appears.

Every append is one write + fsync; prompts whose pair was dropped (the tournament's final check) are recorded in
`<out>.dropped.jsonl`. A re-run skips every prompt found in either file, so a crash never duplicates or loses a
pair; a torn last line is repaired first. A pairs file of another iteration is refused.

`claim_output` (the `megatron-inpo rollout` command's resume check) refuses to append to an output made by a
config of another identity (other sampling, model, judge, pair selection or iteration: see
driver/manifest.identity), listing the differing fields. The identity is recorded next to the output in
`<out>.identity.json` ({"format_version", "sha256", "fields"}: the identity's dotted fields and their digest), so
the check still works, with the fields listed, when `<out>.config.yaml` (the whole config, for people) is
deleted; an output made before the sidecar existed is compared with its config.yaml, and one with records but
neither file is refused (nothing says what made it). The driver's own stages are covered by its manifest.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Sequence, TypeVar

from megatron_inpo.data.preferences import append_jsonl, read_done_ids
from megatron_inpo.events import emit

if TYPE_CHECKING:
    from megatron_inpo.data.preferences import PreferencePair
    from megatron_inpo.data.prompts import PromptRecord
    from megatron_inpo.judge.base import Judge
    from megatron_inpo.rollout.engine import Rollout, RolloutEngine

log = logging.getLogger(__name__)
T = TypeVar("T")


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


IDENTITY_FORMAT = 1


def identity_path(out_path: str | Path) -> Path:
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".identity.json")


def config_path(out_path: str | Path) -> Path:
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".config.yaml")


def _has_records(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except FileNotFoundError:
        return False


def claim_output(out_path: str | Path, cfg: Any, mutable: frozenset[str] | set[str], record: bool = True) -> None:
    """Check that `out_path` (and its .dropped.jsonl) may be resumed by `cfg`, then record cfg next to it
    (`<out>.config.yaml` and `<out>.identity.json`). An output with records made by a config whose identity
    (`cfg` less the `mutable` fields) differs is refused with a ConfigError listing the fields. record=False:
    the check alone (a command checks first and records only once every other check has passed, so that a refused
    command writes nothing)."""
    import yaml

    from megatron_inpo.config import ConfigError, load_yaml, save_yaml, to_dict
    from megatron_inpo.identity import config_diff, different_config, identity, identity_digest
    from megatron_inpo.files import atomic_write_json

    out_path = Path(out_path)
    fields, digest = identity(cfg, mutable), identity_digest(cfg, mutable)
    side, saved = identity_path(out_path), config_path(out_path)
    advice = "resume it with the same config, or write to another --out"
    if _has_records(out_path) or _has_records(dropped_path(out_path)):
        if side.exists():
            try:
                rec = json.loads(side.read_text(encoding="utf-8"))
                old_fields, old_digest = rec["fields"], rec["sha256"]
                if not isinstance(old_fields, dict) or rec.get("format_version") != IDENTITY_FORMAT:
                    raise TypeError("fields")
            except (ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"{side}: unreadable record of the config that made {out_path} "
                                  f"({type(e).__name__}); restore it or write to another --out") from None
            diff = config_diff(old_fields, fields, mutable)
            if diff:
                raise different_config(str(out_path), str(side), diff, advice)
            if old_digest != digest:
                raise ConfigError(f"{side}: its sha256 does not match its fields (edited?); restore it or write to "
                                  "another --out")
        elif saved.exists():  # an output from before the identity sidecar
            try:
                old = load_yaml(saved.read_text(encoding="utf-8")) or {}
            except (yaml.YAMLError, UnicodeDecodeError) as e:
                raise ConfigError(f"{saved}: not a readable YAML config ({type(e).__name__})") from None
            diff = config_diff(old if isinstance(old, dict) else {}, to_dict(cfg), mutable)
            if diff:
                raise different_config(str(out_path), str(saved), diff, advice)
        else:
            raise ConfigError(f"{out_path} holds records, but neither {side.name} nor {saved.name} next to it says "
                              "which config made them, so they cannot be resumed safely; write to another --out "
                              "(or move the file away)")
    if record:
        save_yaml(cfg, saved)
        atomic_write_json(side, {"format_version": IDENTITY_FORMAT, "sha256": digest, "fields": fields})


# ---------------------------------------------------------------------------------------------------------------
# The per-batch pieces


def _batches(items: Sequence[T], batch_size: int) -> list[Sequence[T]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [items[s:s + batch_size] for s in range(0, len(items), batch_size)]


def _judged_ids(out_path: Path, iteration: int) -> set[str]:
    """Prompts an earlier attempt of this iteration already judged into `out_path` (a pair or a dropped record)."""
    done = read_done_ids(out_path) | read_done_ids(dropped_path(out_path))
    if done:
        _check_same_iteration(out_path, iteration)
    return done


def _judge_batch(rollouts: Sequence["Rollout"], judge: "Judge", method: str, out_path: Path, iteration: int,
                 model_version: str, winrate: str = "uclaml") -> tuple[list["PreferencePair"], list[str], dict]:
    """Select the pairs of one batch and append them (and the dropped prompts) to the output."""
    from megatron_inpo.judge.tournament import build_preferences

    pairs, dropped, stats = build_preferences(rollouts, judge, method, iteration, model_version, winrate)
    # pairs first: a crash between the two writes only re-judges this batch's dropped prompts
    append_jsonl(out_path, [p.to_json() for p in pairs])
    append_jsonl(dropped_path(out_path), [json.dumps({"prompt_id": d, "iteration": iteration,
                                                      "model_version": model_version}) for d in dropped])
    return pairs, dropped, stats


def _rollout_record(r: "Rollout") -> str:
    """One line of rollouts.jsonl."""
    return json.dumps({"prompt_id": r.prompt.id, "prompt": r.prompt.prompt, "prompt_ids": r.prompt_ids,
                       "extra": r.prompt.extra, "completions": [dataclasses.asdict(c) for c in r.completions]})


def _rollout_from_record(row: dict) -> "Rollout":
    from megatron_inpo.data.prompts import PromptRecord
    from megatron_inpo.rollout.engine import Completion, Rollout

    return Rollout(PromptRecord(row["prompt_id"], row["prompt"], row["prompt_ids"], row.get("extra") or {}),
                   row["prompt_ids"], [Completion(**c) for c in row["completions"]])


def _read_jsonl(path: Path) -> list[dict]:
    from megatron_inpo.data.preferences import iter_jsonl, repair_torn_tail, unseal

    repair_torn_tail(path)
    return [unseal(obj, f"{path}:{lineno}") for lineno, obj in iter_jsonl(path)]  # type: ignore[misc]


def _batch_line(desc: str, k: int, batches: int, done: int, total: int, t0: float, start_done: int,
                **counts: Any) -> None:
    """The line of one finished batch when no bar is shown (--no-progress): a sign of life with an ETA."""
    dt = time.perf_counter() - t0
    rate = (done - start_done) / max(dt, 1e-9)
    eta = (total - done) / rate if rate > 0 else float("nan")
    extra = "".join(f", {v} {k.replace('_', ' ')}" for k, v in counts.items())
    log.info("%s: batch %d/%d done, %d/%d prompts%s, %.1f s, about %.0f s left", desc, k, batches, done, total,
             extra, dt, eta)


def _bar(enabled: bool, total: int, initial: int, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="prompt", leave=False)


# ---------------------------------------------------------------------------------------------------------------
# The stages


def rollout_stage(prompts: Sequence["PromptRecord"], open_engine: Callable[[], ContextManager["RolloutEngine"]],
                  out_path: str | Path, iteration: int = 1, batch_size: int = 64,
                  progress: bool = True) -> dict[str, Any]:
    """Sample K responses for every prompt not yet in `out_path` (rollouts.jsonl), appended batch by batch.

    `open_engine()` (a context manager giving the engine; contextlib.nullcontext(engine) for an open one) is
    entered only when a prompt is left: a finished stage starts no engine and wakes no server.
    Event `batch<k>` (megatron_inpo/events.py) once batch k is on disk.
    Returns {"rollouts": path, "prompts": prompts in the file, "sequences": samples, "mean_tokens": per sample}.
    """
    out_path = Path(out_path)
    done = read_done_ids(out_path)
    todo = [p for p in prompts if p.id not in done]
    batches = _batches(todo, batch_size)
    if todo:
        with open_engine() as engine:
            t_start = time.perf_counter()
            bar = _bar(progress, len(prompts), len(prompts) - len(todo), f"rollout it{iteration}")
            for k, batch in enumerate(batches):
                rolls = engine.rollout(batch, iteration=iteration)
                append_jsonl(out_path, [_rollout_record(r) for r in rolls])
                if bar is not None:
                    bar.update(len(rolls))
                else:
                    start = len(prompts) - len(todo)
                    _batch_line(f"rollout it{iteration}", k + 1, len(batches),
                                start + sum(len(b) for b in batches[:k + 1]), len(prompts), t_start, start)
                emit(f"batch{k + 1}")
            if bar is not None:
                bar.close()
    rows = _read_jsonl(out_path)
    toks = [len(c["token_ids"]) for r in rows for c in r["completions"]]
    return {"rollouts": str(out_path), "prompts": len(rows), "sequences": len(toks),
            "mean_tokens": sum(toks) / max(1, len(toks))}


def judge_stage(rollouts_path: str | Path, judge: "Judge", method: str, out_path: str | Path, iteration: int = 1,
                model_version: str = "", batch_size: int = 64, progress: bool = True,
                winrate: str = "uclaml") -> dict[str, Any]:
    """Judge every prompt of `rollouts_path` not yet in `out_path` (pairs) or its .dropped.jsonl, batch by batch
    (`winrate`: the all-pairs win-rate definition, judge/tournament.py WINRATES).

    Event `batch<k>` once batch k is on disk. Returns {"pairs_file", "pairs" and "dropped" (totals in the
    files), "method", "comparisons" (made by this call)}.
    """
    out_path = Path(out_path)
    done = _judged_ids(out_path, iteration)
    records = _read_jsonl(Path(rollouts_path))
    rows = [r for r in records if r["prompt_id"] not in done]
    bar = _bar(progress, len(records), len(records) - len(rows), f"judge it{iteration}")
    comparisons = 0
    batches, t_start, start = _batches(rows, batch_size), time.perf_counter(), len(records) - len(rows)
    for k, batch in enumerate(batches):
        rolls = [_rollout_from_record(r) for r in batch]
        _, _, stats = _judge_batch(rolls, judge, method, out_path, iteration, model_version, winrate)
        comparisons += stats["comparisons"]
        if bar is not None:
            bar.update(len(rolls))
        else:
            _batch_line(f"judge it{iteration}", k + 1, len(batches), start + sum(len(b) for b in batches[:k + 1]),
                        len(records), t_start, start, comparisons=comparisons)
        emit(f"batch{k + 1}")
    if bar is not None:
        bar.close()
    return {"pairs_file": str(out_path), "pairs": len(read_done_ids(out_path)),
            "dropped": len(read_done_ids(dropped_path(out_path))), "method": method, "comparisons": comparisons}


def generate_preferences(prompts: Sequence["PromptRecord"], engine: "RolloutEngine", judge: "Judge",
                         out_path: str | Path, method: str = "auto", iteration: int = 1, model_version: str = "",
                         batch_size: int = 64, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the stage; returns counts and throughput (prompts/s, tokens/s, comparisons)."""
    out_path = Path(out_path)
    done = _judged_ids(out_path, iteration)
    todo = [p for p in prompts if p.id not in done]
    batches = _batches(todo, batch_size)
    summary: dict[str, Any] = {"prompts": len(prompts), "skipped": len(prompts) - len(todo), "pairs": 0,
                               "dropped": 0, "comparisons": 0, "judge_calls": 0, "tokens": 0}
    if summary["skipped"]:
        log.info("resuming %s: %d of %d prompts already done", out_path, summary["skipped"], len(prompts))
    gen_s = judge_s = 0.0
    bar = _bar(progress, len(prompts), summary["skipped"], f"rollout+judge it{iteration}")
    t_all = time.perf_counter()
    for k, batch in enumerate(batches, 1):
        t0 = time.perf_counter()
        rollouts = engine.rollout(batch, iteration=iteration)
        t1 = time.perf_counter()
        pairs, dropped, stats = _judge_batch(rollouts, judge, method, out_path, iteration, model_version)
        gen_s += t1 - t0
        judge_s += time.perf_counter() - t1
        summary["pairs"] += len(pairs)
        summary["dropped"] += len(dropped)
        summary["comparisons"] += stats["comparisons"]
        summary["judge_calls"] += stats["judge_calls"]
        summary["tokens"] += sum(len(c.token_ids) for r in rollouts for c in r.completions)
        if bar is not None:
            bar.update(len(batch))
            bar.set_postfix(pairs=summary["pairs"], dropped=summary["dropped"],
                            tok_s=f"{summary['tokens'] / max(gen_s, 1e-9):.0f}")
        else:
            _batch_line(f"rollout+judge it{iteration}", k, len(batches),
                        summary["skipped"] + sum(len(b) for b in batches[:k]), len(prompts), t_all,
                        summary["skipped"], pairs=summary["pairs"], dropped=summary["dropped"],
                        tokens_per_s=f"{summary['tokens'] / max(gen_s, 1e-9):.1f}")
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
