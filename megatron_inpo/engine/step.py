"""One pass through Megatron's pipeline schedule: one `forward_step`, the loss an object.

    run_schedule(model, batches, loss, head, device, forward_only=False)
        hands the micro-batches and `loss` to get_forward_backward_func (Megatron runs TP / PP / the micro-batches);
        `head` (OutputHead) turns the last stage's output into log p(label) per token: chunked from the final
        hidden states (engine/head.py), or from the logits (token_logps, the reference path).

Losses (called once per micro-batch inside the schedule, on the last pipeline stage, with the tokens' log-probs):
    PreferenceLoss(objective, pairs)   sum of a preference objective (INPO, DPO, IPO, SPPO) over pairs
    SFTLoss()                          sum of the response-token NLL
    PairLogpsProbe()                   forward-only: each pair's chosen / rejected log-prob sums

A training loss returns the SUM over its items (pairs, or response tokens) with their count; the model is wrapped
with calculate_per_token_loss (engine.policy.wrap_ddp), so finalize_model_grads divides the gradients once by the
item count of the whole global batch (summed over micro-batches and DP ranks): the mean over the global batch,
whatever the TP / PP / DP split. The detached per-item values are kept so that `global_metrics` computes the step's
metrics exactly on the global batch afterwards.
"""
from __future__ import annotations

import contextlib
import dataclasses
import types
from typing import Any, Sequence

import torch

from megatron_inpo.engine.batches import SequenceBatch


# ----------------------------------------------------------------------------------------------------------------
# Log-probs from (vocab-parallel) logits


