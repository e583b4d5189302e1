"""Pairwise preference model (RLHFlow pair-preference-model style), in-process or on SGLang.

The judge reads one user turn (JudgeConfig.preset, judge/base.py PAIRWISE_PRESETS), rendered with its chat
template, and answers with the token "A" or "B". Preset 'rlhflow_pm' is RLHFlow's pair-preference model:
`[CONTEXT] {context} [RESPONSE A] {A} [RESPONSE B] {B}`, {context} the conversation in a plain '<turn> user'
format, the leading BOS text removed and no generation prompt appended, as in RLHFlow's reference pipeline;
preset 'chat' asks an instruction-tuned chat model in words, with the assistant header appended so that its next
token is the answer. The BOS text is only ever removed at the start of the input, and never when the template uses
the BOS token as a turn marker (ChatML's `<|im_start|>` is SmolLM2's BOS: removing it everywhere would delete
every turn). The answer tokens are checked before any request: each a single token of the judge's vocabulary that
decodes back to itself (not the unknown token), within the model's vocabulary, the two different.
P(A beats B) = softmax over the next-token logits of exactly those two tokens = sigmoid(logit_A - logit_B). With both_orders the judge also asks with A and B swapped and averages
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


def single_token_id(tokenizer: Any, text: str, vocab_size: int | None = None, field: str = "judge.token_a/token_b"
                    ) -> int:
    """The id of answer token `text`: one token of the judge's tokenizer that is not its unknown token, decodes
    back to `text`, and (vocab_size given) lies within the judge model's vocabulary; else a ConfigError."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ConfigError(f"{field}: {text!r} is {len(ids)} tokens {ids} in the judge's tokenizer; "
                          "a pairwise judge needs single-token answers")
    tid = int(ids[0])
    unk = getattr(tokenizer, "unk_token_id", None)
    back = tokenizer.decode([tid])
    if (unk is not None and tid == unk and back != text) or back.strip() != text.strip():
        raise ConfigError(f"{field}: {text!r} is not in the judge's vocabulary (it encodes to token {tid}, "
                          f"{back!r}); choose answer tokens the judge model knows")
    if vocab_size is not None and not 0 <= tid < vocab_size:
        raise ConfigError(f"{field}: {text!r} is token {tid} of the tokenizer, outside the judge model's "
                          f"vocabulary of {vocab_size}")
    return tid


def bos_is_turn_marker(tokenizer: Any) -> bool:
    """Whether the chat template writes the BOS token at every turn (ChatML models whose BOS is `<|im_start|>`),
    so that it is part of the conversation's structure, not only a start-of-text mark."""
    bos = getattr(tokenizer, "bos_token", None)
    if not bos or not getattr(tokenizer, "chat_template", None):
        return False
    probe = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
                                          tokenize=False)
    return probe.count(bos) >= 2


def config_vocab_size(model_path: str) -> int | None:
    """vocab_size of the HF config.json in model_path, where there is one (an SGLang judge's local copy)."""
    import json
    from pathlib import Path

    try:
        v = json.loads((Path(model_path) / "config.json").read_text(encoding="utf-8")).get("vocab_size")
    except (OSError, ValueError, AttributeError):
        return None
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


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

    @property
    def vocab_size(self) -> int | None:
        """Rows of the model's output layer: an answer token id must be below it."""
        out = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        return int(out.weight.shape[0]) if out is not None else getattr(self.model.config, "vocab_size", None)

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
        self.fmt = self.cfg.rendering()
        vocab = getattr(backend, "vocab_size", None)
        self.id_a = single_token_id(tokenizer, self.fmt.token_a, vocab, "judge.token_a")
        self.id_b = single_token_id(tokenizer, self.fmt.token_b, vocab, "judge.token_b")
        if self.id_a == self.id_b:
            raise ConfigError(f"judge.token_a/token_b: {self.fmt.token_a!r} and {self.fmt.token_b!r} are the same "
                              f"token ({self.id_a}) of the judge's tokenizer")
        self.strip_bos = self.fmt.strip_bos and not bos_is_turn_marker(tokenizer)
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
            backend.vocab_size = config_vocab_size(cfg.model_path)
            name = f"pairwise-pm-sglang:{cfg.model_path}"
        return cls(backend, tok, cfg, name=name)

    def render(self, prompt: str, a: str, b: str) -> list[int]:
        """Judge-input ids: the instruction as one user turn of the PM's chat template; the answer token is next."""
        messages = [{"role": "user", "content": prompt}]
        fmt = self.fmt
        if fmt.context_format == "plain":
            context = prompt
        elif fmt.context_format == "rlhflow" or not getattr(self.tokenizer, "chat_template", None):
            context = rlhflow_context(messages)
        else:
            context = self.tokenizer.apply_chat_template(messages, tokenize=False)
        instruction = fmt.template.format(context=context, response_a=a, response_b=b)
        turn = [{"role": "user", "content": instruction}]
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(turn, tokenize=False,
                                                      add_generation_prompt=fmt.add_generation_prompt)
        else:
            text = instruction
        bos = self.tokenizer.bos_token
        if self.strip_bos and bos and text.startswith(bos):
            # only the start-of-text mark the template put first: the context and responses keep theirs
            text = text[len(bos):]
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
