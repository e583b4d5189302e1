"""The forward-only log-prob pass: log pi_ref and log pi_t of every (y_w, y_l) of a preference file.

    megatron-inpo logprobs --config stage.yaml      (an engine.config.LogprobStageConfig; `run_logprobs`)

Results go to a progress directory next to the output (`.<output>.logprobs-progress/`) chunk by chunk, so a re-run
after a crash continues where it stopped; the output (the pairs with ref_chosen_logp, ref_rejected_logp,
last_chosen_logp, last_rejected_logp) is written atomically at the end and the progress directory removed. An
existing output is left alone (stage done). With no last_checkpoint (iteration 1, pi_1 = pi_ref) the last_*
columns are copies of the ref_* ones. Log-probs come from the same schedule and forward_step as training
(engine/step.py); vocabulary rows added for TP divisibility are masked out of the softmax, so the numbers equal a
transformers forward of the same weights.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Sequence

import torch

from megatron_inpo.data.preferences import PreferencePair
from megatron_inpo.engine.batches import SequenceBatch
from megatron_inpo.engine.config import LogprobStageConfig
from megatron_inpo.events import emit

log = logging.getLogger(__name__)


def forward_pair_logps(
    model: list,
    batches: Sequence[SequenceBatch],
    head,
    device: torch.device | str = "cpu",
) -> list[tuple[tuple[int, ...], torch.Tensor, torch.Tensor]] | None:
    """Forward-only through the schedule; every batch holds pairs and all have one shape (on every pipeline stage);
    `head` (engine/step.OutputHead) says how the log-probs come out of the model.

    Returns, on the last pipeline stage, (indices, chosen_logps [B], rejected_logps [B]) per micro-batch; None on
    other stages.
    """
    from megatron.core import parallel_state as ps

    from megatron_inpo.engine.step import PairLogpsProbe, run_schedule

    if not batches:
        return [] if ps.is_pipeline_last_stage() else None
    store = run_schedule(model, batches, PairLogpsProbe(), head, device, forward_only=True)
    if not ps.is_pipeline_last_stage():
        return None
    return [(d["indices"], d["chosen"].double().cpu(), d["rejected"].double().cpu()) for d in store]


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ProgressStore:
    """Per-role results of finished chunks, one fsynced JSONL line per chunk: {"chunk": k, "values": [[c, r], ..]}.

    Used by rank 0 only (compute_role_logps broadcasts what is done). A line torn by a crash is dropped (its chunk
    is recomputed). The store is tied to the input file's digest, the model directory and the chunking; a mismatch
    discards it.
    """

    def __init__(self, root: Path, key: dict):
        self.root = root
        self.key = key
        meta = root / "meta.json"
        if root.exists():
            try:
                ok = json.loads(meta.read_text()) == key
            except (OSError, json.JSONDecodeError):
                ok = False
            if not ok:
                shutil.rmtree(root)
        root.mkdir(parents=True, exist_ok=True)
        if not meta.exists():
            from megatron_inpo.files import atomic_write_json

            atomic_write_json(meta, key)
        from megatron_inpo.data.preferences import repair_torn_tail

        for path in root.glob("*.jsonl"):
            repair_torn_tail(path)

    def done(self, role: str) -> dict[int, list[list[float]]]:
        from megatron_inpo.data.preferences import seal_matches

        path = self.root / f"{role}.jsonl"
        out: dict[int, list[list[float]]] = {}
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    break  # a torn tail (repaired at construction; kept safe for direct readers)
                if seal_matches(obj) is False:  # changed after it was written: the chunk is computed again
                    log.warning("%s: chunk %s changed after it was written; computed again", path, obj.get("chunk"))
                    continue
                out[int(obj["chunk"])] = obj["values"]
        return out

    def append(self, role: str, chunk: int, values: list[list[float]]) -> None:
        from megatron_inpo.data.preferences import append_jsonl

        append_jsonl(self.root / f"{role}.jsonl", [json.dumps({"chunk": chunk, "values": values})])


def compute_role_logps(
    role: str,
    pairs: Sequence[PreferencePair],
    model: list,
    head,
    micro_batch_size: int,
    chunk_pairs: int,
    store: ProgressStore | None,
    pad_multiple: int = 1,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
    packing: bool = False,
) -> tuple[list[list[float]], int]:
    """[chosen, rejected] log-prob sums of every pair under one model (its `head`, engine/step.OutputHead), on
    every rank; resumes from `store`.

    Work is split in chunks of `chunk_pairs` pairs; each chunk is shared among data-parallel ranks by micro-batch
    (engine/batches.py plan_step): padded micro-batches of `micro_batch_size` pairs, or with `packing` rows of
    `logprob_row_capacity` tokens.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_inpo.engine import batches as batches_lib
    from megatron_inpo.engine.config import logprob_row_capacity

    pipeline = ps.get_pipeline_model_parallel_world_size() > 1
    dp_rank = ps.get_data_parallel_rank()
    dp_size = ps.get_data_parallel_world_size()
    # Rank 0 reads the finished chunks and tells everybody: every rank must skip exactly the same chunks, or the
    # collectives below pair up wrongly and hang.
    shared = [store.done(role) if store is not None and dist.get_rank() == 0 else {}]
    dist.broadcast_object_list(shared, src=0)
    done = shared[0]
    values: list[list[float] | None] = [None] * len(pairs)
    n_chunks = -(-len(pairs) // chunk_pairs)
    computed = 0
    for c in range(n_chunks):
        lo, hi = c * chunk_pairs, min(len(pairs), (c + 1) * chunk_pairs)
        if c in done and len(done[c]) == hi - lo:
            values[lo:hi] = done[c]
            if progress:
                progress(hi - lo)
            continue
        chunk = list(range(lo, hi))
        longest = max(batches_lib.pair_length(pairs[i]) for i in chunk)
        mine = batches_lib.plan_step(pairs, chunk, packing=packing, micro_batch_size=micro_batch_size,
                                     capacity=logprob_row_capacity(micro_batch_size, longest), dp_size=dp_size,
                                     dp_rank=dp_rank, pad_multiple=pad_multiple, uniform=pipeline)
        results: list = []
        # Under pipeline parallelism one schedule call per group of micro-batches of one shape (the last padded
        # micro-batch of a chunk may hold fewer pairs); without, one call.
        groups: dict[tuple, list[SequenceBatch]] = {}
        for b in mine:
            groups.setdefault(tuple(b.tokens.shape) if pipeline else (), []).append(b)
        for batches in groups.values():
            out = forward_pair_logps(model, batches, head, device)
            if out is not None and ps.get_tensor_model_parallel_rank() == 0:
                for idx, ch, rj in out:
                    results += [(i, float(a), float(b)) for i, a, b in zip(idx, ch.tolist(), rj.tolist())]
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, results)
        for part in gathered:
            for i, a, b in part or []:
                values[i] = [a, b]
        missing = [i for i in range(lo, hi) if values[i] is None]
        if missing:
            raise RuntimeError(f"log-prob pass: no result for pairs {missing[:5]} (rank layout bug)")
        if store is not None and dist.get_rank() == 0:
            store.append(role, c, values[lo:hi])
        dist.barrier()
        emit("running")  # a chunk is stored (megatron_inpo/events.py)
        computed += 1
        if progress:
            progress(hi - lo)
    return values, computed  # type: ignore[return-value]


