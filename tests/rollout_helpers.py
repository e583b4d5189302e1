"""Test fixtures of the rollout helper: a tiny local tokenizer + Llama, and an in-process fake SGLang server.

The fake server follows SGLang's HTTP API (notes/03-sglang-api.md) field by field: /generate with input_ids or
text (single or batch), sampling_params dict or per-request list, unknown sampling params -> HTTP 400, a list
reply for batches and for n > 1, meta_info with finish_reason / prompt_tokens / completion_tokens /
weight_version, token_ids_logprob -> meta_info.output_token_ids_logprobs, /health 200 or 503 with an empty
body, /model_info, /update_weights_from_disk, /flush_cache (plain text), /classify on --is-embedding servers.
Faults can be injected per path: slow replies, malformed JSON, HTTP 500/503, dropped connections, short lists.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import string
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

# sglang/srt/sampling/sampling_params.py: SamplingParams.__init__ keyword arguments
SGLANG_SAMPLING_KEYS = {
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k", "min_p",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n", "json_schema", "regex",
    "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim",
    "custom_params", "stream_interval", "logit_bias", "sampling_seed",
}

SPECIALS = ["<pad>", "<s>", "</s>"]
CHARS = list(string.ascii_letters + string.digits + string.punctuation + " \n")
PAD, BOS, EOS = 0, 1, 2
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def make_tokenizer(path: str | os.PathLike) -> Any:
    """A character-level tokenizer (no download): ids 0-2 special, then one id per printable character."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="?")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))
    return fast


def make_tiny_llama(path: str | os.PathLike, kind: str = "causal", seed: int = 0, vocab: int | None = None) -> Any:
    """A random tiny Llama (hidden 32, 2 layers) + tokenizer saved to `path`; kind 'causal' or 'reward'."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    tok = make_tokenizer(path)
    cfg = LlamaConfig(vocab_size=vocab or len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False)
    torch.manual_seed(seed)
    if kind == "causal":
        model = LlamaForCausalLM(cfg)
    else:
        cfg.num_labels = 1
        model = LlamaForSequenceClassification(cfg)
    with torch.no_grad():  # larger output weights: sharper, more varied next-token distributions
        head = model.lm_head if kind == "causal" else model.score
        head.weight.normal_(0, 0.5)
    model.save_pretrained(str(path))
    return model, tok


# ----------------------------------------------------------------------------------------------------------------
def _h(*parts: Any) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def decode_chars(ids: list[int]) -> str:
    """Text of ids under make_tokenizer's vocabulary (special tokens skipped)."""
    return "".join(CHARS[t - 3] for t in ids if 3 <= t < 3 + len(CHARS))


def first_token_pref(prompt_ids: list[int], a_ids: list[int], b_ids: list[int]) -> float:
    """A programmatic judge over token ids (for JudgeConfig.function tests): the larger first token wins."""
    return 1.0 if a_ids[0] > b_ids[0] else 0.0 if a_ids[0] < b_ids[0] else 0.5


