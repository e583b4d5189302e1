"""The policy stages of one iteration behind one small interface, with two implementations:

- MegatronStages: each stage is a subprocess (`python -m megatron_inpo convert|logprobs|train`, or torchrun /
  srun+torchrun for several processes), so every byte of GPU memory is released between stages (SGLang servers
  and training can then alternate on the same GPUs), and a crash of one stage never corrupts the driver.
  A policy is a megatron-inpo checkpoint directory (the checkpoint convention of engine/checkpoint.py).
- TorchStages: the in-process transformers reference (driver/torch_stages.py). A policy is an HF directory.

Each method is idempotent and resumable: called again after a crash, it continues (or finds its output done).
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Protocol

import yaml

from megatron_inpo.config import ConfigError, to_dict
from megatron_inpo.faults import HOLD_ENV
from megatron_inpo.files import atomic_write_json

FAULT_ENV = "MEGATRON_INPO_FAULT"


def fault_point(run_dir: str | Path, point: str) -> None:
    """Tests of killed runs: SIGKILL this process at `point` when MEGATRON_INPO_FAULT lists it (each point fires
    once per run directory, so the same command resumed passes it)."""
    wanted = os.environ.get(FAULT_ENV, "")
    if not wanted or point not in wanted.split(","):
        return
    marker = Path(run_dir) / ".faults" / point.replace("/", "_")
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("fired\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def fault_pending(run_dir: str | Path, point: str) -> bool:
    """Whether `point` is listed in MEGATRON_INPO_FAULT and has not fired yet for this run directory."""
    wanted = os.environ.get(FAULT_ENV, "")
    return bool(wanted) and point in wanted.split(",") and not (Path(run_dir) / ".faults" / point.replace("/", "_")).exists()


class StageFault:
    """The fault points of one driver stage (`key@point`); callable like fault_point, and able to say which are
    still pending, so a stage subprocess can be asked to hold where the kill is due (megatron_inpo.faults)."""

    def __init__(self, run_dir: str | Path, key: str) -> None:
        self.run_dir, self.key = run_dir, key

    def __call__(self, point: str) -> None:
        fault_point(self.run_dir, f"{self.key}@{point}")

    def pending(self, point: str) -> bool:
        return fault_pending(self.run_dir, f"{self.key}@{point}")


def _pending(fault: Callable[[str], None], point: str) -> bool:
    pending = getattr(fault, "pending", None)
    return bool(pending and pending(point))


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
    import json

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


class PolicyStages(Protocol):
    def import_hf(self, hf_dir: Path, out: Path) -> Path: ...
    def export_hf(self, policy: Path, out: Path, dtype: str) -> Path: ...
    def sft(self, init: Path, data: Path, out_dir: Path, fault: Callable[[str], None]) -> Path: ...
    def logprobs(self, data: Path, out: Path, ref: Path, last: Path | None,
                 fault: Callable[[str], None] = ...) -> Path: ...
    def train(self, data: Path, init: Path, out_dir: Path, fault: Callable[[str], None]) -> tuple[Path, dict]: ...


# ---------------------------------------------------------------------------------------------------------------
class TorchStages:
    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    def import_hf(self, hf_dir: Path, out: Path) -> Path:
        return Path(hf_dir)

    def export_hf(self, policy: Path, out: Path, dtype: str) -> Path:
        return Path(policy)  # a torch policy already is an HF directory

    def sft(self, init: Path, data: Path, out_dir: Path, fault: Callable[[str], None]) -> Path:
        import json

        from megatron_inpo.driver import torch_stages as ts

        rows = [json.loads(line) for line in open(data, encoding="utf-8") if line.strip()]
        s = self.cfg.sft
        args = ts.TorchTrainArgs(lr=s.lr, epochs=s.epochs, global_batch_size=s.global_batch_size,
                                 warmup_ratio=0.03, seed=self.cfg.seed, save_interval=max(1, self.cfg.train.save_interval))
        with _StepLog(out_dir) as tb:
            def log(step: int, m: dict) -> None:
                tb(step, m)
                fault(f"step{step}")

            res = ts.train_hf(init, out_dir, len(rows),
                              ts.sft_loss_fn([(r["prompt_ids"], r["response_ids"]) for r in rows]), args, log=log)
        return Path(res["model_dir"])

    def logprobs(self, data: Path, out: Path, ref: Path, last: Path | None,
                 fault: Callable[[str], None] = lambda p: None) -> Path:
        from megatron_inpo.driver import torch_stages as ts

        if not out.exists():
            ts.compute_logps(data, out, ref, last if last is not None and Path(last) != Path(ref) else None)
        return out

    def train(self, data: Path, init: Path, out_dir: Path, fault: Callable[[str], None]) -> tuple[Path, dict]:
        from megatron_inpo.data.preferences import read_preferences
        from megatron_inpo.driver import torch_stages as ts

        pairs = read_preferences(data, require_logps=True)
        t = self.cfg.train
        args = ts.TorchTrainArgs(lr=t.lr, epochs=t.epochs, global_batch_size=t.global_batch_size,
                                 warmup_ratio=t.warmup_ratio, min_lr_ratio=t.min_lr / t.lr,
                                 weight_decay=t.weight_decay, clip_grad=t.clip_grad, seed=self.cfg.seed,
                                 save_interval=max(1, t.save_interval))
        with _StepLog(out_dir) as tb:
            def log(step: int, m: dict) -> None:
                tb(step, m)
                fault(f"step{step}")

            res = ts.train_hf(init, out_dir, len(pairs), ts.preference_loss_fn(pairs, self.cfg.algorithm.objective),
                              args, log=log)
        return Path(res["model_dir"]), res["metrics"]


class _StepLog:
    """Per-step training scalars of the torch stages in <out_dir>/tensorboard (the engine writes its own)."""

    def __init__(self, out_dir: Path) -> None:
        self.dir = Path(out_dir) / "tensorboard"
        self.writer = None

    def __enter__(self) -> "_StepLog":
        return self

    def __call__(self, step: int, metrics: dict) -> None:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.dir))
        for k, v in metrics.items():
            self.writer.add_scalar(f"train/{k}", v, step)

    def __exit__(self, *exc: Any) -> None:
        if self.writer is not None:
            self.writer.close()


# ---------------------------------------------------------------------------------------------------------------
class MegatronStages:
    """Megatron-Core stages as subprocesses; stdout/stderr of each go to <run_dir>/logs/<name>.log."""

    def __init__(self, cfg: Any, run_dir: Path) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)

    # -- launching --------------------------------------------------------------------------------------------
    def command(self, args: list[str], distributed: bool = True) -> list[str]:
        p = self.cfg.parallel
        world = p.nproc_per_node * p.nnodes
        if not distributed or (world == 1 and p.launcher == "auto"):
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
            hold: bool = False) -> None:
        """Run one stage subprocess to completion; `watch` is called about twice a second while it runs (the
        fault-injection tests kill the driver from there at a chosen moment of the stage)."""
        cmd = self.command(args, distributed)
        logs = self.run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{name.replace('/', '_')}.log"
        env = dict(os.environ)
        pkg_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("MASTER_PORT", str(self.cfg.parallel.master_port))
        token = uuid.uuid4().hex
        env[STAGE_TOKEN_ENV] = token
        if hold:
            env[HOLD_ENV] = "1"
        timeout = self.cfg.stage_timeout_s or None
        t0 = time.perf_counter()
        with open(log_path, "ab") as log:
            log.write(f"\n$ {shlex.join(cmd)}\n".encode())
            log.flush()
            # Own process group (a timeout kills the whole stage, torchrun workers included) and a parent-death
            # signal: a SIGKILLed driver must not leave a stage running that its resumed run would start again.
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_stage_preexec)
            atomic_write_json(self.run_dir / RUNNING_FILE, {"pid": proc.pid, "pgid": proc.pid, "stage": name,
                                                            "cmd": cmd, "token": token})
            try:
                rc = _wait(proc, timeout, watch)
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
        if rc != 0:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise StageError(f"stage {name} failed (exit {rc}) after {time.perf_counter() - t0:.1f} s; "
                             f"log: {log_path}\n--- last lines ---\n{tail}")

    def _yaml(self, name: str, data: dict) -> Path:
        path = self.run_dir / "stage_configs" / f"{name.replace('/', '_')}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        from megatron_inpo.files import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
        return path

    def _train_fields(self) -> dict:
        t, p = self.cfg.train, self.cfg.parallel
        return dict(tensor_model_parallel_size=p.tensor_model_parallel_size,
                    pipeline_model_parallel_size=p.pipeline_model_parallel_size,
                    sequence_parallel=t.sequence_parallel, use_distributed_optimizer=t.use_distributed_optimizer,
                    micro_batch_size=t.micro_batch_size, max_seq_len=t.max_seq_len, lr_decay_style=t.lr_decay_style,
                    weight_decay=t.weight_decay, clip_grad=t.clip_grad, precision=t.precision,
                    layer_spec=t.layer_spec, fp8=t.fp8, recompute_activations=t.recompute_activations,
                    seed=self.cfg.seed, save_interval=t.save_interval, keep_checkpoints=2, progress=False)

    # -- stages -------------------------------------------------------------------------------------------------
    def import_hf(self, hf_dir: Path, out: Path) -> Path:
        if not (out / "megatron_inpo.json").exists():
            p = self.cfg.parallel
            self.run(f"import_{out.name}", ["convert", "hf-to-mcore", "--hf-dir", str(hf_dir), "--mcore-dir", str(out),
                                            "--tp", str(p.tensor_model_parallel_size),
                                            "--pp", str(p.pipeline_model_parallel_size),
                                            "--layer-spec", self.layer_spec(), "--no-progress"], distributed=False)
        return out

    def layer_spec(self) -> str:
        """The layer spec training will build ('auto': TE when it imports on a GPU machine, as the engine decides),
        so the imported checkpoint carries the parameter names training loads."""
        spec = self.cfg.train.layer_spec
        if spec != "auto":
            return spec
        import importlib.util

        import torch

        return "te" if torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") else "local"

    def export_hf(self, policy: Path, out: Path, dtype: str) -> Path:
        if not (out / "config.json").exists():
            short = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}[dtype]  # the converter's names
            self.run(f"export_{out.name}", ["convert", "mcore-to-hf", "--mcore-dir", str(policy), "--hf-dir", str(out),
                                            "--dtype", short, "--no-progress"], distributed=False)
        return out

    def sft(self, init: Path, data: Path, out_dir: Path, fault: Callable[[str], None]) -> Path:
        s = self.cfg.sft
        # the whole global batch in one micro-batch per data-parallel rank (tiny SFT models: fewest passes)
        micro = s.global_batch_size // self.cfg.parallel.data_parallel_size()
        fields = {**self._train_fields(), "mode": "sft", "data": str(data), "init_checkpoint": str(init),
                  "output_dir": str(out_dir), "lr": s.lr, "epochs": s.epochs, "global_batch_size": s.global_batch_size,
                  "micro_batch_size": micro, "warmup_ratio": 0.03, "min_lr": 0.0}
        self.run("sft", ["train", "--config", str(self._yaml("sft", fields))], watch=_checkpoint_watch(out_dir, fault),
                 hold=_pending(fault, "checkpoint"))
        return self._result(out_dir)

    def _result(self, out_dir: Path) -> Path:
        import json

        res = json.loads((out_dir / "train_result.json").read_text())
        return Path(res["final_checkpoint"])

    def logprobs(self, data: Path, out: Path, ref: Path, last: Path | None,
                 fault: Callable[[str], None] = lambda p: None) -> Path:
        p, t = self.cfg.parallel, self.cfg.train
        fields = dict(data=str(data), output=str(out), ref_checkpoint=str(ref),
                      last_checkpoint=str(last) if last is not None else "",
                      tensor_model_parallel_size=p.tensor_model_parallel_size,
                      pipeline_model_parallel_size=p.pipeline_model_parallel_size,
                      micro_batch_size=t.logprob_micro_batch_size, precision=t.precision, layer_spec=t.layer_spec,
                      seed=self.cfg.seed, progress=False)
        progress = out.with_name(f".{out.name}.logprobs-progress")  # the engine's resumable chunk store

        def watch() -> None:
            if progress.exists() and any(f.is_file() for f in progress.rglob("*")):
                fault("running")

        name = f"logprobs_{out.parent.name}"
        self.run(name, ["logprobs", "--config", str(self._yaml(name, fields))], watch=watch,
                 hold=_pending(fault, "running"))
        return out

    def train(self, data: Path, init: Path, out_dir: Path, fault: Callable[[str], None]) -> tuple[Path, dict]:
        import json

        t = self.cfg.train
        fields = {**self._train_fields(), "mode": "preference", "data": str(data), "init_checkpoint": str(init),
                  "output_dir": str(out_dir), "objective": to_dict(self.cfg.algorithm.objective), "lr": t.lr,
                  "min_lr": t.min_lr, "warmup_ratio": t.warmup_ratio, "epochs": t.epochs,
                  "global_batch_size": t.global_batch_size}
        name = f"train_{out_dir.parent.name}"

        self.run(name, ["train", "--config", str(self._yaml(name, fields))], watch=_checkpoint_watch(out_dir, fault),
                 hold=_pending(fault, "checkpoint"))
        res = json.loads((out_dir / "train_result.json").read_text())
        return Path(res["final_checkpoint"]), res.get("metrics", {})


MEGATRON_MODULES = (("megatron.core", "megatron-core"), ("megatron_inpo.engine.train", "the training engine"),
                    ("megatron_inpo.engine.cli_logprobs", "the log-prob pass"),
                    ("megatron_inpo.convert.cli", "the HF <-> Megatron converter"))


def missing_megatron_parts() -> list[str]:
    """What the 'megatron' engine needs but cannot find (module specs only: importing megatron.core costs ~5 s)."""
    import importlib.util

    missing = []
    for mod, what in MEGATRON_MODULES:
        try:
            found = importlib.util.find_spec(mod) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(f"{what} ({mod})")
    return missing


def resolve_engine(engine: str) -> str:
    if engine != "auto":
        return engine
    return "megatron" if not missing_megatron_parts() else "torch"


def _checkpoint_watch(out_dir: Path, fault: Callable[[str], None]) -> Callable[[], None]:
    def watch() -> None:  # the engine's step checkpoints: fault point 'checkpoint' once one is complete
        if any((Path(out_dir) / "checkpoints").glob("step_*/megatron_inpo.json")):
            fault("checkpoint")
    return watch


def make_stages(engine: str, cfg: Any, run_dir: Path) -> PolicyStages:
    if engine == "torch":
        return TorchStages(cfg)
    if engine == "megatron":
        return MegatronStages(cfg, run_dir)
    raise ConfigError(f"engine: unknown engine {engine!r}")


def copy_tokenizer(src: Path, dst: Path) -> None:
    for f in Path(src).iterdir():
        if f.is_file() and (f.name.startswith("tokenizer") or f.name == "special_tokens_map.json"):
            shutil.copy2(f, Path(dst) / f.name)
