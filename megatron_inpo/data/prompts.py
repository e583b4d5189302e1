"""Prompt files: JSONL, one object per line, ``{"id": ..., "prompt": ...}`` plus optional fields.

Optional fields: ``prompt_ids`` (token ids, used as-is instead of tokenizing ``prompt``) and anything else,
which is kept in ``PromptRecord.extra`` (e.g. a reference answer for a verifiable task). Errors name file:line.
Each record remembers its ``source`` (file:line), so that checks made later, once the tokenizer and the model's
limits are known (the rollout engine's `tokenize`), still name the line.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from megatron_inpo.data.preferences import DataError, check_id, check_text, check_token_ids, iter_jsonl


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
    source: str = field(default="", compare=False, repr=False)
    """Where the record was read ('file:line'), for error messages; '' for records built in code."""

    @property
    def where(self) -> str:
        return self.source or f"prompt {self.id!r}"


def parse_prompt(obj: object, where: str, vocab_size: int | None = None, max_tokens: int | None = None,
                 max_chars: int | None = None) -> PromptRecord:
    """One prompt line, checked: id, prompt text (a valid Unicode string, at most `max_chars` characters when
    given), prompt_ids (non-negative ints below `vocab_size`, at most `max_tokens` of them, when given)."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in ("id", "prompt"):
        if key not in obj:
            raise DataError(f"{where}: missing field {key!r}")
    pid = check_id(obj["id"], where, "id")
    text = check_text(obj["prompt"], where, "prompt")
    ids = obj.get("prompt_ids")
    if ids is not None:
        check_token_ids(ids, where, "prompt_ids", vocab_size, empty="give token ids or leave the field out")
        if max_tokens is not None and len(ids) > max_tokens:
            raise DataError(f"{where}: field 'prompt_ids' has {len(ids)} tokens, more than the {max_tokens} the model's "
                            "positions leave beside max_new_tokens")
    elif max_chars is not None and len(text) > max_chars:
        raise DataError(f"{where}: field 'prompt' has {len(text)} characters, more than the model's positions can "
                        f"hold as tokens (limit {max_chars} characters); refused before tokenizing")
    if not text and ids is None:
        raise DataError(f"{where}: field 'prompt' is empty")
    extra = {k: v for k, v in obj.items() if k not in ("id", "prompt", "prompt_ids")}
    return PromptRecord(id=pid, prompt=text, prompt_ids=ids, extra=extra, source=where)


def read_prompts(path: str | os.PathLike, limit: int | None = None, *, vocab_size: int | None = None,
                 max_tokens: int | None = None, max_chars: int | None = None) -> list[PromptRecord]:
    """Read a prompt JSONL file; duplicate ids are an error (naming both lines), blank lines are skipped.

    vocab_size / max_tokens / max_chars: optional limits checked on every line (see parse_prompt); the rollout
    engine checks the same against its tokenizer and model when it tokenizes (RolloutEngine.tokenize)."""
    records: list[PromptRecord] = []
    seen: dict[str, int] = {}
    for lineno, obj in iter_jsonl(path):
        rec = parse_prompt(obj, f"{path}:{lineno}", vocab_size, max_tokens, max_chars)
        if rec.id in seen:
            raise DataError(f"{path}:{lineno}: duplicate prompt id {rec.id!r} (first on line {seen[rec.id]})")
        seen[rec.id] = lineno
        records.append(rec)
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise DataError(f"{path}: no prompts")
    return records
