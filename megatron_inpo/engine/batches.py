"""Micro-batches: right-padded or packed sequences of pairs (or SFT sequences), the data order and its split.

Sequences are `prompt_ids + response_ids`; the model reads all but the last token and each position predicts the
next one, so the log-prob of response token j is read at position len(prompt) + j - 1. Prompt tokens and padding
have loss-mask 0. Padding is on the right of a causal model, so real positions never see it: the masks are exact
and the sums equal an unpadded forward.

A micro-batch of B pairs holds 2B sequences [chosen_0 .. chosen_{B-1}, rejected_0 .. rejected_{B-1}]: chosen and
rejected of a pair are always in the same micro-batch, which is what a pairwise loss inside Megatron's pipeline
schedule (one loss call per micro-batch) needs.

Packed micro-batches (`MegatronConfig.packing`): the sequences of several pairs laid end to end in ONE row of at most
`capacity` tokens (`make_packed_batch`), position ids restarting at 0 for each sequence, and `cu_seqlens` marking
where each sequence starts (Megatron's THD layout: the model gets a PackedSeqParams, and attention stays inside
each sequence, engine/model.py). The padding at the end of a row is a segment of its own; every sequence keeps its
index in the padded order (`seq_ids`), so per-sequence sums come out in the same [chosen.., rejected..] order.
`pack_rows` fills rows first-fit decreasing; a pair is one unit (chosen and rejected in the same row, so a
pairwise loss still sees both in one micro-batch). `plan_step` deals a step's items to the data-parallel ranks
(longest first, to the least loaded rank) and builds this rank's micro-batches, packed or padded.

The order of a training stage's items is a pure function of (step, seed): `step_items` is what makes a resumed
stage see exactly the batches the uninterrupted one would have seen. `length_buckets` > 0 groups similar lengths
into the same global batches (sorted buckets, still a pure function of (step, seed)).
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
    cu_seqlens: torch.Tensor | None = None
    """Packed batches only (one row): [k + 1] int32 offsets of the row's k segments (its sequences, then the
    padding, if any, as one more segment); None for a padded batch."""
    seq_ids: torch.Tensor | None = None
    """Packed batches only: [1, S] index of the sequence (in the padded order) of each position; n on padding."""

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    @property
    def num_sequences(self) -> int:
        return int(self.lengths.numel()) if self.lengths is not None else int(self.tokens.shape[0])

    @property
    def segment_lengths(self) -> list[int]:
        """The attention spans of the batch: every segment of a packed row, or each padded row's full length."""
        if self.packed:
            return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).tolist()
        return [self.seq_len] * int(self.tokens.shape[0])

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
        moved = lambda t: t.to(device) if t is not None else None  # noqa: E731
        return SequenceBatch(self.tokens.to(device), self.position_ids.to(device), self.labels.to(device),
                             self.loss_mask.to(device), self.lengths, self.num_pairs, self.indices,
                             moved(self.cu_seqlens), moved(self.seq_ids))


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



def make_packed_batch(
    seqs: Sequence[tuple[Sequence[int], Sequence[int]]],
    pad_to: int | None = None,
    pad_multiple: int = 1,
    num_pairs: int = 0,
    indices: Sequence[int] = (),
) -> SequenceBatch:
    """The same sequences as `make_sequence_batch`, laid end to end in one row [1, S]: S = the sum of their
    lengths rounded up to `pad_multiple`, or exactly `pad_to`. Labels and the loss mask are those of each sequence
    on its own; position ids restart at 0 for each one, and `cu_seqlens` / `seq_ids` say where each one lies."""
    padded = make_sequence_batch(seqs, num_pairs=num_pairs, indices=indices)  # the checks, labels and masks
    lens = padded.lengths.tolist()
    total = sum(lens)
    S = round_up(total, pad_multiple)
    if pad_to is not None:
        if pad_to < total:
            raise ValueError(f"pad_to={pad_to} is shorter than the packed sequences ({total})")
        S = pad_to
    n = len(lens)
    tokens = torch.zeros(1, S, dtype=torch.long)
    labels = torch.zeros(1, S, dtype=torch.long)
    mask = torch.zeros(1, S, dtype=torch.float32)
    pos = torch.zeros(1, S, dtype=torch.long)
    seq_ids = torch.full((1, S), n, dtype=torch.long)
    bounds = [0]
    for i, L in enumerate(lens):
        a = bounds[-1]
        tokens[0, a:a + L] = padded.tokens[i, :L]
        labels[0, a:a + L] = padded.labels[i, :L]
        mask[0, a:a + L] = padded.loss_mask[i, :L]
        pos[0, a:a + L] = torch.arange(L)
        seq_ids[0, a:a + L] = i
        bounds.append(a + L)
    if S > total:  # the padding: a segment of its own, so attention and RoPE spans cover the whole row
        pos[0, total:] = torch.arange(S - total)
        bounds.append(S)
    return SequenceBatch(tokens, pos, labels, mask, padded.lengths, num_pairs, tuple(indices),
                         cu_seqlens=torch.tensor(bounds, dtype=torch.int32), seq_ids=seq_ids)


