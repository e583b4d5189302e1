"""Bradley-Terry reward models: in-process (transformers *ForSequenceClassification) or SGLang /classify.

A reward judge needs a trained reward head. transformers loads a causal LM (or any checkpoint without the head's
weights) as *ForSequenceClassification without complaint, initialising the head at random and saying so only in
its load report: `make_reward_judge` refuses such a model with a ConfigError naming the missing weights. (An
SGLang judge's weights are the server's; its model_path may hold only the tokenizer, so it is not checked here.)
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from megatron_inpo.config import ConfigError
from megatron_inpo.data.batching import left_pad
from megatron_inpo.judge.base import JudgeConfig, RewardJudge
from megatron_inpo.judge.pairwise import render_judge_input

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _RMJudge(RewardJudge):
    def __init__(self, tokenizer: Any, max_length: int) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.max_length = max_length

    def render(self, prompt: str, response: str) -> list[int]:
        """The (prompt, response) conversation under the RM's chat template, truncated from the left."""
        ids = render_judge_input(self.tokenizer, [{"role": "user", "content": prompt},
                                                  {"role": "assistant", "content": response}], False)
        return ids[-self.max_length:]


class LocalRewardJudge(_RMJudge):
    """Reward = the sequence-classification head (num_labels=1) at the last token, batched with left padding."""

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 16, device: str = "cpu",
                 max_length: int = 4096, name: str = "bt-rm") -> None:
        super().__init__(tokenizer, max_length)
        self.model = model.eval()
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.name = name
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad or 0)

    @torch.inference_mode()
    def _score(self, items: list[tuple[str, str]], ids: Any) -> Sequence[float]:
        seqs = [self.render(p, r) for p, r in items]
        out: list[float] = []
        head = getattr(self.model, "score", None)
        for s in range(0, len(seqs), self.batch_size):
            x, mask, pos = left_pad(seqs[s:s + self.batch_size], self.pad_id, self.device)
            if head is not None:
                # pool the last position ourselves: the model's own pooling looks for the last non-pad id and
                # would be fooled by a response that contains the pad id
                h = self.model.base_model(input_ids=x, attention_mask=mask, position_ids=pos).last_hidden_state
                r = head(h[:, -1, :])[:, 0]
            else:
                r = self.model(input_ids=x, attention_mask=mask, position_ids=pos).logits[:, 0]
            out += r.float().tolist()
        return out


def parse_reward(item: Any) -> float:
    """The reward in one /classify result: `embedding`, a list whose first element is a finite number (the
    num_labels=1 head's score); TypeError / ValueError / KeyError say what is wrong (the pool retries)."""
    if not isinstance(item, dict):
        raise TypeError(f"a result is {type(item).__name__}, not a JSON object")
    emb = item["embedding"]
    if not isinstance(emb, list) or not emb:
        raise ValueError(f"embedding is {emb!r:.100}, not a non-empty list")
    r = emb[0]
    if not isinstance(r, (int, float)) or isinstance(r, bool) or not math.isfinite(r):
        raise ValueError(f"embedding[0] = {r!r:.100} is not a finite number")
    return float(r)


class SGLangRewardJudge(_RMJudge):
    """Reward from an SGLang --is-embedding server: POST /classify, reward = embedding[0]."""

    def __init__(self, pool: Any, tokenizer: Any, batch_size: int = 16, max_length: int = 4096,
                 name: str = "bt-rm-sglang") -> None:
        super().__init__(tokenizer, max_length)
        self.pool = pool
        self.batch_size = batch_size
        self.name = name

    def _score(self, items: list[tuple[str, str]], ids: Any) -> Sequence[float]:
        seqs = [self.render(p, r) for p, r in items]
        chunks = [seqs[s:s + self.batch_size] for s in range(0, len(seqs), self.batch_size)]

        def validate(reply: Any, k: int) -> None:
            got = reply if isinstance(reply, list) else [reply]
            if len(got) != len(chunks[k]):
                raise ValueError(f"{len(got)} rewards for {len(chunks[k])} inputs")
            for j, g in enumerate(got):
                try:
                    parse_reward(g)
                except KeyError as e:
                    raise ValueError(f"result {j}: missing {e}") from None
                except (ValueError, TypeError) as e:
                    raise type(e)(f"result {j}: {e}") from None

        out: list[float] = []
        for reply in self.pool.map("/classify", [{"input_ids": c} for c in chunks], validate):
            out += [parse_reward(g) for g in (reply if isinstance(reply, list) else [reply])]
        return out


HEAD_NAMES = ("score", "classifier")
"""Names transformers gives the head of a *ForSequenceClassification model (Llama, Mistral, Qwen: score)."""


def check_reward_head(model_path: str, missing: list[str]) -> None:
    """ConfigError when weights of the reward head are among `missing` (those the checkpoint lacks)."""
    head = [k for k in missing if k.split(".")[0] in HEAD_NAMES or any(f".{h}." in f".{k}" for h in HEAD_NAMES)]
    if head:
        raise ConfigError(f"judge.model_path {model_path}: no trained reward head: {', '.join(sorted(head))} "
                          "missing from the checkpoint (transformers would initialise it at random); a reward judge "
                          "needs a sequence-classification checkpoint with num_labels=1 (judge.kind 'reward'), "
                          "a causal LM judges as judge.kind 'pairwise'")


def make_reward_judge(cfg: JudgeConfig) -> RewardJudge:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.model_path)
    if cfg.backend == "local":
        from transformers import AutoModelForSequenceClassification

        model, info = AutoModelForSequenceClassification.from_pretrained(cfg.model_path, dtype=_DTYPES[cfg.dtype],
                                                                         output_loading_info=True)
        check_reward_head(cfg.model_path, list(info.get("missing_keys") or []))
        return LocalRewardJudge(model.to(cfg.device), tok, cfg.batch_size, cfg.device, cfg.max_length,
                                name=f"bt-rm:{cfg.model_path}")
    from megatron_inpo.serving.pool import SGLangPool

    return SGLangRewardJudge(SGLangPool.from_config(cfg, "judge.api_key"), tok, cfg.batch_size, cfg.max_length,
                             name=f"bt-rm-sglang:{cfg.model_path}")
