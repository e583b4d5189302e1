"""Prompt files: JSONL, one object per line, ``{"id": ..., "prompt": ...}`` plus optional fields.

Optional fields: ``prompt_ids`` (token ids, used as-is instead of tokenizing ``prompt``) and anything else,
which is kept in ``PromptRecord.extra`` (e.g. a reference answer for a verifiable task). Errors name file:line.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from megatron_inpo.data.preferences import DataError, iter_jsonl


@dataclass
class PromptRecord:
    id: str
    """Stable prompt id, unique within the file; resumable stages key on it."""
    prompt: str
    """Prompt text (the user turn; the chat template is applied by the rollout engine when configured)."""
    prompt_ids: list[int] | None = None
    """Token ids fed to the policy; when None the engine tokenizes ``prompt``."""
    extra: dict = field(default_factory=dict)
    """Every other field of the line (kept for judges of verifiable tasks and for the output's ``extra``)."""


def parse_prompt(obj: object, where: str) -> PromptRecord:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in ("id", "prompt"):
        if key not in obj:
            raise DataError(f"{where}: missing field {key!r}")
    pid = obj["id"]
    if isinstance(pid, bool) or not isinstance(pid, (str, int)) or str(pid) == "":
        raise DataError(f"{where}: field 'id' must be a non-empty string or an integer, got {pid!r}")
    if not isinstance(obj["prompt"], str):
        raise DataError(f"{where}: field 'prompt' must be a string, got {type(obj['prompt']).__name__}")
    ids = obj.get("prompt_ids")
    if ids is not None:
        if not isinstance(ids, list) or not ids or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
            raise DataError(f"{where}: field 'prompt_ids' must be a non-empty list of non-negative ints")
    if not obj["prompt"] and ids is None:
        raise DataError(f"{where}: field 'prompt' is empty")
    extra = {k: v for k, v in obj.items() if k not in ("id", "prompt", "prompt_ids")}
    return PromptRecord(id=str(pid), prompt=obj["prompt"], prompt_ids=ids, extra=extra)


def read_prompts(path: str | os.PathLike, limit: int | None = None) -> list[PromptRecord]:
    """Read a prompt JSONL file; duplicate ids are an error (naming both lines), blank lines are skipped."""
    records: list[PromptRecord] = []
    seen: dict[str, int] = {}
    for lineno, obj in iter_jsonl(path):
        rec = parse_prompt(obj, f"{path}:{lineno}")
        if rec.id in seen:
            raise DataError(f"{path}:{lineno}: duplicate prompt id {rec.id!r} (first on line {seen[rec.id]})")
        seen[rec.id] = lineno
        records.append(rec)
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise DataError(f"{path}: no prompts")
    return records
