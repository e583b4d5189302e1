"""The rollout engine on SGLang servers: POST /generate with token ids in, over the transport of
megatron_inpo.serving.pool (retries, back-off, fail-over, concurrency limit). The API followed is SGLang's
(notes/03-sglang-api.md)."""
from __future__ import annotations

import logging
import secrets
from typing import Any, Sequence

from megatron_inpo.rollout.engine import Completion, RolloutConfig, RolloutEngine, SamplingConfig, Throughput
from megatron_inpo.serving.pool import SGLangError, SGLangPool

log = logging.getLogger(__name__)


def _as_list(reply: Any) -> list:
    return reply if isinstance(reply, list) else [reply]


FINISH_TYPES = ("stop", "length", "abort")
"""SGLang 0.5.23's finish reasons (api/v1/api_types.py FinishStop / FinishLength / FinishAbort, tagged by `type`)."""


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def check_token_ids(ids: Any, what: str, vocab_size: int | None = None) -> list[int]:
    """`ids` as a list of token ids: ints (not bools), >= 0 and, when vocab_size is known, < vocab_size.
    ValueError / TypeError naming `what`, the position and the value otherwise."""
    if not isinstance(ids, list):
        raise TypeError(f"{what} is {_type_name(ids)}, not a list of token ids")
    for i, t in enumerate(ids):
        if not isinstance(t, int) or isinstance(t, bool):
            raise TypeError(f"{what}[{i}] = {t!r} is {_type_name(t)}, not an int token id")
        if t < 0 or (vocab_size is not None and t >= vocab_size):
            bound = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
            raise ValueError(f"{what}[{i}] = {t} is not a token id {bound}"
                             + (" of the vocabulary" if vocab_size is not None else ""))
    return ids


def parse_completion(item: Any, vocab_size: int | None = None, max_new_tokens: int | None = None) -> Completion:
    """One /generate result, checked: a JSON object with `output_ids` (token ids within [0, vocab_size) when the
    vocabulary size is known, else non-negative ints; at most max_new_tokens of them when given), `text` a string,
    `meta_info` an object whose `finish_reason` is null, one of FINISH_TYPES or {"type": one of them, ...}.
    A wrong reply raises ValueError / TypeError (the pool retries it as a failed attempt); an aborted completion
    too (e.g. aborted by a weight update: the response is cut short, so ask again)."""
    if not isinstance(item, dict):
        raise TypeError(f"a completion is {_type_name(item)}, not a JSON object")
    meta = item.get("meta_info")
    if not isinstance(meta, dict):
        raise TypeError(f"meta_info is {_type_name(meta)}, not a JSON object")
    fr = meta.get("finish_reason")
    if fr is None:
        reason = "length"
    elif isinstance(fr, dict):
        reason = fr.get("type")
        if reason not in FINISH_TYPES:
            raise ValueError(f"finish_reason.type = {reason!r} is not one of {list(FINISH_TYPES)}")
    elif isinstance(fr, str) and fr in FINISH_TYPES:
        reason = fr
    else:
        raise ValueError(f"finish_reason = {fr!r} is not null, one of {list(FINISH_TYPES)} or an object with "
                         "their `type`")
    if reason == "abort":
        msg = fr.get("message", "") if isinstance(fr, dict) else ""
        raise ValueError(f"request aborted by the server: {msg}")
    if "output_ids" not in item:
        raise KeyError("output_ids")
    ids = check_token_ids(item["output_ids"], "output_ids", vocab_size)
    if max_new_tokens is not None and len(ids) > max_new_tokens:
        raise ValueError(f"output_ids has {len(ids)} tokens, more than max_new_tokens={max_new_tokens}")
    text = item.get("text", "")
    if not isinstance(text, str):
        raise TypeError(f"text is {_type_name(text)}, not a string")
    return Completion(text=text, token_ids=list(ids), finish_reason=reason)