def pack_rows(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: indices of `sizes` grouped into rows of at most `capacity` tokens. Each index goes,
    longest first, into the first row it fits; one larger than `capacity` gets a row of its own. Deterministic
    (ties keep index order)."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        for r, f in enumerate(free):
            if sizes[i] <= f:
                rows[r].append(i)
                free[r] -= sizes[i]
                break
        else:
            rows.append([i])
            free.append(capacity - sizes[i])
    return rows


def deal_to_ranks(indices: Sequence[int], sizes: Sequence[int], dp_size: int) -> list[list[int]]:
    """Items of a global batch dealt to the data-parallel ranks for packing: longest first, each to the rank with
    the fewest tokens so far (ties: the lowest rank). Every rank gets at least one item when there are dp_size."""
    load = [0] * dp_size
    out: list[list[int]] = [[] for _ in range(dp_size)]
    for j in sorted(range(len(indices)), key=lambda j: (-sizes[indices[j]], j)):
        r = min(range(dp_size), key=lambda r: (load[r], r))
        out[r].append(indices[j])
        load[r] += sizes[indices[j]]
    return out


def item_sequences(item: Any) -> list[tuple[list[int], list[int]]]:
    """(prompt_ids, response_ids) of an SFT item, or the chosen and rejected sequences of a pair."""
    if isinstance(item, SFTItem):
        return [(item.prompt_ids, item.response_ids)]
    return [(item.prompt_ids, item.chosen_ids), (item.prompt_ids, item.rejected_ids)]


def packed_size(item: Any) -> int:
    """Tokens an item takes in a packed row: its sequence, or a pair's chosen + rejected."""
    return sum(sequence_length(p, r) for p, r in item_sequences(item))


def make_item_batch(items: Sequence[Any], mb: Sequence[int], packed: bool, pad_to: int | None = None,
                    pad_multiple: int = 1) -> SequenceBatch:
    """The micro-batch of dataset indices `mb`: SFT sequences or pairs ([chosen.., rejected..]), padded or packed."""
    if isinstance(items[mb[0]], SFTItem):
        seqs, num_pairs = [(items[i].prompt_ids, items[i].response_ids) for i in mb], 0
    else:
        seqs, num_pairs = pair_sequences([items[i] for i in mb]), len(mb)
    make = make_packed_batch if packed else make_sequence_batch
    return make(seqs, pad_to=pad_to, pad_multiple=pad_multiple, num_pairs=num_pairs, indices=mb)


def plan_step(items: Sequence[Any], indices: Sequence[int], *, packing: bool, micro_batch_size: int,
              capacity: int, dp_size: int, dp_rank: int, pad_multiple: int, uniform: bool) -> list[SequenceBatch]:
    """This data-parallel rank's micro-batches of the items `indices` (a global batch, or a log-prob chunk).

    packing: the items are dealt to the ranks by tokens (`deal_to_ranks`), then packed first-fit decreasing into
    rows of `capacity` tokens, one row per micro-batch. Otherwise: micro-batches of `micro_batch_size` items,
    sorted by length and dealt round-robin (`split_micro_batches`), each padded to its own longest sequence.
    `uniform` (pipeline parallelism: one p2p shape per schedule call): every micro-batch padded to the longest.
    A pure function of its arguments, so every rank of a pipeline builds the same shapes and a resumed step the
    same batches."""
    if packing:
        sizes = {i: packed_size(items[i]) for i in indices}
        mine = deal_to_ranks(list(indices), sizes, dp_size)[dp_rank]
        mbs = [[mine[j] for j in row] for row in pack_rows([sizes[i] for i in mine], capacity)]
        lens = [sum(sizes[i] for i in mb) for mb in mbs]
    else:
        mbs = split_micro_batches(indices, {i: item_length(items[i]) for i in indices}, micro_batch_size,
                                  dp_size, dp_rank)
        lens = [max(item_length(items[i]) for i in mb) for mb in mbs]
    S = round_up(max(lens), pad_multiple) if uniform and mbs else None
    return [make_item_batch(items, mb, packing, pad_to=S, pad_multiple=pad_multiple) for mb in mbs]



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


def length_grouped(order: list[int], lengths: Sequence[int], global_batch: int, buckets: int, epoch: int,
                   seed: int, shuffle: bool) -> list[int]:
    """`order` regrouped so that each global batch holds items of similar length: cut into buckets of `buckets`
    global batches, each bucket sorted longest first (ties by position) and cut into global batches, whose order
    in the epoch is then shuffled (seeded by (seed, epoch)). Only the epoch's whole global batches take part."""
    used = len(order) // global_batch * global_batch
    span = buckets * global_batch
    batches = []
    for a in range(0, used, span):
        bucket = order[a:min(a + span, used)]
        ranked = sorted(range(len(bucket)), key=lambda k: (-lengths[bucket[k]], k))
        bucket = [bucket[k] for k in ranked]
        batches += [bucket[b:b + global_batch] for b in range(0, len(bucket), global_batch)]
    if shuffle:
        g = torch.Generator().manual_seed(seed * 1000003 + epoch + 7919)
        batches = [batches[k] for k in torch.randperm(len(batches), generator=g).tolist()]
    return [i for b in batches for i in b] + order[used:]


def step_items(step: int, n: int, global_batch: int, seed: int, shuffle: bool,
               lengths: Sequence[int] | None = None, length_buckets: int = 0) -> list[int]:
    """Dataset indices of the global batch of optimizer step `step` (0-based); a pure function of its arguments
    (with `length_buckets` > 0 and the items' `lengths`: length-grouped, see `length_grouped`)."""
    per_epoch = n // global_batch
    epoch, slot = divmod(step, per_epoch)
    order = epoch_order(n, epoch, seed, shuffle)
    if length_buckets > 0:
        if lengths is None:
            raise ValueError("step_items: length_buckets needs the items' lengths")
        order = length_grouped(order, lengths, global_batch, length_buckets, epoch, seed, shuffle)
    return order[slot * global_batch : (slot + 1) * global_batch]


def split_micro_batches(indices: Sequence[int], lengths: Sequence[int] | dict, micro_batch_size: int,
                        dp_size: int, dp_rank: int) -> list[list[int]]:
    """This DP rank's micro-batches of a global batch: sorted by length (less padding), then dealt round-robin.
    `lengths` is indexed by dataset index (a list over all items, or a dict over `indices`)."""
    plan = plan_micro_batches([lengths[i] for i in indices], micro_batch_size)
    return [[indices[j] for j in mb] for k, mb in enumerate(plan) if k % dp_size == dp_rank]


def make_batches(items: Sequence[Any], micro_batches: list[list[int]], pad_multiple: int) -> list[SequenceBatch]:
    """SequenceBatch per micro-batch of SFT items or preference pairs, all padded to one length (the pipeline
    schedule's p2p shapes are per call)."""
    S = round_up(max(item_length(items[i]) for mb in micro_batches for i in mb), pad_multiple)
    return [make_item_batch(items, mb, False, pad_to=S, pad_multiple=pad_multiple) for mb in micro_batches]
