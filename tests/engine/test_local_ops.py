"""engine/rope.py and engine/swiglu.py, the local spec's RoPE and SwiGLU without concatenations
(MegatronModelConfig.local_ops 'inplace'): against Megatron-Core's own unfused ones inside a real GPTModel, bit for
bit (logits and every gradient, fp32 and bf16, padded and packed rows), with ours really used; the layout RoPE hands
to SDPA; both backwards by gradcheck in float64."""
import weakref

import pytest
import torch

from megatron_inpo.engine import rope, swiglu

from tests.helpers.engine import TINY_HF, make_pairs


def test_rotation_and_its_backward_in_float64():
    g = torch.Generator().manual_seed(0)
    s, b, n, d = 6, 2, 3, 8
    freqs = torch.rand(s, 1, 1, d // 2, generator=g, dtype=torch.float64) * 3
    freqs = torch.cat([freqs, freqs], dim=-1)  # Megatron's table: the angles twice over
    tables = rope.RopeTables.of(freqs, torch.float64)
    t = torch.randn(s, b, n, d, generator=g, dtype=torch.float64, requires_grad=True)
    out = rope.rotate(t, tables)
    x1, x2 = t[..., :4], t[..., 4:]
    c, si = freqs[..., :4].cos(), freqs[..., :4].sin()
    torch.testing.assert_close(out, torch.cat([x1 * c - x2 * si, x2 * c + x1 * si], -1), rtol=0, atol=1e-15)
    assert out.permute(1, 2, 0, 3).is_contiguous()  # [b, n, s, d] in memory: what SDPA reads after the permute
    v = rope.to_sdpa_layout(t)  # the value, copied into that layout (the fused QKV output is not kept)
    assert torch.equal(v, t) and v.permute(1, 2, 0, 3).is_contiguous() and v.data_ptr() != t.data_ptr()
    assert torch.autograd.gradcheck(lambda x: rope.rotate(x, tables), (t,))


def test_swiglu_and_its_backward_in_float64():
    x = torch.randn(5, 3, 8, dtype=torch.float64, requires_grad=True)
    want = torch.nn.functional.silu(x[..., :4]) * x[..., 4:]
    torch.testing.assert_close(swiglu.swiglu(x), want, rtol=0, atol=0)
    assert torch.autograd.gradcheck(swiglu.swiglu, (x,))


def test_a_linear_layer_after_swiglu_keeps_its_input_not_the_activation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    up = torch.randn(6, 2, 5, generator=g, dtype=torch.float64)
    want = torch.autograd.grad((torch.nn.functional.linear(swiglu.swiglu(x), w) * up).sum(), (x, w))
    act = swiglu.swiglu(x)
    with swiglu.recomputed_when_saved(act, x):
        y = torch.nn.functional.linear(act, w)
    alive = weakref.ref(act)
    del act
    assert alive() is None  # nothing of the graph keeps the activation (a plain linear layer would)
    got = torch.autograd.grad((y * up).sum(), (x, w))
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_packed_positions_restart_at_each_sequence():
    freqs = torch.arange(10, dtype=torch.float64)[:, None, None, None].repeat(1, 1, 1, 4) * 0.1
    cu = torch.tensor([0, 3, 7, 9], dtype=torch.int32)
    tables = rope.RopeTables.of(freqs, torch.float64, cu, 9)
    want = torch.tensor([0, 1, 2, 0, 1, 2, 3, 0, 1], dtype=torch.float64) * 0.1
    torch.testing.assert_close(tables.cos[:, 0, 0, 0], want.cos())


def compare_with_megatron() -> None:
    """In a process of its own (the engine's runtime sets up a process group and the CPU mode): both RoPEs in one
    model build each, every gradient compared; prints the number of rotations ours did."""
    from megatron_inpo.engine.batches import make_packed_batch, make_pair_batch, pair_sequences
    from megatron_inpo.engine.config import MegatronConfig, MegatronModelConfig
    from megatron_inpo.engine.model import packed_seq_params
    from megatron_inpo.engine.policy import build_policy, init_runtime

    calls, glu_calls = [], []
    real, real_glu = rope.rotate, swiglu.swiglu
    rope.rotate = lambda t, tables: calls.append(1) or real(t, tables)
    swiglu.swiglu = lambda x: glu_calls.append(1) or real_glu(x)
    recomputes, real_recompute = [], swiglu._FromInput.recompute
    swiglu._FromInput.recompute = lambda self: recomputes.append(1) or real_recompute(self)
    pairs = make_pairs(4, TINY_HF["vocab_size"], seed=1)
    batches = [make_pair_batch(pairs, indices=range(4)),
               make_packed_batch(pair_sequences(pairs), num_pairs=4, indices=range(4))]
    rt = None
    for precision in ("fp32", "bf16"):
        runs = {}
        for kind in ("megatron", "inplace"):
            eng = MegatronConfig(model=MegatronModelConfig(precision=precision, layer_spec="local", local_ops=kind))
            rt = rt or init_runtime(eng, seed=0)
            torch.manual_seed(0)
            model = build_policy(TINY_HF, eng, rt).model
            runs[kind] = []
            for b in batches:
                model.zero_grad()
                y = model(b.tokens, b.position_ids, attention_mask=None, packed_seq_params=packed_seq_params(b))
                y.float().square().mean().backward()
                runs[kind].append((y.detach().clone(), {k: p.grad.clone() for k, p in model.named_parameters()}))
        for (y_m, g_m), (y_i, g_i) in zip(runs["megatron"], runs["inplace"]):
            assert torch.equal(y_m, y_i), precision
            assert g_m.keys() == g_i.keys() and all(torch.equal(g_m[k], g_i[k]) for k in g_m), precision
    print(f"BIT-IDENTICAL rotations={len(calls)} swiglus={len(glu_calls)} recomputed={len(recomputes)}")


@pytest.mark.megatron
def test_inplace_ops_equal_megatrons_bit_for_bit():
    import subprocess

    from tests.helpers.engine import PY, REPO

    proc = subprocess.run([PY, "-c", "from tests.engine.test_local_ops import compare_with_megatron as c; c()"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    layers = TINY_HF["num_hidden_layers"]
    # precisions x batches x layers (x query, key): ours really ran
    # and each MLP's second linear layer took its input from the recomputation, not from a kept activation
    assert f"BIT-IDENTICAL rotations={2 * 2 * layers * 2} swiglus={2 * 2 * layers} recomputed={2 * 2 * layers}" \
        in proc.stdout
