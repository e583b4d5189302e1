"""Response-token log-probs under a Megatron-Core GPTModel, and the forward-only pass that stores them.

Sequences are `prompt_ids + response_ids`; the model reads all but the last token and each position predicts the
next one, so the log-prob of response token j is read at position len(prompt) + j - 1. Prompt tokens and padding
have loss-mask 0. Padding is on the right of a causal model, so real positions never see it: the masks are exact
and the sums equal an unpadded forward. Vocabulary rows added for TP divisibility are masked out of the softmax, so
the numbers equal a transformers forward of the same weights (pad rows are not tokens).

A micro-batch of B pairs holds 2B sequences [chosen_0 .. chosen_{B-1}, rejected_0 .. rejected_{B-1}]: chosen and
rejected of a pair are always in the same micro-batch, which is what a pairwise loss inside Megatron's pipeline
schedule (one loss_func call per micro-batch) needs.

The log-prob pass (`run_logprob_pass`) reads a preference JSONL and writes a new one with ref_chosen_logp,
ref_rejected_logp, last_chosen_logp and last_rejected_logp for every pair: results go to a progress directory chunk
by chunk (a restart skips finished chunks), and the final file is written atomically.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from megatron_inpo.faults import hold_if_requested

from megatron_inpo.data.preferences import DataError, PreferencePair


# ----------------------------------------------------------------------------------------------------------------
# Batches


@dataclass
class SequenceBatch:
    """Right-padded sequences ready for GPTModel.forward; every tensor is [n, S]."""

    tokens: torch.Tensor
    """Input token ids (the full sequence without its last token), padded with 0."""
    position_ids: torch.Tensor
    """0..S-1 per row (padding positions get positions too; they are masked)."""
    labels: torch.Tensor
    """Next-token targets: labels[i, p] = sequence[i][p + 1]; 0 on padding."""
    loss_mask: torch.Tensor
    """1.0 where labels[i, p] is a response token, else 0.0 (prompt and padding)."""
    lengths: torch.Tensor | None = None
    """[n] real (unpadded) input length of each row."""
    num_pairs: int = 0
    """B for a pair batch (rows [0, B) chosen, [B, 2B) rejected); 0 for a plain sequence batch (SFT)."""
    indices: tuple[int, ...] = ()
    """Dataset indices of the pairs (or sequences) in this micro-batch, for bookkeeping."""

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def num_response_tokens(self) -> int:
        return int(self.loss_mask.sum().item())

    @property
    def num_real_tokens(self) -> int:
        """Tokens that are not padding (prompt + response - 1 per row)."""
        return int(self.lengths.sum().item()) if self.lengths is not None else self.tokens.numel()

    def to(self, device: torch.device | str) -> "SequenceBatch":
        return SequenceBatch(self.tokens.to(device), self.position_ids.to(device), self.labels.to(device),
                             self.loss_mask.to(device), self.lengths, self.num_pairs, self.indices)


def sequence_length(prompt_ids: Sequence[int], response_ids: Sequence[int]) -> int:
    """Input length of one sequence (prompt + response - 1)."""
    return len(prompt_ids) + len(response_ids) - 1


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def make_sequence_batch(
    seqs: Sequence[tuple[Sequence[int], Sequence[int]]],
    pad_to: int | None = None,
    pad_multiple: int = 1,
    num_pairs: int = 0,
    indices: Sequence[int] = (),
) -> SequenceBatch:
    """Pack (prompt_ids, response_ids) sequences into a right-padded batch of length max(len), rounded up to
    `pad_multiple`, or exactly `pad_to` when given (so every micro-batch of a pipeline step has one shape)."""
    lens = []
    for k, (p, r) in enumerate(seqs):
        if len(p) == 0:
            raise DataError(f"sequence {indices[k] if indices else k}: empty prompt_ids; the first response token "
                            "needs a context (put BOS in the prompt)")
        if len(r) == 0:
            raise DataError(f"sequence {indices[k] if indices else k}: empty response")
        lens.append(sequence_length(p, r))
    S = round_up(max(lens), pad_multiple)
    if pad_to is not None:
        if pad_to < S:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest sequence ({S})")
        S = pad_to
    n = len(seqs)
    tokens = torch.zeros(n, S, dtype=torch.long)
    labels = torch.zeros(n, S, dtype=torch.long)
    mask = torch.zeros(n, S, dtype=torch.float32)
    for i, (p, r) in enumerate(seqs):
        full = torch.tensor(list(p) + list(r), dtype=torch.long)
        L = len(full) - 1
        tokens[i, :L] = full[:-1]
        labels[i, :L] = full[1:]
        mask[i, len(p) - 1 : L] = 1.0
    pos = torch.arange(S, dtype=torch.long).unsqueeze(0).expand(n, S).contiguous()
    return SequenceBatch(tokens, pos, labels, mask, torch.tensor(lens, dtype=torch.long), num_pairs, tuple(indices))


def pair_sequences(pairs: Sequence[PreferencePair]) -> list[tuple[list[int], list[int]]]:
    """[chosen_0 .. chosen_{B-1}, rejected_0 .. rejected_{B-1}] as (prompt_ids, response_ids)."""
    return [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]


def pair_length(p: PreferencePair) -> int:
    return max(sequence_length(p.prompt_ids, p.chosen_ids), sequence_length(p.prompt_ids, p.rejected_ids))


def make_pair_batch(pairs: Sequence[PreferencePair], indices: Sequence[int] = (), pad_to: int | None = None,
                    pad_multiple: int = 1) -> SequenceBatch:
    return make_sequence_batch(pair_sequences(pairs), pad_to=pad_to, pad_multiple=pad_multiple,
                               num_pairs=len(pairs), indices=indices)


# ----------------------------------------------------------------------------------------------------------------
# Log-probs from (vocab-parallel) logits


def token_logps(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
    """log p(labels) per position from logits [b, s, V/tp] split over the tensor-parallel group.

    Uses Megatron's vocab-parallel cross entropy (float32 inside). Columns of the padded vocabulary at or beyond
    `vocab_size` are excluded from the softmax.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    logits = logits.float()
    if vocab_size is not None:
        tp_rank = ps.get_tensor_model_parallel_rank()
        local = logits.shape[-1]
        start = tp_rank * local
        if start + local > vocab_size:
            cols = torch.arange(start, start + local, device=logits.device) >= vocab_size
            logits = logits.masked_fill(cols, float("-inf"))
    # vocab_parallel_cross_entropy flattens leading dims; it returns -log p(label).
    return -vocab_parallel_cross_entropy(logits, labels)


