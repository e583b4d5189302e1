"""Fault injection for the tests of killed runs (the driver kills itself at named points of a stage).

A stage subprocess that the driver is about to kill at a point it watches for (a step checkpoint written, a
log-prob chunk stored) is started with HOLD_ENV set: it then waits at that point instead of racing on, so the
kill lands where the test says, not wherever the driver's polling happens to see it.
"""
from __future__ import annotations

import os
import time

HOLD_ENV = "MEGATRON_INPO_HOLD_AT_PROGRESS"


def hold_if_requested() -> None:
    """Block forever (until the driver's kill) when this stage was started with HOLD_ENV; a no-op otherwise."""
    if os.environ.get(HOLD_ENV) != "1":
        return
    while True:
        time.sleep(3600)
