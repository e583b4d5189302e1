"""engine/head.label_logps, the chunked log p(label) (plain torch; MegatronConfig.logps 'chunked'): against the
closed form log_softmax(h W^T)[label] in float64 (values and both gradients), over chunk sizes, a padded
vocabulary and labels outside it; vocabulary-parallel over two gloo processes == one process; bf16 within the
bound of the logits path. The Megatron engine's use of it (TP / PP / packing, against the full-logits path) is in
tests/engine/packing_worker.py and the parity workers."""
import socket

import pytest
import torch
import torch.multiprocessing as mp

from megatron_inpo.engine.head import label_logps


def _case(n=37, h=16, vocab=50, padded=64, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype)
    weight = torch.randn(padded, h, generator=g, dtype=dtype) * 0.5
    labels = torch.randint(0, vocab, (n,), generator=g)
    upstream = torch.randn(n, generator=g, dtype=dtype)
    return hidden, weight, labels, upstream


def _closed_form(hidden, weight, labels, vocab, upstream):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp = torch.log_softmax(h @ w[:vocab].T, dim=-1).gather(1, labels[:, None])[:, 0]
    gh, gw = torch.autograd.grad((lp * upstream).sum(), (h, w))
    return lp.detach(), gh, gw


def _chunked(hidden, weight, labels, vocab, upstream, **kw):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp = label_logps(h, w, labels, vocab, **kw)
    gh, gw = torch.autograd.grad((lp * upstream.to(lp.dtype)).sum(), (h, w))
    return lp.detach(), gh, gw


@pytest.mark.parametrize("chunk", [1, 5, 37, 1000])
def test_float64_equals_the_closed_form_values_and_gradients(chunk):
    hidden, weight, labels, up = _case()
    want = _closed_form(hidden, weight, labels, 50, up)
    got = _chunked(hidden, weight, labels, 50, up, chunk_tokens=chunk)
    for g, w in zip(got, want):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    assert torch.count_nonzero(got[2][50:]) == 0  # padded rows: never in the softmax, no gradient


def test_labels_outside_the_vocabulary_are_finite_and_get_no_gradient():
    """Padding positions carry labels a loss mask removes (0 or -100): finite, and with zero upstream gradient
    they add nothing."""
    hidden, weight, labels, up = _case()
    labels[:3] = torch.tensor([-100, 63, 50])
    up[:3] = 0.0
    lp, gh, gw = _chunked(hidden, weight, labels, 50, up, chunk_tokens=8)
    assert torch.isfinite(lp).all()
    keep = torch.arange(3, 37)
    want = _closed_form(hidden[keep], weight, labels[keep], 50, up[keep])
    torch.testing.assert_close(lp[keep], want[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, want[2], rtol=1e-12, atol=1e-12)
    assert torch.count_nonzero(gh[:3]) == 0


def test_refuses_mismatched_shapes():
    hidden, weight, labels, _ = _case()
    with pytest.raises(ValueError, match="do not match"):
        label_logps(hidden[:, :8], weight, labels, 50)
    with pytest.raises(ValueError, match="labels"):
        label_logps(hidden, weight, labels[:5], 50)
    with pytest.raises(ValueError, match="chunk_tokens"):
        label_logps(hidden, weight, labels, 50, chunk_tokens=0)


def test_bf16_within_the_logits_path_bound():
    """bf16 weights: the logits of a chunk are the same bf16 GEMM the output layer does, taken to float32, so the
    values equal the logits path's to float32 rounding; both are within 2^-8 * max|logit| of float64."""
    hidden, weight, labels, up = _case(n=64, h=64, vocab=500, padded=512, dtype=torch.float32)
    hb, wb = hidden.bfloat16(), weight.bfloat16()
    lp = label_logps(hb, wb, labels, 500, chunk_tokens=16)
    ref = torch.log_softmax((hb @ wb[:500].T).float(), dim=-1).gather(1, labels[:, None])[:, 0]
    exact = _closed_form(hb.double(), wb.double(), labels, 500, up.double())[0]
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp, ref, rtol=1e-5, atol=1e-5)
    bound = 2 ** -8 * float((hb.double() @ wb[:500].double().T).abs().max())
    assert float((lp.double() - exact).abs().max()) <= bound


def _tp_worker(rank, port, vocab, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    hidden, weight, labels, up = _case(dtype=torch.float32)
    labels = labels % vocab
    local = weight.shape[0] // 2
    w = weight[rank * local:(rank + 1) * local]
    lp, gh, gw = _chunked(hidden, w, labels, vocab, up, vocab_start=rank * local, chunk_tokens=6,
                          group=dist.group.WORLD)
    dist.all_reduce(gh)  # what the output layer's TP region does in backward
    out[rank] = (lp, gh, gw)
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("vocab", [50, 20])  # 20: rank 1 holds only padded rows
def test_vocabulary_parallel_over_two_processes_equals_one(vocab):
    hidden, weight, labels, up = _case(dtype=torch.float32)
    labels = labels % vocab
    one = _chunked(hidden, weight, labels, vocab, up, chunk_tokens=6)
    out = mp.Manager().dict()
    mp.spawn(_tp_worker, args=(_free_port(), vocab, out), nprocs=2)
    for rank in (0, 1):
        lp, gh, gw = out[rank]
        torch.testing.assert_close(lp, one[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gh, one[1], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gw, one[2][rank * 32:(rank + 1) * 32], rtol=1e-6, atol=1e-6)
