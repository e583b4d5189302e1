"""The persistent stage worker (`launch.stage_runner: persistent`): one process group per run that runs the
Megatron stages in turn, so torch, Megatron-Core and the torch.distributed world are set up once, not per stage.

    driver                                          worker (every rank: `python -m megatron_inpo stage-worker`)
    StageWorker.start()   -- the launch command of a stage (one process, torchrun, rdzv agents) -->  serve(dir)
    StageWorker.submit()  -- <dir>/request_N.json (atomic) -->  engine.entry.run_stage(kind, config), in-process
    StageWorker.poll()    <-- <dir>/done_N.rank_R.json       (rc, seconds, memory held afterwards)
    StageWorker.stop()    -- a stop request; then the group is killed

The requests are files in a directory of the run, so ranks on several nodes read them from the shared file
system as the stages read their configs. Each rank answers for itself; the driver waits for every rank's marker.
While a request runs, the rank's stdout / stderr are its stage's log file (dup2) and its environment is the one a
stage subprocess would get (the fault tests' hold flag included). Around each request the rank restores what a
fresh process would start with (torch's RNG, deterministic flags, environment, working directory, ...); after it
the stage's Megatron groups, global buffers and every model / optimizer are dropped (gc, and the CUDA cache on
GPUs), and the memory still held is written to the log and the marker. The world stays (run_stage's
`keep_world`).

A request is a typed call: the stage's kind and its config object in dict form (config.to_dict), rebuilt and
checked here (engine/entry.stage_config) and run by the engine's entry point, the one the CLI commands call; no
argv, no YAML, no CLI inside the worker. A stage's bad input is its one line in the log (errors.explain) and its
exit code (errors.InputError.exit_code); a bug its traceback and 1.

A stage that fails (nonzero exit, an exception) takes the worker down: the rank exits after its marker (torchrun
ends the others) and the driver starts a new worker for the next stage. A worker that dies without a marker
(SIGKILL, OOM killer) is restarted once and sent the same request, which resumes from the stage's own progress
(step checkpoints, log-prob chunks, atomic outputs). Nothing outlives the driver: the worker's leader has the
driver's parent-death signal and every rank that of its agent, its process group carries the run's stage token,
and `launcher.reap_orphan_stage` reaps a leftover group at the next start (launcher.WORKER_FILE).
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

POLL_S = 0.05


def request_path(d: Path, n: int) -> Path:
    return d / f"request_{n:05d}.json"


def done_path(d: Path, n: int, rank: int) -> Path:
    return d / f"done_{n:05d}.rank_{rank}.json"


# ---------------------------------------------------------------------------------------------------------------
# Driver side


class WorkerDied(RuntimeError):
    """The worker exited without every rank reporting the request (killed, crashed)."""


class StageWorker:
    """The driver's handle on one worker process group: `start` once, `submit` + `poll` per stage, `stop` at the
    end (launcher.StageLauncher drives it)."""

    def __init__(self, command: list[str], directory: Path, log_path: Path, world_size: int, env: dict[str, str],
                 preexec: Callable[[], None]) -> None:
        """`command`: the launch command of `stage-worker --dir directory`; `env`: the worker's environment."""
        self.command, self.dir, self.log_path, self.world_size = command, Path(directory), Path(log_path), world_size
        self.env, self.preexec = env, preexec
        self.proc: subprocess.Popen | None = None
        self.next = 1

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        import shutil

        if self.dir.exists():  # a previous worker's requests (its group was reaped at the driver's start)
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        self.next = 1
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n$ {shlex.join(self.command)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         preexec_fn=self.preexec)

    def submit(self, name: str, kind: str, config: Any, log_path: Path, env: dict[str, str]) -> int:
        """Send one stage, `kind` with its config object (engine/entry.py); returns the request's number. `env`: the
        stage's environment as a subprocess would get it."""
        from megatron_inpo.config import to_dict
        from megatron_inpo.files import atomic_write_json

        n = self.next
        self.next += 1
        env_set = {k: v for k, v in env.items() if self.env.get(k) != v}
        env_unset = [k for k in self.env if k not in env]
        with open(log_path, "ab") as log:
            log.write(f"\n$ megatron-inpo {kind} (a typed call: {name})   [stage worker, pid {self.pid}, request {n}]\n"
                      f"# the stage worker was started as: {shlex.join(self.command)}\n".encode())
        atomic_write_json(request_path(self.dir, n), {"n": n, "name": name, "kind": kind, "config": to_dict(config),
                                                      "log": str(log_path), "env_set": env_set,
                                                      "env_unset": env_unset})
        return n

    def poll(self, n: int) -> list[dict] | None:
        """Every rank's marker of request n when all are there, or the first that reports a failure; None while it
        runs. Raises WorkerDied when the worker exited without them."""
        assert self.proc is not None
        markers = self._markers(n)
        if markers is not None:
            return markers
        rc = self.proc.poll()
        if rc is None:
            return None
        markers = self._markers(n)  # written just before it exited
        if markers is not None:
            return markers
        raise WorkerDied(f"the stage worker exited ({_exit_name(rc)}) without finishing the request")

    def _markers(self, n: int) -> list[dict] | None:
        found = [json.loads(p.read_text()) for r in range(self.world_size) if (p := done_path(self.dir, n, r)).exists()]
        failed = [m for m in found if m["rc"] != 0]
        return failed[:1] or (found if len(found) == self.world_size else None)

    def kill(self) -> None:
        from megatron_inpo.driver.launcher import STAGE_TOKEN_ENV, kill_tagged, killpg

        if self.proc is not None:
            killpg(self.proc.pid)
            kill_tagged(self.env.get(STAGE_TOKEN_ENV, ""))  # torchrun's ranks, each in a session of its own
            self.proc.wait()

    def stop(self, grace_s: float = 30.0) -> None:
        """Ask every rank to exit, wait up to grace_s for it (then kill what is left); remove the request
        directory. grace_s 0: kill at once."""
        import shutil

        from megatron_inpo.files import atomic_write_json

        if self.alive() and grace_s > 0:
            atomic_write_json(request_path(self.dir, self.next), {"n": self.next, "stop": True})
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        self.kill()  # also the rest of its group (spawned helpers)
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


