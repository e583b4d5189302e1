"""SwiGLU without a concatenation in backward and without keeping silu(gate) (plain torch), for the local spec.

    swiglu(x)   silu(x[..., :f]) * x[..., f:] for the fused gate-and-up projection x [..., 2f]

Why: Megatron-Core's unfused gated MLP (transformer/mlp.py `glu`, the path on CPU and on GPUs without its compiled
fusion) chunks x, and autograd then keeps silu(gate) as well as x for backward and concatenates the two halves of
the gradient. Here backward writes each half of the gradient in place and recomputes silu(gate) from the kept x:
one [tokens x f] activation less per layer. The products and silu's derivative are the same torch kernels on the
same operands, so values and gradients are bit for bit Megatron's (tests/engine/test_local_ops.py compares both).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        gate, up = x.chunk(2, dim=-1)
        out = torch.empty_like(x)
        d_gate, d_up = out.chunk(2, dim=-1)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=d_gate)
        torch.mul(grad, F.silu(gate), out=d_up)
        return out


def swiglu(x: torch.Tensor) -> torch.Tensor:
    return _SwiGLU.apply(x)
