"""The optimizer of a training stage: Megatron's (distributed) AdamW and LR schedule, and the repairs it needs
when it falls back to torch's AdamW (no Transformer Engine or apex: CPU, and GPUs without either).

    build_optimizer(cfg, parallel, model, precision, total_steps) -> (optimizer, scheduler)
    fuse_torch_adam(optimizer)         the fallback AdamW on torch's fused kernel (same update, fewer passes)
    sync_master_weights(optimizer)     after a weights-only load: fp32 master weights := the loaded weights
    prepare_adam_state_for_load / restore_adam_steps   around a distributed-optimizer resume (megatron-core 0.16.1)
"""
from __future__ import annotations

import torch

from megatron_inpo.engine.config import OptimizerConfig, ParallelConfig


def optimizer_parts(optimizer) -> list:
    """The optimizers inside a Megatron ChainedOptimizer (or the one given)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def torch_adams(optimizer):
    """(Megatron optimizer, torch Adam/AdamW inside it) of a Megatron (chained) optimizer."""
    import torch

    for opt in optimizer_parts(optimizer):
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            yield opt, inner


def _distributed_adam_params(optimizer):
    """(torch Adam, param group, parameter) of every parameter that a distributed optimizer updates with torch's
    Adam/AdamW (the fallback without apex or TE, where megatron-core 0.16.1 needs the two repairs below)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt, adam in torch_adams(optimizer):
        if isinstance(opt, DistributedOptimizer):
            for group in adam.param_groups:
                for p in group["params"]:
                    yield adam, group, p


def _adam_step(value: float, group: dict, param):
    """A `step` tensor as torch's Adam keeps it: on the parameter's device for fused / capturable groups."""
    import torch

    on_device = group.get("fused") or group.get("capturable")
    return torch.tensor(float(value), dtype=torch.float32, device=param.device if on_device else "cpu")


def prepare_adam_state_for_load(optimizer) -> None:
    """Zero Adam state for every parameter of a distributed optimizer that has not stepped yet.

    Without apex or TE, megatron-core 0.16.1's DistributedOptimizer uses torch's AdamW and builds the state dict
    to load into from `state["step"]` of each parameter, which torch creates only at the first step (an empty
    state fails an assertion). The load overwrites these values.
    """
    import torch

    for adam, group, p in _distributed_adam_params(optimizer):
        state = adam.state[p]
        if not state:
            state["step"] = _adam_step(0, group, p)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def restore_adam_steps(optimizer) -> None:
    """Give each parameter of a loaded distributed optimizer its own, correct Adam `step`.

    With torch's AdamW, megatron-core 0.16.1 saves the step in the param groups, puts one shared tensor into every
    parameter's state on load and then overwrites it with the per-bucket value of the dp_reshardable state, which
    is not the step (a resumed run restarted Adam's bias correction at 1). torch's AdamW also adds 1 to each entry
    of its list of steps in place, so a shared tensor would advance once per parameter.
    """
    for adam, group, p in _distributed_adam_params(optimizer):
        state = adam.state.get(p)
        if state and group.get("step") is not None:
            state["step"] = _adam_step(group["step"], group, p)


def sync_master_weights(optimizer) -> None:
    """Copy the model's current weights into the optimizer's fp32 master weights.

    Megatron's bf16 / fp16 optimizers (Float16OptimizerWithFloat16Params and the DistributedOptimizer) copy the
    model weights into fp32 masters once, when they are built, and each step writes the updated masters back
    into the model. Weights loaded into the model after that are therefore overwritten by the first step with the
    weights the model had at build time (the random init), unless the masters are refreshed, as Megatron-LM's
    training/checkpointing.py does after a model-only load. Call after every such load; a no-op for fp32, whose
    optimizer updates the model's parameters themselves.
    """
    optimizer.reload_model_params()


def fuse_torch_adam(optimizer) -> int:
    """Switch Megatron's fallback torch AdamW to torch's fused kernel; returns how many param groups it switched.

    Without Transformer Engine or apex, megatron-core builds torch.optim.AdamW on its default multi-tensor path,
    which streams the fp32 master weights and both moments through memory once per elementwise op (about 18 array
    passes per step); the fused kernel makes the same update in one pass (7 arrays). With TE's or apex's
    FusedAdam there is nothing to switch.
    """
    fusable = {torch.float32, torch.bfloat16, torch.float16}
    switched = 0
    for _, adam in torch_adams(optimizer):
        for group in adam.param_groups:
            params = group["params"]
            if group.get("fused") or group.get("differentiable") or not all(
                    p.dtype in fusable and p.device.type in ("cuda", "cpu") for p in params):
                continue
            if any(adam.state.get(p) for p in params):  # a step already placed `step` on the CPU
                continue
            group["foreach"], group["fused"] = False, True
            switched += 1
        if switched:
            adam._step_supports_amp_scaling = True  # as torch's constructor sets it for fused=True
    return switched


def build_optimizer(cfg: OptimizerConfig, parallel: ParallelConfig, model: list, precision: str, total_steps: int):
    """Megatron's optimizer (fp32 master weights for bf16; sharded over DP with the distributed optimizer) and its
    LR / weight-decay schedule over `total_steps`."""
    from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_inpo.engine import parallel as engine_parallel

    ocfg = MegatronOptimizerConfig(
        optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad, bf16=precision == "bf16", fp16=False,
        params_dtype=torch.bfloat16 if precision == "bf16" else torch.float32,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
    )
    if parallel.use_distributed_optimizer or precision != "fp32":
        # CPU workaround (no-op on GPU): both the distributed and the bf16 optimizer check param.type() names
        engine_parallel.prepare_optimizer_params(model)
    optimizer = get_megatron_optimizer(ocfg, model)
    fuse_torch_adam(optimizer)
    warmup, decay = cfg.lr_steps(total_steps)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=cfg.lr, min_lr=cfg.min_lr, lr_warmup_steps=warmup, lr_decay_steps=decay,
        lr_decay_style=cfg.lr_decay_style, start_wd=cfg.weight_decay, end_wd=cfg.weight_decay,
        wd_incr_steps=decay, wd_incr_style="constant",
    )
    return optimizer, scheduler
