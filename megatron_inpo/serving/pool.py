"""SGLang over HTTP (standard library only): a server pool with retries, back-off, fail-over and a concurrency
limit. The rollout engine (rollout/sglang.py) and the judges (judge/pairwise.py, judge/reward.py) send their
requests through it. The API followed is SGLang's (notes/03-sglang-api.md)."""
from __future__ import annotations

import email.utils
import http.client
import json
import logging
import math
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping, Sequence

from megatron_inpo.config import ConfigError
from megatron_inpo.errors import InputError

log = logging.getLogger(__name__)

# Fields of an SGLang client section (RolloutConfig, JudgeConfig) that only say where the servers are, how to reach
# them and how long to wait: the same requests get the same answers whatever their values, so a run or a rollout
# output may be resumed with other values (driver/manifest.py, cli/rollout.py).
TRANSPORT_FIELDS = ("server_urls", "api_key", "timeout_s", "max_retries", "backoff_s", "backoff_max_s", "concurrency")

RETRY_STATUSES = (429, 503)
"""HTTP statuses that mean "not now" rather than "no": 429 is what sglang-router answers when its queue is full,
503 what a server that is starting or overloaded answers. Both are retried after Retry-After (when the reply has
one) or the usual back-off; every other 5xx is retried too (a failure), any other 4xx never (a refusal)."""


def resolve_api_key(spec: str | None, field: str = "api_key") -> str | None:
    """The API key a config field names: "" or None -> None (no key); "env:VAR" -> the value of the environment
    variable VAR (so the key never appears in config.yaml or a command line); anything else is the key itself.
    A named variable that is unset or empty is a ConfigError naming the field."""
    if not spec:
        return None
    if spec.startswith("env:"):
        var = spec[4:]
        if not var:
            raise ConfigError(f"{field}: 'env:' needs a variable name (env:VAR)")
        value = os.environ.get(var, "")
        if not value:
            raise ConfigError(f"{field}: the environment variable {var} (named by {spec!r}) is not set or empty")
        return value
    return spec


def _retry_after(value: str | None) -> float | None:
    """Seconds a Retry-After header asks to wait (RFC 9110: delay-seconds or an HTTP-date); None if absent or
    unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        s = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        s = when.timestamp() - time.time()
    return max(0.0, s) if math.isfinite(s) else None


class SGLangError(InputError, RuntimeError):
    """A request to an SGLang server failed for good; the message names the URL(s) and the reason.

    `status` is the HTTP status of the server's last answer: a 4xx means it refused the request (nothing done),
    a 5xx that it failed after the retries; None means no answer came (connection refused or dropped, timeout,
    malformed reply). Without a 4xx, the server may or may not have carried the request out."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class _Retryable(Exception):
    """A failed attempt: connection refused/reset, timeout, HTTP 5xx or 429, a malformed reply or one that the
    caller's validation rejects."""

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status  # the HTTP status of a 5xx / 429 answer; None when no answer came
        self.retry_after = retry_after  # seconds the server's Retry-After header asked for; None without one
        self.no_answer = False  # no HTTP answer at all (refused, dropped, timed out)


