"""The run manifest: which stage of which iteration is complete, written atomically after each stage.

`<run_dir>/manifest.json`::

    {"format_version": 1, "config_sha256": "...", "identity_sha256": "...", "run_dir": "/abs/run_dir",
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

The identity of a run is its resolved config less the fields that only say *where* things are or *how long to
wait*, which cannot change any result (RESUME_MUTABLE): run_dir, stage_timeout_s, server_memory_saver, the launch
ports / rendezvous address / node runner / stage runner, and the transport of the SGLang clients (serving.pool.TRANSPORT_FIELDS
of rollout, judge and eval.judge: server_urls, api_key, timeouts, retries, back-off, concurrency). Everything else is part of
it, including input paths (prompts, model.hf_path: the files there may differ) and batch sizes (numerics may).
Its sha256 is recorded in the manifest ("identity_sha256"), so a run whose config.yaml was deleted still refuses a
different config (without the YAML the fields cannot be listed; the message says so); a matching config restores
the YAML. Manifests written before the identity existed hold only "config_sha256", the digest of the whole config
(run_dir included), which is compared instead when their config.yaml is missing.

A moved run directory resumes: the manifest records where the run was ("run_dir") and rebases the absolute paths
of the stage outputs it recorded there onto the new location (also those a stage finished on disk before the move
reports afterwards: the former locations are kept in "moved_from").
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterable

import yaml

from megatron_inpo import identity as _identity
from megatron_inpo.config import ConfigError, load_yaml, save_yaml, to_dict
from megatron_inpo.driver.config import RunConfig
from megatron_inpo.files import atomic_write_json
from megatron_inpo.identity import different_config  # noqa: F401 - re-exported
from megatron_inpo.serving.pool import TRANSPORT_FIELDS

FORMAT_VERSION = 1
# Fields (dotted; a name covers everything below it) that may change between a run and its resumption: they say
# where the run and its servers are, or how long to wait, and do not change any result.
RESUME_MUTABLE = frozenset({"run_dir", "stage_timeout_s", "server_memory_saver", "launch.master_port",
                            "launch.rdzv_endpoint", "launch.rdzv_id", "launch.node_runner",
                            "launch.stage_runner"} |
                           {f"{section}.{f}" for section in ("rollout", "judge", "eval.judge")
                            for f in TRANSPORT_FIELDS})


# Run fields renamed since manifests were first written (old name -> new name; YAML refuses the old names). A
# run's identity keeps the old names, so a run directory started before a rename has the same identity digest and
# resumes; a saved config.yaml is read with the new names.
RENAMED_FIELDS = RunConfig.RENAMED


def _old_names(d: dict) -> dict:
    back = {new: old for old, new in RENAMED_FIELDS.items()}
    return {back.get(k, k): v for k, v in d.items()}


def _new_names(d: dict) -> dict:
    return {RENAMED_FIELDS.get(k, k): v for k, v in d.items()}


def identity(cfg: Any, mutable: Iterable[str] = RESUME_MUTABLE) -> dict[str, Any]:
    """identity.identity with the run's mutable fields by default (and renamed fields under their first names)."""
    return _identity.identity(_old_names(to_dict(cfg)), mutable)


def identity_digest(cfg: Any, mutable: Iterable[str] = RESUME_MUTABLE) -> str:
    """identity.identity_digest with the run's mutable fields by default (renamed fields under their first names,
    so the digest of a run started before a rename is unchanged)."""
    return _identity.identity_digest(_old_names(to_dict(cfg)), mutable)


def config_digest(cfg: Any) -> str:
    """identity.config_digest under the fields' first names (what manifests before the identity recorded)."""
    return _identity.config_digest(_old_names(to_dict(cfg)))


def config_diff(old: dict, new: dict, mutable: Iterable[str] = RESUME_MUTABLE) -> list[str]:
    """identity.config_diff with the run's mutable fields by default; both sides read under the new names."""
    return _identity.config_diff(_new_names(old), _new_names(new), mutable)


