"""Starting a Megatron stage as a process group: one process, torchrun on one node, or one torchrun agent per
node meeting at a c10d rendezvous (launch/slurm_inpo.sbatch); its log, timeout, and the reaping of what a killed
driver left running.

    StageLauncher(launch, run_dir, timeout_s, show_progress).run(name, args, ...)
    reap_orphan_stage(run_dir)      kill the leftover processes of the stage of a driver that was killed
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from megatron_inpo.faults import HOLD_ENV
from megatron_inpo.files import atomic_write_json

RUNNING_FILE = "running_stage.json"
STAGE_TOKEN_ENV = "MEGATRON_INPO_STAGE_TOKEN"


def _stage_preexec() -> None:
    os.setsid()
    try:  # Linux: the stage's leader dies with the driver
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except OSError:
        pass


def _wait(proc: subprocess.Popen, timeout: float | None, watch: Callable[[], None] | None) -> int:
    if watch is None:
        return proc.wait(timeout=timeout)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            return proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            if deadline is not None and time.monotonic() > deadline:
                raise
            watch()


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def reap_orphan_stage(run_dir: str | Path) -> str | None:
    """Kill what is left of a stage subprocess group of a driver that was killed (torchrun workers outlive their
    agent's SIGKILL); only a group whose leader still runs `megatron_inpo` is signalled. Returns its stage name."""
    path = Path(run_dir) / RUNNING_FILE
    if not path.exists():
        return None
    info = json.loads(path.read_text())
    pgid = int(info["pgid"])
    members = []
    for p in (os.listdir("/proc") if os.path.isdir("/proc") else []):
        try:
            if p.isdigit() and os.getpgid(int(p)) == pgid:
                members.append(p)
        except (ProcessLookupError, PermissionError):
            continue
    # The stage's processes carry its token in their environment, inherited by every descendant (torchrun
    # workers, dist_checkpointing's spawned helpers): a recycled process-group id never matches it.
    token = f"{STAGE_TOKEN_ENV}={info.get('token', '')}".encode()
    ours = False
    for pid in members:
        try:
            ours |= token in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            pass
    if ours:
        _killpg(pgid)
    path.unlink(missing_ok=True)
    return info.get("stage") if ours else None


class StageError(RuntimeError):
    """A stage failed; the message names the stage and its log file."""

class StageLauncher:
    """Runs `python -m megatron_inpo ARGS` as the launch config says; stdout/stderr go to <run_dir>/logs/<name>.log."""

    def __init__(self, launch: Any, run_dir: Path, timeout_s: float = 0.0, show_progress: bool = False) -> None:
        self.launch, self.run_dir, self.timeout_s, self.show_progress = launch, Path(run_dir), timeout_s, show_progress

    def command(self, args: list[str], distributed: bool = True) -> list[str]:
        p = self.launch
        if not distributed or (p.world_size == 1 and p.launcher == "auto"):
            return [sys.executable, "-m", "megatron_inpo", *args]
        if p.launcher == "auto":
            return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(p.nproc_per_node),
                    "--master-port", str(p.master_port), "-m", "megatron_inpo", *args]
        if p.launcher == "rdzv":
            # One agent per node (node_runner), all started with the same command: the c10d rendezvous hands out
            # node ranks, so nothing here is node-specific. This interpreter's torch.distributed.run rather than a
            # `torchrun` on PATH: the nodes share the file system and so the virtual environment.
            return [*shlex.split(os.path.expandvars(p.node_runner)), sys.executable, "-m", "torch.distributed.run",
                    "--nnodes", str(p.nnodes), "--nproc-per-node", str(p.nproc_per_node), "--rdzv-backend", "c10d",
                    "--rdzv-endpoint", os.path.expandvars(p.rdzv_endpoint),
                    "--rdzv-id", os.path.expandvars(p.rdzv_id), "-m", "megatron_inpo", *args]
        return [*shlex.split(os.path.expandvars(p.launcher)), "-m", "megatron_inpo", *args]

    def run(self, name: str, args: list[str], distributed: bool = True, watch: Callable[[], None] | None = None,
            hold: bool = False, progress_file: str = "") -> None:
        """Run one stage subprocess to completion; `watch` is called about twice a second while it runs (the
        fault-injection tests kill the driver from there at a chosen moment of the stage), and so is the live line
        that shows the stage's `progress_file` (engine.metrics.StageProgress) when progress is shown."""
        cmd = self.command(args, distributed)
        logs = self.run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{name.replace('/', '_')}.log"
        env = dict(os.environ)
        pkg_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("MASTER_PORT", str(self.launch.master_port))
        token = uuid.uuid4().hex
        env[STAGE_TOKEN_ENV] = token
        if hold:
            env[HOLD_ENV] = "1"
        timeout = self.timeout_s or None
        t0 = time.perf_counter()
        with open(log_path, "ab") as log:
            log.write(f"\n$ {shlex.join(cmd)}\n".encode())
            log.flush()
            # Own process group (a timeout kills the whole stage, torchrun workers included) and a parent-death
            # signal: a SIGKILLed driver must not leave a stage running that its resumed run would start again.
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_stage_preexec)
            atomic_write_json(self.run_dir / RUNNING_FILE, {"pid": proc.pid, "pgid": proc.pid, "stage": name,
                                                            "cmd": cmd, "token": token})
            line = _LiveLine(name, progress_file) if self.show_progress and progress_file else None
            try:
                rc = _wait(proc, timeout, _both(watch, line.refresh if line else None))
            except subprocess.TimeoutExpired:
                _killpg(proc.pid)
                proc.wait()
                raise StageError(f"stage {name}: exceeded stage_timeout_s={timeout}; log: {log_path}") from None
            except BaseException:
                _killpg(proc.pid)
                proc.wait()
                raise
            finally:
                (self.run_dir / RUNNING_FILE).unlink(missing_ok=True)
                if line is not None:
                    line.close()
        if rc != 0:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise StageError(f"stage {name} failed (exit {rc}) after {time.perf_counter() - t0:.1f} s; "
                             f"log: {log_path}\n--- last lines ---\n{tail}")


def _both(*fns: Callable[[], None] | None) -> Callable[[], None] | None:
    live = [f for f in fns if f is not None]
    if not live:
        return None

    def call() -> None:
        for f in live:
            f()
    return call


class _LiveLine:
    """One terminal line (tqdm) that follows a stage's progress file: step / total, loss, tokens/s and ETA."""

    def __init__(self, name: str, path: str) -> None:
        self.name, self.path, self.bar, self.seen = name, Path(path), None, None

    def refresh(self) -> None:
        try:
            info = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return  # not written yet (the stage is importing) or being replaced
        key = (info.get("stage"), info.get("done"), info.get("total"))
        if key == self.seen:
            return
        from tqdm import tqdm

        if self.bar is None or self.seen[0] != key[0]:  # a new stage phase (e.g. logprobs[ref] -> logprobs[last])
            self.close()
            self.bar = tqdm(total=info.get("total"), initial=info.get("done", 0), unit=info.get("unit", "step"),
                            desc=f"  {self.name}: {info.get('stage')}", leave=False, dynamic_ncols=True)
        else:
            self.bar.update(int(info.get("done", 0)) - self.bar.n)
        extra = {k: f"{v:.4g}" for k, v in info.items() if k in ("loss", "tokens_per_s")}
        if extra:
            self.bar.set_postfix(extra, refresh=False)
        self.bar.refresh()
        self.seen = key

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
