"""A config's identity: the fields that decide its results (every field less the `mutable` ones, which only say
where things are or how long to wait), their digest, and the listing of what differs between two configs. Used by
the run manifest (driver/manifest.py, whose RESUME_MUTABLE names a run's mutable fields) and by the resumable
outputs of `megatron-inpo rollout` (rollout/pipeline.claim_output). A bottom-layer module: configs only.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable

from megatron_inpo.config import ConfigError, to_dict


def config_digest(cfg: Any) -> str:
    """sha256 of the whole resolved config (what manifests before the identity recorded as config_sha256)."""
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: d}


def _mutable(key: str, mutable: Iterable[str]) -> bool:
    return any(key == m or key.startswith(m + ".") for m in mutable)


def identity(cfg: Any, mutable: Iterable[str] = ()) -> dict[str, Any]:
    """The fields of a config (dataclass or dict) that decide its results: dotted name -> value, sorted, without
    the `mutable` ones (a name covers the fields below it)."""
    flat = _flatten(to_dict(cfg))
    return {k: flat[k] for k in sorted(flat) if not _mutable(k, mutable)}


def identity_digest(cfg: Any, mutable: Iterable[str] = ()) -> str:
    """sha256 of `identity(cfg, mutable)`: equal exactly when no result-changing field differs."""
    return hashlib.sha256(json.dumps(identity(cfg, mutable), sort_keys=True, default=repr).encode()).hexdigest()


def config_diff(old: dict, new: dict, mutable: Iterable[str] = ()) -> list[str]:
    """'field: saved X, now Y' for every differing leaf (dotted names) outside `mutable`, sorted."""
    a, b = _flatten(old), _flatten(new)
    out = []
    for k in sorted(set(a) | set(b)):
        if _mutable(k, mutable):
            continue
        if a.get(k, "<absent>") != b.get(k, "<absent>"):
            out.append(f"{k}: saved {a.get(k, '<absent>')!r}, now {b.get(k, '<absent>')!r}")
    return out


def different_config(where: str, saved: str, diff: list[str], advice: str) -> ConfigError:
    """The one-line refusal of a resumption with another config, listing the differing fields."""
    return ConfigError(f"{where} holds output of a different config ({saved}); {advice}. Differences: "
                       + "; ".join(diff))
