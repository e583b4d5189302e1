"""Start, watch and stop SGLang servers (policy servers and --is-embedding reward-model servers).

Each server is `python -m sglang.launch_server --model-path M --tp T --host H --port P ...` in its own process
group with its own GPUs (CUDA_VISIBLE_DEVICES); the pids, command lines and URLs go to a JSON state file that
`stop_servers` reads, so only processes this launcher started are ever signalled.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from megatron_inpo.config import ConfigError
from megatron_inpo.files import atomic_write_json

log = logging.getLogger(__name__)


@dataclass
class ServerLaunchConfig:
    model_path: str = ""
    """HF model directory served by every server."""
    num_servers: int = 1
    """Independent (data-parallel) servers; the rollout client spreads requests over them."""
    tp: int = 1
    """Tensor-parallel GPUs per server (sglang --tp)."""
    base_port: int = 30000
    """Server i listens on base_port + i."""
    host: str = "127.0.0.1"
    """Bind address; 127.0.0.1 keeps the servers private to this machine."""
    mem_fraction: float = 0.0
    """sglang --mem-fraction-static of every server; 0 keeps sglang's default. SGLang measures it against the
    memory free when the server starts, not the whole GPU: compute it with `launch/sglang_servers.py plan`
    (serving/memory_plan.py) when servers share a GPU."""
    mem_fractions: list[float] = field(default_factory=list)
    """One --mem-fraction-static per server (the plan gives a server that shares its GPU a smaller one);
    empty: mem_fraction for all."""
    deterministic: bool = False
    """Start with --enable-deterministic-inference: SGLang 0.5.23 honours a request's `sampling_seed` only then
    (sampling/sampling_batch_info.py), so seeded rollouts are reproducible only on such servers."""
    is_embedding: bool = False
    """Serve a reward model (sequence classification) for /classify."""
    gpus: list[int] = field(default_factory=list)
    """GPU ids to use, tp per server in order; empty means 0 .. num_servers*tp - 1."""
    api_key: str = ""
    """Start every server with --api-key: SGLang then refuses (HTTP 401) every call but /health and /ready without
    `Authorization: Bearer <key>` (srt/utils/auth.py); clients set rollout.api_key / judge.api_key to the same.
    `env:VAR` reads it from the environment (serving.pool.resolve_api_key); empty: no key. The key is on the
    server's command line (SGLang reads it only there), and is written as "<redacted>" into the state file."""
    extra_args: list[str] = field(default_factory=list)
    """More sglang.launch_server arguments (e.g. --enable-memory-saver, --dtype bfloat16)."""
    command: list[str] = field(default_factory=lambda: [sys.executable, "-m", "sglang.launch_server"])
    """The server program (tests substitute an API-compatible fake)."""
    log_dir: str = "sglang_logs"
    """Where each server's stdout/stderr go (server_<port>.log)."""

    def validate(self) -> None:
        if not self.model_path:
            raise ConfigError("servers.model_path: required")
        if self.num_servers < 1 or self.tp < 1:
            raise ConfigError(f"servers.num_servers/tp: must be >= 1, got {self.num_servers}/{self.tp}")
        if not 0 <= self.mem_fraction < 1:
            raise ConfigError(f"servers.mem_fraction: must be in [0, 1), got {self.mem_fraction}")
        if self.mem_fractions and len(self.mem_fractions) != self.num_servers:
            raise ConfigError(f"servers.mem_fractions: {len(self.mem_fractions)} values for {self.num_servers} servers")
        if any(not 0 < f < 1 for f in self.mem_fractions):
            raise ConfigError(f"servers.mem_fractions: each must be in (0, 1), got {self.mem_fractions}")
        if self.gpus and len(self.gpus) < self.num_servers * self.tp:
            raise ConfigError(f"servers.gpus: {len(self.gpus)} GPUs for {self.num_servers} servers x TP {self.tp}")
        if not (0 < self.base_port and self.base_port + self.num_servers <= 65536):
            raise ConfigError(f"servers.base_port: invalid {self.base_port}")


REDACTED = "<redacted>"


def redact_argv(argv: list[str]) -> list[str]:
    """argv with the value of --api-key (and --admin-api-key) replaced by REDACTED, for state files and logs."""
    out = list(argv)
    for i, a in enumerate(out):
        if a in ("--api-key", "--admin-api-key") and i + 1 < len(out):
            out[i + 1] = REDACTED
        elif a.startswith(("--api-key=", "--admin-api-key=")):
            out[i] = a.split("=", 1)[0] + "=" + REDACTED
    return out


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


HEALTH_ENV = {"SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION": "0"}
"""The environment every server gets: SGLang 0.5.23's GET /health runs a one-token generation unless this is 0
(srt/environ.py, read by http_server.py `health_generate`), and with server_memory_saver a server spends every
Megatron stage with its weights and KV cache released, where a generation crashes it. Anything that probes
/health then (a load balancer, a monitor, an operator's curl) only asks whether the process is alive."""


