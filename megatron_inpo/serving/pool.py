"""SGLang over HTTP (standard library only): a server pool with retries, back-off, fail-over and a concurrency
limit. The rollout engine (rollout/sglang.py) and the judges (judge/pairwise.py, judge/reward.py) send their
requests through it. The API followed is SGLang's (notes/03-sglang-api.md)."""
from __future__ import annotations

import http.client
import json
import logging
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

log = logging.getLogger(__name__)


class SGLangError(RuntimeError):
    """A request to an SGLang server failed for good; the message names the URL(s) and the reason.

    `status` is the HTTP status of the server's last answer: a 4xx means it refused the request (nothing done),
    a 5xx that it failed after the retries; None means no answer came (connection refused or dropped, timeout,
    malformed reply). Without a 4xx, the server may or may not have carried the request out."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class _Retryable(Exception):
    """Transient failure: connection refused/reset, timeout, HTTP 5xx, malformed or incomplete reply."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status  # the HTTP status of a 5xx answer; None when no answer came


class SGLangPool:
    """HTTP client of one or more SGLang servers.

    Requests go round-robin; a failed attempt is retried on the NEXT server after an exponential back-off
    (backoff_s * 2**attempt, capped, with jitter), up to max_retries retries. HTTP 4xx (a bad request) is not
    retried. `map` keeps at most `concurrency` requests in flight and returns replies in request order.
    """

    def __init__(self, urls: Sequence[str], timeout_s: float = 600.0, max_retries: int = 4, backoff_s: float = 1.0,
                 backoff_max_s: float = 30.0, concurrency: int = 16) -> None:
        if not urls:
            raise ValueError("SGLangPool needs at least one server URL")
        self.urls = [u.rstrip("/") for u in urls]
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
    def from_config(cls, cfg: Any) -> "SGLangPool":
        return cls(cfg.server_urls, timeout_s=cfg.timeout_s, max_retries=cfg.max_retries, backoff_s=cfg.backoff_s,
                   backoff_max_s=cfg.backoff_max_s, concurrency=cfg.concurrency)

    def _pick(self) -> int:
        with self._lock:
            i = self._next
            self._next = (self._next + 1) % len(self.urls)
            return i

    def _once(self, url: str, path: str, payload: dict | None, parse_json: bool, timeout: float) -> Any:
        data = None if payload is None else json.dumps(payload).encode("utf-8")
        req = urllib.request.Request(url + path, data=data, method="GET" if payload is None else "POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                body = resp.read()
        except urllib.error.HTTPError as e:
            text = e.read().decode("utf-8", "replace")[:500]
            if e.code >= 500:
                raise _Retryable(f"HTTP {e.code} {text}".strip(), status=e.code) from None
            raise SGLangError(f"{url}{path}: HTTP {e.code}: {text}", status=e.code) from None
        except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError,
                http.client.HTTPException, OSError) as e:
            reason = getattr(e, "reason", e)
            raise _Retryable(f"{type(reason).__name__}: {reason}") from None
        if not parse_json:
            return body.decode("utf-8", "replace")
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _Retryable(f"malformed JSON reply ({e}): {body[:200]!r}") from None

    def request(self, path: str, payload: dict | None = None, validate: Callable[[Any], None] | None = None,
                parse_json: bool = True, server: int | None = None, timeout_s: float | None = None,
                max_retries: int | None = None) -> Any:
        """One request with retries; `validate` raises ValueError on an incomplete reply (retried as transient).

        server=None: round-robin with fail-over; an index pins the request to that server (weight updates, health).
        max_retries overrides the pool's: 0 for a call that is not idempotent (memory release / resume), whose
        connection error must surface instead of being sent again.
        """
        retries = self.max_retries if max_retries is None else max_retries
        start = self._pick() if server is None else server
        errors: list[str] = []
        status = None
        for attempt in range(retries + 1):
            idx = start if server is not None else (start + attempt) % len(self.urls)
            url = self.urls[idx]
            try:
                reply = self._once(url, path, payload, parse_json, timeout_s or self.timeout_s)
                if validate is not None:
                    try:
                        validate(reply)
                    except (ValueError, KeyError, TypeError, IndexError) as e:
                        raise _Retryable(f"incomplete reply: {e}") from None
                return reply
            except _Retryable as e:
                errors.append(f"{url}{path}: {e}")
                status = e.status
                if attempt == retries:
                    break
                with self._lock:
                    self.retries += 1
                delay = min(self.backoff_s * 2 ** attempt, self.backoff_max_s) * random.uniform(0.5, 1.0)
                log.warning("SGLang %s%s failed (%s); retry %d/%d in %.2f s", url, path, e, attempt + 1,
                            retries, delay)
                time.sleep(delay)
        raise SGLangError(f"SGLang request {path} failed after {retries + 1} attempt(s) "
                          f"(is the server up?):\n  " + "\n  ".join(errors), status=status)

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
        """GET /health on every server (200 = healthy; 503 or no answer = not)."""
        ok = []
        for u in self.urls:
            try:
                self._once(u, "/health", None, parse_json=False, timeout=min(self.timeout_s, 10.0))
                ok.append(True)
            except (_Retryable, SGLangError):
                ok.append(False)
        return ok

    def wait_healthy(self, timeout_s: float = 600.0, poll_s: float = 2.0) -> None:
        """Block until every server answers /health with 200; TimeoutError names those that never did."""
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
