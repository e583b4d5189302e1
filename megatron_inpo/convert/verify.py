"""--verify: logits of the Megatron checkpoint (TP=1, PP=1, float32) vs transformers on the HF directory.

What is fed: `batch` x `seq` random token ids, and, when the HF directory's tokenizer has a chat template, a few
fixed conversations (VERIFY_CONVERSATIONS) rendered with that template: real text in the model's own format, with
its special tokens, at real positions.

The rule, and why (README "Converting checkpoints"):

- Both models run in float32 on the SAME weights. A conversion changes the dtype when asked (an export defaults
  to bf16, an import may be given --dtype), so each side's weights are rounded to the coarsest dtype that either
  side is stored in (bf16, else fp16, else fp32; read from the weights themselves: a side is "bf16" when every one
  of its float32-loaded weights is a bf16 value). So the output dtype decides which weights are compared, and a
  bf16 checkpoint checked against its fp32 source compares the bf16 weights on both sides (compared as they are,
  the rounding alone moved a real model's logits by 0.73, far above any useful tolerance).
- What then differs is float32 arithmetic in another order (Megatron's attention and fused layers vs transformers'
  eager path), whose error grows with the size of the logits, not with the dtype of the weights. The tolerance is
  therefore relative to the logit scale: `atol = VERIFY_RTOL x max(1, max |logit|)` over the transformers logits of
  every input, with VERIFY_RTOL = 2^-13 (1.2e-4; 2^10 float32 epsilons). Observed: <= 3e-7 on the tiny test models
  (logits of a few units), 1.0e-4 on SmolLM2-135M (30 layers) exported to bf16, whose logits reach tens; a wrong
  conversion (heads, rotary, norms, tied weights mixed up) moves logits by a sizeable fraction of their scale.

This loads both models fully (float32) in this process, so it is meant for models that fit in memory; the
conversion itself streams. `verify_output` is the command's verify: a failure removes the output it checked.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from megatron_inpo.convert import ConvertError

VERIFY_RTOL = 2.0 ** -13
"""Tolerance of a logit difference, relative to max(1, the largest |logit|) (see the module docstring)."""

VERIFY_CONVERSATIONS = (
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."}],
    [{"role": "user", "content": "Write a haiku about autumn leaves."},
     {"role": "assistant", "content": "Red leaves drift and fall,\nwhispering to the cold ground:\nsummer says goodbye."}],
    [{"role": "user", "content": "List three prime numbers, separated by commas."},
     {"role": "assistant", "content": "2, 3, 5"},
     {"role": "user", "content": "And their sum?"}],
)
"""Fixed texts of --verify, rendered with the model's own chat template when it has one."""
MAX_TEXT_TOKENS = 256


def chat_texts(hf_dir: str | Path, vocab_size: int, max_positions: int) -> list[list[int]]:
    """Token ids of VERIFY_CONVERSATIONS under the HF directory's chat template; [] when it has no tokenizer or
    no template. Texts are cut to the model's positions; one with ids outside the vocabulary is left out (the
    tokenizer knows more tokens than the model: not this conversion's business)."""
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(hf_dir))
    except Exception:  # noqa: BLE001 - no (loadable) tokenizer: random ids only
        return []
    if not getattr(tok, "chat_template", None):
        return []
    out = []
    for conv in VERIFY_CONVERSATIONS:
        try:
            text = tok.apply_chat_template(list(conv), tokenize=False,
                                           add_generation_prompt=conv[-1]["role"] == "user")
        except Exception:  # noqa: BLE001 - a template that refuses this conversation (roles, system turn)
            continue
        ids = list(tok(text, add_special_tokens=False)["input_ids"])[:min(max_positions, MAX_TEXT_TOKENS)]
        if ids and all(0 <= i < vocab_size for i in ids):
            out.append(ids)
    return out


def _exact_dtype(params: Any) -> torch.dtype:
    """The coarsest of bf16 / fp16 in which every float32 weight is exact; else float32."""
    params = list(params)
    for dt in (torch.bfloat16, torch.float16):
        if all(torch.equal(p, p.to(dt).float()) for p in params):
            return dt
    return torch.float32


def _round_to(params: Any, dtype: torch.dtype) -> None:
    if dtype != torch.float32:
        for p in params:
            p.copy_(p.to(dtype).float())


