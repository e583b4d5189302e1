"""Fault injection for the tests of killed runs (the driver kills itself at named points of a stage).

`MEGATRON_INPO_FAULT=point,point,...` makes the driver SIGKILL itself the first time it reaches each listed point
of a run directory (`fault_point`); a stage's points are named `<stage key>@<point>` (`StageFault`), e.g.
`iter1/rollout@batch2` or `iter1/logprobs@release:sending`.

A point named `<stage key>@<point>:kill-worker` (e.g. `iter1/train@checkpoint:kill-worker`) makes the driver
SIGKILL the stage's process group instead of itself (`StageFault.take`): the persistent stage worker (or the
stage subprocess) dies mid-stage while the driver lives on.

A stage subprocess that the driver is about to kill at a point it watches for (a step checkpoint written, a
log-prob chunk stored) is started with HOLD_ENV set: it then waits at that point instead of racing on, so the
kill lands where the test says, not wherever the driver's polling happens to see it.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable

FAULT_ENV = "MEGATRON_INPO_FAULT"
HOLD_ENV = "MEGATRON_INPO_HOLD_AT_PROGRESS"
KILL_STAGE = ":kill-worker"
"""Suffix of a point at which the driver kills the stage's process group (the stage worker) instead of itself."""


def _marker(run_dir: str | Path, point: str) -> Path:
    return Path(run_dir) / ".faults" / point.replace("/", "_")


def fault_point(run_dir: str | Path, point: str) -> None:
    """Tests of killed runs: SIGKILL this process at `point` when MEGATRON_INPO_FAULT lists it (each point fires
    once per run directory, so the same command resumed passes it)."""
    if take_fault(run_dir, point):
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def fault_pending(run_dir: str | Path, point: str) -> bool:
    """Whether `point` is listed in MEGATRON_INPO_FAULT and has not fired yet for this run directory."""
    wanted = os.environ.get(FAULT_ENV, "")
    return bool(wanted) and point in wanted.split(",") and not _marker(run_dir, point).exists()


def take_fault(run_dir: str | Path, point: str) -> bool:
    """True once for a listed `point` (marked fired here): the caller acts on it (kills itself or the stage
    worker)."""
    if not fault_pending(run_dir, point):
        return False
    marker = _marker(run_dir, point)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("fired\n")
    return True


class StageFault:
    """The fault points of one driver stage (`key@point`); callable like fault_point, and able to say which are
    still pending, so a stage subprocess can be asked to hold where the kill is due (HOLD_ENV)."""

    def __init__(self, run_dir: str | Path, key: str) -> None:
        self.run_dir, self.key = run_dir, key

    def __call__(self, point: str) -> None:
        fault_point(self.run_dir, f"{self.key}@{point}")

    def pending(self, point: str) -> bool:
        return fault_pending(self.run_dir, f"{self.key}@{point}")

    def take(self, point: str) -> bool:
        return take_fault(self.run_dir, f"{self.key}@{point}")


def pending(fault: Callable[[str], None], point: str) -> bool:
    """Whether the kill at `point` of this stage's fault hook is still due (False for a hook that cannot say)."""
    is_pending = getattr(fault, "pending", None)
    return bool(is_pending and is_pending(point))


def take(fault: Callable[[str], None], point: str) -> bool:
    """Whether the driver should act on `point` of this stage's fault hook now (once; False for a plain hook)."""
    take_ = getattr(fault, "take", None)
    return bool(take_ and take_(point))


def no_fault(point: str) -> None:
    """The fault hook of code run outside the driver: no point ever fires."""


def hold_if_requested() -> None:
    """Block forever (until the driver's kill) when this stage was started with HOLD_ENV; a no-op otherwise."""
    if os.environ.get(HOLD_ENV) != "1":
        return
    while True:
        time.sleep(3600)
