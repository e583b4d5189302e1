"""Preference pairs on disk: one JSON object per line (JSONL), the hand-off between judging, the log-prob pass and
training. Token ids are stored so that training never re-tokenizes (and so never disagrees with the rollout).

Fields written by the judge stage are the dataclass fields below; the log-prob pass adds the four *_logp columns.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator


class DataError(ValueError):
    """A data file is malformed; the message names the file and the 1-based line."""


@dataclass
class PreferencePair:
    prompt_id: str
    """Stable id of the prompt (unique within an iteration's prompt set); resumable stages key on it."""
    prompt: str
    """Prompt text as shown to the judge (already rendered with the chat template, if any)."""
    prompt_ids: list[int]
    """Token ids of the prompt as fed to the policy."""
    chosen: str
    """Text of y_w, the preferred response."""
    rejected: str
    """Text of y_l, the dispreferred response."""
    chosen_ids: list[int]
    """Token ids of y_w: response tokens only (EOS included when the policy emitted it)."""
    rejected_ids: list[int]
    """Token ids of y_l: response tokens only."""
    iteration: int = 1
    """INPO iteration t that sampled this pair from pi_t (1-based)."""
    model_version: str = ""
    """Identifier of the policy checkpoint that generated the responses."""
    judge: str = ""
    """Name of the oracle that ordered the pair (e.g. 'pairwise-pm', 'bt-rm', 'programmatic')."""
    chosen_prob: float | None = None
    """Judge's P(y_w beats y_l) from the final check (pairwise judges), if any."""
    chosen_winrate: float | None = None
    """Estimated P(y_w beats pi_t) (SPPO's all-pairs win rate), if computed."""
    rejected_winrate: float | None = None
    """Estimated P(y_l beats pi_t), if computed."""
    ref_chosen_logp: float | None = None
    """log pi_ref(y_w | x): sum over response tokens; written by the log-prob pass."""
    ref_rejected_logp: float | None = None
    """log pi_ref(y_l | x); written by the log-prob pass."""
    last_chosen_logp: float | None = None
    """log pi_t(y_w | x) under the previous iterate; written by the log-prob pass (equals ref at t = 1)."""
    last_rejected_logp: float | None = None
    """log pi_t(y_l | x); written by the log-prob pass."""
    extra: dict = field(default_factory=dict)
    """Free-form extra information (e.g. judge probabilities of every tournament match)."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False)

    @classmethod
    def from_obj(cls, obj: object, where: str) -> "PreferencePair":
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
                   and f.name not in obj]
        if missing:
            raise DataError(f"{where}: missing field(s) {missing}")
        unknown = sorted(set(obj) - names)
        if unknown:
            raise DataError(f"{where}: unknown field(s) {unknown}")
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            ids = obj[key]
            if not isinstance(ids, list) or not all(isinstance(t, int) and t >= 0 for t in ids):
                raise DataError(f"{where}: field {key!r} must be a list of non-negative ints")
        for key in ("chosen_ids", "rejected_ids"):
            if not obj[key]:
                raise DataError(f"{where}: field {key!r} is empty (a response needs at least one token)")
        return cls(**obj)

    @property
    def has_logps(self) -> bool:
        return None not in (self.ref_chosen_logp, self.ref_rejected_logp, self.last_chosen_logp, self.last_rejected_logp)


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, object]]:
    """Yield (line number, parsed object) for each non-blank line; a bad line raises DataError naming it."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None


def read_preferences(path: str | os.PathLike, require_logps: bool = False) -> list[PreferencePair]:
    pairs = []
    for lineno, obj in iter_jsonl(path):
        pair = PreferencePair.from_obj(obj, f"{path}:{lineno}")
        if require_logps and not pair.has_logps:
            raise DataError(f"{path}:{lineno}: log-prob columns missing; run the log-prob pass first")
        pairs.append(pair)
    return pairs