class FakeSGLang:
    """An SGLang-API server on 127.0.0.1 (port 0) running in a thread; use as a context manager."""

    def __init__(self, is_embedding: bool = False, vocab: int = 3 + len(CHARS), eos_prob: float = 0.15,
                 model_path: str = "/models/fake", pm_logits: Callable[[list[int]], tuple[float, float]] | None = None,
                 token_a: int = 3 + CHARS.index("A"), token_b: int = 3 + CHARS.index("B"),
                 reward: Callable[[list[int]], float] | None = None) -> None:
        self.is_embedding = is_embedding
        self.vocab = vocab
        self.eos_prob = eos_prob
        self.model_path = model_path
        self.weight_version = "default"
        self.pm_logits = pm_logits or (lambda ids: ((_h("a", ids) % 1000) / 250.0, (_h("b", ids) % 1000) / 250.0))
        self.token_a, self.token_b = token_a, token_b
        self.reward = reward or (lambda ids: (_h("r", ids) % 10000) / 1000.0)
        self.healthy = True
        self.requests: list[tuple[str, Any]] = []
        self.faults: dict[str, list[tuple[str, float]]] = {}
        self.flushes = 0
        self.inflight = 0
        self.max_inflight = 0
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> "FakeSGLang":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def inject(self, path: str, kind: str, count: int = 1, delay: float = 0.0) -> None:
        """Next `count` requests to `path` get fault `kind`: slow, malformed, http500, http503, drop, short,
        abort (the first completion of a list reply is marked aborted)."""
        with self.lock:
            self.faults.setdefault(path, []).extend([(kind, delay)] * count)

    def _take_fault(self, path: str) -> tuple[str, float] | None:
        with self.lock:
            q = self.faults.get(path)
            return q.pop(0) if q else None

    # ---- the model --------------------------------------------------------------------------------------------
    def _sample(self, ids: list[int], sp: dict, rng: random.Random) -> dict:
        max_new = int(sp.get("max_new_tokens", 128))
        stop_ids = set(sp.get("stop_token_ids") or [])
        if not sp.get("ignore_eos", False):
            stop_ids.add(EOS)
        greedy = float(sp.get("temperature", 1.0)) == 0.0
        out: list[int] = []
        finish: dict[str, Any] = {"type": "length", "length": max_new}
        for _ in range(max_new):
            r = random.Random(_h("greedy", ids, out)) if greedy else rng
            t = EOS if r.random() < self.eos_prob else r.randrange(3, self.vocab)
            out.append(t)
            if t in stop_ids:
                finish = {"type": "stop", "matched": t}
                break
        return {"output_ids": out, "finish": finish}

    def _generate_one(self, ids: list[int], sp: dict, body: dict, index: int) -> dict:
        seed = sp.get("sampling_seed")
        rng = random.Random(_h("seed", seed, ids)) if seed is not None else random.Random()
        want = body.get("token_ids_logprob")
        if want is not None and isinstance(want[0], list):
            want = want[index]
        res = self._sample(ids, sp, rng)
        out = res["output_ids"]
        meta: dict[str, Any] = {
            "id": f"{_h('rid', time.time_ns(), index):x}", "finish_reason": res["finish"],
            "prompt_tokens": len(ids), "completion_tokens": len(out), "cached_tokens": 0,
            "weight_version": self.weight_version, "e2e_latency": 0.001,
        }
        if body.get("return_logprob"):
            meta["output_token_logprobs"] = [[-1.0, t, None] for t in out]
            meta["input_token_logprobs"] = []
            if want:
                la, lb = self.pm_logits(ids)
                m = max(la, lb, 0.0)
                logz = m + math.log(math.exp(la - m) + math.exp(lb - m) + (self.vocab - 2) * math.exp(-m))
                table = {self.token_a: la - logz, self.token_b: lb - logz}
                meta["output_token_ids_logprobs"] = [[[table.get(t, -logz), t, None] for t in want]
                                                     for _ in out]
        text = decode_chars([t for t in out if t != EOS])
        return {"text": text, "output_ids": out, "meta_info": meta}

    def handle(self, path: str, body: Any) -> tuple[int, Any]:
        if path in ("/health", "/health_generate"):
            return (200, b"") if self.healthy else (503, b"")
        if path in ("/model_info", "/get_model_info"):
            return 200, {"model_path": self.model_path, "tokenizer_path": self.model_path,
                         "is_generation": not self.is_embedding, "weight_version": self.weight_version,
                         "architectures": ["LlamaForSequenceClassification" if self.is_embedding
                                           else "LlamaForCausalLM"]}
        if path == "/flush_cache":
            self.flushes += 1
            return 200, (b"Cache flushed.\nPlease check backend logs for more details. (When there are running "
                         b"or waiting requests, the operation will not be performed.)\n")
        if path == "/update_weights_from_disk":
            mp = body.get("model_path", "")
            if not os.path.isdir(mp):
                return 400, {"success": False, "message": f"Failed to load weights from {mp}: not found"}
            self.model_path = mp
            self.weight_version = body.get("weight_version") or self.weight_version
            if body.get("flush_cache", True):
                self.flushes += 1
            return 200, {"success": True, "message": "Succeeded to update model weights.", "num_paused_requests": 0}
        if path in ("/classify", "/encode"):
            if not self.is_embedding:
                return 400, {"error": {"message": "This model does not appear to be an embedding model by default."}}
            prompts, single = self._inputs(body)
            items = [{"embedding": [self.reward(ids)], "meta_info": {"id": str(i), "prompt_tokens": len(ids)}}
                     for i, ids in enumerate(prompts)]
            return 200, items[0] if single else items
        if path == "/generate":
            if self.is_embedding:
                return 400, {"error": {"message": "generate is not supported for embedding models"}}
            prompts, single = self._inputs(body)
            sps = body.get("sampling_params") or {}
            sps = sps if isinstance(sps, list) else [sps] * len(prompts)
            if len(sps) != len(prompts):
                return 400, {"error": {"message": "sampling_params length does not match the batch"}}
            for sp in sps:
                bad = sorted(set(sp) - SGLANG_SAMPLING_KEYS)
                if bad:
                    return 400, {"error": {"message": f"SamplingParams.__init__() got an unexpected keyword "
                                                      f"argument '{bad[0]}'"}}
            items = []
            for i, (ids, sp) in enumerate(zip(prompts, sps)):
                for _ in range(int(sp.get("n", 1))):
                    items.append(self._generate_one(ids, sp, body, i))
            return 200, items[0] if (single and len(items) == 1) else items
        return 404, {"detail": "Not Found"}

    def _inputs(self, body: dict) -> tuple[list[list[int]], bool]:
        if body.get("input_ids") is not None:
            x = body["input_ids"]
            return ([x], True) if x and isinstance(x[0], int) else (x, False)
        text = body.get("text")
        enc = lambda s: [BOS] + [3 + CHARS.index(c) if c in CHARS else 3 for c in s]  # noqa: E731
        return ([enc(text)], True) if isinstance(text, str) else ([enc(t) for t in text], False)

    def _handler(self) -> type:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _serve(self, has_body: bool) -> None:
                path = self.path.split("?")[0]
                body = None
                if has_body:
                    raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                    try:
                        body = json.loads(raw) if raw else {}
                    except json.JSONDecodeError:
                        return self._send(400, {"error": {"message": "invalid JSON body"}})
                with server.lock:
                    server.requests.append((path, body))
                    server.inflight += 1
                    server.max_inflight = max(server.max_inflight, server.inflight)
                try:
                    self._reply(path, body)
                finally:
                    with server.lock:
                        server.inflight -= 1

            def _reply(self, path: str, body: Any) -> None:
                fault = server._take_fault(path)
                if fault and fault[0] == "slow":
                    time.sleep(fault[1])
                if fault and fault[0] == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if fault and fault[0] in ("http500", "http503"):
                    return self._send(int(fault[0][4:]), b"")
                if fault and fault[0] == "malformed":
                    return self._send(200, b'{"text": "trunc')
                status, payload = server.handle(path, body or {})
                if fault and fault[0] == "short" and isinstance(payload, list):
                    payload = payload[:-1]
                if fault and fault[0] == "abort" and isinstance(payload, list):
                    payload[0]["meta_info"]["finish_reason"] = {"type": "abort", "message": "weights updated"}
                self._send(status, payload)

            def _send(self, status: int, payload: Any) -> None:
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                self._serve(False)

            def do_POST(self) -> None:  # noqa: N802
                self._serve(True)

        return Handler


def free_url() -> str:
    """A URL where nothing listens (a port that was just free)."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


if __name__ == "__main__":  # stand-in for `python -m sglang.launch_server` in the launcher test
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--model-path", default="/models/fake")
    ap.add_argument("--is-embedding", action="store_true")
    args, _ = ap.parse_known_args()
    srv = FakeSGLang(is_embedding=args.is_embedding, model_path=args.model_path)
    srv.httpd.server_close()
    srv.httpd = ThreadingHTTPServer((args.host, args.port), srv._handler())
    srv.httpd.serve_forever()


def one_torch_thread():
    """Fixture body: tiny models are latency-bound, and on a shared 2-core machine OpenMP's spinning barriers make
    2 threads up to 100x slower than 1; the previous setting is restored for other tests."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
