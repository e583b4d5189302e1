"""SwiGLU without a concatenation in backward and without keeping silu(gate) (plain torch), for the local spec.

    swiglu(x)   silu(x[..., :f]) * x[..., f:] for the fused gate-and-up projection x [..., 2f]
    with recomputed_when_saved(out, x): ...   a save of out = swiglu(x) for backward (by the next linear layer)
                                               keeps nothing: backward recomputes it from x

Why: Megatron-Core's unfused gated MLP (transformer/mlp.py `glu`, the path on CPU and on GPUs without its compiled
fusion) chunks x, and autograd then keeps silu(gate) as well as x for backward and concatenates the two halves of
the gradient. Here backward writes each half of the gradient in place and recomputes silu(gate) from the kept x:
one [tokens x f] activation less per layer; and with `recomputed_when_saved` the output itself, which the next
linear layer would keep, is recomputed from x in backward: another [tokens x f] less (0.75 GB at SmolLM2-135M's
shape and 4,096 tokens). The products and silu's derivative are the same torch kernels on the same operands, so
values and gradients are bit for bit Megatron's (tests/engine/test_local_ops.py compares both).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def _forward(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return _forward(x)

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


class _FromInput:
    """What a save of swiglu(x) keeps instead of the tensor: x, which swiglu's own backward keeps anyway, and the
    shape the save had (a linear layer may save a flattened view of its input)."""

    def __init__(self, x: torch.Tensor, shape: torch.Size) -> None:
        self.x, self.shape = x, shape

    def recompute(self) -> torch.Tensor:
        with torch.no_grad():  # swiglu's own forward on the same operands: the same bits
            return _forward(self.x).view(self.shape)


@contextlib.contextmanager
def recomputed_when_saved(out: torch.Tensor, x: torch.Tensor):
    """Within: autograd's saves of `out` (= swiglu(x)) or of a reshaped view of it keep x instead, and backward
    recomputes `out` from it. Why: the MLP's second linear layer saves its input [tokens x f] for its weight's
    gradient, a third of the MLP's activations, while swiglu's backward keeps x anyway. The hooks hold only out's
    address and size, never out itself (autograd keeps a pack hook until backward), so out is freed after forward."""
    if not out.is_contiguous():
        yield
        return
    ptr, numel, dtype = out.data_ptr(), out.numel(), out.dtype

    def pack(t: torch.Tensor):
        same = t.data_ptr() == ptr and t.numel() == numel and t.dtype == dtype and t.is_contiguous()
        return _FromInput(x, t.shape) if same else t

    def unpack(saved):
        return saved.recompute() if isinstance(saved, _FromInput) else saved

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
