"""The policy stages of one iteration behind one small interface, with two implementations:

- MegatronStages: each stage is the command line `python -m megatron_inpo convert|logprobs|train` (torchrun /
  srun+torchrun for several processes; driver/launcher.py), handed its config objects whole as a YAML file
  (engine/config.py: TrainStageConfig, LogprobStageConfig). It runs in the run's persistent stage worker
  (launch.stage_runner 'persistent', driver/worker.py: imports and the torch.distributed world paid once) or as a
  subprocess of its own ('subprocess': every byte of GPU memory is released between stages, so SGLang servers and
  training can alternate on the same GPUs); either way a crash of one stage never corrupts the driver.
  A policy is a megatron-inpo checkpoint directory (the checkpoint convention of engine/checkpoint.py).
- TorchStages: the in-process transformers reference (driver/torch_stages.py). A policy is an HF directory.

Each method is idempotent and resumable: called again after a crash, it continues (or finds its output done).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol

from megatron_inpo.config import ConfigError
from megatron_inpo.driver.launcher import StageCall
from megatron_inpo.events import emit

class PolicyStages(Protocol):
    def import_hf(self, hf_dir: Path, out: Path) -> Path: ...
    def export_hf(self, policy: Path, out: Path, dtype: str) -> Path: ...
    def sft(self, init: Path, data: Path, out_dir: Path) -> Path: ...
    def logprobs(self, data: Path, out: Path, ref: Path, last: Path | None) -> Path: ...
    def train(self, data: Path, init: Path, out_dir: Path, objective: Any = None) -> tuple[Path, dict]: ...
    def close(self) -> None: ...


# ---------------------------------------------------------------------------------------------------------------
class TorchStages:
    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    def import_hf(self, hf_dir: Path, out: Path) -> Path:
        return Path(hf_dir)

    def close(self) -> None:
        pass

    def export_hf(self, policy: Path, out: Path, dtype: str) -> Path:
        # A torch policy already is an HF directory (float32): the export is its copy, so run_dir/hf/pi_n exists
        # as with the Megatron engine and carries a digest record; the dtype stays float32, the torch engine's
        # precision, so its rollouts sample from the weights it trained.
        import shutil

        from megatron_inpo.engine.trust import record_export_digests
        from megatron_inpo.files import atomic_directory

        if not (out / "config.json").exists():
            with atomic_directory(out, overwrite=out.exists()) as tmp:
                for p in sorted(Path(policy).iterdir()):
                    if p.is_file():
                        shutil.copyfile(p, tmp / p.name)
                record_export_digests(tmp)
        return out

    def sft(self, init: Path, data: Path, out_dir: Path) -> Path:
        import json

        from megatron_inpo.driver import torch_stages as ts

        rows = [json.loads(line) for line in open(data, encoding="utf-8") if line.strip()]
        loss = ts.sft_loss_fn([(r["prompt_ids"], r["response_ids"]) for r in rows])
        return Path(self._train(init, out_dir, len(rows), loss, self.cfg.sft)["model_dir"])

    def logprobs(self, data: Path, out: Path, ref: Path, last: Path | None) -> Path:
        from megatron_inpo.driver import torch_stages as ts

        if not out.exists():
            ts.compute_logps(data, out, ref, last if last is not None and Path(last) != Path(ref) else None)
        return out

    def train(self, data: Path, init: Path, out_dir: Path, objective: Any = None) -> tuple[Path, dict]:
        from megatron_inpo.data.preferences import read_preferences
        from megatron_inpo.driver import torch_stages as ts

        pairs = read_preferences(data, require_logps=True)
        loss = ts.preference_loss_fn(pairs, objective or self.cfg.algorithm.objective)
        res = self._train(init, out_dir, len(pairs), loss, self.cfg.train)
        return Path(res["model_dir"]), res["metrics"]

    def _train(self, init: Path, out_dir: Path, n_items: int, loss, schedule) -> dict:
        from megatron_inpo.driver import torch_stages as ts

        with _StepLog(out_dir) as tb:
            def log(step: int, m: dict) -> None:
                tb(step, m)
                emit(f"step{step}")

            return ts.train_hf(init, out_dir, n_items, loss, schedule, self.cfg.seed, log=log)


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
    """Megatron-Core stages in the stage worker or as subprocesses (driver/launcher.py); stdout/stderr of each go to
    <run_dir>/logs/<name>.log, and with `show_progress` the stage's progress is one live line in the terminal.
    `close()` stops the stage worker (the driver calls it at its end)."""

    def __init__(self, cfg: Any, run_dir: Path, show_progress: bool = False,
                 notify: Callable[[str], None] | None = None) -> None:
        from megatron_inpo.driver.launcher import StageLauncher

        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.launcher = StageLauncher(cfg.launch, self.run_dir, cfg.stage_timeout_s, show_progress, notify)
        self.run = self.launcher.run
        self.command = self.launcher.command
        self.close = self.launcher.close

    def _stage_config(self, name: str, stage: Any) -> Path:
        """Write a stage's config object, as it is, to stage_configs/<name>.yaml; the stage shows its progress
        in a file next to it, which `run` polls for the driver's live line."""
        from megatron_inpo.config import save_yaml

        path = self.run_dir / "stage_configs" / f"{name.replace('/', '_')}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_yaml(stage, path)
        return path

    def _progress_file(self, name: str) -> str:
        return str(self.run_dir / "stage_configs" / f"{name.replace('/', '_')}.progress.json")

    # -- stages -------------------------------------------------------------------------------------------------
    def import_hf(self, hf_dir: Path, out: Path) -> Path:
        from megatron_inpo.convert.stage import ConvertStageConfig

        if not (out / "megatron_inpo.json").exists():
            p = self.cfg.megatron.parallel
            stage = ConvertStageConfig(direction="hf-to-mcore", hf_dir=str(hf_dir), mcore_dir=str(out),
                                       tp=p.tensor_model_parallel_size, pp=p.pipeline_model_parallel_size,
                                       layer_spec=self.cfg.megatron.model.resolved_layer_spec(), progress=False)
            self.run(f"import_{out.name}", StageCall("convert", stage, [
                "convert", "hf-to-mcore", "--hf-dir", stage.hf_dir, "--mcore-dir", stage.mcore_dir, "--tp",
                str(stage.tp), "--pp", str(stage.pp), "--layer-spec", stage.layer_spec, "--no-progress"]),
                distributed=False)
        return out

    def export_hf(self, policy: Path, out: Path, dtype: str) -> Path:
        from megatron_inpo.convert.stage import ConvertStageConfig

        if not (out / "config.json").exists():
            short = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}[dtype]  # the converter's names
            stage = ConvertStageConfig(direction="mcore-to-hf", mcore_dir=str(policy), hf_dir=str(out), dtype=short,
                                       progress=False)
            self.run(f"export_{out.name}", StageCall("convert", stage, [
                "convert", "mcore-to-hf", "--mcore-dir", stage.mcore_dir, "--hf-dir", stage.hf_dir, "--dtype", short,
                "--no-progress"]), distributed=False)
        return out

    def _train_call(self, name: str, loss: str, schedule: Any, data: Path, init: Path, out_dir: Path,
                    objective: Any = None) -> StageCall:
        """The typed call of a training stage (engine/entry.py 'train')."""
        from megatron_inpo.engine.config import TrainStageConfig

        stage = TrainStageConfig(data=str(data), init_checkpoint=str(init), output_dir=str(out_dir), loss=loss,
                                 objective=objective or self.cfg.algorithm.objective, megatron=self.cfg.megatron,
                                 train=schedule,
                                 seed=self.cfg.seed, progress=False, progress_file=self._progress_file(name))
        return StageCall("train", stage, ["train", "--config", str(self._stage_config(name, stage))])

    def sft(self, init: Path, data: Path, out_dir: Path) -> Path:
        call = self._train_call("sft", "sft", self.cfg.sft, data, init, out_dir)
        self.run("sft", call, progress_file=call.config.progress_file)
        return Path(_train_result(out_dir)["final_checkpoint"])

    def logprobs(self, data: Path, out: Path, ref: Path, last: Path | None) -> Path:
        from megatron_inpo.engine.config import LogprobStageConfig

        name = f"logprobs_{out.parent.name}"
        stage = LogprobStageConfig(data=str(data), output=str(out), ref_checkpoint=str(ref),
                                   last_checkpoint=str(last) if last is not None else "",
                                   megatron=self.cfg.megatron, logprobs=self.cfg.logprobs, seed=self.cfg.seed,
                                   progress=False, progress_file=self._progress_file(name))
        self.run(name, StageCall("logprobs", stage, ["logprobs", "--config", str(self._stage_config(name, stage))]),
                 progress_file=stage.progress_file)
        return out

    def train(self, data: Path, init: Path, out_dir: Path, objective: Any = None) -> tuple[Path, dict]:
        """`objective`: the iteration's objective (AlgorithmConfig.objective_at: its eta); None = the run's."""
        name = f"train_{out_dir.parent.name}"
        call = self._train_call(name, "preference", self.cfg.train, data, init, out_dir, objective)
        self.run(name, call, progress_file=call.config.progress_file)
        res = _train_result(out_dir)
        return Path(res["final_checkpoint"]), res.get("metrics", {})


def _train_result(out_dir: Path) -> dict:
    """What a training stage recorded when it finished (engine/train.py's train_result.json)."""
    import json

    return json.loads((Path(out_dir) / "train_result.json").read_text())


MEGATRON_MODULES = (("megatron.core", "megatron-core"), ("megatron_inpo.engine.train", "the training engine"),
                    ("megatron_inpo.engine.logprobs", "the log-prob pass"),
                    ("megatron_inpo.convert.hf_to_mcore", "the HF <-> Megatron converter"))


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


def resolve_trainer(trainer: str) -> str:
    if trainer != "auto":
        return trainer
    return "megatron" if not missing_megatron_parts() else "torch"


def make_stages(trainer: str, cfg: Any, run_dir: Path, show_progress: bool = False,
                notify: Callable[[str], None] | None = None) -> PolicyStages:
    if trainer == "torch":
        return TorchStages(cfg)
    if trainer == "megatron":
        return MegatronStages(cfg, run_dir, show_progress, notify)
    raise ConfigError(f"trainer: unknown trainer {trainer!r}")