def _exit_name(rc: int) -> str:
    if rc < 0:
        try:
            return f"signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"signal {-rc}"
    return f"exit {rc}"


# ---------------------------------------------------------------------------------------------------------------
# Worker side (every rank)


class _FreshState:
    """What a fresh stage process starts with and a stage may change: environment, working directory, torch's
    default RNG (seed and state; CUDA's follow the seed), deterministic / precision flags, default dtype, thread
    count, warning filters, the root logger. Captured once at the worker's start, before any stage ran; restored
    before each request and the environment again after it."""

    def __init__(self) -> None:
        import logging
        import warnings

        import torch

        self.env = dict(os.environ)
        self.cwd = os.getcwd()
        self.seed, self.rng = torch.initial_seed(), torch.get_rng_state()
        self.warnings = list(warnings.filters)
        root = logging.getLogger()
        self.logging = (root.level, list(root.handlers))
        self.flags = (torch.are_deterministic_algorithms_enabled(),
                      torch.is_deterministic_algorithms_warn_only_enabled())
        self.dtype = torch.get_default_dtype()
        self.matmul = torch.get_float32_matmul_precision()
        self.threads = torch.get_num_threads()
        self.cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)

    def restore_env(self) -> None:
        os.environ.clear()
        os.environ.update(self.env)

    def restore(self) -> None:
        import logging
        import warnings

        import torch

        self.restore_env()
        os.chdir(self.cwd)
        torch.manual_seed(self.seed)  # also (lazily) every CUDA generator, as in a fresh process
        torch.set_rng_state(self.rng)
        warnings.filters[:] = self.warnings
        root = logging.getLogger()
        root.setLevel(self.logging[0])
        root.handlers[:] = self.logging[1]
        torch.use_deterministic_algorithms(self.flags[0], warn_only=self.flags[1])
        torch.set_default_dtype(self.dtype)
        torch.set_float32_matmul_precision(self.matmul)
        torch.set_num_threads(self.threads)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = self.cudnn