def token_logps(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
    """log p(labels) per position from logits [b, s, V/tp] split over the tensor-parallel group.

    Uses Megatron's vocab-parallel cross entropy (float32 inside). Columns of the padded vocabulary at or beyond
    `vocab_size` are excluded from the softmax, so the numbers equal a transformers forward of the same weights.
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


def sequence_sums(tok: torch.Tensor, batch: SequenceBatch) -> torch.Tensor:
    """Per-sequence sums of the response tokens' log-probs `tok` (shaped like batch.labels), [n] float64, in the
    padded order whether the batch is padded ([n, S] rows) or packed (one row; each position's sequence is
    `batch.seq_ids`).

    The sums run in float64: a sequence's log-prob is a sum of hundreds of nats, and float32 sums in another order
    (a packed row vs a padded one) differ by ulps of the total; in float64 both equal the exact sum of the same
    float32 token log-probs to ~1e-13."""
    tok = tok.double() * batch.loss_mask
    if not batch.packed:
        return tok.sum(dim=-1)
    n = batch.num_sequences
    sums = torch.zeros(n + 1, dtype=tok.dtype, device=tok.device)  # slot n collects the padding (all zeros)
    return sums.index_add(0, batch.seq_ids.reshape(-1), tok.reshape(-1))[:n]


def sequence_logps(logits: torch.Tensor, batch: SequenceBatch, vocab_size: int | None = None) -> torch.Tensor:
    """sequence_sums of token_logps: the per-sequence log-probs from a model's logits (the reference path)."""
    return sequence_sums(token_logps(logits, batch.labels, vocab_size), batch)


# ----------------------------------------------------------------------------------------------------------------
# From a model chunk's output to log p(label)


def _gpt(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while not hasattr(chunk, "output_layer") and hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient. Megatron's TP regions all-reduce the gradient in
    place on `grad.contiguous()`, which for a strided gradient (the one GPTModel's [s, b] -> [b, s] transpose gives
    back) is a copy: the sum would be lost."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _output_layer_input(layer, input_, weight=None, runtime_gather_output=None):
    """An output layer (ColumnParallelLinear) that returns its input as it would see it: gathered over the sequence
    under sequence parallelism, or under a region whose backward all-reduces over TP (its allreduce_dgrad)."""
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region, gather_from_sequence_parallel_region

    if layer.sequence_parallel:
        input_ = gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=True, group=layer.tp_group)
    elif layer.allreduce_dgrad:
        input_ = copy_to_tensor_model_parallel_region(input_, group=layer.tp_group)
    else:
        return input_, None
    return _ContiguousGrad.apply(input_), None


@dataclasses.dataclass
class OutputHead:
    """How the last pipeline stage's output becomes log p(label) per token (see MegatronConfig.logps).

    'chunked': the model's output layer hands back its input, so the model returns its final hidden states
    [b, s, h], and engine/head.label_logps applies the head's weight a chunk of tokens at a time. 'logits': the model
    returns its logits and token_logps takes them (the reference path)."""

    vocab_size: int
    """The real vocabulary; ids of the padded vocabulary are left out of the softmax."""
    logps: str = "chunked"
    """'chunked' or 'logits'."""
    chunk_tokens: int = 1024
    """Tokens per chunk of the chunked path."""

    @classmethod
    def of(cls, engine, vocab_size: int) -> "OutputHead":
        """The head a MegatronConfig asks for (its `logps`, `logps_chunk_tokens`) over `vocab_size` real ids."""
        return cls(vocab_size, engine.logps, engine.logps_chunk_tokens)

    @contextlib.contextmanager
    def applied(self, model: list):
        """Within: every model chunk with an output layer returns its final hidden states instead of logits."""
        layers = [g.output_layer for g in map(_gpt, model) if getattr(g, "post_process", False)]
        if self.logps == "chunked":
            for layer in layers:
                # an instance attribute shadows ColumnParallelLinear.forward; module hooks still run
                layer.forward = types.MethodType(_output_layer_input, layer)
        try:
            yield
        finally:
            for layer in layers:
                layer.__dict__.pop("forward", None)

    def token_logps(self, chunk: torch.nn.Module, output: torch.Tensor, labels: torch.Tensor,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
        """log p(labels) [b, s] float32 from `chunk`'s output (hidden states or logits, as `applied` made it).

        `mask` (like labels; the batch's loss mask): the chunked head computes only the positions where it is
        nonzero and gives 0 elsewhere, as every loss multiplies by it anyway. Prompt tokens then cost no head
        GEMM at all (four of them per token: forward, its recomputation and the two of backward), where a full
        logits head pays for every position."""
        if self.logps != "chunked":
            return token_logps(output, labels, self.vocab_size)
        from megatron.core import parallel_state as ps

        from megatron_inpo.engine.head import label_logps

        gpt = _gpt(chunk)
        weight = gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights \
            else gpt.output_layer.weight
        tp = ps.get_tensor_model_parallel_world_size()
        group = ps.get_tensor_model_parallel_group() if tp > 1 else None
        start = ps.get_tensor_model_parallel_rank() * weight.shape[0]
        hidden, flat = output.reshape(-1, output.shape[-1]), labels.reshape(-1)
        if mask is None:
            tok = label_logps(hidden, weight, flat, self.vocab_size, start, self.chunk_tokens, group)
            return tok.view(labels.shape)
        rows = mask.reshape(-1).nonzero().squeeze(1)  # the same on every TP rank: the same batch
        tok = label_logps(hidden.index_select(0, rows), weight, flat.index_select(0, rows), self.vocab_size, start,
                          self.chunk_tokens, group)
        return tok.new_zeros(flat.shape).index_copy(0, rows, tok).view(labels.shape)


# ----------------------------------------------------------------------------------------------------------------
# Losses


class Loss:
    """Base: what a loss needs staged on the device per micro-batch, the per-micro-batch call, and the step's
    metrics from the collected per-item values."""

    metric_names: tuple[str, ...] = ("loss",)

    def __init__(self) -> None:
        self.collected: list[dict[str, Any]] = []

    def inputs(self, batch: SequenceBatch, device) -> Any:
        """Extra tensors of this micro-batch, moved to `device` before the schedule starts."""
        return None

    def __call__(self, batch: SequenceBatch, inputs: Any, tok: torch.Tensor):
        """The micro-batch's loss from `tok`, log p(label) of each of its tokens (shaped like batch.labels)."""
        raise NotImplementedError

    def summarize(self, collected: list[dict[str, Any]]) -> list[float]:
        """The values of `metric_names` over the whole global batch (every DP rank's `collected`)."""
        raise NotImplementedError


def frozen_columns(pairs: Sequence[Any], device) -> dict[str, torch.Tensor | None]:
    """The stored log pi_ref / log pi_t columns (and SPPO win rates) of `pairs`, as PairLogps fields."""
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


class PreferenceLoss(Loss):
    """A preference objective (megatron_inpo.objectives) summed over the pairs of a micro-batch."""

    metric_names = ("loss", "h_mean", "h_std", "chosen_logratio", "rejected_logratio", "margin", "accuracy")

    def __init__(self, objective, pairs: Sequence[Any]) -> None:
        super().__init__()
        self.objective, self.pairs = objective, pairs

    def inputs(self, batch: SequenceBatch, device) -> dict:
        return frozen_columns([self.pairs[i] for i in batch.indices], device)

    def __call__(self, batch: SequenceBatch, inputs: dict, tok: torch.Tensor):
        from megatron_inpo.objectives import PairLogps, compute_objective

        lp = sequence_sums(tok, batch)
        B = batch.num_pairs
        logps = PairLogps(policy_chosen=lp[:B], policy_rejected=lp[B:], **inputs)
        loss, _ = compute_objective(self.objective, logps, reduction="sum")
        self.collected.append({f.name: (getattr(logps, f.name).detach() if getattr(logps, f.name) is not None
                                        else None) for f in dataclasses.fields(logps)})
        return loss, torch.tensor(B, dtype=torch.int, device=lp.device), {"loss_sum": loss.detach()}

    def summarize(self, collected: list[dict[str, Any]]) -> list[float]:
        from megatron_inpo.objectives import PairLogps, compute_objective

        cat = {k: (torch.cat([d[k] for d in collected]).double() if collected[0][k] is not None else None)
               for k in collected[0]}
        loss, m = compute_objective(self.objective, PairLogps(**cat), reduction="mean")
        return [float(loss)] + [float(m[k]) for k in self.metric_names[1:]]


class SFTLoss(Loss):
    """The response-token NLL of a micro-batch of SFT sequences (summed; divided by the global token count)."""

    metric_names = ("loss", "tokens")

    def __call__(self, batch: SequenceBatch, inputs: None, tok: torch.Tensor):
        nll = -(tok * batch.loss_mask).sum()
        n = batch.loss_mask.sum().to(torch.int)
        self.collected.append({"nll": nll.detach().reshape(1), "tokens": n.detach().reshape(1).float()})
        return nll, n, {"nll_sum": nll.detach()}

    def summarize(self, collected: list[dict[str, Any]]) -> list[float]:
        nll = sum(float(d["nll"].sum()) for d in collected)
        tok = sum(float(d["tokens"].sum()) for d in collected)
        return [nll / max(tok, 1.0), tok]


class PairLogpsProbe(Loss):
    """Forward-only: the chosen / rejected log-prob sums of each pair (the loss is 0 and never used)."""

    def __call__(self, batch: SequenceBatch, inputs: None, tok: torch.Tensor):
        lp = sequence_sums(tok, batch)
        B = batch.num_pairs
        return lp.sum() * 0.0, {"chosen": lp[:B].detach(), "rejected": lp[B:].detach(), "indices": batch.indices}


def make_loss(kind: str, objective, items: Sequence[Any]) -> Loss:
    """The training loss of a stage config's `loss` ('preference' or 'sft')."""
    return SFTLoss() if kind == "sft" else PreferenceLoss(objective, items)


# ----------------------------------------------------------------------------------------------------------------
# The schedule


def run_schedule(model: list, batches: Sequence[SequenceBatch], loss: Loss, head: OutputHead, device,
                 forward_only: bool = False):
    """Forward (and backward, unless `forward_only`) of `batches` through get_forward_backward_func; `head` turns
    the last stage's output into the log-probs `loss` takes.

    Under pipeline parallelism every micro-batch must have one shape. Padded and packed micro-batches (one row
    each, engine/batches.py) may be mixed. Returns the schedule's per-micro-batch reports (the last pipeline
    stage's; empty elsewhere).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_inpo.engine.model import packed_seq_params

    loss.collected = []
    # Every micro-batch and what its loss reads go to the device before the schedule starts: inside it, each
    # blocking copy (or tensor built in the loss) would hold the CPU until the queued forward ran.
    staged = [(b.to(device), loss.inputs(b, device)) for b in batches]

    def forward_step(data_iterator, chunk):
        batch, inputs, packed = next(data_iterator)
        # a packed row is one THD batch: Megatron applies RoPE per sequence (cu_seqlens) and the core attention
        # (TE's, or ours on the local spec) keeps each sequence to itself
        output = chunk(batch.tokens, batch.position_ids, attention_mask=None, packed_seq_params=packed)
        return output, lambda out: loss(batch, inputs, head.token_logps(chunk, out, batch.labels, batch.loss_mask))

    shape = batches[0].tokens.shape
    # Pipeline stages exchange activations of the shape given below; without a pipeline each micro-batch may have
    # its own (a padded micro-batch padded only to its own longest sequence).
    if ps.get_pipeline_model_parallel_world_size() > 1 and any(b.tokens.shape != shape for b in batches):
        raise ValueError("run_schedule: under pipeline parallelism every micro-batch of one call must have the "
                         "same shape")
    staged = [(b, inputs, packed_seq_params(b)) for b, inputs in staged]
    with torch.no_grad() if forward_only else torch.enable_grad(), head.applied(model):
        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(staged), model=model,
            num_microbatches=len(batches), seq_length=shape[1], micro_batch_size=shape[0],
            forward_only=forward_only,
        )


def global_metrics(loss: Loss, device) -> dict[str, float]:
    """`loss.metric_names` over the whole global batch, on every rank (computed on the last pipeline stage's TP
    rank 0 from every DP rank's collected values, then shared by an all-reduce)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    names = loss.metric_names
    vec = torch.zeros(len(names) + 1, dtype=torch.float64)
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
        mine = [{k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in d.items()} for d in loss.collected]
        parts: list = [None] * ps.get_data_parallel_world_size()
        dist.all_gather_object(parts, mine, group=ps.get_data_parallel_group())
        if ps.get_data_parallel_rank() == 0:
            vec[:-1] = torch.tensor(loss.summarize([d for p in parts for d in p]), dtype=torch.float64)
            vec[-1] = 1.0
    dev_vec = vec.to(device)
    dist.all_reduce(dev_vec)
    vec = dev_vec.cpu()
    if vec[-1] != 1.0:
        raise RuntimeError("metrics: expected exactly one reporting rank")
    return dict(zip(names, vec[:-1].tolist()))
