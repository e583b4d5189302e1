"""The policy of a stage on this rank: process groups, the model chunk built from a checkpoint's HF config, and its
wrapping for training (Megatron DDP) or for a forward-only pass.

    init_runtime(engine, seed) -> Runtime            torch.distributed + Megatron's groups for engine.parallel
    build_policy(hf_config, engine, runtime, padded_vocab_size) -> engine.model.Built
    wrap_ddp(model, engine, precision) -> [DDP]      training: Float16Module (bf16) + DistributedDataParallel
    load_frozen_policy(path, engine, runtime) -> (model, Built)   forward-only: built, loaded, eval()
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_inpo.engine.config import MegatronConfig


@dataclass
class Runtime:
    device: torch.device
    cuda: bool
    world_size: int
    rank: int
    dp_size: int


def init_runtime(engine: MegatronConfig, seed: int) -> Runtime:
    """torch.distributed (NCCL on GPU, gloo on CPU with the CPU mode of engine/cpu.py) + Megatron's groups."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_inpo.engine import parallel as engine_parallel

    p = engine.parallel
    engine_parallel.initialize(tensor_model_parallel_size=p.tensor_model_parallel_size,
                               pipeline_model_parallel_size=p.pipeline_model_parallel_size, seed=seed)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return Runtime(device, cuda, dist.get_world_size(), dist.get_rank(), ps.get_data_parallel_world_size())


def build_policy(hf_config: dict, engine: MegatronConfig, runtime: Runtime, padded_vocab_size: int | None = None):
    """The unwrapped model chunk of this rank (.model), true vocab size, padded vocab size, layer spec name.

    `padded_vocab_size` (from a checkpoint's metadata) keeps the checkpoint's padding, so it loads at any TP that
    divides it.
    """
    import dataclasses

    from megatron.core import parallel_state as ps

    from megatron_inpo.engine import model as engine_model

    model_cfg = dataclasses.replace(engine.model, precision=engine.model.resolved_precision(runtime.cuda))
    return engine_model.build_model(
        hf_config, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
        config=model_cfg, sequence_parallel=engine.parallel.sequence_parallel, padded_vocab_size=padded_vocab_size)


def wrap_ddp(model: torch.nn.Module, engine: MegatronConfig, precision: str, per_item_loss: bool = True) -> list:
    """Megatron DDP (and Float16Module for bf16) around one model chunk; sets the schedule's hooks."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.transformer.module import Float16Module

    config = model.config
    config.calculate_per_token_loss = per_item_loss
    config.finalize_model_grads_func = finalize_model_grads
    if precision == "bf16" and not isinstance(model, Float16Module):
        model = Float16Module(config, model)
    p = engine.parallel
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=p.overlap_grad_reduce,
        use_distributed_optimizer=p.use_distributed_optimizer, average_in_collective=False,
    )
    ddp = DistributedDataParallel(config=config, ddp_config=ddp_cfg, module=model)
    if p.overlap_grad_reduce:
        config.no_sync_func = ddp.no_sync
    return [ddp]


def load_frozen_policy(path: str, engine: MegatronConfig, runtime: Runtime):
    """The policy saved at `path`, built for this rank, loaded (weights only) and in eval mode, for a forward-only
    pass; bf16 models are wrapped in Float16Module as in training. Returns (model, Built)."""
    from megatron_inpo.engine import checkpoint as ckpt

    meta = ckpt.read_meta(path)
    built = build_policy(meta["hf_config"], engine, runtime, meta["padded_vocab_size"])
    model = built.model
    if engine.model.resolved_precision(runtime.cuda) == "bf16":
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(model.config, model)
    ckpt.load_checkpoint(path, [model], load_rng=False)
    model.eval()
    return model, built
