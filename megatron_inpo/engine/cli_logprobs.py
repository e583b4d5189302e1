"""`megatron-inpo logprobs`: store log pi_ref and log pi_t of every (y_w, y_l) of a preference file.

    megatron-inpo logprobs --data pairs.jsonl --output pairs.logp.jsonl --ref-checkpoint REF [--last-checkpoint LAST]
    torchrun --nproc-per-node N -m megatron_inpo logprobs --config logprobs.yaml tensor_model_parallel_size=2

Forward-only over Megatron-Core (any TP / PP / DP); results are kept chunk by chunk in a progress directory next
to the output (`.<output>.logprobs-progress/`), so a re-run after a crash continues where it stopped; the output is
written atomically at the end and the progress directory removed. An existing output is left alone (stage done).
With no last_checkpoint (iteration 1, pi_1 = pi_ref) the last_* columns are copies of the ref_* ones.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path


@dataclass
class LogprobConfig:
    """The forward-only log-prob pass of one INPO iteration."""

    data: str = ""
    """Preference JSONL (megatron_inpo.data.preferences) whose pairs need log-probs."""
    output: str = ""
    """Output JSONL: the same pairs with ref_chosen_logp, ref_rejected_logp, last_chosen_logp, last_rejected_logp."""
    ref_checkpoint: str = ""
    """megatron-inpo checkpoint of pi_ref (the SFT model)."""
    last_checkpoint: str = ""
    """Checkpoint of the previous iterate pi_t; '' or the same path as ref_checkpoint at iteration 1."""
    tensor_model_parallel_size: int = 1
    """TP size for the pass (any; checkpoints reshard on load)."""
    pipeline_model_parallel_size: int = 1
    """PP size for the pass."""
    micro_batch_size: int = 4
    """Pairs per micro-batch (2x sequences: chosen and rejected always together)."""
    chunk_pairs: int = 256
    """Pairs per resumable chunk (sorted by length inside a chunk to cut padding)."""
    pad_multiple: int = 8
    """Pad sequence length to a multiple of this."""
    precision: str = "auto"
    """'auto' (bf16 on GPU, fp32 on CPU), 'bf16' or 'fp32'. Log-softmax is computed in fp32 either way."""
    layer_spec: str = "auto"
    """'auto', 'te' or 'local' (as for training)."""
    seed: int = 1234
    """Megatron RNG seed (no randomness is used in a forward pass without dropout)."""
    progress: bool = True
    """tqdm progress bar on rank 0."""

    def validate(self) -> None:
        from megatron_inpo.config import ConfigError

        for name in ("data", "output", "ref_checkpoint"):
            if not getattr(self, name):
                raise ConfigError(f"{name}: required (path)")
        if Path(self.output).resolve() == Path(self.data).resolve():
            raise ConfigError("output: must differ from data (the input is read while the output is written)")
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "micro_batch_size",
                     "chunk_pairs", "pad_multiple"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}: must be a positive integer, got {v!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"precision: 'auto', 'bf16' or 'fp32', got {self.precision!r}")
        if self.layer_spec not in ("auto", "te", "local"):
            raise ConfigError(f"layer_spec: 'auto', 'te' or 'local', got {self.layer_spec!r}")

    def same_models(self) -> bool:
        return not self.last_checkpoint or Path(self.last_checkpoint).resolve() == Path(self.ref_checkpoint).resolve()


def run_logprobs(cfg: LogprobConfig) -> dict:
    """Compute and write the four log-prob columns (resuming a cut run); returns a small summary."""
    import torch
    import torch.distributed as dist

    from megatron_inpo.data.preferences import read_preferences
    from megatron_inpo.engine import checkpoint as ckpt
    from megatron_inpo.engine import logprobs as lp
    from megatron_inpo.engine.train import TrainConfig, build_policy, init_runtime

    cfg.validate()
    out = Path(cfg.output)
    if out.exists():
        return {"output": str(out), "skipped": True}
    pairs = read_preferences(cfg.data)
    for path in (cfg.ref_checkpoint, cfg.last_checkpoint):
        if path:
            ckpt.read_meta(path)  # a wrong path fails before any process group exists
    runtime = init_runtime(cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size, cfg.seed)
    tcfg = TrainConfig(precision=cfg.precision, layer_spec=cfg.layer_spec,
                       tensor_model_parallel_size=cfg.tensor_model_parallel_size,
                       pipeline_model_parallel_size=cfg.pipeline_model_parallel_size)
    mp = cfg.tensor_model_parallel_size * cfg.pipeline_model_parallel_size
    if runtime.world_size % mp:
        from megatron_inpo.config import ConfigError

        raise ConfigError(f"tensor_model_parallel_size x pipeline_model_parallel_size = {mp} does not divide the "
                          f"world size {runtime.world_size}")
    # precision 'bf16' also runs on CPU (as training does; see TrainConfig.validate_runtime), only more slowly.
    roles = [("ref", cfg.ref_checkpoint)] + ([] if cfg.same_models() else [("last", cfg.last_checkpoint)])
    pdir = lp.progress_dir(out)
    values: dict[str, list] = {}
    computed: dict[str, int] = {}
    for role, path in roles:
        meta = ckpt.read_meta(path)
        built = build_policy(meta["hf_config"], tcfg, runtime, meta["padded_vocab_size"])
        model = built.model
        if tcfg.resolved_precision(runtime.cuda) == "bf16":
            from megatron.core.transformer.module import Float16Module

            model = Float16Module(model.config, model)
        ckpt.load_checkpoint(path, [model], load_rng=False)
        model.eval()
        key = lp.store_key(Path(cfg.data), role, path, cfg.micro_batch_size, cfg.chunk_pairs)
        # Only rank 0 touches the progress files; compute_role_logps broadcasts what is done.
        store = lp.ProgressStore(pdir / role, key) if runtime.rank == 0 else None
        bar = None
        if runtime.rank == 0 and cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=len(pairs), desc=f"logprobs[{role}]", unit="pair")
        values[role], computed[role] = lp.compute_role_logps(
            role, pairs, [model], built.vocab_size, cfg.micro_batch_size, cfg.chunk_pairs, store,
            pad_multiple=cfg.pad_multiple, device=runtime.device,
            progress=(bar.update if bar is not None else None))
        if bar is not None:
            bar.close()
        del model, built
        if runtime.cuda:
            torch.cuda.empty_cache()
    if "last" not in values:
        values["last"] = values["ref"]
    if runtime.rank == 0:
        lp.write_with_logps(pairs, values["ref"], values["last"], out)
    dist.barrier()
    if runtime.rank == 0:
        shutil.rmtree(pdir, ignore_errors=True)
    return {"output": str(out), "pairs": len(pairs), "computed_chunks": computed, "rank0": runtime.rank == 0}


def main(argv: list[str] | None = None) -> int:
    from megatron_inpo.engine.cli import run_command

    return run_command(argv, LogprobConfig, "megatron-inpo logprobs", __doc__, run_logprobs,
                       lambda summary: f"logprobs: {summary}" if summary.get("rank0", True) else None)
