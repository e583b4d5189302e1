"""The run manifest: which stage of which iteration is complete, written atomically after each stage.

`<run_dir>/manifest.json`::

    {"format_version": 1, "config_sha256": "...",
     "stages": {"sft": {"outputs": {...}, "seconds": 12.3, "finished": "2026-11-26T23:01:02Z", "attempts": 1},
                "iter1/export": {...}, "iter1/rollout": {...}, ...},
     "attempts": {"iter1/train": 2, ...}}

A stage is done exactly when its key is in "stages"; its outputs were complete on disk before the entry was
written (each stage writes atomically or appends resumably), so a SIGKILL at any moment leaves either a done
stage or one that the next run continues (rollout/judge skip finished prompts, the log-prob pass keeps finished
chunks, training resumes from its newest step checkpoint). Nothing is redone, nothing is duplicated.

`<run_dir>/server_memory.json` (megatron_inpo.serving.memory.ServerMemoryRecord) records whether each SGLang server
released its GPU memory (server_memory_saver), so a restarted driver neither resumes memory that was not released
nor releases twice.

`<run_dir>/config.yaml` is the resolved config; a resumed run must resolve to the same config, or it is refused
with the differing fields named (a silently changed config would mix two experiments in one run).
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import yaml

from megatron_inpo.config import ConfigError, save_yaml, to_dict
from megatron_inpo.files import atomic_write_json

FORMAT_VERSION = 1
# Fields that may change between a run and its resumption: they do not change any result.
RESUME_MUTABLE = {"stage_timeout_s", "server_memory_saver"}


def config_digest(cfg: Any) -> str:
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: d}


def config_diff(old: dict, new: dict) -> list[str]:
    """'field: saved X, now Y' for every differing leaf (dotted names), sorted."""
    a, b = _flatten(old), _flatten(new)
    out = []
    for k in sorted(set(a) | set(b)):
        if k.split(".")[0] in RESUME_MUTABLE:
            continue
        if a.get(k, "<absent>") != b.get(k, "<absent>"):
            out.append(f"{k}: saved {a.get(k, '<absent>')!r}, now {b.get(k, '<absent>')!r}")
    return out


class Manifest:
    """Completion records of a run directory."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "manifest.json"
        self.data: dict[str, Any] = {"format_version": FORMAT_VERSION, "config_sha256": None, "stages": {},
                                     "attempts": {}}
        if self.path.exists():
            try:
                self.data = json.loads(self.path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{self.path}: corrupt manifest ({e.msg}); it is written atomically, so this "
                                  "file was edited by hand or by another program") from None
            if self.data.get("format_version") != FORMAT_VERSION:
                raise ConfigError(f"{self.path}: manifest format {self.data.get('format_version')} is not "
                                  f"{FORMAT_VERSION}")

    @classmethod
    def open(cls, run_dir: str | Path, cfg: Any) -> "Manifest":
        """Open (or start) the run in run_dir for `cfg`: saves config.yaml, or refuses a different config."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        saved = run_dir / "config.yaml"
        m = cls(run_dir)
        new = to_dict(cfg)
        if saved.exists():
            old = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
            diff = config_diff(old, new)
            if diff:
                raise ConfigError(f"{run_dir} holds a run with a different config ({saved}); resume it with the same "
                                  "command or use a new run_dir. Differences:\n  " + "\n  ".join(diff))
        else:
            save_yaml(cfg, saved)
        m.data["config_sha256"] = config_digest(cfg)
        m._write()
        return m

    def _write(self) -> None:
        atomic_write_json(self.path, self.data)

    def done(self, key: str) -> bool:
        return key in self.data["stages"]

    def outputs(self, key: str) -> dict:
        if key not in self.data["stages"]:
            raise KeyError(f"stage {key!r} is not complete in {self.path}")
        return self.data["stages"][key]["outputs"]

    def attempts(self, key: str) -> int:
        return int(self.data["attempts"].get(key, 0))

    def start(self, key: str) -> int:
        """Count an attempt of `key` (a resumed stage shows attempts > 1); returns the attempt number."""
        n = self.attempts(key) + 1
        self.data["attempts"][key] = n
        self._write()
        return n

    def finish(self, key: str, outputs: dict, seconds: float) -> None:
        if key in self.data["stages"]:
            raise RuntimeError(f"stage {key!r} recorded twice in {self.path}")
        self.data["stages"][key] = {"outputs": outputs, "seconds": round(seconds, 3),
                                    "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                    "attempts": self.attempts(key)}
        self._write()

    def set_engine(self, engine: str) -> None:
        """Record the engine of the run (auto is resolved once, at the first start)."""
        if self.data.get("engine") not in (None, engine):
            raise ConfigError(f"{self.path}: run started with engine {self.data['engine']!r}, not {engine!r}")
        self.data["engine"] = engine
        self._write()

    def stage_seconds(self) -> dict[str, float]:
        return {k: v["seconds"] for k, v in self.data["stages"].items()}
