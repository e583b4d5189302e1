"""Fault injection for the tests of killed runs: a listener of the run's events (megatron_inpo/events.py), loaded in
every process of the run through the events hook variable (run_cli sets it up when a test asks for faults).

`MEGATRON_INPO_FAULT=point,point,...` lists event names (`<stage key>@<point>`, e.g. `iter1/rollout@batch2`,
`iter1/logprobs@release:sending`, `iter1/train@checkpoint`); each fires the first time it is reached for a run
directory (a marker in MEGATRON_INPO_FAULT_DIR, `<run_dir>/.faults`), so the same command resumed passes it:

- `<key>@<point>`: the driver dies (SIGKILL). Reached in the driver's process, it kills itself; reached in a stage's
  process (a step checkpoint saved, a log-prob chunk stored), it kills the driver, then waits for its own end (its
  parent-death signal): the kill lands exactly at the point.
- `<key>@<point>:kill-worker`: the stage's process group dies (the stage worker, or the stage subprocess) and the
  driver lives on.
- `<key>@<point>:hold`: the process waits there until something kills it (a test that kills a stage itself).
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

FAULT_ENV = "MEGATRON_INPO_FAULT"
DIR_ENV = "MEGATRON_INPO_FAULT_DIR"
HOOK = "tests.helpers.faults:hook"
STAGE_TOKEN_ENV = "MEGATRON_INPO_STAGE_TOKEN"  # driver/launcher.py's: every stage process carries it


def env_for(points: list[str] | str, run_dir: str | Path) -> dict[str, str]:
    """The environment of a run that is to fail at `points` (markers in <run_dir>/.faults)."""
    from megatron_inpo.events import HOOK_ENV

    listed = points if isinstance(points, str) else ",".join(points)
    return {FAULT_ENV: listed, DIR_ENV: str(Path(run_dir) / ".faults"), HOOK_ENV: HOOK}


def _take(point: str) -> bool:
    """True once per fault directory for a listed point (the marker is created atomically: one process fires)."""
    wanted = os.environ.get(FAULT_ENV, "").split(",")
    if point not in wanted:
        return False
    d = Path(os.environ[DIR_ENV])
    d.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(d / point.replace("/", "_"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _token(pid: int) -> bool:
    try:
        return any(v.startswith(STAGE_TOKEN_ENV.encode() + b"=")
                   for v in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
    except OSError:
        return False


def _driver_pid() -> int:
    """The driver: the nearest ancestor (or this process) that is not a stage process."""
    pid = os.getpid()
    while _token(pid):
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return pid


def _hold() -> None:
    while True:
        time.sleep(1)


def hook(name: str) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    if _take(name + ":hold"):
        _hold()
    if _take(name + ":kill-worker"):
        os.killpg(os.getpgrp(), signal.SIGKILL)
    if _take(name):
        driver = _driver_pid()
        os.kill(driver, signal.SIGKILL)
        if driver != os.getpid():
            _hold()