def start_servers(cfg: ServerLaunchConfig, state_file: str | os.PathLike, wait_timeout_s: float = 1800.0,
                  poll_s: float = 2.0) -> list[str]:
    """Start the servers, wait until every one is ready, prove once that each generates, record them in
    `state_file`; return the URLs.

    Readiness is polled without side effects (SGLangPool.health: GET /ready), then each server runs one
    generation (GET /health_generate): the only generating probe this project sends, to servers it has just
    started, before anything could release their memory. If a server exits, never becomes ready or cannot
    generate, every server started here is stopped and the error names the server and the tail of its log.
    """
    from megatron_inpo.serving.pool import SGLangError, SGLangPool, resolve_api_key

    cfg.validate()
    api_key = resolve_api_key(cfg.api_key, "servers.api_key")
    if not cfg.deterministic:
        log.warning("SGLang servers start without --enable-deterministic-inference: they ignore sampling_seed, so "
                    "seeded rollouts will not be reproducible")
    gpus = cfg.gpus or list(range(cfg.num_servers * cfg.tp))
    log_dir = Path(cfg.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    servers = []
    for i in range(cfg.num_servers):
        port = cfg.base_port + i
        if not _port_free(cfg.host, port):
            stop_servers(state_file, _servers=servers)
            raise RuntimeError(f"port {port} on {cfg.host} is already in use (choose another servers.base_port)")
        argv = cfg.command + ["--model-path", cfg.model_path, "--tp", str(cfg.tp), "--host", cfg.host,
                              "--port", str(port)]
        fraction = cfg.mem_fractions[i] if cfg.mem_fractions else cfg.mem_fraction
        if fraction:
            argv += ["--mem-fraction-static", str(fraction)]
        if cfg.is_embedding:
            argv += ["--is-embedding"]
        if cfg.deterministic:
            argv += ["--enable-deterministic-inference"]
        if api_key:
            argv += ["--api-key", api_key]
        argv += cfg.extra_args
        env = dict(os.environ, **HEALTH_ENV,
                   CUDA_VISIBLE_DEVICES=",".join(str(g) for g in gpus[i * cfg.tp:(i + 1) * cfg.tp]))
        logf = log_dir / f"server_{port}.log"
        with open(logf, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        servers.append({"pid": proc.pid, "url": f"http://{cfg.host}:{port}", "port": port, "log": str(logf),
                        "argv": redact_argv(argv), "gpus": env["CUDA_VISIBLE_DEVICES"], "_proc": proc})
        log.info("started SGLang server pid %d on %s (GPUs %s), log %s", proc.pid, servers[-1]["url"],
                 env["CUDA_VISIBLE_DEVICES"], logf)
    _write_state(state_file, servers)
    pool = SGLangPool([s["url"] for s in servers], timeout_s=10.0, max_retries=0, api_key=api_key)
    deadline = time.monotonic() + wait_timeout_s
    while True:
        for s in servers:
            rc = s["_proc"].poll()
            if rc is not None:
                stop_servers(state_file, _servers=servers)
                raise RuntimeError(f"SGLang server {s['url']} exited with code {rc}; log {s['log']}:\n"
                                   f"{_tail(Path(s['log']))}")
        ok = pool.health()
        if all(ok):
            break
        if time.monotonic() > deadline:
            bad = [s for s, h in zip(servers, ok) if not h]
            stop_servers(state_file, _servers=servers)
            raise TimeoutError(f"SGLang server(s) {[s['url'] for s in bad]} not ready after {wait_timeout_s:.0f} s;"
                               f" see {[s['log'] for s in bad]}")
        time.sleep(poll_s)
    for i, s in enumerate(servers):
        try:
            pool.health_generate(i)
        except SGLangError as e:
            stop_servers(state_file, _servers=servers)
            raise RuntimeError(f"SGLang server {s['url']} is up but cannot generate (GET /health_generate: {e}); "
                               f"log {s['log']}:\n{_tail(Path(s['log']))}") from None
    log.info("SGLang servers ready and generating: %s", ", ".join(s["url"] for s in servers))
    return [s["url"] for s in servers]


def _write_state(state_file: str | os.PathLike, servers: list[dict]) -> None:
    atomic_write_json(state_file, {"servers": [{k: v for k, v in s.items() if not k.startswith("_")}
                                               for s in servers]})


def _cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _same_program(cmdline: list[str], argv: list[str]) -> bool:
    """Whether a live process still runs the recorded argv; a script started by its #! line shows the
    interpreter in front of it (['/bin/sh', script, ...] for argv [script, ...]). The recorded argv has its API
    key redacted (redact_argv), so the live one is compared redacted too."""
    cmdline, argv = redact_argv(cmdline), redact_argv(argv)
    return cmdline == argv or (len(cmdline) > len(argv) and cmdline[-len(argv):] == argv)


def read_state(state_file: str | os.PathLike) -> list[dict]:
    path = Path(state_file)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no server state file (were servers started with it?)")
    return json.loads(path.read_text())["servers"]


def stop_servers(state_file: str | os.PathLike, timeout_s: float = 30.0, _servers: list[dict] | None = None) -> int:
    """SIGTERM each recorded server's process group, SIGKILL after timeout_s; returns how many were running.

    A pid whose command line no longer matches the recorded one (reused by another program) is left alone.
    """
    servers = _servers if _servers is not None else read_state(state_file)
    alive = []
    for s in servers:
        proc = s.get("_proc")
        if proc is not None and proc.poll() is not None:
            continue
        cmd = _cmdline(s["pid"])
        if cmd is None or (not _same_program(cmd, s["argv"]) and proc is None):
            continue
        try:
            os.killpg(s["pid"], signal.SIGTERM)
            alive.append(s)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout_s
    for s in alive:
        proc = s.get("_proc")
        while time.monotonic() < deadline:
            if proc is not None:
                if proc.poll() is not None:
                    break
            elif _cmdline(s["pid"]) is None or _is_zombie(s["pid"]):
                break
            time.sleep(0.05)
        else:
            try:
                os.killpg(s["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc is not None:
            proc.wait(timeout=5)
        log.info("stopped SGLang server pid %d (%s)", s["pid"], s["url"])
    if _servers is None:
        Path(state_file).unlink(missing_ok=True)
    return len(alive)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True
