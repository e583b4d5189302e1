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


# --- resumable appends (rollout/judge stage) -----------------------------------------------------------------------
# The stage appends one prompt batch at a time with a single write + fsync. A crash can only tear the LAST line
# (a partial write), which repair_torn_tail() removes before a resumed run reads the done set and appends again.

def repair_torn_tail(path: str | os.PathLike) -> int:
    """Drop a torn (partial, unparseable) last line left by a crash; return the number of bytes removed.

    A complete JSON object that only lost its newline is kept (the newline is restored). Damage anywhere but the
    last line is not a crash artefact and is left for iter_jsonl to report with its line number.
    """
    path = Path(path)
    if not path.exists():
        return 0
    with open(path, "rb+") as f:
        data = f.read()
        if not data or data.endswith(b"\n"):
            return 0
        start = data.rfind(b"\n") + 1
        tail = data[start:]
        try:
            ok = isinstance(json.loads(tail.decode("utf-8")), dict)
        except (UnicodeDecodeError, json.JSONDecodeError):
            ok = False
        if ok:
            f.write(b"\n")
            removed = 0
        else:
            f.truncate(start)
            removed = len(tail)
        f.flush()
        os.fsync(f.fileno())
    return removed


def append_jsonl(path: str | os.PathLike, lines: list[str]) -> None:
    """Append JSON lines with one O_APPEND write and an fsync, so a batch is on disk before the next starts."""
    if not lines:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(line.rstrip("\n") + "\n" for line in lines).encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:  # os.write may write less than asked (signals, quotas): finish the batch
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)


def read_done_ids(path: str | os.PathLike, key: str = "prompt_id") -> set[str]:
    """Ids (field `key`) of every record in a JSONL file, after repairing a torn tail; empty if no file."""
    path = Path(path)
    if not path.exists():
        return set()
    repair_torn_tail(path)
    done = set()
    for lineno, obj in iter_jsonl(path):
        if not isinstance(obj, dict) or key not in obj:
            raise DataError(f"{path}:{lineno}: record without field {key!r}")
        done.add(str(obj[key]))
    return done
