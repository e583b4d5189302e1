"""Pairwise preference model (RLHFlow pair-preference-model style), in-process or on SGLang.

The PM reads one user turn, `[CONTEXT] {context} [RESPONSE A] {A} [RESPONSE B] {B}`, rendered with the PM's chat
template, and answers with the token "A" or "B". As in RLHFlow's reference pipeline, {context} is the conversation in
a plain '<turn> user' format, the rendered input has its BOS text removed and no generation prompt appended (all
three are JudgeConfig options). P(A beats B) = softmax over the next-token logits of exactly those
two tokens = sigmoid(logit_A - logit_B). With both_orders the judge also asks with A and B swapped and averages
P_AB(A) and P_BA(B), cancelling the PM's position bias (two forward passes per comparison, as the authors do).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from megatron_inpo.config import ConfigError
from megatron_inpo.data.batching import left_pad
from megatron_inpo.judge.base import Comparison, Judge, JudgeConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def single_token_id(tokenizer: Any, text: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ConfigError(f"judge.token_a/token_b: {text!r} is {len(ids)} tokens {ids} in the judge's tokenizer; "
                          "a pairwise judge needs single-token answers")
    return ids[0]


def rlhflow_context(messages: list[dict]) -> str:
    """The conversation in the plain format RLHFlow's pair-preference model was trained on."""
    turns = "".join(f"\n\n<turn> {'user' if i % 2 == 0 else 'assistant'}\n {m['content']}"
                    for i, m in enumerate(messages))
    return "\n" + turns + "\n\n\n"


