"""Policy training on Megatron-Core: preference objectives (INPO and baselines) and SFT, with TP / PP / DP.

Command line (the driver runs these as subprocesses; one process per GPU / CPU rank):

    python -m megatron_inpo train --config stage.yaml [KEY=VALUE ...] [--FIELD VALUE ...]
    torchrun --nproc-per-node N -m megatron_inpo train --config stage.yaml tensor_model_parallel_size=2

Every TrainConfig field is also a flag (`--init-checkpoint DIR`, `--objective.eta 0.005`, ...). Required:
`data` (JSONL), `init_checkpoint` (a megatron-inpo checkpoint: converter output or a training checkpoint),
`output_dir`. The stage writes into output_dir:

    train_config.yaml          resolved config
    checkpoints/step_XXXXXXXX  checkpoints (see engine/checkpoint.py); the last one is the trained policy
    tensorboard/               event files + metrics.jsonl (one line per step)
    train_result.json          {"final_checkpoint", "steps", "metrics"}: written last, atomically

Re-running the same command resumes from the newest complete checkpoint in output_dir/checkpoints (model,
optimizer, LR schedule, RNG, data position) and continues exactly; when train_result.json exists the stage is
already done and exits 0 at once.

Modes:
  mode=preference  a preference JSONL (megatron_inpo.data.preferences) with the four *_logp columns filled by
                   `megatron-inpo logprobs`; loss = objective.name (inpo, inpo_nokl, dpo, ipo, sppo), mean over
                   the pairs of the global batch. micro_batch_size and global_batch_size count PAIRS.
  mode=sft         a JSONL of {"prompt_ids": [...], "response_ids": [...]}; loss = mean NLL over the response
                   tokens of the global batch. Batch sizes count sequences.

Parallelism: world size = TP x PP x DP; global_batch_size must be a multiple of micro_batch_size x DP
(gradient accumulation = global / (micro x DP) micro-batches per step). Megatron's schedule
(get_forward_backward_func) runs the micro-batches; the loss is a per-item sum divided once by the global item count
(Megatron's calculate_per_token_loss), so any TP / PP / DP split gives the same gradients as one process.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from megatron_inpo.faults import hold_if_requested

from megatron_inpo.config import ConfigError
from megatron_inpo.objectives import ObjectiveConfig

# ----------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class TrainConfig:
    """One training stage (an INPO iteration's policy update, or SFT)."""

    mode: str = "preference"
    """'preference' (pairs with stored log-probs, any objective) or 'sft' (prompt_ids / response_ids JSONL)."""
    data: str = ""
    """Training JSONL. preference: output of `megatron-inpo logprobs`; sft: {"prompt_ids", "response_ids"}."""
    init_checkpoint: str = ""
    """megatron-inpo checkpoint to start from (converter output or a training checkpoint; any TP/PP)."""
    output_dir: str = ""
    """Stage directory: checkpoints/, tensorboard/, train_config.yaml, train_result.json."""
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    """The preference objective (ignored in sft mode)."""

    tensor_model_parallel_size: int = 1
    """TP size (Megatron's name). Must divide the attention heads and KV groups."""
    pipeline_model_parallel_size: int = 1
    """PP size (Megatron's name). Must divide the number of layers."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (with TP > 1; saves activation memory)."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (Megatron's distributed optimizer, ZeRO-1 like)."""
    overlap_grad_reduce: bool = False
    """Overlap DP gradient reduction with backward (GPU)."""

    micro_batch_size: int = 1
    """Pairs (preference) or sequences (sft) per micro-batch on one DP rank; a pair is 2 sequences."""
    global_batch_size: int = 128
    """Pairs / sequences per optimizer step over all DP ranks (the paper: 128)."""
    epochs: int = 1
    """Passes over the data (each pass reshuffled); ignored when train_iters > 0."""
    train_iters: int = 0
    """Optimizer steps; 0 = epochs x (items // global_batch_size). The remainder of an epoch is dropped."""
    max_seq_len: int = 4096
    """Longest prompt + response allowed; a longer item is an error naming its line."""
    pad_multiple: int = 8
    """Pad sequence length to a multiple of this (kernels and sequence parallelism like round shapes)."""
    shuffle: bool = True
    """Shuffle the items each epoch (seeded; the order is part of the resumable state)."""

    lr: float = 5e-7
    """Peak learning rate (the paper: 5e-7)."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine decay."""
    warmup_ratio: float = 0.03
    """Fraction of the steps with linear warm-up from 0 (the paper: 0.03)."""
    lr_decay_style: str = "cosine"
    """'cosine', 'linear' or 'constant' (Megatron's OptimizerParamScheduler styles)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""

    precision: str = "auto"
    """'auto' (bf16 on GPU, fp32 on CPU), 'bf16' or 'fp32'. bf16 keeps fp32 master weights in the optimizer."""
    layer_spec: str = "auto"
    """'auto' (Transformer Engine when it imports, else local), 'te' or 'local'."""
    fp8: str = ""
    """'' (off), 'hybrid' or 'e4m3': Transformer Engine FP8 (GPU, layer_spec te, bf16)."""
    fp8_recipe: str = "delayed"
    """FP8 scaling recipe: 'delayed' (amax history) or 'current' (per-tensor current scaling, Megatron's
    'tensorwise'; also accepted under that name)."""
    recompute_activations: bool = False
    """Full activation recomputation of every layer (trades compute for memory)."""

    seed: int = 1234
    """Seed for model-parallel RNG and the data order."""
    save_interval: int = 0
    """Save a checkpoint every this many steps (0: only at the end). The final step is always saved."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept in output_dir/checkpoints (0 keeps all)."""
    log_interval: int = 1
    """Log scalars every this many steps."""
    peak_tflops: float = 989.0
    """Accelerator peak TFLOP/s for MFU (H100 dense bf16 989; FP8 1979). 0 disables MFU."""
    progress: bool = True
    """Show a tqdm progress bar on rank 0."""
    stop_after_steps: int = 0
    """Exit (without final save) after this many steps of this process; for tests of interrupted runs."""

    def validate(self) -> None:
        if self.mode not in ("preference", "sft"):
            raise ConfigError(f"mode: must be 'preference' or 'sft', got {self.mode!r}")
        for name in ("data", "init_checkpoint", "output_dir"):
            if not getattr(self, name):
                raise ConfigError(f"{name}: required (path)")
        if self.mode == "preference":
            self.objective.validate()
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "micro_batch_size",
                     "global_batch_size", "epochs", "pad_multiple", "log_interval", "max_seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}: must be a positive integer, got {v!r}")
        for name in ("train_iters", "save_interval", "keep_checkpoints", "stop_after_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name}: must be an integer >= 0, got {v!r}")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(f"global_batch_size: {self.global_batch_size} is not a multiple of micro_batch_size "
                              f"{self.micro_batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr: must be > 0, got {self.lr}")
        if not (0 <= self.min_lr <= self.lr):
            raise ConfigError(f"min_lr: must lie in [0, lr={self.lr}], got {self.min_lr}")
        if not (0.0 <= self.warmup_ratio < 1.0):
            raise ConfigError(f"warmup_ratio: must lie in [0, 1), got {self.warmup_ratio}")
        if self.lr_decay_style not in ("cosine", "linear", "constant"):
            raise ConfigError(f"lr_decay_style: 'cosine', 'linear' or 'constant', got {self.lr_decay_style!r}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay: must be >= 0, got {self.weight_decay}")
        for name in ("adam_beta1", "adam_beta2"):
            if not (0.0 <= getattr(self, name) < 1.0):
                raise ConfigError(f"{name}: must lie in [0, 1), got {getattr(self, name)}")
        if self.adam_eps <= 0:
            raise ConfigError(f"adam_eps: must be > 0, got {self.adam_eps}")
        if self.clip_grad < 0:
            raise ConfigError(f"clip_grad: must be >= 0, got {self.clip_grad}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"precision: 'auto', 'bf16' or 'fp32', got {self.precision!r}")
        if self.layer_spec not in ("auto", "te", "local"):
            raise ConfigError(f"layer_spec: 'auto', 'te' or 'local', got {self.layer_spec!r}")
        if self.fp8 not in ("", "hybrid", "e4m3"):
            raise ConfigError(f"fp8: '', 'hybrid' or 'e4m3', got {self.fp8!r}")
        if self.fp8_recipe not in ("delayed", "current", "tensorwise"):
            raise ConfigError(f"fp8_recipe: 'delayed' or 'current', got {self.fp8_recipe!r}")
        if self.fp8:
            if self.layer_spec == "local":
                raise ConfigError("fp8: needs the Transformer Engine layer spec; set layer_spec to 'te' or 'auto'")
            if self.precision == "fp32":
                raise ConfigError("fp8: needs precision 'bf16' (or 'auto' on GPU), got 'fp32'")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ConfigError("sequence_parallel: needs tensor_model_parallel_size > 1")
        if self.sequence_parallel and self.pad_multiple % self.tensor_model_parallel_size:
            raise ConfigError(f"pad_multiple: {self.pad_multiple} must be a multiple of tensor_model_parallel_size "
                              f"{self.tensor_model_parallel_size} with sequence_parallel (sequence is split over TP)")
        if self.peak_tflops < 0:
            raise ConfigError(f"peak_tflops: must be >= 0, got {self.peak_tflops}")

    def batch_pad_multiple(self) -> int:
        """pad_multiple, raised for FP8: TE's FP8 GEMMs need each rank's token rows divisible by 16, and under
        sequence parallelism a sequence is split over the TP ranks. Padding is masked, so values do not change."""
        if not self.fp8:
            return self.pad_multiple
        need = 16 * (self.tensor_model_parallel_size if self.sequence_parallel else 1)
        return math.lcm(self.pad_multiple, need)

    def validate_runtime(self, world_size: int, cuda: bool) -> int:
        """Checks that need the launch: returns the data-parallel size."""
        mp = self.tensor_model_parallel_size * self.pipeline_model_parallel_size
        if world_size % mp:
            raise ConfigError(f"tensor_model_parallel_size x pipeline_model_parallel_size = {mp} does not divide "
                              f"the world size {world_size}")
        dp = world_size // mp
        if self.global_batch_size % (self.micro_batch_size * dp):
            raise ConfigError(f"global_batch_size: {self.global_batch_size} is not a multiple of micro_batch_size x "
                              f"data-parallel size = {self.micro_batch_size} x {dp}")
        if not cuda:
            # precision 'bf16' is allowed on CPU: Megatron's bf16 optimizers (fp32 master weights) run under gloo,
            # which is how the CPU suite tests the mixed-precision path; it is slower than fp32 there.
            if self.fp8:
                raise ConfigError("fp8: needs a GPU with Transformer Engine; this machine has no CUDA")
            if self.layer_spec == "te":
                raise ConfigError("layer_spec: 'te' needs a GPU with Transformer Engine; use 'auto' or 'local'")
        return dp

    def resolved_precision(self, cuda: bool) -> str:
        return ("bf16" if cuda else "fp32") if self.precision == "auto" else self.precision


# ----------------------------------------------------------------------------------------------------------------
# Data


@dataclass
class SFTItem:
    prompt_ids: list[int]
    response_ids: list[int]


def read_sft(path: str | os.PathLike) -> list[SFTItem]:
    """{"prompt_ids": [...], "response_ids": [...]} per line; other fields are ignored."""
    from megatron_inpo.data.preferences import DataError, iter_jsonl

    items = []
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object")
        for key in ("prompt_ids", "response_ids"):
            ids = obj.get(key)
            if not isinstance(ids, list) or not all(isinstance(t, int) and t >= 0 for t in ids):
                raise DataError(f"{where}: field {key!r} must be a list of non-negative ints")
        if not obj["prompt_ids"] or not obj["response_ids"]:
            raise DataError(f"{where}: prompt_ids and response_ids must be non-empty")
        items.append(SFTItem(obj["prompt_ids"], obj["response_ids"]))
    return items


def item_length(item: Any) -> int:
    from megatron_inpo.engine.logprobs import pair_length, sequence_length

    if isinstance(item, SFTItem):
        return sequence_length(item.prompt_ids, item.response_ids)
    return pair_length(item)


def epoch_order(n: int, epoch: int, seed: int, shuffle: bool) -> list[int]:
    if not shuffle:
        return list(range(n))
    g = torch.Generator().manual_seed(seed * 1000003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def step_items(step: int, n: int, global_batch: int, seed: int, shuffle: bool) -> list[int]:
    """Dataset indices of the global batch of optimizer step `step` (0-based); a pure function of its arguments."""
    per_epoch = n // global_batch
    epoch, slot = divmod(step, per_epoch)
    order = epoch_order(n, epoch, seed, shuffle)
    return order[slot * global_batch : (slot + 1) * global_batch]


def split_micro_batches(indices: Sequence[int], lengths: Sequence[int], micro_batch_size: int,
                        dp_size: int, dp_rank: int) -> list[list[int]]:
    """This DP rank's micro-batches of a global batch: sorted by length (less padding), then dealt round-robin."""
    from megatron_inpo.engine.logprobs import plan_micro_batches

    plan = plan_micro_batches([lengths[i] for i in indices], micro_batch_size)
    return [[indices[j] for j in mb] for k, mb in enumerate(plan) if k % dp_size == dp_rank]


# ----------------------------------------------------------------------------------------------------------------
# The step


def make_batches(items: Sequence[Any], micro_batches: list[list[int]], pad_multiple: int, mode: str) -> list:
    """SequenceBatch per micro-batch, all padded to one length (the schedule's p2p shapes are per call)."""
    from megatron_inpo.engine.logprobs import make_pair_batch, make_sequence_batch, round_up

    S = round_up(max(item_length(items[i]) for mb in micro_batches for i in mb), pad_multiple)
    out = []
    for mb in micro_batches:
        if mode == "sft":
            out.append(make_sequence_batch([(items[i].prompt_ids, items[i].response_ids) for i in mb],
                                           pad_to=S, indices=mb))
        else:
            out.append(make_pair_batch([items[i] for i in mb], indices=mb, pad_to=S))
    return out


def _frozen_columns(pairs: Sequence[Any], device) -> dict[str, torch.Tensor | None]:
    # float64: the objective differences stored sums of hundreds of nats; the float32 policy sums promote to it.
    t = lambda xs: torch.tensor(xs, dtype=torch.float64, device=device)  # noqa: E731
    out = {
        "ref_chosen": t([p.ref_chosen_logp for p in pairs]),
        "ref_rejected": t([p.ref_rejected_logp for p in pairs]),
        "last_chosen": t([p.last_chosen_logp for p in pairs]),
        "last_rejected": t([p.last_rejected_logp for p in pairs]),
        "chosen_winrate": None,
        "rejected_winrate": None,
    }
    if all(p.chosen_winrate is not None and p.rejected_winrate is not None for p in pairs):
        out["chosen_winrate"] = t([p.chosen_winrate for p in pairs])
        out["rejected_winrate"] = t([p.rejected_winrate for p in pairs])
    return out


class StepRunner:
    """One optimizer step through get_forward_backward_func, for a given objective (or SFT).

    The loss of a micro-batch is the SUM over its items (pairs, or response tokens for SFT) and the schedule is run
    with calculate_per_token_loss, so finalize_model_grads divides the gradients once by the item count of the
    whole global batch (summed over micro-batches and DP ranks): the mean over the global batch, independent of how
    it is split. The per-pair log-probs are kept (detached) so that the step's metrics are computed exactly on the
    global batch afterwards.
    """

    def __init__(self, mode: str, objective: ObjectiveConfig | None, vocab_size: int, device):
        self.mode = mode
        self.objective = objective
        self.vocab_size = vocab_size
        self.device = device
        self.collected: list[dict[str, torch.Tensor]] = []

    def _loss(self, batch, cols, output):
        from megatron_inpo.engine.logprobs import sequence_logps, token_logps
        from megatron_inpo.objectives import PairLogps, compute_objective

        if self.mode == "sft":
            nll = -(token_logps(output, batch.labels, self.vocab_size) * batch.loss_mask).sum()
            n = batch.loss_mask.sum().to(torch.int)
            self.collected.append({"nll": nll.detach().reshape(1), "tokens": n.detach().reshape(1).float()})
            return nll, n, {"nll_sum": nll.detach()}
        lp = sequence_logps(output, batch, self.vocab_size)
        B = batch.num_pairs
        logps = PairLogps(policy_chosen=lp[:B], policy_rejected=lp[B:], **cols)
        loss, _ = compute_objective(self.objective, logps, reduction="sum")
        self.collected.append({f.name: (getattr(logps, f.name).detach() if getattr(logps, f.name) is not None
                                        else None) for f in dataclasses.fields(logps)})
        return loss, torch.tensor(B, dtype=torch.int, device=lp.device), {"loss_sum": loss.detach()}

    def run(self, model: list, batches: list, items: Sequence[Any], forward_only: bool = False):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.collected = []
        # Every micro-batch and its frozen log-prob columns go to the device before the schedule starts: inside
        # it, each blocking copy (or tensor built in the loss) would hold the CPU until the queued forward ran.
        staged = [(b.to(self.device), None if self.mode == "sft" else
                   _frozen_columns([items[i] for i in b.indices], self.device)) for b in batches]

        def forward_step(data_iterator, chunk):
            b, cols = next(data_iterator)
            out = chunk(b.tokens, b.position_ids, attention_mask=None)
            return out, lambda o: self._loss(b, cols, o)

        rows = batches[0].tokens.shape[0]
        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(staged), model=model,
            num_microbatches=len(batches), seq_length=batches[0].seq_len, micro_batch_size=rows,
            forward_only=forward_only,
        )

    def global_metrics(self) -> dict[str, float] | None:
        """Loss and metrics of the whole global batch, on every rank (from the last stage, TP rank 0)."""
        import torch.distributed as dist
        from megatron.core import parallel_state as ps
        from megatron_inpo.objectives import PairLogps, compute_objective

        reporter = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
        names = (["loss", "tokens"] if self.mode == "sft" else
                 ["loss", "h_mean", "h_std", "chosen_logratio", "rejected_logratio", "margin", "accuracy"])
        vec = torch.zeros(len(names) + 1, dtype=torch.float64)
        if reporter:
            mine = [{k: (v.cpu() if v is not None else None) for k, v in d.items()} for d in self.collected]
            parts: list = [None] * ps.get_data_parallel_world_size()
            dist.all_gather_object(parts, mine, group=ps.get_data_parallel_group())
            if ps.get_data_parallel_rank() == 0:
                flat = [d for p in parts for d in p]
                if self.mode == "sft":
                    nll = sum(float(d["nll"].sum()) for d in flat)
                    tok = sum(float(d["tokens"].sum()) for d in flat)
                    vals = [nll / max(tok, 1.0), tok]
                else:
                    cat = {k: (torch.cat([d[k] for d in flat]).double() if flat[0][k] is not None else None)
                           for k in flat[0]}
                    loss, m = compute_objective(self.objective, PairLogps(**cat), reduction="mean")
                    vals = [float(loss)] + [float(m[k]) for k in names[1:]]
                vec[:-1] = torch.tensor(vals, dtype=torch.float64)
                vec[-1] = 1.0
        # One rank holds the numbers; a world all-reduce hands them to everybody (rank 0 logs them).
        dev_vec = vec.to(self.device)
        dist.all_reduce(dev_vec)
        vec = dev_vec.cpu()
        if vec[-1] != 1.0:
            raise RuntimeError("metrics: expected exactly one reporting rank")
        return dict(zip(names, vec[:-1].tolist()))


# ----------------------------------------------------------------------------------------------------------------
# Optimizer and schedule


def lr_steps(cfg: TrainConfig, total_steps: int) -> tuple[int, int]:
    """(warm-up steps, decay steps) of the schedule."""
    warmup = int(round(cfg.warmup_ratio * total_steps))
    return warmup, max(total_steps, warmup + 1)


def fuse_torch_adam(optimizer) -> int:
    """Switch Megatron's fallback torch AdamW to torch's fused kernel; returns how many param groups it switched.

    Without Transformer Engine or apex, megatron-core builds torch.optim.AdamW on its default multi-tensor path,
    which streams the fp32 master weights and both moments through memory once per elementwise op (about 18 array
    passes per step); the fused kernel makes the same update in one pass (7 arrays). With TE's or apex's
    FusedAdam there is nothing to switch.
    """
    from megatron_inpo.engine.checkpoint import torch_adams

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


def build_optimizer(cfg: TrainConfig, model: list, precision: str, total_steps: int):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_inpo.engine import parallel as engine_parallel

    ocfg = OptimizerConfig(
        optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad, bf16=precision == "bf16", fp16=False,
        params_dtype=torch.bfloat16 if precision == "bf16" else torch.float32,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
    )
    if cfg.use_distributed_optimizer or precision != "fp32":
        # CPU workaround (no-op on GPU): both the distributed and the bf16 optimizer check param.type() names
        engine_parallel.prepare_optimizer_params(model)
    optimizer = get_megatron_optimizer(ocfg, model)
    fuse_torch_adam(optimizer)
    warmup, decay = lr_steps(cfg, total_steps)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=cfg.lr, min_lr=cfg.min_lr, lr_warmup_steps=warmup, lr_decay_steps=decay,
        lr_decay_style=cfg.lr_decay_style, start_wd=cfg.weight_decay, end_wd=cfg.weight_decay,
        wd_incr_steps=decay, wd_incr_style="constant",
    )
    return optimizer, scheduler


