"""Preference pairs on disk: one JSON object per line (JSONL), the hand-off between judging, the log-prob pass and
training. Token ids are stored so that training never re-tokenizes (and so never disagrees with the rollout).

Fields written by the judge stage are the dataclass fields below; the log-prob pass adds the four *_logp columns.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from megatron_inpo.errors import InputError


log = logging.getLogger(__name__)


class DataError(InputError, ValueError):
    """A data file is malformed; the message names the file and the 1-based line."""


SEAL_FIELD = "record_sha256"
"""The seal append_jsonl adds to every record of a resumable output (pairs, rollouts, log-prob chunks): the sha256
of the record's canonical JSON without it. A crash can only tear the last line (repair_torn_tail); a record changed
later (an edit, a bad disk, a copy gone wrong) still parses, and only its seal tells. A resumed stage drops such
records and does their prompts again (drop_damaged); readers refuse them (unseal)."""


def _digest(obj: dict) -> str:
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def seal(line: str) -> str:
    """One JSON object line with its SEAL_FIELD (replaced if present)."""
    obj = json.loads(line)
    obj.pop(SEAL_FIELD, None)
    return json.dumps({**obj, SEAL_FIELD: _digest(obj)}, ensure_ascii=False)


def seal_matches(obj: dict) -> bool | None:
    """None: the record has no seal (written by hand or by a release before seals); else whether it matches."""
    if SEAL_FIELD not in obj:
        return None
    rest = {k: v for k, v in obj.items() if k != SEAL_FIELD}
    return obj[SEAL_FIELD] == _digest(rest)


def unseal(obj: object, where: str) -> object:
    """The record without its seal; DataError naming `where` if the seal does not match its content."""
    if not isinstance(obj, dict) or SEAL_FIELD not in obj:
        return obj
    if not seal_matches(obj):
        raise DataError(f"{where}: record changed after it was written (field {SEAL_FIELD!r} does not match its "
                        "content)")
    return {k: v for k, v in obj.items() if k != SEAL_FIELD}


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
    def from_obj(cls, obj: object, where: str, vocab_size: int | None = None) -> "PreferencePair":
        """A pair from one parsed JSON line; every field is checked (types, ranges, token ids below `vocab_size`
        when given) and a bad one raises DataError naming `where` and the field."""
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {_kind(obj)}")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
                   and f.name not in obj]
        if missing:
            raise DataError(f"{where}: missing field(s) {missing}")
        obj = unseal(obj, where)
        unknown = sorted(set(obj) - names)
        if unknown:
            raise DataError(f"{where}: unknown field(s) {unknown}")
        kw = dict(obj)
        kw.pop(SEAL_FIELD, None)
        kw["prompt_id"] = check_id(obj["prompt_id"], where, "prompt_id")
        for key in ("prompt", "chosen", "rejected", "model_version", "judge"):
            if key in obj:
                check_text(obj[key], where, key)
        check_token_ids(obj["prompt_ids"], where, "prompt_ids", vocab_size,
                        empty="the first response token needs a context (put BOS in the prompt)")
        for key in ("chosen_ids", "rejected_ids"):
            check_token_ids(obj[key], where, key, vocab_size, empty="a response needs at least one token")
        if "iteration" in obj:
            it = obj["iteration"]
            if type(it) is not int or it < 1:
                raise DataError(f"{where}: field 'iteration' must be an integer >= 1, got {_short(it)}")
        for key in ("chosen_prob", "chosen_winrate", "rejected_winrate"):
            if obj.get(key) is not None:
                kw[key] = check_float(obj[key], where, key, lo=0.0, hi=1.0)
        for key in LOGP_FIELDS:
            if obj.get(key) is not None:
                # a log-probability sum is <= 0; the tolerance allows float rounding of a near-certain response
                kw[key] = check_float(obj[key], where, key, hi=LOGP_TOLERANCE)
        if "extra" in obj and not isinstance(obj["extra"], dict):
            raise DataError(f"{where}: field 'extra' must be a JSON object, got {_kind(obj['extra'])}")
        return cls(**kw)

    @property
    def has_logps(self) -> bool:
        return None not in (self.ref_chosen_logp, self.ref_rejected_logp, self.last_chosen_logp, self.last_rejected_logp)


LOGP_FIELDS = ("ref_chosen_logp", "ref_rejected_logp", "last_chosen_logp", "last_rejected_logp")
LOGP_TOLERANCE = 1e-3
"""Largest log-prob sum accepted: a sum of log-softmax values is <= 0 up to float rounding."""


# --- field checks shared by every reader (preferences, prompts, SFT): each error names `where` and the field ---

def _kind(value: object) -> str:
    return {bool: "a boolean", type(None): "null", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _short(value: object, limit: int = 40) -> str:
    """repr of a value cut to one short line (a hostile file may hold megabytes in one field)."""
    r = repr(value)
    if len(r) <= limit:
        return r
    if isinstance(value, (str, list, dict)):
        return r[:limit] + f"... ({_kind(value)} of length {len(value)})"
    return r[:limit] + "..."


def check_text(value: object, where: str, key: str, allow_empty: bool = True) -> str:
    """A text field: a string that is valid Unicode (JSON's \\ud800 escapes can smuggle lone surrogates in, which
    no tokenizer or UTF-8 writer accepts)."""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {_kind(value)} {_short(value)}")
    if not value and not allow_empty:
        raise DataError(f"{where}: field {key!r} is empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{where}: field {key!r} holds an unpaired surrogate (\\u{ord(value[e.start]):04x} at "
                        f"character {e.start}): not valid Unicode") from None
    return value


def check_id(value: object, where: str, key: str) -> str:
    """A record id: a non-empty string or an integer (not a boolean); returned as a string."""
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value) == "":
        raise DataError(f"{where}: field {key!r} must be a non-empty string or an integer, got {_short(value)}")
    if isinstance(value, str):
        check_text(value, where, key)
    return str(value)


def check_token_ids(value: object, where: str, key: str, vocab_size: int | None = None,
                    empty: str | None = None) -> list[int]:
    """A list of token ids: plain non-negative ints (no booleans, no floats), below `vocab_size` when given;
    non-empty unless `empty` is None (then an empty list is fine), whose text explains why."""
    if not isinstance(value, list):
        raise DataError(f"{where}: field {key!r} must be a list of non-negative ints (token ids), got "
                        f"{_kind(value)} {_short(value)}")
    if not value:
        if empty is not None:
            raise DataError(f"{where}: field {key!r} is empty ({empty})")
        return value
    # C-speed checks of the common, valid case; the slow walk below only runs to name a bad entry
    if set(map(type, value)) == {int} and min(value) >= 0 and (vocab_size is None or max(value) < vocab_size):
        return value
    for j, t in enumerate(value):
        if type(t) is not int or t < 0:
            raise DataError(f"{where}: field {key!r} must be a list of non-negative ints (token ids); entry {j} is "
                            f"{_kind(t)} {_short(t)}")
        if vocab_size is not None and t >= vocab_size:
            raise DataError(f"{where}: field {key!r}: token id {t} (entry {j}) is outside the model's vocabulary "
                            f"(size {vocab_size})")
    raise AssertionError("unreachable")  # pragma: no cover


def check_float(value: object, where: str, key: str, lo: float | None = None, hi: float | None = None) -> float:
    """A finite number (no NaN / inf, no strings or booleans) within [lo, hi] when given."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{where}: field {key!r} must be a number, got {_kind(value)} {_short(value)}")
    x = float(value)
    if not math.isfinite(x):
        raise DataError(f"{where}: field {key!r} must be a finite number, got {value!r}")
    if (lo is not None and x < lo) or (hi is not None and x > hi):
        rng = f"[{lo}, {hi}]" if lo is not None and hi is not None else (f"<= {hi}" if hi is not None else f">= {lo}")
        raise DataError(f"{where}: field {key!r} must be {rng}, got {value!r}")
    return x


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, object]]:
    """Yield (line number, parsed object) for each non-blank line; a bad line raises DataError naming it.

    Lines are split on b"\\n" (as the appenders write them) and decoded one by one, so invalid UTF-8 is reported
    with its line; a UTF-8 byte-order mark on line 1 is skipped. An object with a repeated key is refused (JSON
    would silently keep the last value).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    with f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} "
                                "of the line)") from None
            if lineno == 1 and line.startswith("\ufeff"):
                line = line[1:]
            if not line.strip():
                continue
            try:
                obj = json.loads(line, object_pairs_hook=_no_duplicate_keys)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            except _DuplicateKey as e:
                raise DataError(f"{path}:{lineno}: field {e.args[0]!r} appears twice in one object") from None
            except RecursionError:
                raise DataError(f"{path}:{lineno}: invalid JSON (nested too deeply)") from None
            except ValueError as e:  # e.g. an integer literal of more than 4300 digits
                raise DataError(f"{path}:{lineno}: invalid JSON ({e})") from None
            yield lineno, obj


def read_preferences(path: str | os.PathLike, require_logps: bool = False, *, require_winrates: bool = False,
                     vocab_size: int | None = None, max_len: int | None = None, max_len_name: str = "max_seq_len",
                     unique_ids: bool = True) -> list[PreferencePair]:
    """Every pair of a preference JSONL file, checked line by line (DataError naming file:line and the field).

    require_logps / require_winrates: the four *_logp columns (training) / both win rates (SPPO) on every pair.
    vocab_size: token ids must be below it (the model's vocabulary). max_len: the longer of the two sequences
    (prompt + response - 1 input tokens) must fit; `max_len_name` names the bound in the message. unique_ids:
    each prompt_id once (the stages key their resumption on it). An empty file is an error.
    """
    pairs = []
    seen: dict[str, int] = {}
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        pair = PreferencePair.from_obj(obj, where, vocab_size=vocab_size)
        if require_logps and not pair.has_logps:
            raise DataError(f"{where}: log-prob columns missing; run the log-prob pass first")
        if require_winrates and (pair.chosen_winrate is None or pair.rejected_winrate is None):
            raise DataError(f"{where}: fields 'chosen_winrate' and 'rejected_winrate' are needed (objective sppo); "
                            "judge with method all_pairs")
        if max_len is not None:
            n = len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids)) - 1
            if n > max_len:
                raise DataError(f"{where}: fields 'prompt_ids' + 'chosen_ids'/'rejected_ids': {n} tokens > "
                                f"{max_len_name}={max_len}")
        if unique_ids:
            if pair.prompt_id in seen:
                raise DataError(f"{where}: field 'prompt_id': duplicate {_short(pair.prompt_id)} (first on line "
                                f"{seen[pair.prompt_id]})")
            seen[pair.prompt_id] = lineno
        pairs.append(pair)
    if not pairs:
        raise DataError(f"{path}: no preference pairs (empty file)")
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
    """Append JSON object lines, each sealed (SEAL_FIELD), with one O_APPEND write and an fsync, so a batch is on
    disk before the next starts."""
    if not lines:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(seal(line) + "\n" for line in lines).encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:  # os.write may write less than asked (signals, quotas): finish the batch
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)


def drop_damaged(path: str | os.PathLike, key: str = "prompt_id") -> list[str]:
    """Remove the records of a resumable output whose seal does not match (or that lost it while others have
    theirs): they were changed after they were written. The file is rewritten atomically without them and each is
    named in a warning; returns their descriptions. A file without any seal (hand-made, or from a release before
    seals) is left as it is."""
    path = Path(path)
    return _drop_damaged(path, list(iter_jsonl(path)), key)[1] if path.exists() else []


def _drop_damaged(path: Path, records: list[tuple[int, object]],
                  key: str) -> tuple[list[tuple[int, object]], list[str]]:
    """drop_damaged on the records already read from `path`: (the records kept, the descriptions of those dropped)."""
    from megatron_inpo.files import atomic_write_bytes

    states = [(lineno, obj, seal_matches(obj) if isinstance(obj, dict) else False) for lineno, obj in records]
    bad = {lineno for lineno, _, state in states if not state}
    if not bad or not any(state for _, _, state in states):  # nothing damaged, or no record sealed to check against
        return records, []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    kept = b"".join(line + b"\n" for i, line in enumerate(lines, start=1) if line.strip() and i not in bad)
    atomic_write_bytes(path, kept)
    named = [f"line {lineno}" + (f" ({key} {_short(obj[key])})" if isinstance(obj, dict) and key in obj else "")
             for lineno, obj, state in states if lineno in bad]
    log.warning("%s: %d record(s) changed after they were written (%s does not match): %s; dropped, done again",
                path, len(named), SEAL_FIELD, ", ".join(named))
    return [(lineno, obj) for lineno, obj in records if lineno not in bad], named


def read_done_ids(path: str | os.PathLike, key: str = "prompt_id") -> set[str]:
    """Ids (field `key`) of every record in a JSONL file, after repairing a torn tail and dropping damaged records
    (drop_damaged: their prompts are done again); empty if no file. The file is parsed once."""
    path = Path(path)
    if not path.exists():
        return set()
    repair_torn_tail(path)
    kept, _ = _drop_damaged(path, list(iter_jsonl(path)), key)
    done = set()
    for lineno, obj in kept:
        if not isinstance(obj, dict) or key not in obj:
            raise DataError(f"{path}:{lineno}: record without field {key!r}")
        done.add(str(obj[key]))
    return done
