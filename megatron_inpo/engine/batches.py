"""Micro-batches: right-padded sequences of pairs (or SFT sequences), the data order and its split.

Sequences are `prompt_ids + response_ids`; the model reads all but the last token and each position predicts the
next one, so the log-prob of response token j is read at position len(prompt) + j - 1. Prompt tokens and padding
have loss-mask 0. Padding is on the right of a causal model, so real positions never see it: the masks are exact
and the sums equal an unpadded forward.

A micro-batch of B pairs holds 2B sequences [chosen_0 .. chosen_{B-1}, rejected_0 .. rejected_{B-1}]: chosen and
rejected of a pair are always in the same micro-batch, which is what a pairwise loss inside Megatron's pipeline
schedule (one loss call per micro-batch) needs.

The order of a training stage's items is a pure function of (step, seed): `step_items` is what makes a resumed
stage see exactly the batches the uninterrupted one would have seen.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from megatron_inpo.data.preferences import DataError, PreferencePair


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
        # the readers (read_preferences, read_sft) refuse these with file:line; this guards in-code callers
        if len(p) == 0:
            raise DataError(f"item {indices[k] if indices else k} (0-based): empty prompt_ids; the first response "
                            "token needs a context (put BOS in the prompt)")
        if len(r) == 0:
            raise DataError(f"item {indices[k] if indices else k} (0-based): empty response")
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


def plan_micro_batches(lengths: Sequence[int], micro_batch_size: int, sort: bool = True) -> list[list[int]]:
    """Group item indices into micro-batches of `micro_batch_size`; longest first when sorting (less padding)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if sort else list(range(len(lengths)))
    return [order[i : i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]



@dataclass
class SFTItem:
    prompt_ids: list[int]
    response_ids: list[int]


def read_sft(path: str | os.PathLike, vocab_size: int | None = None, max_len: int | None = None,
             max_len_name: str = "max_seq_len") -> list[SFTItem]:
    """{"prompt_ids": [...], "response_ids": [...]} per line; other fields are ignored.

    Both lists non-empty, plain non-negative ints, below `vocab_size` when given; prompt + response - 1 input
    tokens at most `max_len` when given. Errors name file:line and the field; an empty file is an error."""
    from megatron_inpo.data.preferences import check_token_ids, iter_jsonl

    items = []
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        for key in ("prompt_ids", "response_ids"):
            if key not in obj:
                raise DataError(f"{where}: missing field {key!r}")
        check_token_ids(obj["prompt_ids"], where, "prompt_ids", vocab_size,
                        empty="the first response token needs a context (put BOS in the prompt)")
        check_token_ids(obj["response_ids"], where, "response_ids", vocab_size,
                        empty="a response needs at least one token")
        item = SFTItem(obj["prompt_ids"], obj["response_ids"])
        if max_len is not None and item_length(item) > max_len:
            raise DataError(f"{where}: fields 'prompt_ids' + 'response_ids': {item_length(item)} tokens > "
                            f"{max_len_name}={max_len}")
        items.append(item)
    if not items:
        raise DataError(f"{path}: no SFT records (empty file)")
    return items


def model_limits(meta: dict) -> tuple[int | None, int | None]:
    """(vocab_size, max_position_embeddings) of a checkpoint's HF config (None where absent or not an int): the
    bounds of token ids and sequence lengths that the data readers check before any model is built."""
    hf = meta.get("hf_config") if isinstance(meta, dict) else None
    hf = hf if isinstance(hf, dict) else {}

    def positive(key: str) -> int | None:
        v = hf.get(key)
        return v if type(v) is int and v > 0 else None

    return positive("vocab_size"), positive("max_position_embeddings")


def item_length(item: Any) -> int:
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
    plan = plan_micro_batches([lengths[i] for i in indices], micro_batch_size)
    return [[indices[j] for j in mb] for k, mb in enumerate(plan) if k % dp_size == dp_rank]


def make_batches(items: Sequence[Any], micro_batches: list[list[int]], pad_multiple: int) -> list[SequenceBatch]:
    """SequenceBatch per micro-batch of SFT items or preference pairs, all padded to one length (the pipeline
    schedule's p2p shapes are per call)."""
    S = round_up(max(item_length(items[i]) for mb in micro_batches for i in mb), pad_multiple)
    out = []
    for mb in micro_batches:
        if isinstance(items[mb[0]], SFTItem):
            out.append(make_sequence_batch([(items[i].prompt_ids, items[i].response_ids) for i in mb],
                                           pad_to=S, indices=mb))
        else:
            out.append(make_pair_batch([items[i] for i in mb], indices=mb, pad_to=S))
    return out