def _release() -> dict:
    """Drop everything the stage held except the world: Megatron's groups and global buffers (and its microbatch
    calculator, if a stage made one), the gloo / NCCL sub-groups, then garbage; on GPUs the CUDA cache. Returns
    the memory still held."""
    import gc

    import torch
    import torch.distributed as dist

    if "megatron.core.parallel_state" in sys.modules:
        from megatron.core import parallel_state as ps

        ps.destroy_model_parallel()  # groups, global memory buffers, the gloo DP groups
    calc = sys.modules.get("megatron.core.num_microbatches_calculator")
    if calc is not None and getattr(calc, "_GLOBAL_NUM_MICROBATCHES_CALCULATOR", None) is not None:
        calc.destroy_num_microbatches_calculator()
    if dist.is_available() and dist.is_initialized():
        from torch.distributed import distributed_c10d as c10d

        world = c10d._get_default_group()
        for pg in [g for g in list(c10d._world.pg_map) if g is not world]:
            try:
                dist.destroy_process_group(pg)  # Megatron drops its groups without destroying them
            except Exception:  # noqa: BLE001 - a group torch already tore down
                pass
    gc.collect()
    mem = {"rss_bytes": _rss_bytes()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        mem.update(cuda_allocated_bytes=torch.cuda.memory_allocated(), cuda_reserved_bytes=torch.cuda.memory_reserved())
    return mem


def _rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak, where /proc is missing


def memory_line(mem: dict) -> str:
    gib = 1 << 30
    parts = [f"RSS {mem['rss_bytes'] / gib:.2f} GiB"]
    if "cuda_allocated_bytes" in mem:
        parts.append(f"CUDA allocated {mem['cuda_allocated_bytes'] / gib:.2f} GiB, reserved "
                     f"{mem['cuda_reserved_bytes'] / gib:.2f} GiB")
    return ", ".join(parts)


def _run_request(req: dict, rank: int, fresh: _FreshState) -> tuple[int, dict]:
    """One stage in this process, its output in the stage's log; (exit code, memory held afterwards)."""
    import traceback

    from megatron_inpo.engine.entry import run_stage, stage_config
    from megatron_inpo.errors import EXIT_BAD_INPUT, explain

    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    log = os.open(req["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    fresh.restore()
    for k in req.get("env_unset", []):
        os.environ.pop(k, None)
    os.environ.update(req.get("env_set", {}))
    t0 = time.perf_counter()
    try:
        run_stage(req["kind"], stage_config(req["kind"], req["config"]), keep_world=True)
        rc = 0
    except BaseException as e:  # noqa: BLE001 - a failed stage: its line or traceback in its log; the worker goes down
        msg = explain(e)
        if msg is None:
            traceback.print_exc()
            rc = 1
        else:
            print(f"megatron-inpo {req['kind']}: error: {msg}", file=sys.stderr)
            rc = getattr(e, "exit_code", EXIT_BAD_INPUT)
    dt = time.perf_counter() - t0
    try:
        mem = _release()
    except BaseException:  # noqa: BLE001 - cannot tell what is left: do not run another stage in this process
        traceback.print_exc()
        mem, rc = {"rss_bytes": _rss_bytes()}, rc or 1
    print(f"[stage worker rank {rank}] {req['name']}: exit {rc} after {dt:.1f} s; held afterwards: "
          f"{memory_line(mem)}", flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(saved[0], 1)
    os.dup2(saved[1], 2)
    for fd in saved:
        os.close(fd)
    fresh.restore_env()
    return int(rc), {**mem, "seconds": dt}


def _die_with_parent() -> int:
    """Parent-death signal for this rank (its agent, or the driver when it is the leader); the parent pid."""
    from megatron_inpo.driver.launcher import die_with_parent

    parent = os.getppid()
    die_with_parent()
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)
    return parent


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not: its parent is gone too, and a container's init may never reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True


def _orphaned(parent: int, leader: int | None) -> bool:
    """This rank's parent (its torchrun agent, or the driver) or the worker's group leader on this machine (the
    driver's child: a node runner such as launch/local_nodes.sh, whose agents a killed driver would orphan) is
    gone: nobody will send another request."""
    return os.getppid() != parent or (leader is not None and not _alive(leader))


def serve(directory: str | Path) -> int:
    """The worker loop of one rank: run request 1, 2, ... in order until a stop request, a failed stage, or the
    death of its parent or of the worker's leader."""
    from megatron_inpo.files import atomic_write_json

    d = Path(directory)
    rank = int(os.environ.get("RANK", "0"))
    parent = _die_with_parent()
    leader = os.getpgid(0)
    leader = leader if leader != os.getpid() and _alive(leader) else None  # on another node: srun's to watch
    # Imported now, while the driver still prepares, and kept: what the stages would each import again.
    import megatron.core  # noqa: F401
    import torch  # noqa: F401

    from megatron_inpo.engine import parallel  # noqa: F401

    fresh = _FreshState()
    print(f"[stage worker rank {rank}] ready (pid {os.getpid()})", flush=True)
    n = 1
    while True:
        path = request_path(d, n)
        while not path.exists():
            if _orphaned(parent, leader):
                return 1
            time.sleep(POLL_S)
        req = json.loads(path.read_text())
        if req.get("stop"):
            return 0
        rc, mem = _run_request(req, rank, fresh)
        atomic_write_json(done_path(d, n, rank), {"rc": rc, "rank": rank, "memory": mem})
        if rc != 0:
            return rc
        n += 1


def describe(markers: list[dict]) -> str:
    """The memory the worker's ranks held after a request, for the driver's output (rank 0's, and the largest)."""
    first = min(markers, key=lambda m: m.get("rank", 0))
    top = max(markers, key=lambda m: m["memory"].get("cuda_reserved_bytes", m["memory"]["rss_bytes"]))
    text = memory_line(first["memory"])
    if top is not first:
        text += f" (rank {first.get('rank')}; the most: rank {top.get('rank')}, {memory_line(top['memory'])})"
    return text