def draw_seeds(prompts: int, k: int) -> list[list[int]]:
    """K distinct sampling seeds per prompt from the OS's randomness (secrets): an unseeded rollout on servers that
    honour seeds must not leave them to the server, which seeds every such request with 42 (SGLang 0.5.23,
    sampling/sampling_batch_info.py) and so returns K identical samples. 63 bits: SGLang accepts any int64
    (sampling/sampling_params.py), and non-negative seeds read the same everywhere."""
    out = []
    for _ in range(prompts):
        ss: list[int] = []
        while len(ss) < k:
            s = secrets.randbits(63)
            if s not in ss:
                ss.append(s)
        out.append(ss)
    return out


def tokenizer_vocab_size(tokenizer: Any, model_path: str = "") -> int | None:
    """The number of token ids a policy may produce: the larger of the tokenizer's size (len, added tokens
    included) and the model's config.json `vocab_size` (an embedding padded beyond the tokenizer, as Qwen's, can
    emit those ids); None when neither is known."""
    sizes = []
    if tokenizer is not None:
        try:
            sizes.append(int(len(tokenizer)))
        except (TypeError, ValueError):
            v = getattr(tokenizer, "vocab_size", None)
            if isinstance(v, int) and not isinstance(v, bool):
                sizes.append(v)
    if model_path:
        import json
        from pathlib import Path

        try:
            v = json.loads((Path(model_path) / "config.json").read_text(encoding="utf-8")).get("vocab_size")
        except (OSError, ValueError, AttributeError):
            v = None
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            sizes.append(v)
    sizes = [x for x in sizes if x > 0]
    return max(sizes) if sizes else None


