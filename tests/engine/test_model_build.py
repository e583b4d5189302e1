"""Megatron-Core GPTModel built from HF configs equals transformers' LlamaForCausalLM (single process, float32)."""

import pytest
import torch

from tests.helpers.model import LOGITS_ATOL, hf_logits, hf_model, megatron_logits, sample_tokens, tiny_config

pytestmark = pytest.mark.megatron


@pytest.fixture(scope="module")
def world():
    from megatron_inpo.engine import parallel

    parallel.initialize(1, 1, seed=7)
    yield parallel
    parallel.destroy()


@pytest.mark.parametrize("name", ["gqa_untied_rope", "gqa_tied", "mha_tied_rope", "gqa_headdim"])
def test_logits_match_transformers(world, name):
    from megatron_inpo.engine.mapping import load_hf_state_dict
    from megatron_inpo.engine.model import build_model

    cfg = tiny_config(name)
    ref = hf_model(cfg)
    built = build_model(cfg, precision="fp32", layer_spec="local")
    assert built.layer_spec == "local" and built.padded_vocab_size % 128 == 0
    load_hf_state_dict(built.model, ref.state_dict(), cfg)
    tokens = sample_tokens(cfg["vocab_size"], seq=40)  # 40 > original_max_position_embeddings: scaling matters
    got = megatron_logits(built.model, tokens, cfg["vocab_size"])
    want = hf_logits(ref, tokens)
    err = (got - want).abs().max().item()
    assert err < LOGITS_ATOL, f"{name}: max abs logits error {err:.3e}"


def test_sdpa_attention_equals_megatron_unfused(world):
    from megatron_inpo.engine.mapping import load_hf_state_dict
    from megatron_inpo.engine.model import build_model

    cfg = tiny_config("gqa_untied_rope")
    ref = hf_model(cfg)
    tokens = sample_tokens(cfg["vocab_size"])
    outs = []
    for attention in ("sdpa", "unfused"):
        built = build_model(cfg, layer_spec="local", attention=attention)
        load_hf_state_dict(built.model, ref.state_dict(), cfg)
        outs.append(megatron_logits(built.model, tokens, cfg["vocab_size"]))
    assert (outs[0] - outs[1]).abs().max().item() < 1e-5


def test_rope_inv_freq_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from megatron_inpo.engine.model import LlamaArch, rope_inv_freq

    cfg = tiny_config("gqa_untied_rope")
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](LlamaConfig(**cfg), "cpu")
    got = rope_inv_freq(LlamaArch.from_hf(cfg))
    assert torch.equal(got, want.float())
    # and differs from unscaled RoPE, so the check has teeth
    plain = rope_inv_freq(LlamaArch.from_hf(tiny_config("gqa_tied")))
    assert not torch.equal(got, plain)