# ----------------------------------------------------------------------------------------------------------------
# Runtime: process groups and the model (model building itself lives in engine/model.py)


@dataclass
class Runtime:
    device: torch.device
    cuda: bool
    world_size: int
    rank: int
    dp_size: int


def init_runtime(tp: int, pp: int, seed: int) -> Runtime:
    """torch.distributed (NCCL on GPU, gloo on CPU with the CPU mode of engine/cpu.py) + Megatron's groups."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_inpo.engine import parallel as engine_parallel

    engine_parallel.initialize(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, seed=seed)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return Runtime(device, cuda, dist.get_world_size(), dist.get_rank(), ps.get_data_parallel_world_size())


def build_policy(hf_config: dict, cfg: TrainConfig, runtime: Runtime, padded_vocab_size: int | None = None):
    """The unwrapped model chunk of this rank (.model), true vocab size, padded vocab size, layer spec name.

    `padded_vocab_size` (from a checkpoint's metadata) keeps the checkpoint's padding, so it loads at any TP that
    divides it.
    """
    from megatron.core import parallel_state as ps

    from megatron_inpo.engine import model as engine_model

    precision = cfg.resolved_precision(runtime.cuda)
    built = engine_model.build_model(
        hf_config,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        precision=precision,
        layer_spec=cfg.layer_spec,
        fp8=cfg.fp8 or None,
        fp8_recipe=cfg.fp8_recipe,
        sequence_parallel=cfg.sequence_parallel,
        recompute_activations=cfg.recompute_activations,
        padded_vocab_size=padded_vocab_size,
    )
    return built


def wrap_ddp(model: torch.nn.Module, cfg: TrainConfig, precision: str, per_item_loss: bool = True) -> list:
    """Megatron DDP (and Float16Module for bf16) around one model chunk; sets the schedule's hooks."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.transformer.module import Float16Module

    config = model.config
    config.calculate_per_token_loss = per_item_loss
    config.finalize_model_grads_func = finalize_model_grads
    if precision == "bf16" and not isinstance(model, Float16Module):
        model = Float16Module(config, model)
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=cfg.overlap_grad_reduce,
        use_distributed_optimizer=cfg.use_distributed_optimizer, average_in_collective=False,
    )
    ddp = DistributedDataParallel(config=config, ddp_config=ddp_cfg, module=model)
    if cfg.overlap_grad_reduce:
        config.no_sync_func = ddp.no_sync
    return [ddp]


