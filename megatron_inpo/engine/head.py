"""The policy's output head as log-probs: log p(label) of every token from the final hidden states, a chunk of
tokens at a time. Plain torch (and torch.distributed under tensor parallelism); no Megatron.

    label_logps(hidden, weight, labels, vocab_size, vocab_start=0, chunk_tokens=1024, group=None)  -> [N] float32

Why chunks: the reference path (engine/step.token_logps on the model's logits) holds the whole [tokens x vocab]
logits, a float32 copy of them when they are not float32, a masked copy when the vocabulary is padded, and Megatron's
cross entropy keeps the softmax for backward: up to four [tokens x vocab] tensors (0.8 GB each at 4,096 tokens and a
49k vocabulary in float32; 2 GB each at Llama-3's 128k). Here each chunk of tokens goes through the head's matmul,
the max, the log-sum-exp and the label's gather, and only [tokens] float32 values are kept; backward recomputes a
chunk's logits (a custom autograd function), so one chunk's [chunk x vocab/tp] logits exist at a time.

Vocabulary parallel: `weight` holds this rank's rows [V/tp, h] of the head, the first one being global token id
`vocab_start`; the max, the sum of exponentials and the label's logit are all-reduced over `group`, the three
all-reduces of Megatron's vocab_parallel_cross_entropy. Rows at or beyond `vocab_size` (the padded vocabulary) are
never multiplied: the weight is sliced (a view), the logits are not masked. The gradient of `hidden` is this rank's
share (its vocabulary rows); the caller's Megatron region (engine/step.py: the output layer's own input op) sums it
over the tensor-parallel group in backward, as ColumnParallelLinear does.

Precision: the logits of a chunk are computed in the weight's dtype and taken to float32, as the model's output
layer followed by `.float()` does; the weight's gradient is accumulated over chunks in float32.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def label_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                vocab_start: int = 0, chunk_tokens: int = 1024, group=None) -> torch.Tensor:
    """log p(labels[i]) for every row i of hidden [N, h] under the head `weight` [V_local, h]: [N] float32.

    `vocab_size`: the real vocabulary (global ids >= vocab_size are padding, left out of the softmax);
    `vocab_start`: the global id of weight's first row (tp_rank * V_local); `group`: the tensor-parallel group
    (None: the whole vocabulary is here). A label outside [0, vocab_size) gets a value that callers mask out.
    The result is float32 (float64 for a float64 weight)."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"label_logps: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} do not match")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"label_logps: labels {tuple(labels.shape)} for {hidden.shape[0]} rows")
    if chunk_tokens < 1:
        raise ValueError(f"label_logps: chunk_tokens must be >= 1, got {chunk_tokens}")
    valid = max(0, min(weight.shape[0], vocab_size - vocab_start))
    return _LabelLogps.apply(hidden.to(weight.dtype), weight, labels, vocab_start, valid, chunk_tokens, group)


def _accumulate_dtype(weight: torch.Tensor) -> torch.dtype:
    """float32, or the weight's dtype when wider (float64 in the closed-form tests)."""
    return torch.promote_types(weight.dtype, torch.float32)


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(t, op=op, group=group)
    return t


def _local_labels(labels: torch.Tensor, start: int, valid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index into this rank's rows, clamped; whether the label is one of them)."""
    local = labels - start
    here = (local >= 0) & (local < valid)
    return local.clamp(0, max(valid - 1, 0)), here


class _LabelLogps(torch.autograd.Function):
    """Forward: per chunk, logits -> max, log-sum-exp, the label's logit (all-reduced over `group`); keeps only
    the inputs and the [N] log-sum-exp. Backward: per chunk, the logits again, d logp / d logits = onehot - softmax,
    then the two matmuls of a linear layer's backward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, start, valid, chunk, group):
        w, acc = weight[:valid], _accumulate_dtype(weight)
        out = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        lse = torch.empty_like(out)
        for a in range(0, hidden.shape[0], chunk):
            logits = F.linear(hidden[a:a + chunk], w).to(acc)
            idx, here = _local_labels(labels[a:a + chunk], start, valid)
            m = _all_reduce(logits.max(dim=-1).values if valid else
                            torch.full_like(out[a:a + chunk], float("-inf")), dist.ReduceOp.MAX, group)
            target = _all_reduce(logits.gather(1, idx[:, None])[:, 0].masked_fill(~here, 0.0) if valid else
                                 torch.zeros_like(m), dist.ReduceOp.SUM, group)
            logits.sub_(m[:, None]).exp_()
            sum_exp = _all_reduce(logits.sum(dim=-1), dist.ReduceOp.SUM, group)
            lse[a:a + chunk] = m + sum_exp.log()
            out[a:a + chunk] = target - lse[a:a + chunk]
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.start, ctx.valid, ctx.chunk = start, valid, chunk
        return out

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, labels, lse = ctx.saved_tensors
        start, valid, chunk = ctx.start, ctx.valid, ctx.chunk
        w, acc = weight[:valid], _accumulate_dtype(weight)
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if ctx.needs_input_grad[1] else None
        for a in range(0, hidden.shape[0] if valid else 0, chunk):
            h, g = hidden[a:a + chunk], grad[a:a + chunk].to(acc)
            # d logp / d logits = onehot(label) - softmax; times the incoming gradient of each token
            d = F.linear(h, w).to(acc).sub_(lse[a:a + chunk, None]).exp_().mul_(-g[:, None])
            idx, here = _local_labels(labels[a:a + chunk], start, valid)
            d.scatter_add_(1, idx[:, None], (g * here)[:, None])
            d = d.to(weight.dtype)
            if grad_hidden is not None:
                torch.matmul(d, w, out=grad_hidden[a:a + chunk])  # rows of a contiguous tensor: no copy
            if grad_w is not None:
                if d.dtype == acc:
                    grad_w[:valid].addmm_(d.t(), h)
                else:
                    grad_w[:valid] += (d.t() @ h).to(acc)
        return (grad_hidden, grad_w.to(weight.dtype) if grad_w is not None else None,
                None, None, None, None, None)
