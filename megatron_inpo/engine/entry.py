"""The engine's stage entry points as typed calls: `run_stage(kind, config)` runs one training, log-prob or
conversion stage and returns its result. The CLI commands (`megatron-inpo train / logprobs / convert`) call it after
reading their config; the persistent stage worker (driver/worker.py) calls it with the config object the driver
handed over (no argv, no second YAML parse, no CLI inside the worker).

Megatron-Core's process groups are torn down after each stage; the torch.distributed world too, unless the caller
keeps it for the next stage (`keep_world`: the stage worker).
"""
from __future__ import annotations

import importlib
from typing import Any

from megatron_inpo.config import ConfigError, from_dict, validate_all

# kind -> (config class, entry point): "module:attribute" each, imported when a stage of that kind runs
STAGES: dict[str, tuple[str, str]] = {
    "train": ("megatron_inpo.engine.config:TrainStageConfig", "megatron_inpo.engine.train:train"),
    "logprobs": ("megatron_inpo.engine.config:LogprobStageConfig", "megatron_inpo.engine.logprobs:run_logprobs"),
    "convert": ("megatron_inpo.convert.stage:ConvertStageConfig", "megatron_inpo.convert.stage:run_convert"),
}


def _load(ref: str) -> Any:
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


def config_class(kind: str) -> type:
    if kind not in STAGES:
        raise ConfigError(f"stage kind: one of {sorted(STAGES)}, got {kind!r}")
    return _load(STAGES[kind][0])


def stage_config(kind: str, data: dict) -> Any:
    """The config object of a stage of `kind` from its dict form (config.to_dict), checked as a loaded config is."""
    cfg = from_dict(config_class(kind), data)
    validate_all(cfg)
    return cfg


def run_stage(kind: str, cfg: Any, keep_world: bool = False) -> Any:
    """Run one stage of `kind` with its config object; its result (a dict). Process groups are torn down afterwards,
    whatever happened; the torch.distributed world stays when `keep_world`."""
    if not isinstance(cfg, config_class(kind)):
        raise TypeError(f"stage {kind}: expected a {config_class(kind).__name__}, got {type(cfg).__name__}")
    try:
        return _load(STAGES[kind][1])(cfg)
    finally:
        teardown(keep_world)


def teardown(keep_world: bool = False) -> None:
    """Megatron's groups and (unless keep_world) the torch.distributed world."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            from megatron.core import parallel_state as ps

            ps.destroy_model_parallel()
        finally:
            if not keep_world:
                dist.destroy_process_group()
