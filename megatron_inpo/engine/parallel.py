"""Process groups for the engine: torch.distributed (NCCL on GPU, gloo on CPU) and Megatron's model parallelism.

API (what the engine, converter and tests call):

    initialize(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, seed=1234, backend=None) -> Layout
        Starts torch.distributed if needed (under torchrun from its env vars; under plain `python` as a world of
        1 on an in-process store, or on 127.0.0.1:$MASTER_PORT when MASTER_PORT is set), enables the CPU mode (engine/cpu.py) when there is no CUDA,
        (re)initializes Megatron's TP/PP/DP groups (DP = world / (TP*PP)) and seeds torch + Megatron's RNG
        tracker. Calling it again with other sizes re-creates the model-parallel groups (the world stays).
    layout() -> Layout          ranks and sizes of this process (tp/pp/dp rank+size, first/last stage).
    destroy(process_group=False)  destroys Megatron's groups (and the torch.distributed world if asked).
    prepare_optimizer_params(model)   CPU workaround for Megatron's distributed and bf16 optimizers (no-op on GPU).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from megatron_inpo.engine.cpu import enable_cpu_mode, prepare_optimizer_params  # noqa: F401  (re-export)
from megatron_inpo.errors import InputError

class ParallelError(InputError, ValueError):
    """An impossible parallel layout (e.g. the world size is not a multiple of TP x PP)."""


@dataclass(frozen=True)
class Layout:
    """Where this process sits in the TP x PP x DP grid."""

    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    is_first_stage: bool
    is_last_stage: bool
    cuda: bool


def init_distributed(backend: str | None = None) -> None:
    """torch.distributed over NCCL (CUDA) or gloo (CPU); a world of 1 when not launched by torchrun."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    cuda = torch.cuda.is_available()
    if backend is None:
        backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if "RANK" not in os.environ and "MASTER_PORT" not in os.environ:
        # plain `python`: a world of 1 on an in-process store, so concurrent runs never fight over a TCP port
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
        return
    if "RANK" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group(backend=backend)


def initialize(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1, seed: int = 1234,
               backend: str | None = None) -> Layout:
    """See the module docstring."""
    import torch.distributed as dist

    tp, pp = int(tensor_model_parallel_size), int(pipeline_model_parallel_size)
    if tp < 1 or pp < 1:
        raise ParallelError(f"tensor/pipeline parallel sizes must be >= 1, got tp={tp} pp={pp}")
    if not torch.cuda.is_available():
        enable_cpu_mode()
    init_distributed(backend)
    world = dist.get_world_size()
    if world % (tp * pp):
        raise ParallelError(f"world size {world} is not a multiple of tp*pp = {tp}*{pp}")
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    seed_all(seed)
    return layout()


def seed_all(seed: int) -> None:
    """Seed python-level torch RNG and Megatron's model-parallel RNG tracker (per-TP-rank streams)."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def layout() -> Layout:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    return Layout(
        rank=dist.get_rank(), world_size=dist.get_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(), pp_size=ps.get_pipeline_model_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size(),
        is_first_stage=ps.is_pipeline_first_stage(), is_last_stage=ps.is_pipeline_last_stage(),
        cuda=torch.cuda.is_available(),
    )


def destroy(process_group: bool = False) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if process_group and dist.is_initialized():
        dist.destroy_process_group()