class SGLangEngine(RolloutEngine):
    """Rollout on SGLang servers via POST /generate with token ids in.

    Seeded sampling sends each prompt K times with per-sample `sampling_seed` (SGLang would give the n copies of
    one seeded request the same seed). Unseeded sampling does the same with K distinct seeds per prompt drawn from
    the OS (draw_seeds) unless every server is known to ignore seeds, and sends `n=K` only then: a server started
    with --enable-deterministic-inference seeds each request that has no sampling_seed with 42, so the n samples
    of one request would all be the same. Either way the reply is a prompt-major list, and each completion keeps
    the seed it was drawn with (Completion.seed). SGLang honours sampling_seed only on servers started with
    --enable-deterministic-inference; elsewhere the samples are valid but not reproducible. An aborted
    completion counts as a failed request and is retried.
    """

    def __init__(self, cfg: RolloutConfig, tokenizer: Any = None, pool: SGLangPool | None = None) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.pool = pool or SGLangPool.from_config(cfg, "rollout.api_key")
        self.meter = Throughput("rollout[sglang]")
        self.nondeterministic: list[str] | None = None
        """Servers that ignore sampling_seed or did not say (warned about at the first seeded rollout); None until
        then."""
        self.honours_seeds: list[bool | None] | None = None
        """Per server: whether it honours sampling_seed (/server_info enable_deterministic_inference), None where it
        did not answer; asked once, at the first rollout."""
        self._told_drawn = False
        self.output_vocab_size: int | None = tokenizer_vocab_size(tokenizer, cfg.model_path)
        """Every output id must be below it (the tokenizer's size or the model's vocab_size, whichever is larger);
        None (no tokenizer, no config.json): ids are only checked to be non-negative ints."""

    def check_deterministic(self) -> list[str]:
        """URLs of the servers started without --enable-deterministic-inference, warned about once.

        SGLang 0.5.23 reads a request's sampling_seed only on such servers (sampling_batch_info.py); elsewhere a
        seeded rollout samples validly but differently on every run, so a resumed run would not redo the same
        samples. /server_info reports the server's resolved arguments; a server that does not answer it is
        counted as unknown and named in the warning too.
        """
        if self.nondeterministic is None:
            bad = [u for u, h in zip(self.pool.urls, self.seed_modes()) if h is not True]
            if bad:
                log.warning("rollouts will NOT be reproducible: SGLang server(s) %s were started without "
                            "--enable-deterministic-inference (or did not say), so they ignore sampling_seed; "
                            "start them with it (launch/sglang_servers.py start --deterministic)", ", ".join(bad))
            self.nondeterministic = bad
        return self.nondeterministic

    def seed_modes(self) -> list[bool | None]:
        """Whether each server honours sampling_seed: /server_info's enable_deterministic_inference (SGLang 0.5.23
        reads a request's sampling_seed only then, sampling_batch_info.py); None where it did not answer. Asked
        once per engine."""
        if self.honours_seeds is None:
            modes: list[bool | None] = []
            for i in range(len(self.pool.urls)):
                try:  # informational: one try, a server that is down fails the /generate that follows anyway
                    info = self.pool.server_info(i, max_retries=0)
                except SGLangError:
                    info = None
                flag = info.get("enable_deterministic_inference") if isinstance(info, dict) else None
                modes.append(flag if isinstance(flag, bool) else None)
            self.honours_seeds = modes
        return self.honours_seeds

    def _payload(self, prompts: list[list[int]], sampling: SamplingConfig,
                 seeds: Sequence[Sequence[int]] | None) -> dict:
        if seeds is None:
            return {"input_ids": prompts, "sampling_params": sampling.sglang_params(n=sampling.n)}
        ids, params = [], []
        for p, ss in zip(prompts, seeds):
            for s in ss:
                ids.append(p)
                params.append(sampling.sglang_params(seed=s))
        return {"input_ids": ids, "sampling_params": params}

    def _generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig,
                  seeds: Sequence[Sequence[int]] | None) -> list[list[Completion]]:
        if seeds is not None:
            self.check_deterministic()
        elif not all(h is False for h in self.seed_modes()):
            # a server that honours seeds (or may: it did not say) would seed all K samples alike; seeds sent to
            # one that ignores them change nothing
            seeds = draw_seeds(len(prompt_ids), sampling.n)
            if not self._told_drawn:
                log.info("unseeded rollout on servers that honour sampling_seed: %d seeds per prompt drawn from the "
                         "OS (recorded with each sample)", sampling.n)
                self._told_drawn = True
        step = self.cfg.request_prompts
        chunks = [(i, prompt_ids[i:i + step], None if seeds is None else seeds[i:i + step])
                  for i in range(0, len(prompt_ids), step)]
        payloads = [self._payload(p, sampling, s) for _, p, s in chunks]

        def validate(reply: Any, k: int) -> None:
            items = _as_list(reply)
            want = len(chunks[k][1]) * sampling.n
            if len(items) != want:
                raise ValueError(f"{len(items)} completions for {want} requested")
            for j, it in enumerate(items):
                try:
                    parse_completion(it, self.output_vocab_size, sampling.max_new_tokens)
                except KeyError as e:
                    raise ValueError(f"completion {j}: missing {e}") from None
                except (ValueError, TypeError) as e:
                    raise type(e)(f"completion {j}: {e}") from None

        replies = self.pool.map("/generate", payloads, validate)
        out: list[list[Completion]] = []
        for reply in replies:
            items = [parse_completion(it, self.output_vocab_size, sampling.max_new_tokens) for it in _as_list(reply)]
            out += [items[j:j + sampling.n] for j in range(0, len(items), sampling.n)]
        if seeds is not None:
            for o, ss in zip(out, seeds):
                for c, s in zip(o, ss):
                    c.seed = s
        return out

    def update_weights(self, model_path: str, version: str = "") -> None:
        from megatron_inpo.engine.trust import verify_export

        # the servers read the files themselves: the digests are checked here, where the export is named (a server
        # on another node sees the same shared file system)
        verify_export(model_path)
        self.pool.update_weights_from_disk(model_path, version)