def write_with_logps(pairs: Sequence[PreferencePair], ref: Sequence[Sequence[float]],
                     last: Sequence[Sequence[float]], out_path: str | os.PathLike) -> None:
    """Write the pairs with the four log-prob columns filled, atomically."""
    from megatron_inpo.files import atomic_write_text

    lines = []
    for p, (rc, rr), (lc, lr) in zip(pairs, ref, last):
        q = PreferencePair(**{**p.__dict__})
        q.ref_chosen_logp, q.ref_rejected_logp = float(rc), float(rr)
        q.last_chosen_logp, q.last_rejected_logp = float(lc), float(lr)
        lines.append(q.to_json())
    atomic_write_text(out_path, "".join(line + "\n" for line in lines))


def progress_dir(out_path: str | os.PathLike) -> Path:
    out = Path(out_path)
    return out.with_name(f".{out.name}.logprobs-progress")


def store_key(input_path: Path, role: str, model_dir: str, micro_batch_size: int, chunk_pairs: int) -> dict:
    return {"input_sha256": file_digest(input_path), "role": role, "model_dir": str(Path(model_dir).resolve()),
            "micro_batch_size": micro_batch_size, "chunk_pairs": chunk_pairs}


def run_logprobs(cfg: LogprobStageConfig) -> dict:
    """Compute and write the four log-prob columns (resuming a cut run); returns a small summary."""
    import torch.distributed as dist

    from megatron_inpo.config import validate_all
    from megatron_inpo.data.preferences import read_preferences
    from megatron_inpo.engine import checkpoint as ckpt
    from megatron_inpo.engine.batches import model_limits
    from megatron_inpo.engine.config import batch_pad_multiple
    from megatron_inpo.engine.metrics import StageProgress
    from megatron_inpo.engine.policy import init_runtime, load_frozen_policy
    from megatron_inpo.engine.step import OutputHead

    validate_all(cfg)
    out = Path(cfg.output)
    if out.exists():
        return {"output": str(out), "skipped": True}
    # A wrong checkpoint path, then bad data, fail here, before any process group exists. Token ids must be within
    # every model's vocabulary and each sequence within its positions (the stage config has no max_seq_len: the
    # models' max_position_embeddings is the bound).
    limits = [model_limits(ckpt.read_meta(path)) for path in (cfg.ref_checkpoint, cfg.last_checkpoint) if path]
    vocabs = [v for v, _ in limits if v is not None]
    positions = [n for _, n in limits if n is not None]
    pairs = read_preferences(cfg.data, vocab_size=min(vocabs) if vocabs else None,
                             max_len=min(positions) if positions else None, max_len_name="max_position_embeddings")
    engine = cfg.logprobs.forward_engine(cfg.megatron)  # bf16, not FP8, unless logprobs.fp8 (its docstring: why)
    runtime = init_runtime(engine, cfg.seed)
    engine.validate_runtime(runtime.world_size, runtime.cuda)
    roles = [("ref", cfg.ref_checkpoint)] + ([] if cfg.same_models() else [("last", cfg.last_checkpoint)])
    pdir = progress_dir(out)
    lc = cfg.logprobs
    values: dict[str, list] = {}
    computed: dict[str, int] = {}
    for role, path in roles:
        model, built = load_frozen_policy(path, engine, runtime)
        # Only rank 0 touches (and keys, hashing the input file) the progress files; compute_role_logps broadcasts
        # what is done.
        store = (ProgressStore(pdir / role, store_key(Path(cfg.data), role, path, lc.micro_batch_size, lc.chunk_pairs))
                 if runtime.rank == 0 else None)
        progress = StageProgress(f"logprobs[{role}]", len(pairs), 0, "pair", bar=cfg.progress,
                                 path=cfg.progress_file, enabled=runtime.rank == 0)
        values[role], computed[role] = compute_role_logps(
            role, pairs, [model], OutputHead.of(engine, built.vocab_size),
            lc.micro_batch_size, lc.chunk_pairs, store,
            pad_multiple=batch_pad_multiple(lc.pad_multiple, engine), device=runtime.device,
            progress=progress.update, packing=engine.packing)
        progress.close()
        del model, built
        if runtime.cuda:
            torch.cuda.empty_cache()
    if "last" not in values:
        values["last"] = values["ref"]
    if runtime.rank == 0:
        write_with_logps(pairs, values["ref"], values["last"], out)
    dist.barrier()
    if runtime.rank == 0:
        shutil.rmtree(pdir, ignore_errors=True)
    return {"output": str(out), "pairs": len(pairs), "computed_chunks": computed, "rank0": runtime.rank == 0}