def _rebase(value: Any, old: str, new: str) -> Any:
    """`value` with every string that is `old` or a path below it moved to `new` (lists and dicts walked)."""
    if isinstance(value, str):
        if value == old:
            return new
        if value.startswith(old.rstrip("/") + "/"):
            return new.rstrip("/") + "/" + value[len(old.rstrip("/")) + 1:]
        return value
    if isinstance(value, list):
        return [_rebase(v, old, new) for v in value]
    if isinstance(value, dict):
        return {k: _rebase(v, old, new) for k, v in value.items()}
    return value


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
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ConfigError(f"{self.path}: corrupt manifest ({getattr(e, 'msg', None) or e.reason}); it is "
                                  "written atomically, so this file was edited by hand or by another program") from None
            if not isinstance(self.data, dict) or not isinstance(self.data.get("stages"), dict):
                raise ConfigError(f"{self.path}: corrupt manifest (not a manifest object); it is written atomically, "
                                  "so this file was edited by hand or by another program")
            if self.data.get("format_version") != FORMAT_VERSION:
                raise ConfigError(f"{self.path}: manifest format {self.data.get('format_version')} is not "
                                  f"{FORMAT_VERSION}")

    @classmethod
    def open(cls, run_dir: str | Path, cfg: Any) -> "Manifest":
        """Open (or start) the run in run_dir for `cfg`: saves config.yaml, or refuses a different config.

        The config is compared with config.yaml (the differing fields are listed) and with the identity digest the
        manifest recorded (which still refuses a different config when config.yaml was deleted); a moved run
        directory has its recorded stage outputs rebased (see the module docstring)."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        saved = run_dir / "config.yaml"
        m = cls(run_dir)
        new = to_dict(cfg)
        digest = identity_digest(cfg)
        advice = "resume it with the same command or use a new run_dir"
        if saved.exists():
            try:
                old = load_yaml(saved.read_text(encoding="utf-8")) or {}
            except (yaml.YAMLError, UnicodeDecodeError) as e:
                raise ConfigError(f"{saved}: not a readable YAML config ({type(e).__name__}); restore it or use a "
                                  "new run_dir") from None
            if not isinstance(old, dict):
                raise ConfigError(f"{saved}: not a config mapping; restore it or use a new run_dir")
            diff = config_diff(old, new)
            if diff:
                raise different_config(str(run_dir), str(saved), diff, advice)
        recorded, digest_now = m.data.get("identity_sha256"), digest
        if recorded is None and not saved.exists() and m.data.get("config_sha256") is not None:
            # a manifest from before the identity, without its YAML: the digest of the whole config is all there is
            recorded, digest_now = m.data["config_sha256"], config_digest(cfg)
        if recorded is not None and recorded != digest_now:
            what = ("its config.yaml was edited after the run started" if saved.exists()
                    else f"{saved} is missing, so the differing fields cannot be listed")
            raise ConfigError(f"{run_dir} holds a run of a different config (the manifest records config identity "
                              f"sha256 {recorded[:12]}..., this config is {digest_now[:12]}...; {what}); {advice}")
        old_dir = m.data.get("run_dir")
        here = str(run_dir.resolve())
        if old_dir and old_dir != here:  # moved: the recorded outputs live under the new location now
            moved_from = [d for d in m.data.get("moved_from", []) if d != here] + [old_dir]
            m.data["moved_from"] = moved_from
            m.data["stages"] = _rebase(m.data["stages"], old_dir, here)
        m.data["run_dir"] = here
        save_yaml(cfg, saved)  # the same identity; location fields (run_dir, ...) as they are now
        m.data["config_sha256"] = config_digest(cfg)
        m.data["identity_sha256"] = digest
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
        for old in self.data.get("moved_from", []):  # a stage done on disk before the move reports old paths
            outputs = _rebase(outputs, old, str(self.run_dir.resolve()))
        self.data["stages"][key] = {"outputs": outputs, "seconds": round(seconds, 3),
                                    "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                    "attempts": self.attempts(key)}
        self._write()

    def set_trainer(self, trainer: str) -> None:
        """Record the trainer of the run (auto is resolved once, at the first start)."""
        if self.data.get("trainer") not in (None, trainer):
            raise ConfigError(f"{self.path}: run started with trainer {self.data['trainer']!r}, not {trainer!r}")
        self.data["trainer"] = trainer
        self._write()

    def stage_seconds(self) -> dict[str, float]:
        return {k: v["seconds"] for k, v in self.data["stages"].items()}
