"""Starting a Megatron stage: in the run's persistent stage worker (driver/worker.py) or as a process group of its
own: one process, torchrun on one node, or one torchrun agent per node meeting at a c10d rendezvous
(launch/slurm_inpo.sbatch); its log, timeout, and the reaping of what a killed driver left running.

    StageLauncher(launch, run_dir, timeout_s, show_progress, notify).run(name, args, ...)   one stage
    StageLauncher.close()           stop the stage worker (the driver's end)
    reap_orphan_stage(run_dir)      kill the leftover processes of the stage / worker of a driver that was killed
    master_port(configured)         the port of torch.distributed's store: a free one (0), or the configured one
                                    checked free before anything starts

Ports: the stage worker holds its torch.distributed store's port (launch.master_port) for the whole run, so a
second run on the same machine with the same port would fail with EADDRINUSE. launch.master_port 0 (the default)
picks a free port at each start of the worker or of a stage process group; a configured port is checked before
start, and a clash (checked, or hit in a stage's log) is a ConfigError naming launch.master_port (exit 2).
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from megatron_inpo import events
from megatron_inpo.files import atomic_write_json

RUNNING_FILE = "running_stage.json"
WORKER_FILE = "stage_worker.json"
STAGE_TOKEN_ENV = "MEGATRON_INPO_STAGE_TOKEN"


def die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies (PR_SET_PDEATHSIG); elsewhere nothing."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def _stage_preexec() -> None:
    os.setsid()
    die_with_parent()  # the stage's leader dies with the driver


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


def killpg(pgid: int) -> None:
    """SIGKILL a process group (a stage's, the stage worker's); one already gone is fine."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _environ(pid: int) -> list[bytes]:
    """A process's environment entries; empty when it is gone, a zombie or not ours to read."""
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return []


def environments() -> list[tuple[int, list[bytes]]]:
    """(pid, environment entries) of every other process this user can read; none where there is no /proc."""
    if not os.path.isdir("/proc"):
        return []
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]
    return [(pid, env) for pid in pids if (env := _environ(pid))]


def tagged(token: str) -> list[int]:
    """The processes that carry stage token `token` (STAGE_TOKEN_ENV, inherited by every descendant)."""
    tag = f"{STAGE_TOKEN_ENV}={token}".encode()
    return [pid for pid, env in environments() if tag in env] if token else []