def render_judge_input(tokenizer: Any, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    """Token ids of `messages` under the tokenizer's chat template (plain concatenation when it has none)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer("\n".join(m["content"] for m in messages))["input_ids"])


class LocalPairwiseBackend:
    """Next-token log-probs of a transformers causal LM, batched with left padding."""

    def __init__(self, model: Any, batch_size: int = 16, device: str = "cpu", pad_id: int = 0) -> None:
        self.model = model.eval()
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.pad_id = pad_id

    @classmethod
    def from_pretrained(cls, path: str, cfg: JudgeConfig, pad_id: int) -> "LocalPairwiseBackend":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[cfg.dtype]).to(cfg.device)
        return cls(model, cfg.batch_size, cfg.device, pad_id)

    @torch.inference_mode()
    def token_logprobs(self, inputs: list[list[int]], token_ids: list[int]) -> list[list[float]]:
        out: list[list[float]] = []
        for s in range(0, len(inputs), self.batch_size):
            ids, mask, pos = left_pad(inputs[s:s + self.batch_size], self.pad_id, self.device)
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                                use_cache=False).logits[:, -1, :].float()
            logp = torch.log_softmax(logits, dim=-1)[:, token_ids]
            out += logp.tolist()
        return out


LOGPROB_TOLERANCE = 1e-4
"""A log-probability may exceed 0 by rounding only."""


def parse_token_logprobs(item: Any, token_ids: list[int]) -> list[float]:
    """The next-token log-probs of `token_ids` in one /generate result asked with token_ids_logprob: the first
    row of meta_info.output_token_ids_logprobs, entries [logprob, token_id, text] (SGLang's LogprobEntry). The
    row must hold exactly the asked ids, each once, with a finite float log-probability <= 0; ValueError /
    TypeError / KeyError say what is wrong otherwise (the pool retries the request)."""
    if not isinstance(item, dict):
        raise TypeError(f"a result is {type(item).__name__}, not a JSON object")
    meta = item["meta_info"]
    if not isinstance(meta, dict):
        raise TypeError(f"meta_info is {type(meta).__name__}, not a JSON object")
    rows = meta["output_token_ids_logprobs"]
    if not isinstance(rows, list) or not rows or not isinstance(rows[0], list):
        raise ValueError(f"output_token_ids_logprobs is {rows!r:.200}, not a list of rows")
    table: dict[int, float] = {}
    for e in rows[0]:
        if not isinstance(e, list) or len(e) < 2:
            raise ValueError(f"output_token_ids_logprobs entry {e!r:.100} is not [logprob, token_id, text]")
        lp, tid = e[0], e[1]
        if not isinstance(tid, int) or isinstance(tid, bool):
            raise TypeError(f"output_token_ids_logprobs token id {tid!r} is not an int")
        if not isinstance(lp, (int, float)) or isinstance(lp, bool) or not math.isfinite(lp) \
                or lp > LOGPROB_TOLERANCE:
            raise ValueError(f"output_token_ids_logprobs: log-prob {lp!r} of token {tid} is not a finite float "
                             "<= 0")
        if tid not in token_ids:
            raise ValueError(f"output_token_ids_logprobs holds token {tid}, not asked for (asked {token_ids})")
        if tid in table:
            raise ValueError(f"output_token_ids_logprobs holds token {tid} twice")
        table[tid] = min(float(lp), 0.0)
    missing = [t for t in token_ids if t not in table]
    if missing:
        raise ValueError(f"output_token_ids_logprobs lacks token(s) {missing} (asked {token_ids})")
    return [table[t] for t in token_ids]


class SGLangPairwiseBackend:
    """Next-token log-probs from SGLang: /generate with max_new_tokens=1 and token_ids_logprob=[A, B]."""

    def __init__(self, pool: Any, batch_size: int = 16) -> None:
        self.pool = pool
        self.batch_size = batch_size

    def token_logprobs(self, inputs: list[list[int]], token_ids: list[int]) -> list[list[float]]:
        chunks = [inputs[s:s + self.batch_size] for s in range(0, len(inputs), self.batch_size)]
        payloads = [{"input_ids": c, "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
                     "return_logprob": True, "logprob_start_len": -1, "token_ids_logprob": list(token_ids)}
                    for c in chunks]

        def parse(item: Any) -> list[float]:
            return parse_token_logprobs(item, token_ids)

        def validate(reply: Any, k: int) -> None:
            items = reply if isinstance(reply, list) else [reply]
            if len(items) != len(chunks[k]):
                raise ValueError(f"{len(items)} results for {len(chunks[k])} judge inputs")
            for j, it in enumerate(items):
                try:
                    parse(it)
                except KeyError as e:
                    raise ValueError(f"result {j}: missing {e}") from None
                except (ValueError, TypeError, IndexError) as e:
                    raise type(e)(f"result {j}: {e}") from None

        out: list[list[float]] = []
        for reply in self.pool.map("/generate", payloads, validate):
            out += [parse(it) for it in (reply if isinstance(reply, list) else [reply])]
        return out


class PairwiseJudge(Judge):
    """P(a beats b) from a pairwise preference model's next-token log-probs of "A" and "B"."""

    kind = "pairwise"

    def __init__(self, backend: Any, tokenizer: Any, cfg: JudgeConfig | None = None, name: str = "pairwise-pm"
                 ) -> None:
        super().__init__()
        self.cfg = cfg or JudgeConfig()
        self.backend = backend
        self.tokenizer = tokenizer
        self.name = name
        self.id_a = single_token_id(tokenizer, self.cfg.token_a)
        self.id_b = single_token_id(tokenizer, self.cfg.token_b)
        self.forward_passes = 0

    @classmethod
    def from_config(cls, cfg: JudgeConfig) -> "PairwiseJudge":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(cfg.model_path)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        if cfg.backend == "local":
            backend: Any = LocalPairwiseBackend.from_pretrained(cfg.model_path, cfg, pad)
            name = f"pairwise-pm:{cfg.model_path}"
        else:
            from megatron_inpo.serving.pool import SGLangPool

            backend = SGLangPairwiseBackend(SGLangPool.from_config(cfg, "judge.api_key"), cfg.batch_size)
            name = f"pairwise-pm-sglang:{cfg.model_path}"
        return cls(backend, tok, cfg, name=name)

    def render(self, prompt: str, a: str, b: str) -> list[int]:
        """Judge-input ids: the instruction as one user turn of the PM's chat template; the answer token is next."""
        messages = [{"role": "user", "content": prompt}]
        if self.cfg.context_format == "rlhflow" or not getattr(self.tokenizer, "chat_template", None):
            context = rlhflow_context(messages)
        else:
            context = self.tokenizer.apply_chat_template(messages, tokenize=False)
        instruction = self.cfg.template.format(context=context, response_a=a, response_b=b)
        turn = [{"role": "user", "content": instruction}]
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(turn, tokenize=False,
                                                      add_generation_prompt=self.cfg.add_generation_prompt)
        else:
            text = instruction
        if self.cfg.strip_bos and self.tokenizer.bos_token:
            text = text.replace(self.tokenizer.bos_token, "")
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return ids[-self.cfg.max_length:]  # keep the answer position: cut the oldest context

    def _compare(self, items: list[Comparison]) -> Sequence[float]:
        inputs = [self.render(c.prompt, c.a, c.b) for c in items]
        if self.cfg.both_orders:
            inputs += [self.render(c.prompt, c.b, c.a) for c in items]
        lp = self.backend.token_logprobs(inputs, [self.id_a, self.id_b])  # one batch: both orders, all prompts
        self.forward_passes += len(inputs)
        p_first = [1.0 / (1.0 + math.exp(lb - la)) for la, lb in lp]  # P(the response shown first wins)
        n = len(items)
        if not self.cfg.both_orders:
            return p_first
        return [0.5 * (p_first[i] + (1.0 - p_first[n + i])) for i in range(n)]
