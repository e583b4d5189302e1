"""GPU sharing with SGLang servers (server_memory_saver): release their memory before a Megatron stage, resume it
before rollout / judging, each call sent once and each server's state recorded in the run directory.

`<run_dir>/server_memory.json` (ServerMemoryRecord) records whether each SGLang server released its GPU memory,
so a restarted driver neither resumes memory that was not released nor releases twice.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterable

from megatron_inpo.config import ConfigError
from megatron_inpo.events import emit
from megatron_inpo.files import atomic_write_json
from megatron_inpo.serving.pool import SGLangError, SGLangPool

FORMAT_VERSION = 1
MEMORY_FILE = "server_memory.json"
MEMORY_STABLE = {"release": "released", "resume": "resumed"}
"""The state a server is in once the call of that name took effect."""
MEMORY_IN_FLIGHT = {"release": "releasing", "resume": "resuming"}
"""Recorded just before the call is sent: found on a restart, the call may or may not have taken effect."""


class ServerMemoryRecord:
    """Whether each SGLang server of the run holds or has released its GPU memory, in `<run_dir>/server_memory.json`
    (next to manifest.json, written atomically at every change)::

        {"format_version": 1,
         "servers": {"http://127.0.0.1:30000": {"state": "released", "tags": ["weights", "kv_cache"],
                                                 "startup_time": "{\"cuda_graph\": ..., \"load_weight\": 41.7, ...}"}}}

    The record outlives the driver process because the calls are not idempotent: SGLang exits on a resume of memory
    that was not released, and a second release pauses the regions twice. `startup_time` (GET /server_info) tells
    a restarted server (which holds its memory again) from the one the state was recorded for.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / MEMORY_FILE
        self.servers: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{self.path}: corrupt record of the servers' memory ({e.msg}); it is written "
                                  "atomically, so it was edited by hand or by another program") from None
            if data.get("format_version") != FORMAT_VERSION:
                raise ConfigError(f"{self.path}: format {data.get('format_version')} is not {FORMAT_VERSION}")
            self.servers = data.get("servers", {})

    def get(self, url: str) -> dict[str, Any] | None:
        return self.servers.get(url)

    def set(self, url: str, state: str, tags: list[str], startup_time: str | None) -> None:
        self.servers[url] = {"state": state, "tags": list(tags), "startup_time": startup_time,
                             "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        atomic_write_json(self.path, {"format_version": FORMAT_VERSION, "servers": self.servers})


class MemoryServers(dict):
    """{server URL: memory tags}, with `api_keys` {server URL: the api_key setting of the config naming it (a key,
    env:VAR or "")}: servers started with --api-key refuse the release / resume (and /server_info) without it."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.api_keys: dict[str, str] = {}


def memory_servers(rollout: Any, judges: Iterable[Any]) -> MemoryServers:
    """{server URL: memory tags} of a run: weights + KV cache of the policy servers (`rollout`, a RolloutConfig),
    the KV cache only of the judge servers (JudgeConfigs or None; their weights never change). A server listed
    twice gets the union, released once. Its `api_keys` holds each server's client api_key."""
    out = MemoryServers()
    groups = []
    if rollout.backend == "sglang":
        groups.append((rollout.server_urls, ["weights", "kv_cache"], getattr(rollout, "api_key", "")))
    for jc in judges:
        if jc is not None and jc.kind in ("pairwise", "reward") and jc.backend == "sglang":
            groups.append((jc.server_urls, ["kv_cache"], getattr(jc, "api_key", "")))
    for urls, tags, key in groups:
        for u in urls:
            have = out.setdefault(u.rstrip("/"), [])
            have += [t for t in tags if t not in have]
            if key and not out.api_keys.get(u.rstrip("/")):
                out.api_keys[u.rstrip("/")] = key
    return out


class ServerMemory:
    """Release / resume the GPU memory of `servers` ({URL: memory tags}, memory_servers) for the run in `run_dir`.

    Each call announces the events `<action>:sending`, `<action>:sent` and `<action>:recorded` of the running
    stage (megatron_inpo/events.py; the tests kill the driver there). With enabled=False (the saver
    switched off on resumption) release does nothing and resume gives back only memory this run released.
    `api_keys` ({URL: key or env:VAR}; default: `servers.api_keys` when memory_servers made it) authenticates
    the calls to servers started with --api-key.
    """

    def __init__(self, run_dir: str | Path, servers: dict[str, list[str]],
                 enabled: bool = True,
                 api_keys: dict[str, str] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.servers = servers
        self.enabled = enabled
        self.api_keys = dict(getattr(servers, "api_keys", {}) if api_keys is None else api_keys)

    def release(self) -> None:
        """Before a Megatron stage: each server frees its memory (once, whatever happened to an earlier driver)."""
        self._switch("release")

    def resume(self) -> None:
        """Before rollout / judging: each server released by this run gets its memory back."""
        self._switch("resume")

    def _switch(self, action: str) -> None:
        """Neither call is idempotent (SGLang exits on a resume of memory that was not released; a second release
        pauses twice), so each server's state is recorded in the run directory (ServerMemoryRecord) around the
        call, which is sent once (no retry; a connection error surfaces):
          1. record '<action>ing' (in flight), 2. send, 3. record 'released' / 'resumed'.
        A driver killed before 1 or after 3 resumes knowing the state. Killed between 1 and 3, it cannot know
        whether the server acted: SGLang 0.5.23 has no endpoint reporting released memory (its offload tags stay
        inside the scheduler), and both guesses can break the server. The rerun therefore stops and asks for a
        restart of that server: a fresh server holds its memory, and its new startup_time in /server_info
        (recorded with each state) tells the driver that the record no longer applies. A 4xx answer is certain
        (refused, nothing done): the previous state is restored. Fault points `<action>:sending` (after 1),
        `:sent` (after 2) and `:recorded` (after the last server) let the tests kill the driver there.
        """
        if not self.enabled:
            # server_memory_saver may be switched off on resumption (RESUME_MUTABLE): servers this run released
            # must still get their memory back before they generate
            if action != "resume" or not (self.run_dir / MEMORY_FILE).exists():
                return
        if not self.servers:
            return
        record = ServerMemoryRecord(self.run_dir)
        target, in_flight = MEMORY_STABLE[action], MEMORY_IN_FLIGHT[action]
        other = MEMORY_STABLE["resume" if action == "release" else "release"]
        pool = SGLangPool(list(self.servers), timeout_s=600.0, max_retries=0, backoff_s=0.25, backoff_max_s=1.0,
                          api_key=self.api_keys)
        for i, (url, tags) in enumerate(self.servers.items()):
            started = server_startup_time(pool, i, url)
            rec = record.get(url)
            if rec is None or (started is not None and rec.get("startup_time") != started):
                state = "resumed"  # never touched by this run, or restarted since: a fresh server holds its memory
                record.set(url, state, tags, started)
            else:
                state = rec["state"]
            if state == target:
                continue
            if state != other:
                raise RuntimeError(
                    f"{url}: this run was stopped during the {'release' if state == 'releasing' else 'resume'} of "
                    f"its memory (/..._memory_occupation; recorded "
                    f"{rec['state']!r} in {record.path} at {rec.get('since')}), so whether the server acted on it is "
                    "unknown, and SGLang has no endpoint that says. Sending the call again could release twice, "
                    "skipping it could later resume memory that was never released (the server then exits). "
                    "Restart that SGLang server (a fresh one holds its memory; the driver tells it by the new "
                    "startup_time of /server_info) and rerun the same command.")
            record.set(url, in_flight, tags, started)
            emit(f"{action}:sending")
            try:
                pool.request(f"/{action}_memory_occupation", {"tags": tags}, server=i, parse_json=False,
                             max_retries=0)
            except SGLangError as e:
                if e.status is not None and 400 <= e.status < 500:  # refused before acting: nothing changed
                    record.set(url, state, tags, started)
                raise SGLangError(f"/{action}_memory_occupation on {url} failed; the server's memory state is "
                                  f"recorded in {record.path}: {e}", status=e.status) from None
            emit(f"{action}:sent")
            record.set(url, target, tags, started)
        emit(f"{action}:recorded")


def server_startup_time(pool: SGLangPool, i: int, url: str) -> str | None:
    """A fingerprint of the server process (GET /server_info, idempotent and retried); None where not reported.

    SGLang 0.5.23's `startup_time` is a dict of that process's measured start-up durations (weight load, KV
    allocation, scheduler start; observability/startup_time.py), not a clock time: a restarted server measures
    new ones, so its canonical JSON tells a new process from the one a memory state was recorded for.
    """
    try:
        info = pool.server_info(i, max_retries=2, timeout_s=30.0)
    except SGLangError as e:
        if e.status is None:
            raise
        return None  # an older server without /server_info: the record alone decides
    if isinstance(info, dict) and info.get("enable_memory_saver") is False:
        # without it a release frees nothing, and training would run out of GPU memory next to the server
        raise ConfigError(f"server_memory_saver: {url} was started without --enable-memory-saver "
                          "(/server_info); restart it with that flag or run without server_memory_saver")
    t = info.get("startup_time") if isinstance(info, dict) else None
    if t is None or isinstance(t, bool):
        return None
    return json.dumps(t, sort_keys=True)