def hf_reference(hf_dir: str | Path) -> Any:
    """transformers' float32 model of the HF directory (eager attention: the plainest reference)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, attn_implementation="eager").eval()


@torch.no_grad()
def compare_logits(mcore_dir, hf_dir, seq: int = 32, batch: int = 2, seed: int = 0) -> dict:
    """Logits of both checkpoints on random ids and the chat texts; returns {"verify_max_abs_err",
    "verify_tolerance", "verify_logit_scale", "verify_weights_dtype", "verify_texts"} (no verdict)."""
    from megatron.core import dist_checkpointing

    from megatron_inpo.engine import parallel
    from megatron_inpo.engine.checkpoint import read_meta  # the checkpoint the conversion has just written
    from megatron_inpo.engine.model import build_model

    meta = read_meta(Path(mcore_dir))
    hf_config = meta["hf_config"]
    vocab = int(hf_config["vocab_size"])
    parallel.initialize(1, 1, seed=seed)
    try:
        built = build_model(hf_config, precision="fp32", layer_spec="local",
                            padded_vocab_size=int(meta["padded_vocab_size"]))
        loaded = dist_checkpointing.load({"model": built.model.sharded_state_dict()}, str(mcore_dir))
        built.model.load_state_dict(loaded["model"], strict=False)
        ref = hf_reference(hf_dir)
        mine, theirs = list(built.model.parameters()), list(ref.parameters())
        # compare the SAME weights: round both sides to the coarser of the two stored dtypes
        d_m, d_h = _exact_dtype(mine), _exact_dtype(theirs)
        dtype = next((d for d in (torch.bfloat16, torch.float16) if d in (d_m, d_h)), torch.float32)
        _round_to(mine, dtype)
        _round_to(theirs, dtype)
        built.model.eval()
        g = torch.Generator().manual_seed(seed)
        inputs = [torch.randint(0, vocab, (batch, seq), generator=g)]
        texts = chat_texts(hf_dir, vocab, int(hf_config.get("max_position_embeddings") or MAX_TEXT_TOKENS))
        inputs += [torch.tensor([t]) for t in texts]
        err, scale = 0.0, 1.0
        for tokens in inputs:
            b, s = tokens.shape
            pos = torch.arange(s).unsqueeze(0).expand(b, -1)
            got = built.model(tokens, pos, attention_mask=None)[..., :vocab].float()
            want = ref(input_ids=tokens).logits.float()
            err = max(err, (got - want).abs().max().item())
            scale = max(scale, want.abs().max().item())
    finally:
        parallel.destroy()
    return {"verify_max_abs_err": err, "verify_tolerance": VERIFY_RTOL * scale, "verify_logit_scale": scale,
            "verify_weights_dtype": str(dtype).replace("torch.", ""), "verify_texts": len(texts)}


def verify_mcore_against_hf(mcore_dir, hf_dir, seq: int = 32, batch: int = 2, seed: int = 0,
                            atol: float | None = None) -> float:
    """The max |logit difference|; ConvertError when it exceeds `atol` (default: the rule of the module
    docstring)."""
    r = compare_logits(mcore_dir, hf_dir, seq, batch, seed)
    check(r, mcore_dir, hf_dir, atol)
    return r["verify_max_abs_err"]


def check(report: dict, mcore_dir: Any, hf_dir: Any, atol: float | None = None) -> None:
    tol = report["verify_tolerance"] if atol is None else atol
    err = report["verify_max_abs_err"]
    if not err <= tol:
        raise ConvertError(f"--verify failed: max |logits(megatron) - logits(transformers)| = {err:.3e} > {tol:.3e} "
                           f"(= 2^-13 x logit scale {report['verify_logit_scale']:.3g}, weights compared in "
                           f"{report['verify_weights_dtype']}; {mcore_dir} vs {hf_dir})")


def verify_output(mcore_dir, hf_dir, output_dir) -> dict:
    """`convert --verify`: compare the two checkpoints; when they differ (or the check itself fails), remove
    `output_dir`, the conversion's output, so that nothing unverified is left for a later command to pick up."""
    try:
        report = compare_logits(mcore_dir, hf_dir)
        check(report, mcore_dir, hf_dir)
    except BaseException as e:
        shutil.rmtree(output_dir, ignore_errors=True)
        if isinstance(e, ConvertError):
            raise ConvertError(f"{e}; removed the output {output_dir}") from None
        raise
    return report
