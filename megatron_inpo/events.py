"""Named events at the boundaries of a run's stages: the one seam through which tests (fault injection) or a plugin
observe a run. The product only announces (`emit`); nothing it does depends on who listens, and no product
signature carries a hook.

An event is named `<stage>@<point>`. The driver names the stage (`scope`, around each stage it runs); the code that
reaches a point names the point:

    <key>@end                 the driver: a stage's outputs are complete, not yet recorded in the manifest
    <key>@batch<k>            rollout / judge: batch k is on disk
    <key>@step<k>             the torch engine's training: step k is done
    <key>@<action>:<phase>    serving/memory.py: a release / resume call sending, sent, recorded
    <key>@checkpoint          a Megatron training stage saved a step checkpoint (in the stage's own process)
    <key>@running             the log-prob pass stored a chunk (in the stage's own process)

The scope reaches the stage's processes: the stage launcher hands it to the persistent stage worker with the request
and to a stage subprocess in SCOPE_ENV, the one variable of the process it starts.

Listeners: `subscribe(fn)` in this process, and the plugin named by HOOK_ENV (`module:function`, called as
fn(name)), imported at the first event of every process of the run (stage processes inherit the variable), so
that a test can act inside a stage worker or subprocess.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from typing import Callable, Iterator

HOOK_ENV = "MEGATRON_INPO_EVENT_HOOK"
SCOPE_ENV = "MEGATRON_INPO_EVENT_SCOPE"

_listeners: list[Callable[[str], None]] = []
_scope: list[str] = []
_plugin: dict[str, Callable[[str], None] | None] = {}  # HOOK_ENV's value -> its function, imported once


def subscribe(fn: Callable[[str], None]) -> Callable[[], None]:
    """Call fn(name) at every event of this process; returns the function that unsubscribes it."""
    _listeners.append(fn)
    return lambda: _listeners.remove(fn)


@contextlib.contextmanager
def scope(stage: str) -> Iterator[None]:
    """Events emitted inside the block are `<stage>@<point>`."""
    _scope.append(stage)
    try:
        yield
    finally:
        _scope.pop()


def current_scope() -> str:
    """The innermost scope, else the one this process was started in (SCOPE_ENV), else ''."""
    return _scope[-1] if _scope else os.environ.get(SCOPE_ENV, "")


def emit(point: str) -> None:
    """Announce that `point` of the current stage was reached."""
    name = f"{current_scope()}@{point}"
    for fn in (*_listeners, *_hook()):
        fn(name)


def _hook() -> tuple[Callable[[str], None], ...]:
    ref = os.environ.get(HOOK_ENV, "")
    if not ref:
        return ()
    if ref not in _plugin:
        module, _, attr = ref.partition(":")
        _plugin[ref] = getattr(importlib.import_module(module), attr)
    fn = _plugin[ref]
    return (fn,) if fn is not None else ()