class SGLangPool:
    """HTTP client of one or more SGLang servers.

    Requests go round-robin; a failed attempt is retried on the NEXT server after an exponential back-off
    (backoff_s * 2**attempt, capped at backoff_max_s, with jitter), up to max_retries retries. A failed attempt is:
    no answer (connection refused / dropped, timeout), HTTP 5xx, HTTP 429 (overloaded: the wait is the reply's
    Retry-After when longer than the back-off, capped at backoff_max_s), a malformed reply, or a reply that the
    caller's `validate` rejects (wrong types, out-of-range ids, ...). Any other HTTP 4xx (a refusal: bad request,
    401 wrong API key) is not retried. Only idempotent calls may be retried: a call that is not (memory release /
    resume) is sent with max_retries=0. `map` keeps at most `concurrency` requests in flight and returns replies
    in request order.

    api_key: sent as `Authorization: Bearer <key>` (what SGLang's --api-key checks, srt/utils/auth.py); a string
    for every server (resolve_api_key: "env:VAR" reads it from the environment) or {URL: key} per server; empty /
    None: no header. The probes /health and /ready never need it (SGLang lets them through).
    """

    def __init__(self, urls: Sequence[str], timeout_s: float = 600.0, max_retries: int = 4, backoff_s: float = 1.0,
                 backoff_max_s: float = 30.0, concurrency: int = 16,
                 api_key: str | Mapping[str, str | None] | None = None) -> None:
        if not urls:
            raise ValueError("SGLangPool needs at least one server URL")
        self.urls = [u.rstrip("/") for u in urls]
        if isinstance(api_key, Mapping):
            keys = {str(u).rstrip("/"): resolve_api_key(k) for u, k in api_key.items()}
            self._keys = [keys.get(u) for u in self.urls]
        else:
            key = resolve_api_key(api_key)
            self._keys = [key] * len(self.urls)
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.concurrency = concurrency
        self._next = 0
        self._lock = threading.Lock()
        self.retries = 0
        """Failed attempts that were retried (for logs and tests)."""

    @classmethod
    def from_config(cls, cfg: Any, field: str = "api_key") -> "SGLangPool":
        """The pool of a RolloutConfig / JudgeConfig; `field` names its api_key in errors (rollout.api_key)."""
        return cls(cfg.server_urls, timeout_s=cfg.timeout_s, max_retries=cfg.max_retries, backoff_s=cfg.backoff_s,
                   backoff_max_s=cfg.backoff_max_s, concurrency=cfg.concurrency,
                   api_key=resolve_api_key(getattr(cfg, "api_key", ""), field))

    def _headers(self, url: str) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        try:
            key = self._keys[self.urls.index(url)]
        except ValueError:
            key = None
        if key:
            h["Authorization"] = f"Bearer {key}"
        return h

    def _pick(self) -> int:
        with self._lock:
            i = self._next
            self._next = (self._next + 1) % len(self.urls)
            return i

    def _once(self, url: str, path: str, payload: dict | None, parse_json: bool, timeout: float) -> Any:
        data = None if payload is None else json.dumps(payload).encode("utf-8")
        req = urllib.request.Request(url + path, data=data, method="GET" if payload is None else "POST",
                                     headers=self._headers(url))
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                body = resp.read()
        except urllib.error.HTTPError as e:
            try:
                text = e.read().decode("utf-8", "replace")[:500]
            except (OSError, http.client.HTTPException):
                text = ""
            if e.code >= 500 or e.code in RETRY_STATUSES:
                raise _Retryable(f"HTTP {e.code} {text}".strip(), status=e.code,
                                 retry_after=_retry_after(e.headers.get("Retry-After") if e.headers else None)
                                 ) from None
            if e.code in (401, 403):
                has = bool(self._keys[self.urls.index(url)]) if url in self.urls else False
                hint = ("the API key sent was refused: is it the one the server was started with (--api-key)?"
                        if has else "the server requires an API key (started with --api-key): set the client's "
                                    "api_key (rollout.api_key / judge.api_key, e.g. env:VAR)")
                raise SGLangError(f"{url}{path}: HTTP {e.code}: {text}; {hint}", status=e.code) from None
            raise SGLangError(f"{url}{path}: HTTP {e.code}: {text}", status=e.code) from None
        except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError,
                http.client.HTTPException, OSError) as e:
            reason = getattr(e, "reason", e)
            err = _Retryable(f"{type(reason).__name__}: {reason}")
            err.no_answer = True
            raise err from None
        if not parse_json:
            return body.decode("utf-8", "replace")
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _Retryable(f"malformed JSON reply ({e}): {body[:200]!r}") from None

    def request(self, path: str, payload: dict | None = None, validate: Callable[[Any], None] | None = None,
                parse_json: bool = True, server: int | None = None, timeout_s: float | None = None,
                max_retries: int | None = None) -> Any:
        """One request with retries; `validate` raises ValueError (or KeyError / TypeError / IndexError) on a
        reply that is incomplete or wrong (types, ranges): that attempt counts as failed and is retried like a
        malformed reply; after the last one the SGLangError names each URL and what was wrong.

        server=None: round-robin with fail-over; an index pins the request to that server (weight updates, health).
        max_retries overrides the pool's: 0 for a call that is not idempotent (memory release / resume), whose
        failure (connection error, 5xx, 429) must surface instead of being sent again.
        """
        retries = self.max_retries if max_retries is None else max_retries
        start = self._pick() if server is None else server
        errors: list[str] = []
        status = None
        no_answer = False
        for attempt in range(retries + 1):
            idx = start if server is not None else (start + attempt) % len(self.urls)
            url = self.urls[idx]
            try:
                reply = self._once(url, path, payload, parse_json, timeout_s or self.timeout_s)
                if validate is not None:
                    try:
                        validate(reply)
                    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
                        what = f"{type(e).__name__}: {e}" if isinstance(e, (KeyError, AttributeError)) else str(e)
                        raise _Retryable(f"invalid reply: {what}") from None
                return reply
            except _Retryable as e:
                errors.append(f"{url}{path}: {e}")
                status = e.status
                no_answer = e.no_answer
                if attempt == retries:
                    break
                with self._lock:
                    self.retries += 1
                delay = min(self.backoff_s * 2 ** attempt, self.backoff_max_s) * random.uniform(0.5, 1.0)
                if e.retry_after is not None:  # the server said when to come back: not before, within the cap
                    delay = min(max(delay, e.retry_after), self.backoff_max_s)
                log.warning("SGLang %s%s failed (%s); retry %d/%d in %.2f s", url, path, e, attempt + 1,
                            retries, delay)
                time.sleep(delay)
        hint = " (is the server up?)" if no_answer else ""
        raise SGLangError(f"SGLang request {path} failed after {retries + 1} attempt(s){hint}:\n  "
                          + "\n  ".join(errors), status=status)

    def map(self, path: str, payloads: Sequence[dict], validate: Callable[[Any, int], None] | None = None) -> list:
        """Send every payload (at most `concurrency` in flight); replies in order. Any final failure raises."""
        if not payloads:
            return []

        def one(i: int) -> Any:
            v = (lambda r: validate(r, i)) if validate is not None else None
            return self.request(path, payloads[i], validate=v)

        if len(payloads) == 1 or self.concurrency == 1:
            return [one(i) for i in range(len(payloads))]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(payloads))) as ex:
            return list(ex.map(one, range(len(payloads))))

    def health(self) -> list[bool]:
        """Whether each server is up and ready, asked without side effects (200 = yes; any other answer or none =
        no): a probe may reach a server whose memory another process released (server_memory_saver), where any
        generation crashes it, so it must never generate.

        GET /ready is SGLang 0.5.23's flag check (http_server.py `ready`: started, warmed up, not paused) and needs
        no API key (srt/utils/auth.py decide_request_auth lets /health, /ready and /metrics through). A 404 (an
        older server, or a router in front) falls back to GET /model_info, a read of the tokenizer manager's
        fields. Not /health: unless the server was started with SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=0 (ours
        are, serving/servers.py) it runs a one-token generation (http_server.py `health_generate`).
        """
        return [self._ready(u) for u in self.urls]

    def _ready(self, url: str) -> bool:
        timeout = min(self.timeout_s, 10.0)
        try:
            self._once(url, "/ready", None, parse_json=False, timeout=timeout)
            return True
        except _Retryable:
            return False
        except SGLangError as e:
            if e.status != 404:
                return False
        try:
            self._once(url, "/model_info", None, parse_json=True, timeout=timeout)
            return True
        except (_Retryable, SGLangError):
            return False

    def health_generate(self, server: int, timeout_s: float = 60.0) -> None:
        """GET /health_generate on one server: a one-token generation, the proof that it can generate. Only for
        a server this process just started (serving/servers.py), before anything could release its memory;
        SGLangError (with the status) when it answers anything but 200. SGLang gives up on its side after
        SGLANG_HEALTH_CHECK_TIMEOUT (20 s) with a 503; `timeout_s` leaves it that long."""
        self.request("/health_generate", None, parse_json=False, server=server, timeout_s=timeout_s,
                     max_retries=0)

    def wait_healthy(self, timeout_s: float = 600.0, poll_s: float = 2.0) -> None:
        """Block until every server is ready (`health`: no generation); TimeoutError names those that never were."""
        deadline = time.monotonic() + timeout_s
        while True:
            ok = self.health()
            if all(ok):
                return
            if time.monotonic() >= deadline:
                bad = [u for u, h in zip(self.urls, ok) if not h]
                raise TimeoutError(f"SGLang server(s) not healthy after {timeout_s:.0f} s: {bad}")
            time.sleep(poll_s)

    def model_info(self, server: int = 0) -> dict:
        return self.request("/model_info", None, server=server)

    def server_info(self, server: int = 0, max_retries: int | None = None, timeout_s: float | None = None) -> Any:
        """GET /server_info: the server's resolved launch arguments (enable_memory_saver,
        enable_deterministic_inference, ...) and its `startup_time`; idempotent."""
        return self.request("/server_info", None, server=server, max_retries=max_retries, timeout_s=timeout_s)

    def update_weights_from_disk(self, model_path: str, version: str = "") -> None:
        """Every server loads `model_path` and flushes its radix cache (stale prefixes belong to old weights).

        The flush is the update's own `flush_cache: true` (SGLang flushes once the update holds the model lock, and
        fails the update if it cannot); a separate /flush_cache afterwards would be refused with HTTP 400 whenever
        another client's request is running or queued. Retrying is safe: loading the same path twice is a no-op.
        """
        for i, u in enumerate(self.urls):
            payload: dict[str, Any] = {"model_path": model_path, "flush_cache": True}
            if version:
                payload["weight_version"] = version
            try:
                reply = self.request("/update_weights_from_disk", payload, server=i)
            except SGLangError as e:
                raise SGLangError(f"weight update of {u} to {model_path} failed: {e}") from None
            if not (isinstance(reply, dict) and reply.get("success")):
                raise SGLangError(f"{u}/update_weights_from_disk: {model_path}: {reply!r}")
            log.info("SGLang %s: weights from %s (version %r), cache flushed", u, model_path, version)