# ----------------------------------------------------------------------------------------------------------------
# The stage


def _data_digest(path: str) -> str:
    from megatron_inpo.engine.logprobs import _file_digest

    return _file_digest(Path(path))


def load_items(cfg: TrainConfig) -> list:
    from megatron_inpo.data.preferences import DataError, read_preferences

    if cfg.mode == "sft":
        items = read_sft(cfg.data)
    else:
        items = read_preferences(cfg.data, require_logps=True)
        if cfg.objective.name == "sppo" and any(p.chosen_winrate is None or p.rejected_winrate is None
                                                for p in items):
            raise DataError(f"{cfg.data}: objective sppo needs chosen_winrate and rejected_winrate on every pair")
    for k, it in enumerate(items):
        if item_length(it) > cfg.max_seq_len:
            raise DataError(f"{cfg.data}: item {k + 1} has {item_length(it)} tokens > max_seq_len={cfg.max_seq_len}")
    if len(items) < cfg.global_batch_size:
        raise DataError(f"{cfg.data}: {len(items)} items, fewer than one global batch ({cfg.global_batch_size})")
    return items


def total_steps(cfg: TrainConfig, n_items: int) -> int:
    return cfg.train_iters or cfg.epochs * (n_items // cfg.global_batch_size)


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) one training stage; returns the content of train_result.json."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_inpo.config import save_yaml, validate_all
    from megatron_inpo.engine import checkpoint as ckpt
    from megatron_inpo.engine.metrics import FlopDims, MetricsLog, batch_flops, throughput
    from megatron_inpo.files import atomic_write_json

    validate_all(cfg)
    out = Path(cfg.output_dir)
    result_path = out / "train_result.json"
    if result_path.exists():  # stage already done
        return {**json.loads(result_path.read_text()), "rank0": os.environ.get("RANK", "0") == "0"}

    # Bad data or a bad init checkpoint fail here, before any process group exists.
    items = load_items(cfg)
    steps = total_steps(cfg, len(items))
    digest = _data_digest(cfg.data)
    lengths = [item_length(it) for it in items]
    init_meta = ckpt.read_meta(cfg.init_checkpoint)

    runtime = init_runtime(cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size, cfg.seed)
    cfg.validate_runtime(runtime.world_size, runtime.cuda)
    precision = cfg.resolved_precision(runtime.cuda)
    is_rank0 = runtime.rank == 0
    if is_rank0:
        out.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, out / "train_config.yaml")
    built = build_policy(init_meta["hf_config"], cfg, runtime, init_meta["padded_vocab_size"])
    model = wrap_ddp(built.model, cfg, precision)
    optimizer, scheduler = build_optimizer(cfg, model, precision, steps)

    ckpt_root = out / "checkpoints"
    resume = ckpt.latest_checkpoint(ckpt_root)
    start = 0
    if resume is not None:
        state = ckpt.load_checkpoint(resume, model, optimizer, scheduler)
        data_state = state["data"] or {}
        if data_state.get("data_sha256") != digest:
            raise ckpt.CheckpointError(f"{resume}: was trained on different data than {cfg.data} (digest differs)")
        start = int(data_state["step"])
        if is_rank0:
            print(f"resuming from {resume} (step {start} of {steps})", flush=True)
    else:
        # The optimizer is passed so that its fp32 master weights (bf16) are refreshed from the loaded weights.
        ckpt.load_checkpoint(cfg.init_checkpoint, model, optimizer, load_rng=False, optimizer_state=False)
    tok_dir = Path(cfg.init_checkpoint) / "tokenizer"
    meta = {"hf_config": init_meta["hf_config"], "padded_vocab_size": built.padded_vocab_size,
            "layer_spec": built.layer_spec}

    dims = FlopDims.from_hf_config(init_meta["hf_config"], built.padded_vocab_size)
    n_gpus = runtime.world_size
    runner = StepRunner(cfg.mode, cfg.objective, built.vocab_size, runtime.device)
    logger = MetricsLog(out / "tensorboard", resume_step=start + 1, enabled=is_rank0)  # first step logged next
    bar = None
    if is_rank0 and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=start, desc=f"train[{cfg.mode}]", unit="step")
    last_metrics: dict = {}
    done_here = 0
    dp_rank = ps.get_data_parallel_rank()
    try:
        for step in range(start, steps):
            idx = step_items(step, len(items), cfg.global_batch_size, cfg.seed, cfg.shuffle)
            mbs = split_micro_batches(idx, lengths, cfg.micro_batch_size, runtime.dp_size, dp_rank)
            batches = make_batches(items, mbs, cfg.batch_pad_multiple(), cfg.mode)
            if runtime.cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for chunk in model:
                chunk.zero_grad_buffer()
            optimizer.zero_grad()
            runner.run(model, batches, items)
            lr_used = optimizer.param_groups[0]["lr"]
            ok, grad_norm, _ = optimizer.step()
            scheduler.step(increment=1)
            if runtime.cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            metrics = runner.global_metrics()
            # Throughput over the whole job: padded tokens actually computed on this DP rank, summed over DP.
            local = torch.tensor([sum(b.tokens.numel() for b in batches),
                                  batch_flops(dims, [b.seq_len for b in batches for _ in range(b.tokens.shape[0])])],
                                 dtype=torch.float64, device=runtime.device)
            if ps.get_tensor_model_parallel_rank() == 0 and ps.is_pipeline_first_stage():
                dist.all_reduce(local, group=ps.get_data_parallel_group())
            tokens, flops = local.tolist()
            speed = throughput(flops / n_gpus, int(tokens), dt, cfg.peak_tflops or None)
            metrics.update(grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                           lr=lr_used, step_time_s=dt,
                           tokens_per_s=speed["tokens_per_s"], tflops_per_gpu=speed["tflops"],
                           update_ok=float(bool(ok)))
            if "mfu" in speed:
                metrics["mfu"] = speed["mfu"]
            last_metrics = metrics
            if (step + 1) % cfg.log_interval == 0 or step + 1 == steps:
                logger.log(step + 1, metrics)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4g}")
            done_here += 1
            data_state = {"step": step + 1, "data_sha256": digest, "num_items": len(items)}
            if step + 1 == steps or (cfg.save_interval and (step + 1) % cfg.save_interval == 0):
                ckpt.save_checkpoint(ckpt_root, step + 1, model, meta, optimizer, scheduler, data_state,
                                     tokenizer_dir=tok_dir if tok_dir.is_dir() else None,
                                     keep_last=cfg.keep_checkpoints)
                hold_if_requested()  # fault-injection tests only: wait here for the driver's kill
            if cfg.stop_after_steps and done_here >= cfg.stop_after_steps and step + 1 < steps:
                return {"stopped_at": step + 1}
    finally:
        logger.close()
        if bar is not None:
            bar.close()
    final = ckpt.latest_checkpoint(ckpt_root)
    result = {"final_checkpoint": str(final), "steps": steps, "metrics": last_metrics, "rank0": is_rank0}
    if is_rank0:
        atomic_write_json(result_path, {k: v for k, v in result.items() if k != "rank0"})
    dist.barrier()
    return result
