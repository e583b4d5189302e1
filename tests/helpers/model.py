"""Shared fixtures of the model / converter tests: tiny Llama configs, HF reference models, Megatron forwards."""
from __future__ import annotations

import os
import warnings

import torch

warnings.filterwarnings("ignore", message=".*Apex.*")
warnings.filterwarnings("ignore", message=".*Transformer Engine.*")

# float32 tolerance of Megatron logits vs transformers' on the tiny models (observed <= 2.4e-7; summation order differs)
LOGITS_ATOL = 1e-5

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


def tiny_config(name: str = "gqa_untied_rope", **over) -> dict:
    """HF config.json dicts of tiny Llamas. Names cover GQA, tied / untied, llama3 rope scaling, a vocab that
    needs TP padding (vocab 250 -> 256 at TP=1 with divisor 128, 256 at TP=2), head_dim != hidden/heads."""
    from transformers import LlamaConfig

    base = dict(vocab_size=250, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
                tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    presets = {
        "gqa_untied_rope": dict(rope_scaling=dict(LLAMA3_ROPE)),
        "gqa_tied": dict(tie_word_embeddings=True),
        "mha_tied_rope": dict(num_key_value_heads=8, tie_word_embeddings=True, rope_scaling=dict(LLAMA3_ROPE),
                              vocab_size=300),
        "gqa_headdim": dict(head_dim=16, num_hidden_layers=4, vocab_size=131),
    }
    kw = {**base, **presets[name], **over}
    return LlamaConfig(**kw).to_dict()


def hf_model(hf_config: dict, seed: int = 0):
    """A transformers LlamaForCausalLM (float32, eager attention) with random weights (norms too)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**{k: v for k, v in hf_config.items() if k != "transformers_version"})
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():  # random norm weights so a layernorm name mix-up cannot pass
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return model


def sample_tokens(vocab: int, batch: int = 2, seq: int = 24, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


@torch.no_grad()
def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens).logits.float()


@torch.no_grad()
def megatron_logits(model, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
    """Full-vocab logits [b, s, vocab] of a (TP / PP sharded) Megatron model on EVERY rank of its model-parallel
    group (pipeline stages pass hidden states with send/recv; TP logits are gathered); pad columns dropped."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    model.eval()
    b, s = tokens.shape
    pos = torch.arange(s).unsqueeze(0).expand(b, -1).contiguous()
    hidden = model.config.hidden_size
    if not ps.is_pipeline_first_stage():
        h = torch.empty(s, b, hidden, dtype=torch.float32)
        dist.recv(h, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(h)
    out = model(tokens if ps.is_pipeline_first_stage() else None, pos, attention_mask=None)
    if not ps.is_pipeline_last_stage():
        dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        logits = torch.empty(b, s, vocab_size)
    else:
        logits = gather_from_tensor_model_parallel_region(out)[..., :vocab_size].contiguous()
    # everyone gets the last stage's logits
    last = ps.get_pipeline_model_parallel_last_rank()
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(logits, src=last, group=ps.get_pipeline_model_parallel_group())
    return logits


def free_port(base: int = 29600, span: int = 100) -> int:
    """A free TCP port in this helper's range (29600-29699)."""
    import socket

    start = base + (os.getpid() % span)
    for i in range(span):
        port = base + (start - base + i) % span
        with socket.socket() as sk:
            try:
                sk.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 29600-29699")