def sequence_logps(logits: torch.Tensor, batch: SequenceBatch, vocab_size: int | None = None) -> torch.Tensor:
    """Per-sequence sums of response-token log-probs, [n]."""
    return (token_logps(logits, batch.labels, vocab_size) * batch.loss_mask).sum(dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# Forward-only pass through Megatron's schedule


def plan_micro_batches(lengths: Sequence[int], micro_batch_size: int, sort: bool = True) -> list[list[int]]:
    """Group item indices into micro-batches of `micro_batch_size`; longest first when sorting (less padding)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if sort else list(range(len(lengths)))
    return [order[i : i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]


def forward_pair_logps(
    model: list,
    batches: Sequence[SequenceBatch],
    vocab_size: int | None,
    device: torch.device | str = "cpu",
) -> list[tuple[tuple[int, ...], torch.Tensor, torch.Tensor]] | None:
    """Forward-only through get_forward_backward_func; every batch holds pairs.

    All pipeline stages must pass the same `batches` (same shapes). Returns, on the last pipeline stage, a list of
    (indices, chosen_logps [B], rejected_logps [B]) per micro-batch; None on other stages.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not batches:
        return [] if ps.is_pipeline_last_stage() else None
    S = batches[0].seq_len
    mbs = batches[0].tokens.shape[0]
    for b in batches:
        if b.tokens.shape != (mbs, S):
            raise ValueError("forward_pair_logps: every micro-batch of one call must have the same shape")

    def loss_func(batch: SequenceBatch, output: torch.Tensor):
        lp = sequence_logps(output, batch, vocab_size)
        B = batch.num_pairs
        return lp.sum() * 0.0, {"chosen": lp[:B].detach(), "rejected": lp[B:].detach(), "indices": batch.indices}

    def forward_step(data_iterator: Iterator[SequenceBatch], chunk):
        b = next(data_iterator)
        out = chunk(b.tokens, b.position_ids, attention_mask=None)
        return out, lambda o: loss_func(b, o)

    # on the device before the schedule: a blocking copy inside it would wait for the queued forward
    staged = [b.to(device) for b in batches]
    with torch.no_grad():
        store = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(staged), model=model,
            num_microbatches=len(batches), seq_length=S, micro_batch_size=mbs, forward_only=True,
        )
    if not ps.is_pipeline_last_stage():
        return None
    return [(d["indices"], d["chosen"].float().cpu(), d["rejected"].float().cpu()) for d in store]


# ----------------------------------------------------------------------------------------------------------------
# The log-prob pass over a preference file


def _file_digest(path: Path) -> str:
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
        path = self.root / f"{role}.jsonl"
        out: dict[int, list[list[float]]] = {}
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    break  # a torn tail (repaired at construction; kept safe for direct readers)
                out[int(obj["chunk"])] = obj["values"]
        return out

    def append(self, role: str, chunk: int, values: list[list[float]]) -> None:
        from megatron_inpo.data.preferences import append_jsonl

        append_jsonl(self.root / f"{role}.jsonl", [json.dumps({"chunk": chunk, "values": values})])


def compute_role_logps(
    role: str,
    pairs: Sequence[PreferencePair],
    model: list,
    vocab_size: int | None,
    micro_batch_size: int,
    chunk_pairs: int,
    store: ProgressStore | None,
    pad_multiple: int = 1,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> tuple[list[list[float]], int]:
    """[chosen, rejected] log-prob sums of every pair under one model, on every rank; resumes from `store`.

    Work is split in chunks of `chunk_pairs` pairs; each chunk is shared among data-parallel ranks by micro-batch.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

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
        plan = plan_micro_batches([pair_length(pairs[i]) for i in chunk], micro_batch_size)
        mine = [[chunk[j] for j in mb] for k, mb in enumerate(plan) if k % dp_size == dp_rank]
        results: list = []
        # One schedule call per group of equal-size micro-batches with one padded length: the last micro-batch
        # of a chunk may be short.
        groups: dict[int, list[list[int]]] = {}
        for mb in mine:
            groups.setdefault(len(mb), []).append(mb)
        for size, mbs in groups.items():
            S = round_up(max(pair_length(pairs[i]) for mb in mbs for i in mb), pad_multiple)
            batches = [make_pair_batch([pairs[i] for i in mb], indices=mb, pad_to=S) for mb in mbs]
            out = forward_pair_logps(model, batches, vocab_size, device)
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
        hold_if_requested()  # fault-injection tests only: wait here for the driver's kill
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
    return {"input_sha256": _file_digest(input_path), "role": role, "model_dir": str(Path(model_dir).resolve()),
            "micro_batch_size": micro_batch_size, "chunk_pairs": chunk_pairs}
