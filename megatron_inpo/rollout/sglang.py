"""The rollout engine on SGLang servers: POST /generate with token ids in, over the transport of
megatron_inpo.serving.pool (retries, back-off, fail-over, concurrency limit). The API followed is SGLang's
(notes/03-sglang-api.md)."""
from __future__ import annotations

import logging
from typing import Any, Sequence

from megatron_inpo.rollout.engine import Completion, RolloutConfig, RolloutEngine, SamplingConfig, Throughput
from megatron_inpo.serving.pool import SGLangError, SGLangPool

log = logging.getLogger(__name__)


def _as_list(reply: Any) -> list:
    return reply if isinstance(reply, list) else [reply]


def parse_completion(item: dict) -> Completion:
    meta = item["meta_info"]
    fr = meta.get("finish_reason") or {}
    reason = fr.get("type", "length") if isinstance(fr, dict) else str(fr)
    if reason == "abort":  # e.g. aborted by a weight update: the response is cut short, so ask again
        raise ValueError(f"request aborted by the server: {fr.get('message', '') if isinstance(fr, dict) else ''}")
    ids = item["output_ids"]
    if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
        raise ValueError("output_ids is not a list of ints")
    return Completion(text=item.get("text", ""), token_ids=list(ids), finish_reason=reason)


class SGLangEngine(RolloutEngine):
    """Rollout on SGLang servers via POST /generate with token ids in.

    Seeded sampling sends each prompt K times with per-sample `sampling_seed` (SGLang would give the n copies of
    one seeded request the same seed); unseeded sampling sends `n=K`. Either way the reply is a prompt-major list.
    SGLang honours sampling_seed only on servers started with --enable-deterministic-inference; elsewhere the
    samples are valid but not reproducible. An aborted completion counts as a failed request and is retried.
    """

    def __init__(self, cfg: RolloutConfig, tokenizer: Any = None, pool: SGLangPool | None = None) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.pool = pool or SGLangPool.from_config(cfg)
        self.meter = Throughput("rollout[sglang]")
        self.nondeterministic: list[str] | None = None
        """Servers that ignore sampling_seed (checked at the first seeded rollout); None until checked."""

    def check_deterministic(self) -> list[str]:
        """URLs of the servers started without --enable-deterministic-inference, warned about once.

        SGLang 0.5.23 reads a request's sampling_seed only on such servers (sampling_batch_info.py); elsewhere a
        seeded rollout samples validly but differently on every run, so a resumed run would not redo the same
        samples. /server_info reports the server's resolved arguments; a server that does not answer it is
        counted as unknown and named in the warning too.
        """
        if self.nondeterministic is None:
            bad = []
            for i, u in enumerate(self.pool.urls):
                try:  # informational: one try, a server that is down fails the /generate that follows anyway
                    info = self.pool.server_info(i, max_retries=0)
                except SGLangError:
                    info = None
                if not (isinstance(info, dict) and info.get("enable_deterministic_inference") is True):
                    bad.append(u)
            if bad:
                log.warning("rollouts will NOT be reproducible: SGLang server(s) %s were started without "
                            "--enable-deterministic-inference (or did not say), so they ignore sampling_seed; "
                            "start them with it (launch/sglang_servers.py start --deterministic)", ", ".join(bad))
            self.nondeterministic = bad
        return self.nondeterministic

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
        step = self.cfg.request_prompts
        chunks = [(i, prompt_ids[i:i + step], None if seeds is None else seeds[i:i + step])
                  for i in range(0, len(prompt_ids), step)]
        payloads = [self._payload(p, sampling, s) for _, p, s in chunks]

        def validate(reply: Any, k: int) -> None:
            items = _as_list(reply)
            want = len(chunks[k][1]) * sampling.n
            if len(items) != want:
                raise ValueError(f"{len(items)} completions for {want} requested")
            for it in items:
                parse_completion(it)

        replies = self.pool.map("/generate", payloads, validate)
        out: list[list[Completion]] = []
        for reply in replies:
            items = [parse_completion(it) for it in _as_list(reply)]
            out += [items[j:j + sampling.n] for j in range(0, len(items), sampling.n)]
        return out

    def update_weights(self, model_path: str, version: str = "") -> None:
        self.pool.update_weights_from_disk(model_path, version)
