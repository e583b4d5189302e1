"""Policy training on Megatron-Core: preference objectives (INPO and baselines) and SFT, with TP / PP / DP.

Command line (the driver runs these as subprocesses; one process per GPU / CPU rank):

    python -m megatron_inpo train --config stage.yaml [--a.b=value ...]
    torchrun --nproc-per-node N -m megatron_inpo train --config stage.yaml --megatron.parallel.tensor_model_parallel_size=2

The config is an engine.config.TrainStageConfig. Required: `data` (JSONL), `init_checkpoint` (a megatron-inpo
checkpoint: converter output or a training checkpoint), `output_dir`. The stage writes into output_dir:

    train_config.yaml          resolved config
    checkpoints/step_XXXXXXXX  checkpoints (see engine/checkpoint.py); the last one is the trained policy
    tensorboard/               event files + metrics.jsonl (one line per step)
    train_result.json          {"final_checkpoint", "steps", "metrics"}: written last, atomically

Re-running the same command resumes from the newest complete checkpoint in output_dir/checkpoints (model,
optimizer, LR schedule, RNG, data position) and continues exactly; when train_result.json exists the stage is
already done and exits 0 at once.

Losses (engine/step.py):
  loss=preference  a preference JSONL (megatron_inpo.data.preferences) with the four *_logp columns filled by
                   `megatron-inpo logprobs`; the objective (inpo, inpo_nokl, dpo, ipo, sppo), mean over the pairs
                   of the global batch. micro_batch_size and global_batch_size count PAIRS.
  loss=sft         a JSONL of {"prompt_ids": [...], "response_ids": [...]}; mean NLL over the response tokens of
                   the global batch. Batch sizes count sequences.

Parallelism: world size = TP x PP x DP; global_batch_size must be a multiple of micro_batch_size x DP
(gradient accumulation = global / (micro x DP) micro-batches per step). Megatron's schedule runs the
micro-batches (engine/step.py), so any TP / PP / DP split gives the same gradients as one process.
With megatron.packing (the default) a step's items are dealt to the DP ranks by tokens and packed into rows of up
to train.max_seq_len tokens, one row per micro-batch (engine/batches.py plan_step); micro_batch_size then only
sizes the padded path (and the divisibility check above).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from megatron_inpo.engine.config import TrainStageConfig, batch_pad_multiple
from megatron_inpo.events import emit


def load_items(cfg: TrainStageConfig) -> list:
    """The stage's SFT items or preference pairs, checked line by line (file:line and field in every error):
    token ids within the init checkpoint's vocabulary, lengths within max_seq_len, log-probs finite, ids unique;
    then that there is at least one global batch. Runs before any process group exists."""
    from megatron_inpo.data.preferences import DataError, read_preferences
    from megatron_inpo.engine import checkpoint as ckpt
    from megatron_inpo.engine.batches import model_limits, read_sft

    t = cfg.train
    try:
        vocab_size = model_limits(ckpt.read_meta(cfg.init_checkpoint))[0]
    except ckpt.CheckpointError:
        vocab_size = None  # train() reports the checkpoint itself right after the data checks
    if cfg.loss == "sft":
        items = read_sft(cfg.data, vocab_size=vocab_size, max_len=t.max_seq_len, max_len_name="train.max_seq_len")
    else:
        items = read_preferences(cfg.data, require_logps=True, require_winrates=cfg.objective.name == "sppo",
                                 vocab_size=vocab_size, max_len=t.max_seq_len, max_len_name="train.max_seq_len")
    if len(items) < t.global_batch_size:
        raise DataError(f"{cfg.data}: {len(items)} items, fewer than one global batch ({t.global_batch_size})")
    return items


def train(cfg: TrainStageConfig) -> dict:
    """Run (or resume) one training stage; returns the content of train_result.json."""
    import torch.distributed as dist

    from megatron_inpo.config import save_yaml, validate_all
    from megatron_inpo.engine import checkpoint as ckpt
    from megatron_inpo.engine.logprobs import file_digest
    from megatron_inpo.engine.optimizer import build_optimizer
    from megatron_inpo.engine.policy import build_policy, init_runtime, wrap_ddp
    from megatron_inpo.files import atomic_write_json

    validate_all(cfg)
    out = Path(cfg.output_dir)
    result_path = out / "train_result.json"
    if result_path.exists():  # stage already done
        return {**json.loads(result_path.read_text()), "rank0": os.environ.get("RANK", "0") == "0"}

    # Bad data or a bad init checkpoint fail here, before any process group exists.
    items = load_items(cfg)
    steps = cfg.train.total_steps(len(items))
    digest = file_digest(Path(cfg.data))
    init_meta = ckpt.read_meta(cfg.init_checkpoint)

    runtime = init_runtime(cfg.megatron, cfg.seed)
    cfg.validate_runtime(runtime.world_size, runtime.cuda)
    precision = cfg.megatron.model.resolved_precision(runtime.cuda)
    built = build_policy(init_meta["hf_config"], cfg.megatron, runtime, init_meta["padded_vocab_size"])
    model = wrap_ddp(built.model, cfg.megatron, precision)
    optimizer, scheduler = build_optimizer(cfg.train, cfg.megatron.parallel, model, precision, steps)

    resume = ckpt.latest_checkpoint(out / "checkpoints")
    start = 0
    if resume is not None:
        data_state = ckpt.load_checkpoint(resume, model, optimizer, scheduler)["data"] or {}
        if data_state.get("data_sha256") != digest:
            raise ckpt.CheckpointError(f"{resume}: was trained on different data than {cfg.data} (digest differs)")
        start = int(data_state["step"])
        if runtime.rank == 0:
            print(f"resuming from {resume} (step {start} of {steps})", flush=True)
    else:
        # The optimizer is passed so that its fp32 master weights (bf16) are refreshed from the loaded weights.
        ckpt.load_checkpoint(cfg.init_checkpoint, model, optimizer, load_rng=False, optimizer_state=False)
    # written once the init checkpoint has loaded (and passed its trust checks): a refused stage writes nothing
    if runtime.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, out / "train_config.yaml")
    meta = {"hf_config": init_meta["hf_config"], "padded_vocab_size": built.padded_vocab_size,
            "layer_spec": built.layer_spec}
    trainer = _Trainer(cfg, items, runtime, model, optimizer, scheduler, built, digest, meta)
    stopped_at = trainer.run(start, steps)
    if stopped_at is not None:
        return {"stopped_at": stopped_at}
    final = ckpt.latest_checkpoint(out / "checkpoints")
    result = {"final_checkpoint": str(final), "steps": steps, "metrics": trainer.last_metrics,
              "rank0": runtime.rank == 0}
    if runtime.rank == 0:
        atomic_write_json(result_path, {k: v for k, v in result.items() if k != "rank0"})
    dist.barrier()
    return result


class _Trainer:
    """The step loop of one stage: batches of each step, the schedule, the optimizer, metrics, checkpoints."""

    def __init__(self, cfg: TrainStageConfig, items: list, runtime, model: list, optimizer, scheduler, built,
                 digest: str, meta: dict) -> None:
        from megatron_inpo.engine.batches import item_length
        from megatron_inpo.engine.metrics import FlopDims
        from megatron_inpo.engine.step import OutputHead, make_loss

        self.cfg, self.items, self.runtime = cfg, items, runtime
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.digest, self.meta = digest, meta
        self.lengths = [item_length(it) for it in items]
        self.loss = make_loss(cfg.loss, cfg.objective, items)
        self.head = OutputHead.of(cfg.megatron, built.vocab_size)
        self.dims = FlopDims.from_hf_config(meta["hf_config"], built.padded_vocab_size)
        tok_dir = Path(cfg.init_checkpoint) / "tokenizer"
        self.tokenizer_dir = tok_dir if tok_dir.is_dir() else None
        self.last_metrics: dict = {}

    def run(self, start: int, steps: int) -> int | None:
        """Steps [start, steps); the step count where stop_after_steps stopped it, else None."""
        from megatron_inpo.engine import checkpoint as ckpt
        from megatron_inpo.engine.metrics import MetricsLog, StageProgress

        cfg, t, rank0 = self.cfg, self.cfg.train, self.runtime.rank == 0
        out = Path(cfg.output_dir)
        logger = MetricsLog(out / "tensorboard", resume_step=start + 1, enabled=rank0)  # first step logged next
        progress = StageProgress(f"train[{cfg.loss}]", steps, start, "step", bar=cfg.progress,
                                 path=cfg.progress_file, enabled=rank0)
        try:
            for step in range(start, steps):
                metrics = self.step(step)
                self.last_metrics = metrics
                if (step + 1) % t.log_interval == 0 or step + 1 == steps:
                    logger.log(step + 1, metrics)
                progress.update(1, loss=metrics["loss"], tokens_per_s=metrics["tokens_per_s"])
                if step + 1 == steps or (t.save_interval and (step + 1) % t.save_interval == 0):
                    data_state = {"step": step + 1, "data_sha256": self.digest, "num_items": len(self.items)}
                    ckpt.save_checkpoint(out / "checkpoints", step + 1, self.model, self.meta, self.optimizer,
                                         self.scheduler, data_state, tokenizer_dir=self.tokenizer_dir,
                                         keep_last=t.keep_checkpoints)
                    emit("checkpoint")  # a step checkpoint is complete (megatron_inpo/events.py)
                if t.stop_after_steps and step + 1 - start >= t.stop_after_steps and step + 1 < steps:
                    return step + 1
        finally:
            logger.close()
            progress.close()
        return None

    def step(self, step: int) -> dict:
        """One optimizer step on the global batch of `step`; returns its metrics."""
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        from megatron_inpo.engine.batches import plan_step, step_items
        from megatron_inpo.engine.metrics import batch_flops, throughput
        from megatron_inpo.engine.step import global_metrics, run_schedule

        t, rt, engine = self.cfg.train, self.runtime, self.cfg.megatron
        idx = step_items(step, len(self.items), t.global_batch_size, self.cfg.seed, t.shuffle, self.lengths,
                         t.length_buckets)
        batches = plan_step(self.items, idx, packing=engine.packing, micro_batch_size=t.micro_batch_size,
                            capacity=t.max_seq_len, dp_size=rt.dp_size, dp_rank=ps.get_data_parallel_rank(),
                            pad_multiple=batch_pad_multiple(t.pad_multiple, engine),
                            uniform=engine.parallel.pipeline_model_parallel_size > 1)
        if rt.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        run_schedule(self.model, batches, self.loss, self.head, rt.device)
        lr_used = self.optimizer.param_groups[0]["lr"]
        ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        if rt.cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        metrics = global_metrics(self.loss, rt.device)
        # Throughput over the whole job: tokens actually computed on this DP rank (padding included), summed over
        # DP; FLOPs per attention span (a packed row's segments attend separately).
        local = torch.tensor([sum(b.tokens.numel() for b in batches),
                              batch_flops(self.dims, [L for b in batches for L in b.segment_lengths])],
                             dtype=torch.float64, device=rt.device)
        if ps.get_tensor_model_parallel_rank() == 0 and ps.is_pipeline_first_stage():
            dist.all_reduce(local, group=ps.get_data_parallel_group())
        tokens, flops = local.tolist()
        speed = throughput(flops / rt.world_size, int(tokens), dt, t.peak_tflops or None)
        metrics.update(grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                       lr=lr_used, step_time_s=dt, tokens_per_s=speed["tokens_per_s"], tflops_per_gpu=speed["tflops"],
                       update_ok=float(bool(ok)))
        if "mfu" in speed:
            metrics["mfu"] = speed["mfu"]
        return metrics
