"""Rotary position embeddings without concatenation (plain torch), for the local layer spec.

    RopeTables.of(freqs, dtype, cu_seqlens=None)   cos / sin of one forward, computed once for every layer
    rotate(t, tables)                              the rotated query or key, written in the layout SDPA reads
    to_sdpa_layout(t)                              the value copied into that layout (frees the QKV output)

Why: Megatron-Core's unfused RoPE (models/common/embeddings/rope_utils.py, the path on CPU and on GPUs without
Transformer Engine) takes cos and sin of the whole table in every layer, builds the rotated half with torch.cat and
concatenates the rotated part with the (empty) pass-through part, and splits packed rows per sequence and concatenates
them again: on SmolLM2-135M's shape these copies and concatenations were ~15% of a training step. Here each half of the
output is written in place (x1 cos - x2 sin, x2 cos + x1 sin: the same products and sums, in the same dtype, as
Megatron's t * cos + rotate_half(t) * sin, so the result is bit for bit the same), and backward is the rotation by
the opposite angle. The output is allocated as [b, n, s, d] and returned as a [s, b, n, d] view, the layout
torch's scaled_dot_product_attention reads without a copy after the core attention's permute.

Scope (checked by `supported`): the non-interleaved RoPE of the Llama family over the whole head dimension, no
context parallelism, no YaRN scale; anything else stays on Megatron's function.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RopeTables:
    """cos / sin of the angles of one forward, [positions, 1, 1, d/2] in the activations' dtype, per token for
    packed rows (positions restarting at each sequence of cu_seqlens)."""

    cos: torch.Tensor
    sin: torch.Tensor

    @classmethod
    def of(cls, freqs: torch.Tensor, dtype: torch.dtype, cu_seqlens: torch.Tensor | None = None,
           tokens: int | None = None) -> "RopeTables":
        """From Megatron's rotary table `freqs` [s, 1, 1, d] (the angles twice over: cat(freqs, freqs)); with
        `cu_seqlens`, the `tokens` positions of a packed row."""
        half = freqs[..., : freqs.shape[-1] // 2]
        if cu_seqlens is not None:
            starts = cu_seqlens[:-1].long()
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
            first = torch.repeat_interleave(starts, lengths, output_size=tokens)
            half = half[torch.arange(tokens, device=freqs.device) - first]
        # the cos / sin Megatron takes per layer, `.to(t.dtype)` included (its `* mscale` is 1.0 without YaRN)
        return cls(torch.cos(half).to(dtype), torch.sin(half).to(dtype))


def supported(config, rotary_dim: int, head_dim: int) -> bool:
    """Whether `rotate` does what Megatron's RoPE does for this TransformerConfig."""
    return (not getattr(config, "rotary_interleaved", False) and not getattr(config, "apply_rope_fusion", False)
            and getattr(config, "context_parallel_size", 1) == 1 and rotary_dim == head_dim and head_dim % 2 == 0
            and not getattr(config, "multi_latent_attention", False)
            and not hasattr(config, "yarn_rotary_scaling_factor"))  # YaRN: Megatron scales cos / sin


def _rotate_into(out: torch.Tensor, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    h = t.shape[-1] // 2
    x1, x2 = t[..., :h], t[..., h:]
    o1, o2 = out[..., :h], out[..., h:]
    torch.mul(x1, cos, out=o1)
    o1.sub_(x2 * sin)
    torch.mul(x2, cos, out=o2)
    o2.add_(x1 * sin)
    return out


def _sdpa_layout(t: torch.Tensor) -> torch.Tensor:
    """An empty [s, b, n, d] tensor whose memory is [b, n, s, d] (3-D THD rows: [t, n, d] over [n, t, d])."""
    if t.dim() == 4:
        s, b, n, d = t.shape
        return t.new_empty(b, n, s, d).permute(2, 0, 1, 3)
    s, n, d = t.shape
    return t.new_empty(n, s, d).permute(1, 0, 2)


class _Rotate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate_into(_sdpa_layout(t), t, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate_into(torch.empty_like(grad), grad, cos, -sin), None, None


def to_sdpa_layout(t: torch.Tensor) -> torch.Tensor:
    """A copy of t [s, b, n, d] (or [t, n, d]) in the memory layout `rotate` writes. For the value: the fused QKV
    projection's output would otherwise stay alive until backward as the storage of the value's view, where the
    copy keeps only the value's share of it (a third to a fifth)."""
    return _sdpa_layout(t).copy_(t)


def rotate(t: torch.Tensor, tables: RopeTables) -> torch.Tensor:
    """t [s, b, n, d] (or a packed row's [t, 1, n, d]) rotated by `tables`."""
    cos, sin = tables.cos, tables.sin
    if cos.shape[0] != t.shape[0]:
        cos, sin = cos[: t.shape[0]], sin[: t.shape[0]]
    return _Rotate.apply(t, cos, sin)
