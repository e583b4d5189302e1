"""In-process rollout with transformers (CPU or one GPU): the embedded default when no SGLang server is used.

The decode loop is our own (not `model.generate`) so that every sequence draws its OWN random numbers: sample j
of prompt p depends only on its seed, not on which other prompts share the batch. The uniform number of row r at
step t is a counter-based hash of (seed_r, t), computed for the whole batch at once (no per-row generator calls),
and the token is found by inverse-CDF search, as FlashInfer's sampler does. The sampling semantics follow SGLang's:
temperature (0 = greedy), then top-k, top-p and min-p filtering of the probabilities.
"""
from __future__ import annotations

import inspect
import logging
import random
from typing import Any, Sequence

import torch

from megatron_inpo.data.batching import left_pad
from megatron_inpo.rollout.engine import Completion, RolloutConfig, RolloutEngine, SamplingConfig, Throughput

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def filter_logits(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Temperature-scaled logits [B, V] with the top-k / top-p / min-p rejected tokens set to -inf."""
    logits = logits.float() / sampling.temperature
    if sampling.top_k > 0 and sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass of the tokens strictly before it already reaches top_p (the first always stays)
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= sampling.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if sampling.min_p > 0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < sampling.min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))
    return logits


_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finalizer on int64 tensors holding uint32 values (products wrap; the mask keeps 32 bits)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def row_uniforms(seeds: torch.Tensor, step: int) -> torch.Tensor:
    """U[0, 1) per row from (63-bit seed, step): a pure function, so a row's draws ignore the rest of the batch."""
    lo, hi = seeds & _M32, (seeds >> 32) & _M32
    h = _mix32(_mix32(_mix32(lo) ^ hi) ^ ((step * 0x9E3779B9 + 0x7F4A7C15) & _M32))
    return (h >> 8).to(torch.float32) / float(1 << 24)


def sample_next(logits: torch.Tensor, sampling: SamplingConfig, seeds: torch.Tensor, step: int) -> torch.Tensor:
    """One token per row by inverse-CDF search with row_uniforms(seeds, step)."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(filter_logits(logits, sampling), dim=-1)
    cdf = torch.cumsum(probs, dim=-1)
    cdf = cdf / cdf[:, -1:]
    u = row_uniforms(seeds, step).to(cdf.device)[:, None]
    # first index with cdf > u: never a filtered token (its cdf equals its predecessor's)
    return torch.searchsorted(cdf, u, right=True)[:, 0].clamp_(max=probs.shape[-1] - 1)


class LocalEngine(RolloutEngine):
    """Rollout with a transformers causal LM held in this process."""

    def __init__(self, cfg: RolloutConfig, model: Any, tokenizer: Any) -> None:
        self.cfg = cfg
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = torch.device(cfg.device)
        self.meter = Throughput("rollout[local]")
        self.version = ""

    @classmethod
    def from_pretrained(cls, cfg: RolloutConfig, tokenizer: Any = None) -> "LocalEngine":
        from transformers import AutoTokenizer

        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_path or cfg.model_path)
        return cls(cfg, cls._load_model(cfg.model_path, cfg), tokenizer)

    @staticmethod
    def _load_model(path: str, cfg: RolloutConfig) -> Any:
        from transformers import AutoModelForCausalLM

        from megatron_inpo.engine.trust import verify_export

        from megatron_inpo.config import ConfigError

        verify_export(path)  # an export of this project is checked against its digest record first
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[cfg.dtype])
        except torch.OutOfMemoryError:
            raise
        except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:  # a broken directory, not a bug here
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            why = _shape_mismatch(path) or f"{type(e).__name__}: {first}"
            raise ConfigError(f"{path}: cannot load the model ({why})") from None
        return model.to(cfg.device).eval()

    def update_weights(self, model_path: str, version: str = "") -> None:
        self.model = None  # free the old weights first: two copies may not fit on one GPU
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.model = self._load_model(model_path, self.cfg)
        self.version = version
        log.info("rollout[local]: loaded weights from %s (version %r)", model_path, version)

    def close(self) -> None:
        self.model = None

    def vocab_size(self) -> int | None:
        """Prompt token ids must index both the tokenizer and the model's embedding (an id past the embedding is
        an IndexError deep in the forward)."""
        sizes = [n for n in (super().vocab_size(), getattr(self.model.config, "vocab_size", None))
                 if type(n) is int and n > 0]
        return min(sizes) if sizes else None

    def max_positions(self) -> int | None:
        """The model's max_position_embeddings (its tokenizer's model_max_length is only advice)."""
        n = getattr(self.model.config, "max_position_embeddings", None)
        return n if type(n) is int and n > 0 else super().max_positions()

    def _stop_ids(self, sampling: SamplingConfig) -> set[int]:
        stop = set(sampling.stop_token_ids)
        if not sampling.ignore_eos:
            for src in (getattr(self.model, "generation_config", None), self.model.config, self.tokenizer):
                eos = getattr(src, "eos_token_id", None) if src is not None else None
                if eos is not None:
                    stop.update(eos if isinstance(eos, (list, tuple)) else [eos])
        return stop

    def _pad_id(self) -> int:
        for v in (getattr(self.tokenizer, "pad_token_id", None), getattr(self.model.config, "pad_token_id", None),
                  getattr(self.tokenizer, "eos_token_id", None)):
            if isinstance(v, int):
                return v
        return 0

    def _generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig,
                  seeds: Sequence[Sequence[int]] | None) -> list[list[Completion]]:
        n = sampling.n
        row_seeds = [[seeds[i][j] if seeds is not None else random.getrandbits(63) for j in range(n)]
                     for i in range(len(prompt_ids))]
        results: list[list[Completion]] = [[] for _ in prompt_ids]
        # prompts of similar length share a batch (left padding is compute spent on nothing: IFBench's prompts run
        # from 45 to 2591 tokens), and each batch holds whole prompts, whose prompt is run once for its K samples
        order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
        per_batch = max(1, self.cfg.max_batch_sequences // n)
        for start in range(0, len(order), per_batch):
            chunk = order[start:start + per_batch]
            comps = self._decode([prompt_ids[i] for i in chunk], [s for i in chunk for s in row_seeds[i]], sampling)
            for k, i in enumerate(chunk):
                results[i] = comps[k * n:(k + 1) * n]
        return results

    @torch.inference_mode()
    def _decode(self, prompts: list[list[int]], seeds: list[int], sampling: SamplingConfig) -> list[Completion]:
        """n samples of each prompt (rows prompt-major, seeds[k * n + j] for sample j of prompt k): the prompts are
        run once and their KV cache repeated n times (the prefill of a prompt costs as much as decoding as many
        tokens, so K copies of it would cost K times that)."""
        dev, n = self.device, sampling.n
        B, pad = len(prompts) * n, self._pad_id()
        input_ids, mask, pos = left_pad(prompts, pad, dev)
        seed_t = torch.tensor(seeds, dtype=torch.long, device=dev)
        stop = self._stop_ids(sampling)
        # transformers >= 5.2x renamed past_key_values to cache (the old name warns); support both
        params = inspect.signature(self.model.forward).parameters
        kw = "cache" if "cache" in params else "past_key_values"
        keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=True, **keep)
        past, logits = getattr(out, kw), out.logits[:, -1, :]
        if n > 1:
            past.batch_repeat_interleave(n)
            logits, mask, pos = (x.repeat_interleave(n, dim=0) for x in (logits, mask, pos))
        tokens: list[list[int]] = [[] for _ in range(B)]
        finish = ["length"] * B
        done = [False] * B
        for step in range(sampling.max_new_tokens):
            nxt = sample_next(logits, sampling, seed_t, step).tolist()
            for r, t in enumerate(nxt):
                if done[r]:
                    continue
                tokens[r].append(t)
                if t in stop:
                    done[r], finish[r] = True, "stop"
            if all(done) or step == sampling.max_new_tokens - 1:
                break
            fed = torch.tensor([pad if d else t for t, d in zip(nxt, done)], device=dev)[:, None]
            mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=dev)], dim=1)
            pos = pos[:, -1:] + 1
            out = self.model(input_ids=fed, attention_mask=mask, position_ids=pos, use_cache=True, **{kw: past})
            past, logits = getattr(out, kw), out.logits[:, -1, :]
        return [Completion(text=self.tokenizer.decode(t, skip_special_tokens=True), token_ids=t, finish_reason=f)
                for t, f in zip(tokens, finish)]


def _shape_mismatch(path: str) -> str | None:
    """The first weight whose shape differs from what config.json makes of it, in words (transformers' own message
    points at a load report that its quiet logging never shows); None when there is none or it cannot be told."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        from megatron_inpo.convert.safetensors_io import SafetensorsSource

        src = SafetensorsSource(path)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
        for name, p in skeleton.state_dict().items():
            if name in src.tensors and tuple(src.info(name).shape) != tuple(p.shape):
                return (f"{name}: shape {tuple(src.info(name).shape)} in the weights, {tuple(p.shape)} from "
                        "config.json (a config.json that does not describe these weights, e.g. its vocab_size)")
    except Exception:  # noqa: BLE001 - a diagnosis only: the caller reports the original error instead
        return None
    return None
