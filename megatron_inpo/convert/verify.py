"""--verify: logits of the Megatron checkpoint (TP=1, PP=1, float32) vs transformers on the HF directory.

This loads both models fully (float32) in this process, so it is meant for models that fit in memory; the
conversion itself streams.
"""
from __future__ import annotations

from pathlib import Path

import torch

from megatron_inpo.convert import ConvertError

# float32 compute of identical weights; observed <= 3e-7 on the tiny test models (bf16 weights are upcast)
VERIFY_ATOL = 1e-4


@torch.no_grad()
def verify_mcore_against_hf(mcore_dir, hf_dir, seq: int = 32, batch: int = 2, seed: int = 0,
                            atol: float = VERIFY_ATOL) -> float:
    from megatron.core import dist_checkpointing
    from transformers import AutoModelForCausalLM

    from megatron_inpo.engine import parallel
    from megatron_inpo.engine.checkpoint import read_meta  # the checkpoint the conversion has just written
    from megatron_inpo.engine.model import build_model

    meta = read_meta(Path(mcore_dir))
    hf_config = meta["hf_config"]
    parallel.initialize(1, 1, seed=seed)
    built = build_model(hf_config, precision="fp32", layer_spec="local",
                        padded_vocab_size=int(meta["padded_vocab_size"]))
    loaded = dist_checkpointing.load({"model": built.model.sharded_state_dict()}, str(mcore_dir))
    built.model.load_state_dict(loaded["model"], strict=False)
    # compare the SAME weights: an export to bf16 rounds them, so round Megatron's copy the same way
    import json

    hf_dtype = json.loads((Path(hf_dir) / "config.json").read_text()).get("dtype")
    rounding = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(hf_dtype)
    if rounding is not None:
        for p in built.model.parameters():
            p.copy_(p.to(rounding).float())
    ref = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, hf_config["vocab_size"], (batch, seq), generator=g)
    pos = torch.arange(seq).unsqueeze(0).expand(batch, -1)
    built.model.eval()
    got = built.model(tokens, pos, attention_mask=None)[..., : hf_config["vocab_size"]]
    want = ref(input_ids=tokens).logits
    err = (got - want).abs().max().item()
    parallel.destroy()
    if not err <= atol:
        raise ConvertError(f"--verify failed: max |logits(megatron) - logits(transformers)| = {err:.3e} > {atol:g} "
                           f"({mcore_dir} vs {hf_dir})")
    return err