def kill_tagged(token: str, wait_s: float = 5.0) -> int:
    """SIGKILL every process that carries stage token `token` and wait up to wait_s for them to go; returns how
    many were signalled. killpg alone misses torchrun's ranks: its agent starts each in a session of its own, so
    they outlive a killed agent."""
    hit = []
    for pid in tagged(token):
        try:
            os.kill(pid, signal.SIGKILL)
            hit.append(pid)
        except ProcessLookupError:
            continue
    tag = f"{STAGE_TOKEN_ENV}={token}".encode()
    deadline = time.monotonic() + wait_s
    for pid in hit:  # gone, or a zombie (its environment reads empty) waiting for its parent
        while tag in _environ(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    return len(hit)


def reap_orphan_stage(run_dir: str | Path) -> str | None:
    """Kill what is left of a stage subprocess group or of the stage worker of a driver that was killed (torchrun
    workers outlive their agent's SIGKILL); only a group whose members carry the stage's token is signalled.
    Returns the names of what was killed ("stage worker", a stage), or None."""
    killed = [name for f in (RUNNING_FILE, WORKER_FILE) if (name := _reap(Path(run_dir) / f))]
    return ", ".join(killed) or None


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def _reap(path: Path) -> str | None:
    if not path.exists():
        return None
    info = json.loads(path.read_text())
    # The stage's processes carry its token in their environment, inherited by every descendant (torchrun
    # workers, dist_checkpointing's spawned helpers): a recycled process-group id never matches it.
    pgid, token = int(info["pgid"]), info.get("token", "")
    ours = any(_pgid(pid) == pgid for pid in tagged(token))
    if ours:
        killpg(pgid)
    kill_tagged(token)  # torchrun's ranks, each in a session of its own
    path.unlink(missing_ok=True)
    return info.get("stage") if ours else None


class StageError(RuntimeError):
    """A stage failed; the message names the stage and its log file."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the kernel's pick; the store binds it a moment later)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether binding `port` fails now. SO_REUSEADDR as torch's store sets it: a port left in TIME_WAIT by a
    finished stage is free, one a listening store holds is not."""
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def master_port(configured: int) -> int:
    """launch.master_port 0: a free port; otherwise `configured`, or a ConfigError when something holds it."""
    from megatron_inpo.config import ConfigError

    if configured == 0:
        return free_port()
    if port_in_use(configured):
        raise ConfigError(f"launch.master_port: port {configured} is in use on this machine (another run's stage "
                          "worker or torchrun?); set --launch.master_port=0 to pick a free port, or another port")
    return configured


ADDRESS_IN_USE = ("EADDRINUSE", "Address already in use", "address already in use")


def port_clash(log_path: Path, port: int) -> Exception | None:
    """The ConfigError for a stage whose log shows its store's port taken (another process bound it between the
    check and the start), else None."""
    from megatron_inpo.config import ConfigError

    try:
        tail = log_path.read_text(errors="replace")[-3000:]
    except OSError:
        return None
    if not any(m in tail for m in ADDRESS_IN_USE):
        return None
    return ConfigError(f"launch.master_port: port {port} was taken by another process as the stage started "
                       f"(EADDRINUSE; log: {log_path}); set --launch.master_port=0 to pick a free port, or another "
                       "port")

@dataclass(frozen=True)
class StageCall:
    """One stage as a runner gets it: the typed call the stage worker makes (engine/entry.py: `kind` and its config
    object, handed over as they are) and the same stage as a command line (`argv` of `python -m megatron_inpo`) for
    a stage subprocess."""

    kind: str
    config: Any
    argv: list[str]


class StageLauncher:
    """Runs `python -m megatron_inpo ARGS` as the launch config says, in the stage worker (launch.stage_runner
    'persistent') or as a subprocess; stdout/stderr go to <run_dir>/logs/<name>.log either way. `notify` gets the
    driver's lines about the worker (the memory it holds after each stage, a restart)."""

    def __init__(self, launch: Any, run_dir: Path, timeout_s: float = 0.0, show_progress: bool = False,
                 notify: Callable[[str], None] | None = None) -> None:
        self.launch, self.run_dir, self.timeout_s, self.show_progress = launch, Path(run_dir), timeout_s, show_progress
        self.notify = notify or (lambda line: None)
        self.runner = ""  # resolved at the first stage (auto asks torch about CUDA)
        self.worker: Any = None  # driver.worker.StageWorker, started at the first stage it runs
        self._proc: subprocess.Popen | None = None  # the running stage subprocess
        self._worker_token = ""
        self.worker_port = 0  # the stage worker's master port (master_port()), held while it runs

    def command(self, args: list[str], distributed: bool = True, port: int = 0) -> list[str]:
        """The launch command of `python -m megatron_inpo ARGS`; `port`: torchrun's master port (0: the
        configured one)."""
        p = self.launch
        if not distributed or (p.world_size == 1 and p.launcher == "auto"):
            return [sys.executable, "-m", "megatron_inpo", *args]
        if p.launcher == "auto":
            return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(p.nproc_per_node),
                    "--master-port", str(port or p.master_port), "-m", "megatron_inpo", *args]
        if p.launcher == "rdzv":
            # One agent per node (node_runner), all started with the same command: the c10d rendezvous hands out
            # node ranks, so nothing here is node-specific. This interpreter's torch.distributed.run rather than a
            # `torchrun` on PATH: the nodes share the file system and so the virtual environment.
            return [*shlex.split(os.path.expandvars(p.node_runner)), sys.executable, "-m", "torch.distributed.run",
                    "--nnodes", str(p.nnodes), "--nproc-per-node", str(p.nproc_per_node), "--rdzv-backend", "c10d",
                    "--rdzv-endpoint", os.path.expandvars(p.rdzv_endpoint),
                    "--rdzv-id", os.path.expandvars(p.rdzv_id), "-m", "megatron_inpo", *args]
        return [*shlex.split(os.path.expandvars(p.launcher)), "-m", "megatron_inpo", *args]

    def in_worker(self, distributed: bool) -> bool:
        """Whether a stage runs in the worker: with the persistent runner, every distributed stage, and the
        one-process ones (convert) when the worker is one process too; else they keep a subprocess of their own."""
        if not self.runner:
            self.runner = self.launch.resolved_stage_runner()
        return self.runner == "persistent" and (distributed or self.launch.world_size == 1)

    def _env(self, token: str, port: bool | int = True, scoped: bool = True) -> dict[str, str]:
        """The stage's environment; `port`: False for none (an in-process store), True for launch.master_port, or
        the port number picked for it; `scoped`: the driver's running stage names the stage's events
        (events.SCOPE_ENV)."""
        env = dict(os.environ)
        pkg_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        number = self.launch.master_port if port is True else int(port)
        if port and number:
            env.setdefault("MASTER_PORT", str(number))
        else:
            env.pop("MASTER_PORT", None)
        env[STAGE_TOKEN_ENV] = token
        env.pop(events.SCOPE_ENV, None)
        if scoped and events.current_scope():
            env[events.SCOPE_ENV] = events.current_scope()
        return env

    def run(self, name: str, call: StageCall | list[str], distributed: bool = True, progress_file: str = "") -> None:
        """Run one stage to completion: `call`, or a plain argv (a command that only runs as a subprocess). With
        progress shown, a live line follows the stage's `progress_file` (engine.metrics.StageProgress)."""
        logs = self.run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{name.replace('/', '_')}.log"
        line = _LiveLine(name, progress_file) if self.show_progress and progress_file else None
        watch = line.refresh if line else None
        try:
            if self.in_worker(distributed):
                if not isinstance(call, StageCall):
                    raise TypeError(f"stage {name}: the stage worker runs typed calls (StageCall), not {call!r}")
                self._run_in_worker(name, call, log_path, watch)
            else:
                args = call.argv if isinstance(call, StageCall) else call
                # a one-process stage beside a torchrun worker: an in-process store, not the worker's master port
                port: bool | int = distributed or self.runner != "persistent"
                if port and self._uses_master_port():
                    port = master_port(self.launch.master_port)  # checked (or picked) before anything starts
                self._run_subprocess(name, self.command(args, distributed, 0 if port is True else int(port)), log_path,
                                     watch, port)
        finally:
            if line is not None:
                line.close()

    def _uses_master_port(self) -> bool:
        """Whether this machine's store binds launch.master_port: not with a rendezvous launcher (its endpoint
        is its own), nor when the environment's MASTER_PORT already says which port one process uses."""
        p = self.launch
        if p.launcher == "rdzv":
            return False
        return not (p.world_size == 1 and os.environ.get("MASTER_PORT"))

    def close(self, grace_s: float = 30.0) -> None:
        """Stop the stage worker, if one runs: every rank exits (within grace_s, else it is killed; 0: at once), and
        what is left of its group is killed."""
        if self.worker is not None:
            self.worker.stop(grace_s)
            self.worker = None
            (self.run_dir / WORKER_FILE).unlink(missing_ok=True)

    # -- one process group per stage ----------------------------------------------------------------------------
    def _run_subprocess(self, name: str, cmd: list[str], log_path: Path, watch: Callable[[], None] | None,
                        port: bool | int = True) -> None:
        token = uuid.uuid4().hex
        env = self._env(token, port)
        timeout = self.timeout_s or None
        t0 = time.perf_counter()
        with open(log_path, "ab") as log:
            log.write(f"\n$ {shlex.join(cmd)}\n".encode())
            log.flush()
            # Own process group (a timeout kills the whole stage, torchrun workers included) and a parent-death
            # signal: a SIGKILLed driver must not leave a stage running that its resumed run would start again.
            proc = self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                 preexec_fn=_stage_preexec)
            atomic_write_json(self.run_dir / RUNNING_FILE, {"pid": proc.pid, "pgid": proc.pid, "stage": name,
                                                            "cmd": cmd, "token": token})
            try:
                rc = _wait(proc, timeout, watch)
            except subprocess.TimeoutExpired:
                killpg(proc.pid)
                kill_tagged(token)
                proc.wait()
                raise StageError(f"stage {name}: exceeded stage_timeout_s={timeout}; log: {log_path}") from None
            except BaseException:  # Ctrl-C, SIGTERM, a driver error: the stage, its agent and ranks must not run on
                killpg(proc.pid)
                kill_tagged(token)
                proc.wait()
                raise
            finally:
                self._proc = None
                (self.run_dir / RUNNING_FILE).unlink(missing_ok=True)
        if rc != 0:
            clash = port is not True and port and port_clash(log_path, int(port))
            raise clash or _failed(name, f"exit {rc}", t0, log_path)

    # -- the persistent stage worker ----------------------------------------------------------------------------
    def _start_worker(self) -> None:
        from megatron_inpo.driver.worker import StageWorker

        token = uuid.uuid4().hex
        # the worker's world holds this port until the run ends: pick a free one (0) or check the configured one
        self.worker_port = master_port(self.launch.master_port) if self._uses_master_port() else 0
        directory = self.run_dir / "worker"
        cmd = self.command(["stage-worker", "--dir", str(directory)], distributed=True, port=self.worker_port)
        self.worker = StageWorker(cmd, directory, self.run_dir / "logs" / "stage_worker.log", self.launch.world_size,
                                  self._env(token, self.worker_port or True, scoped=False), _stage_preexec)
        self.worker.start()
        # The worker outlives stages, so its record is its own file (a one-process stage may run beside it).
        atomic_write_json(self.run_dir / WORKER_FILE, {"pid": self.worker.pid, "pgid": self.worker.pid,
                                                        "stage": "stage worker", "cmd": cmd, "token": token})
        self._worker_token = token

    def _run_in_worker(self, name: str, call: StageCall, log_path: Path, watch: Callable[[], None] | None) -> None:
        from megatron_inpo.driver.worker import WorkerDied, describe

        t0 = time.perf_counter()
        deadline = time.monotonic() + self.timeout_s if self.timeout_s else None
        for attempt in (1, 2):
            if self.worker is None or not self.worker.alive():
                self.close(0)
                self._start_worker()
            n = self.worker.submit(name, call.kind, call.config, log_path,
                                   self._env(self._worker_token, self.worker_port or True))
            try:
                markers = self._wait_worker(n, deadline, watch)
            except WorkerDied as e:
                self.close(0)
                clash = self.worker_port and (port_clash(self.run_dir / "logs" / "stage_worker.log", self.worker_port)
                                              or port_clash(log_path, self.worker_port))
                if clash:
                    raise clash from None
                if attempt == 2:
                    raise _failed(name, f"{e}, twice", t0, log_path) from None
                self.notify(f"  {name}: {e}; starting a new stage worker and sending the stage again (it resumes "
                            "from its own progress)")
                continue
            except subprocess.TimeoutExpired:
                self.close(0)
                raise StageError(f"stage {name}: exceeded stage_timeout_s={self.timeout_s}; log: {log_path}") from None
            except BaseException:  # Ctrl-C, a driver error: the stage must not run on
                self.close(0)
                raise
            if markers[0]["rc"] != 0:  # the failing rank's: the worker is going down; the next stage starts anew
                self.close()
                clash = self.worker_port and port_clash(log_path, self.worker_port)
                if clash:
                    raise clash
                raise _failed(name, f"exit {markers[0]['rc']}", t0, log_path)
            self.notify(f"  {name}: the stage worker holds {describe(markers)} afterwards")
            return

    def _wait_worker(self, n: int, deadline: float | None, watch: Callable[[], None] | None) -> list[dict]:
        while True:
            markers = self.worker.poll(n)
            if markers is not None:
                return markers
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"request {n}", self.timeout_s)
            if watch is not None:
                watch()
            time.sleep(0.1)


def _failed(name: str, how: str, t0: float, log_path: Path) -> StageError:
    tail = log_path.read_text(errors="replace")[-3000:]
    return StageError(f"stage {name} failed ({how}) after {time.perf_counter() - t0:.1f} s; log: {log_path}\n"
                      f"--- last lines ---\n{tail}")


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
