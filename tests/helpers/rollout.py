"""Test fixtures of the rollout helper: a tiny local tokenizer + Llama, and an in-process fake SGLang server.

The fake server follows SGLang's HTTP API (notes/03-sglang-api.md) and is held to SGLang's own contract: every
request body is decoded with the request type of the released sglang wheel (api/v1/api_types.py, or the io_struct
field declarations where api_types has no type; see SGLangContract) and a violation answers HTTP 400 with the
server's error text; every reply the fake builds is decoded with SGLang's response type first, so a fake that
drifted from the server fails loudly. It is stateful where the server is: /flush_cache is refused (400) while
requests run or wait, a weight update waits for running requests (SGLang's model-update writer lock), memory
release / resume keep per-tag state and a resume of an unreleased tag (or a second release, or a release while
busy, or generation on released memory) kills the server (`fatal`: every later request finds it dead). As in
SGLang 0.5.23 (http_server.py `health_generate`), GET /health is a one-token generation unless the server runs
with SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=0 (`health_generates`), /health_generate always is one, and GET /ready
is a flag check; so a generating /health on released memory kills the fake as it may the real server. With
`deterministic` (--enable-deterministic-inference) a request without `sampling_seed` is seeded with 42, as
SGLang's sampling/sampling_batch_info.py does: the n samples of one unseeded request are then all the same.
Faults can be injected per path: slow replies, malformed JSON, HTTP 500/503, HTTP 429 with Retry-After (what
sglang-router answers when overloaded), dropped connections, short lists, and wrong-typed / out-of-range replies
(CORRUPTIONS), for the next `count` requests or at a rate. With api_key set the fake checks `Authorization` exactly
as SGLang's --api-key does (the wheel's own srt/utils/auth.py decide_request_auth, with each route's auth level read
from srt/entrypoints/http_server.py): 401 without the right key, /health always open.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import math
import os
import random
import string
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[2]
SGLANG_VERSION = "0.5.23"
SGLANG_TEST_DEPS = Path(os.environ.get("MEGATRON_INPO_SGLANG_TEST_DEPS", REPO / ".test-deps" / "sglang"))
"""Where tools/setup.sh installs the sglang wheel without its dependencies (only its plain-Python API types are
used; `import sglang` would pull torch and CUDA packages)."""

# Llama-3 architectures (Meta's published config.json values); the RLHFlow pairwise PM is a Llama-3-8B too.
LLAMA3_8B = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=14336,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                 max_position_embeddings=8192, tie_word_embeddings=False, torch_dtype="bfloat16")
LLAMA3_70B = dict(LLAMA3_8B, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64)

# sglang/srt/constants.py GPU_MEMORY_ALL_TYPES: what a release / resume without tags covers
GPU_MEMORY_ALL_TYPES = ("kv_cache", "weights", "cuda_graph")


class ContractUnavailable(RuntimeError):
    """The sglang wheel (or msgspec) is not installed where the tests look for it."""


def _load_file_module(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # msgspec resolves the Structs' string annotations through sys.modules
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return mod


class _AnyNames(dict):
    """Evaluation namespace of io_struct annotations: typing names, and Any for the module's own aliases (image
    data and the like), which our requests never send."""

    def __missing__(self, key: str) -> Any:
        return Any


def _conforms(value: Any, ann: Any) -> bool:
    """Whether a parsed JSON value has type `ann` (typing constructs of io_struct). Strict: no coercion of a
    string to a number and the like, which pydantic's lax mode would allow; our client must send the real types."""
    import typing

    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if ann is Any:
        return True
    if ann is None or ann is type(None):
        return value is None
    if origin is typing.Union:
        return any(_conforms(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin in (list, tuple, set):
        return isinstance(value, list) and all(_conforms(v, args[0] if args else Any) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_conforms(v, args[1] if args else Any) for v in value.values())
    if ann is bool:
        return isinstance(value, bool)
    if ann is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if ann is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if ann is str:
        return isinstance(value, str)
    if ann in (list, dict):
        return isinstance(value, ann)
    return True  # a class of SGLang's own (never sent by this project's client)


def _io_struct_fields(path: Path, names: tuple[str, ...]) -> dict[str, dict[str, tuple[Any, bool]]]:
    """{class: {field: (annotation, required)}} of SGLang's request / reply classes in srt/managers/io_struct.py,
    read from their declarations with `ast`: the module imports torch, zmq and pydantic, so it cannot be loaded
    here. Inherited fields (BaseReq's rid, http_worker_ipc) included."""
    import typing

    tree = ast.parse(path.read_text(encoding="utf-8"))
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    ns = _AnyNames({k: getattr(typing, k) for k in ("Any", "Dict", "List", "Literal", "Optional", "Tuple", "Union")})
    ns.update(dict=dict, list=list, str=str, int=int, float=float, bool=bool)

    def fields_of(cls: ast.ClassDef) -> dict[str, tuple[Any, bool]]:
        out: dict[str, tuple[Any, bool]] = {}
        for base in cls.bases:
            if isinstance(base, ast.Name) and base.id in classes:
                out.update(fields_of(classes[base.id]))
        for st in cls.body:
            if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name):
                ann = eval(ast.unparse(st.annotation), {"__builtins__": {}}, ns)  # noqa: S307 (sglang's own source)
                out[st.target.id] = (ann, st.value is None)
        return out

    return {name: fields_of(classes[name]) for name in names}


class SGLangContract:
    """SGLang's own JSON contract, loaded from the installed sglang wheel: `api_types` is the wheel's
    sglang/api/v1/api_types.py loaded by file path (the module the server's /generate gate uses,
    srt/entrypoints/api_contract.py), `io` the io_struct types of the endpoints api_types has no type for."""

    IO_TYPES = ("UpdateWeightFromDiskReqInput", "UpdateWeightFromDiskReqOutput", "ReleaseMemoryOccupationReqInput",
                "ResumeMemoryOccupationReqInput", "EmbeddingReqInput")

    def __init__(self, root: Path | None = None) -> None:
        root = SGLANG_TEST_DEPS if root is None else root
        api = root / "sglang" / "api" / "v1" / "api_types.py"
        io = root / "sglang" / "srt" / "managers" / "io_struct.py"
        dist = root / f"sglang-{SGLANG_VERSION}.dist-info"
        if not (api.exists() and io.exists() and dist.exists()):
            raise ContractUnavailable(f"sglang=={SGLANG_VERSION} is not installed in {root} (tools/setup.sh installs "
                                      "it there, without dependencies)")
        try:
            import msgspec  # noqa: F401
        except ImportError:
            raise ContractUnavailable("msgspec is not installed (the `test` extra pins it)") from None
        self.api = _load_file_module("_sglang_api_v1_api_types", api)
        self.io = _io_struct_fields(io, self.IO_TYPES)

    def check(self, type_name: str, value: Any) -> str | None:
        """The contract violation of `value` as type `type_name` (an api_types or io_struct name), or None."""
        if type_name in self.io:
            if not isinstance(value, dict):
                return f"{type_name}: expected a JSON object, got {type(value).__name__}"
            fields = self.io[type_name]
            for name, (_, required) in fields.items():
                if required and name not in value:
                    return f"{type_name}: missing required field `{name}`"
            for name, v in value.items():  # unknown keys are ignored, as FastAPI does for these bodies
                if name in fields and not _conforms(v, fields[name][0]):
                    return f"{type_name}: field `{name}`: {v!r} is not {fields[name][0]}"
            return None
        try:
            getattr(self.api, type_name).from_json_value(value)
        except self.api.JsonContractError as e:
            return str(e)
        return None


_CONTRACT: SGLangContract | ContractUnavailable | None = None


def sglang_contract() -> SGLangContract | None:
    """The contract, loaded once; None where it is not installed. Under CI=true its absence is an error: CI runs
    tools/setup.sh, so a missing wheel means the contract checks silently stopped."""
    global _CONTRACT
    if _CONTRACT is None:
        try:
            _CONTRACT = SGLangContract()
        except ContractUnavailable as e:
            _CONTRACT = e
    if isinstance(_CONTRACT, ContractUnavailable):
        if os.environ.get("CI", "").lower() == "true":
            raise _CONTRACT
        return None
    return _CONTRACT


def require_sglang_contract() -> SGLangContract:
    """For tests of the contract itself: skip with the reason where it is absent; under CI=true, fail."""
    import pytest

    try:
        c = sglang_contract()
    except ContractUnavailable as e:
        pytest.fail(f"CI=true but SGLang's API types are unavailable: {e}")
    if c is None:
        pytest.skip(f"SGLang's API types are unavailable: {_CONTRACT}; run tools/setup.sh")
    return c


class SGLangAuth:
    """SGLang's --api-key check, from the wheel: `decide_request_auth` of srt/utils/auth.py (stdlib only, loaded by
    file path) and the auth level of each route, read with `ast` from the `@auth_level(AuthLevel.X)` decorators of
    srt/entrypoints/http_server.py (routes without one are NORMAL, as the middleware resolves them). Where the
    wheel is absent, `decide` follows the same rules for the one configuration the launchers use (api_key only):
    /health, /ready, /metrics open, everything else needs `Authorization: Bearer <api_key>`."""

    def __init__(self, root: Path | None = None) -> None:
        root = SGLANG_TEST_DEPS if root is None else root
        auth = root / "sglang" / "srt" / "utils" / "auth.py"
        http = root / "sglang" / "srt" / "entrypoints" / "http_server.py"
        self.mod = _load_file_module("_sglang_srt_utils_auth", auth) if auth.exists() else None
        self.levels: dict[str, str] = {}
        if http.exists():
            for node in ast.walk(ast.parse(http.read_text(encoding="utf-8"))):
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                paths, level = [], None
                for d in node.decorator_list:
                    if not isinstance(d, ast.Call):
                        continue
                    f = d.func
                    if isinstance(f, ast.Attribute) and f.attr in ("get", "post", "put", "delete", "api_route") \
                            and d.args and isinstance(d.args[0], ast.Constant) and isinstance(d.args[0].value, str):
                        paths.append(d.args[0].value)
                    if isinstance(f, ast.Name) and f.id == "auth_level" and d.args \
                            and isinstance(d.args[0], ast.Attribute):
                        level = d.args[0].attr  # AuthLevel.ADMIN_OPTIONAL -> "ADMIN_OPTIONAL"
                for pth in paths:
                    self.levels[pth] = level or "NORMAL"

    @property
    def from_wheel(self) -> bool:
        return self.mod is not None and bool(self.levels)

    def decide(self, method: str, path: str, authorization: str | None, api_key: str | None,
               admin_api_key: str | None = None) -> int:
        """200 when the request may pass, else the status the middleware answers (401 / 403)."""
        if self.mod is not None:
            level = getattr(self.mod.AuthLevel, self.levels.get(path, "NORMAL"))
            d = self.mod.decide_request_auth(method=method, path=path, authorization_header=authorization,
                                             api_key=api_key, admin_api_key=admin_api_key, auth_level=level)
            return 200 if d.allowed else d.error_status_code
        if method == "OPTIONS" or path.startswith(("/health", "/ready", "/metrics")) or not api_key:
            return 200
        parts = (authorization or "").split(" ", 1)
        ok = len(parts) == 2 and parts[0].lower() == "bearer" and parts[1] == api_key
        return 200 if ok else 401


_AUTH: SGLangAuth | None = None


def sglang_auth() -> SGLangAuth:
    global _AUTH
    if _AUTH is None:
        _AUTH = SGLangAuth()
    return _AUTH


def _first(payload: Any) -> Any:
    return payload[0] if isinstance(payload, list) and payload else payload


def _set_meta(key: str, value: Any) -> Callable[[Any, "FakeSGLang"], None]:
    def f(payload: Any, srv: "FakeSGLang") -> None:
        _first(payload)["meta_info"][key] = value
    return f


def _set_item(key: str, value: Any) -> Callable[[Any, "FakeSGLang"], None]:
    def f(payload: Any, srv: "FakeSGLang") -> None:
        _first(payload)[key] = value(srv) if callable(value) else value
    return f


def _set_logprob(index: int, value: Any) -> Callable[[Any, "FakeSGLang"], None]:
    def f(payload: Any, srv: "FakeSGLang") -> None:
        _first(payload)["meta_info"]["output_token_ids_logprobs"][0][0][index] = value
    return f


CORRUPTIONS: dict[str, Callable[[Any, "FakeSGLang"], None]] = {
    # /generate (rollout)
    "ids_out_of_range": _set_item("output_ids", [-7, 10 ** 12]),
    "ids_negative": _set_item("output_ids", [5, -7]),
    "ids_vocab": _set_item("output_ids", lambda srv: [5, srv.vocab]),  # one past the last id
    "ids_str": _set_item("output_ids", ["5", "6"]),
    "ids_bool": _set_item("output_ids", [True, False]),
    "ids_float": _set_item("output_ids", [5.0, 6.5]),
    "ids_not_list": _set_item("output_ids", 5),
    "text_int": _set_item("text", 12345),
    "meta_not_dict": _set_item("meta_info", ["finish_reason"]),
    "finish_unknown": _set_meta("finish_reason", {"type": "exploded"}),
    "finish_int": _set_meta("finish_reason", 3),
    "item_not_dict": lambda payload, srv: payload.__setitem__(0, "oops") if isinstance(payload, list) else None,
    # /generate with token_ids_logprob (pairwise judge)
    "logprob_nan": _set_logprob(0, float("nan")),
    "logprob_inf": _set_logprob(0, float("-inf")),
    "logprob_str": _set_logprob(0, "-0.5"),
    "logprob_positive": _set_logprob(0, 3.0),
    "logprob_token": _set_logprob(1, 10 ** 6),
    # /classify (reward model)
    "reward_nan": _set_item("embedding", [float("nan")]),
    "reward_str": _set_item("embedding", ["1.5"]),
    "reward_empty": _set_item("embedding", []),
    "reward_not_list": _set_item("embedding", 1.5),
}
"""Wrong-typed / out-of-range replies, applied to the first result of a reply (after the fake checked that the
reply it built is valid): what a broken server, proxy or a version mismatch could send; the client must treat each
as a failed attempt. json.dumps writes NaN / Infinity, which Python's json.loads accepts, as a sloppy server would."""
CORRUPT_GENERATE = [k for k in CORRUPTIONS if not k.startswith(("logprob", "reward"))]
CORRUPT_LOGPROB = [k for k in CORRUPTIONS if k.startswith("logprob")]
CORRUPT_REWARD = [k for k in CORRUPTIONS if k.startswith("reward")]


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
    """An SGLang-API server on 127.0.0.1 (port 0) running in a thread; use as a context manager.

    contract: check requests / replies with SGLang's own types (default: where installed; see sglang_contract).
    context_len: the model's context length (prompt + max_new_tokens beyond it is a 400, as in SGLang).
    eos_id / decode: the EOS id and the detokenizer of the served model's vocabulary.
    """

    def __init__(self, is_embedding: bool = False, vocab: int = 3 + len(CHARS), eos_prob: float = 0.15,
                 model_path: str = "/models/fake", pm_logits: Callable[[list[int]], tuple[float, float]] | None = None,
                 token_a: int = 3 + CHARS.index("A"), token_b: int = 3 + CHARS.index("B"),
                 reward: Callable[[list[int]], float] | None = None, contract: SGLangContract | None | bool = True,
                 context_len: int = 4096, eos_id: int | None = None,
                 decode: Callable[[list[int]], str] | None = None, memory_saver: bool = True,
                 deterministic: bool = True, api_key: str | None = None, health_generates: bool = True,
                 request_log: str | os.PathLike | None = None) -> None:
        self.is_embedding = is_embedding
        self.api_key = api_key or None  # --api-key: checked as SGLang's middleware does (SGLangAuth)
        self.auth = sglang_auth() if self.api_key else None
        self.memory_saver = memory_saver  # --enable-memory-saver
        self.deterministic = deterministic  # --enable-deterministic-inference: without it sampling_seed is ignored
        self.health_generates = health_generates  # SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION (SGLang's default: on)
        self.request_log = Path(request_log) if request_log else None
        """A file that gets the path of every request, one a line (for the fake run as a separate process)."""
        self.vocab = vocab
        self.eos_prob = eos_prob
        self.eos_id = EOS if eos_id is None else eos_id
        self.decode = decode or decode_chars
        self.launch_model_path = model_path
        self.context_len = context_len
        self.pm_logits = pm_logits or (lambda ids: ((_h("a", ids) % 1000) / 250.0, (_h("b", ids) % 1000) / 250.0))
        self.token_a, self.token_b = token_a, token_b
        self.reward = reward or (lambda ids: (_h("r", ids) % 10000) / 1000.0)
        self.contract = sglang_contract() if contract is True else (contract or None)
        self.healthy = True
        self.requests: list[tuple[str, Any]] = []
        """Every request received, in order (path, parsed body), including refused ones."""
        self.refused: list[tuple[str, int, str]] = []
        """(path, status, error) of every request answered with a 4xx by the server's own checks."""
        self.faults: dict[str, list[tuple[str, float]]] = {}
        self.fault_rates: dict[str, tuple[float, list[str], float, random.Random]] = {}
        self.injected: list[tuple[str, str]] = []
        """(path, kind) of every fault served, in order."""
        self.inflight = 0
        self.max_inflight = 0
        self.lock = threading.Lock()
        self.idle = threading.Condition(self.lock)
        self._process_state()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def _process_state(self) -> None:
        """What a server process holds and loses when it restarts."""
        self.model_path = self.launch_model_path  # --model-path: a restart forgets weight updates
        self.weight_version = "default"
        self.flushes = 0
        self.busy = 0  # generation / embedding requests running or waiting (what /flush_cache refuses on)
        self.updating = False  # a weight update holds the model-update lock: new requests wait
        self.released: set[str] = set()  # memory-saver tags released (the scheduler's offload_tags)
        self.fatal: str | None = None  # why the server process died; None while it lives
        # SGLang 0.5.23 reports startup_time as a dict of the start-up's measured durations
        # (observability/startup_time.py), not a wall-clock time; each process measures its own
        self._starts = getattr(self, "_starts", 0) + 1
        self.startup_time = {"load_weight": 0.5 + 1e-3 * self._starts, "kv_cache_allocation": 0.25,
                             "scheduler_e2e": 1.0, "cuda_graph": {}}

    def restart(self) -> None:
        """The server process restarted on the same port (e.g. after it died): a fresh one holds its memory."""
        with self.lock:
            self._process_state()  # a new process: new measured start-up durations

    def __enter__(self) -> "FakeSGLang":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def inject(self, path: str, kind: str, count: int = 1, delay: float = 0.0) -> None:
        """Next `count` requests to `path` get fault `kind`: slow, malformed, http400 (refused, no effect), http500,
        http503, http429 (overloaded; for both, `delay` > 0 adds `Retry-After: delay`), drop, short, abort (the first
        completion of a list reply is marked aborted), or a key of CORRUPTIONS (a wrong-typed / out-of-range
        reply; the request itself is carried out)."""
        if kind not in CORRUPTIONS and kind not in ("slow", "malformed", "http400", "http500", "http503", "http429",
                                                    "drop", "short", "abort"):
            raise ValueError(f"unknown fault {kind!r}")
        with self.lock:
            self.faults.setdefault(path, []).extend([(kind, delay)] * count)

    def inject_rate(self, path: str, kinds: str | list[str], rate: float, delay: float = 0.0, seed: int = 0) -> None:
        """Each request to `path` (after any counted faults) gets, with probability `rate`, a fault drawn from
        `kinds` (as in inject), from a seeded generator; rate 0 stops."""
        kinds = [kinds] if isinstance(kinds, str) else list(kinds)
        for k in kinds:
            if k not in CORRUPTIONS and not k.startswith("http") and k not in ("malformed", "drop", "short",
                                                                                "abort", "slow"):
                raise ValueError(f"unknown fault {k!r}")
        with self.lock:
            if rate <= 0:
                self.fault_rates.pop(path, None)
            else:
                self.fault_rates[path] = (rate, kinds, delay, random.Random(seed))

    def _take_fault(self, path: str) -> tuple[str, float] | None:
        with self.lock:
            q = self.faults.get(path)
            fault = q.pop(0) if q else None
            if fault is None and path in self.fault_rates:
                rate, kinds, delay, rng = self.fault_rates[path]
                if rng.random() < rate:
                    fault = (rng.choice(kinds), delay)
            if fault is not None:
                self.injected.append((path, fault[0]))
            return fault

    def _die(self, reason: str) -> None:
        with self.lock:
            if self.fatal is None:
                self.fatal = reason

    # ---- the model --------------------------------------------------------------------------------------------
    def _sample(self, ids: list[int], sp: dict, rng: random.Random) -> dict:
        max_new = int(sp.get("max_new_tokens", 128))
        stop_ids = set(sp.get("stop_token_ids") or [])
        if not sp.get("ignore_eos", False):
            stop_ids.add(self.eos_id)
        greedy = float(sp.get("temperature", 1.0)) == 0.0
        out: list[int] = []
        finish: dict[str, Any] = {"type": "length", "length": max_new}
        for _ in range(max_new):
            r = random.Random(_h("greedy", ids, out)) if greedy else rng
            t = self.eos_id if r.random() < self.eos_prob else r.randrange(3, self.vocab)
            out.append(t)
            if t in stop_ids:
                finish = {"type": "stop", "matched": t}
                break
        return {"output_ids": out, "finish": finish}

    def _generate_one(self, ids: list[int], sp: dict, body: dict, index: int) -> dict:
        # sampling_batch_info.py: with --enable-deterministic-inference every request is seeded, by its
        # sampling_seed or else 42 (and sampler.multinomial_with_seed draws from the seed and positions only);
        # without it sampling_seed is ignored
        seed = sp.get("sampling_seed") if self.deterministic else None
        if self.deterministic and seed is None:
            seed = 42
        rng = random.Random(_h("seed", seed, ids)) if seed is not None else random.Random()
        want = body.get("token_ids_logprob")
        if want is not None and want and isinstance(want[0], list):
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
        text = self.decode([t for t in out if t != self.eos_id])
        return {"text": text, "output_ids": out, "meta_info": meta}

    # ---- the server's checks --------------------------------------------------------------------------------
    def _refuse(self, path: str, message: str, status: int = 400, body: Any = None) -> tuple[int, Any]:
        with self.lock:
            self.refused.append((path, status, message))
        return status, body if body is not None else {"error": {"message": message}}

    def _check(self, type_name: str, value: Any) -> str | None:
        return None if self.contract is None else self.contract.check(type_name, value)

    def _check_reply(self, type_name: str, value: Any) -> None:
        """A reply the real server could not send is a bug of this fake: fail the test, not the client."""
        err = self._check(type_name, value)
        if err is not None:
            raise AssertionError(f"FakeSGLang reply violates SGLang's {type_name}: {err}: {value!r}"[:2000])

    def _input_too_long(self, path: str, ids: list[int]) -> tuple | None:
        """tokenizer_manager._validate_one_request: a prompt must be shorter than the context length."""
        if len(ids) >= self.context_len:
            return self._refuse(path, f"The input ({len(ids)} tokens) is longer than the model's context "
                                      f"length ({self.context_len} tokens).")
        return None

    def _dies_on_released_memory(self, path: str) -> bool:
        """Work on paused weights / KV cache: the scheduler faults on freed memory and the server exits."""
        if self.released:
            self._die(f"{path} on released memory {sorted(self.released)}")
        return bool(self.released)

    def _generate_checks(self, path: str, body: dict, prompts: list[list[int]], sps: list[dict]) -> tuple | None:
        # io_struct.GenerateReqInput._normalize: one n (parallel_sample_num) for the whole batch
        ns = {int(sp.get("n", 1) or 1) for sp in sps}
        if len(ns) > 1:
            return self._refuse(path, "The parallel_sample_num should be the same for all samples in sample "
                                      "params.")
        # tokenizer_manager._validate_one_request: the prompt, then prompt + max_new_tokens, against context_len
        for ids, sp in zip(prompts, sps):
            too_long = self._input_too_long(path, ids)
            if too_long:
                return too_long
            mnt = sp.get("max_new_tokens")
            if mnt is not None and mnt + len(ids) > self.context_len:
                return self._refuse(path, "Requested token count exceeds the model's maximum context length of "
                                          f"{self.context_len} tokens. You requested a total of {mnt + len(ids)} "
                                          f"tokens: {len(ids)} tokens from the input messages and {mnt} tokens "
                                          "for the completion.")
        return None

    def handle(self, path: str, body: Any) -> tuple[int, Any]:
        if path == "/ready":  # http_server.ready: tokenizer_manager.is_ready(), a flag check
            return (200, b"") if self.healthy else (503, b"")
        if path in ("/health", "/health_generate"):
            # http_server.health_generate: a 1-token generation, except /health when the server runs with
            # SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=0
            generates = path == "/health_generate" or self.health_generates
            if generates and self._dies_on_released_memory(path):
                return 0, None
            return (200, b"") if self.healthy else (503, b"")
        if path in ("/model_info", "/get_model_info"):
            info = {"model_path": self.model_path, "tokenizer_path": self.model_path,
                    "is_generation": not self.is_embedding, "weight_version": self.weight_version,
                    "architectures": ["LlamaForSequenceClassification" if self.is_embedding else "LlamaForCausalLM"]}
            self._check_reply("GetModelInfoResponse", info)
            return 200, info
        if path in ("/server_info", "/get_server_info"):
            info = {"model_path": self.model_path, "tokenizer_path": self.model_path,
                    "max_context_length": self.context_len, "version": SGLANG_VERSION,
                    "enable_memory_saver": self.memory_saver,
                    "enable_deterministic_inference": self.deterministic, "startup_time": self.startup_time,
                    "internal_states": [{"startup_time": self.startup_time}], "host": "127.0.0.1",
                    "port": self.httpd.server_address[1]}
            self._check_reply("GetServerInfoResponse", info)
            return 200, info
        if path == "/flush_cache":
            with self.lock:  # scheduler.flush_cache: refused unless fully idle
                busy = self.busy
                if not busy:
                    self.flushes += 1
            if busy:
                return self._refuse(path, "Flush cache failed.\n", body=b"Flush cache failed.\n")
            return 200, (b"Cache flushed.\nPlease check backend logs for more details. (When there are running "
                         b"or waiting requests, the operation will not be performed.)\n")
        if path == "/update_weights_from_disk":
            err = self._check("UpdateWeightFromDiskReqInput", body)
            if err:
                return self._refuse(path, err)
            return self._update_weights(path, body)
        if path in ("/release_memory_occupation", "/resume_memory_occupation"):
            err = self._check(("ReleaseMemoryOccupationReqInput" if path.startswith("/release") else
                               "ResumeMemoryOccupationReqInput"), body)
            if err:
                return self._refuse(path, err)
            return self._memory(path, body)
        if path in ("/classify", "/encode"):
            err = self._check("EmbeddingReqInput", body)
            if err:
                return self._refuse(path, err)
            if not self.is_embedding:
                return self._refuse(path, "This model does not appear to be an embedding model by default. Please "
                                          "add `--is-embedding` when launching the server or try another model.")
            prompts, single = self._inputs(body)
            if self._dies_on_released_memory(path):
                return 0, None
            for ids in prompts:
                too_long = self._input_too_long(path, ids)
                if too_long:
                    return too_long
            items = [{"embedding": [self.reward(ids)], "meta_info": {"id": str(i), "prompt_tokens": len(ids)}}
                     for i, ids in enumerate(prompts)]
            return 200, items[0] if single else items
        if path == "/generate":
            # http_server.generate_request: SGLang's JSON contract gate first (api_contract.py), a 400 with its text
            err = self._check("GenerateRequest", body)
            if err:
                return self._refuse(path, err, body={"error": err})
            if self.is_embedding:
                return self._refuse(path, "generate is not supported for embedding models")
            prompts, single = self._inputs(body)
            sps = body.get("sampling_params") or {}
            sps = sps if isinstance(sps, list) else [sps] * len(prompts)
            if len(sps) != len(prompts):
                return self._refuse(path, "sampling_params length does not match the batch")
            refused = self._generate_checks(path, body, prompts, sps)
            if refused:
                return refused
            if self._dies_on_released_memory(path):
                return 0, None
            items = []
            for i, (ids, sp) in enumerate(zip(prompts, sps)):
                for _ in range(int(sp.get("n", 1) or 1)):
                    items.append(self._generate_one(ids, sp, body, i))
            for it in items:
                self._check_reply("GenerateResponse", it)
            # a batch, or n > 1 even for one prompt, answers a list
            return 200, items[0] if (single and len(items) == 1) else items
        return 404, {"detail": "Not Found"}

    def _update_weights(self, path: str, body: dict) -> tuple[int, Any]:
        # tokenizer_manager: the update takes the model-update writer lock, so it waits for the requests that
        # run, and new ones wait for it
        with self.idle:
            self.updating = True
            try:
                self.idle.wait_for(lambda: self.busy == 0, timeout=60)
                mp = body.get("model_path", "")
                if not os.path.isdir(mp):
                    reply = {"success": False, "message": f"Failed to load weights from {mp}: not found",
                             "num_paused_requests": 0}
                else:
                    self.model_path = mp
                    self.weight_version = body.get("weight_version") or self.weight_version
                    if body.get("flush_cache", True):
                        self.flushes += 1
                    reply = {"success": True, "message": "Succeeded to update model weights.",
                             "num_paused_requests": 0}
            finally:
                self.updating = False
                self.idle.notify_all()
        self._check_reply("UpdateWeightFromDiskReqOutput", reply)
        if not reply["success"]:
            return self._refuse(path, reply["message"], body=reply)
        return 200, reply

    def _memory(self, path: str, body: dict) -> tuple[int, Any]:
        """weight_updater.release/resume_memory_occupation: the scheduler asserts idleness on release and does
        offload_tags.remove(tag) on resume; either failure raises in the scheduler, and the server exits."""
        tags = body.get("tags") or list(GPU_MEMORY_ALL_TYPES)
        if not self.memory_saver:  # the memory-saver adapter is a no-op: nothing is freed, nothing to resume
            return 200, None
        with self.lock:
            if path.startswith("/release"):
                if self.busy:
                    reason = "release_memory_occupation should be called only when server is idle."
                elif set(tags) & self.released:
                    reason = f"second release of {sorted(set(tags) & self.released)}: the regions are paused twice"
                else:
                    self.released |= set(tags)
                    return 200, None
            else:
                missing = sorted(set(tags) - self.released)
                if missing:
                    reason = f"resume of tags that were not released: offload_tags.remove({missing[0]!r}) KeyError"
                else:
                    self.released -= set(tags)
                    return 200, None
        self._die(f"{path} {tags}: {reason}")
        return 0, None

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

            def _drop(self) -> None:
                self.close_connection = True
                try:
                    self.connection.shutdown(2)
                except OSError:
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
                work = path in ("/generate", "/classify", "/encode")
                with server.idle:
                    server.requests.append((path, body))
                    if server.request_log is not None:
                        with open(server.request_log, "a", encoding="utf-8") as f:
                            f.write(path + "\n")
                    if server.fatal is not None:  # a dead server answers nothing
                        return self._drop()
                if server.auth is not None:  # SGLang's api-key middleware runs before any route
                    code = server.auth.decide(self.command, path, self.headers.get("Authorization"),
                                              server.api_key)
                    if code != 200:
                        with server.lock:
                            server.refused.append((path, code, "Unauthorized" if code == 401 else "Forbidden"))
                        return self._send(code, {"error": "Unauthorized" if code == 401 else "Forbidden"})
                with server.idle:
                    if work:  # new requests wait behind a weight update's model-update lock, then count as busy
                        server.idle.wait_for(lambda: not server.updating, timeout=60)
                        server.busy += 1
                    server.inflight += 1
                    server.max_inflight = max(server.max_inflight, server.inflight)
                try:
                    self._reply(path, body)
                finally:
                    with server.idle:
                        server.inflight -= 1
                        if work:
                            server.busy -= 1
                        server.idle.notify_all()

            def _reply(self, path: str, body: Any) -> None:
                fault = server._take_fault(path)
                if fault and fault[0] == "slow":
                    time.sleep(fault[1])
                    fault = None
                if fault and fault[0] == "drop":
                    return self._drop()
                if fault and fault[0] in ("http400", "http500", "http503"):
                    retry = {"Retry-After": f"{fault[1]:g}"} if fault[0] == "http503" and fault[1] > 0 else {}
                    return self._send(int(fault[0][4:]), b"", retry)
                if fault and fault[0] == "http429":  # sglang-router's answer when its queue is full
                    headers = {"Retry-After": f"{fault[1]:g}"} if fault[1] > 0 else {}
                    return self._send(429, {"error": {"message": "Too many requests", "type": "rate_limit_error"}},
                                      headers)
                if fault and fault[0] == "malformed":
                    return self._send(200, b'{"text": "trunc')
                status, payload = server.handle(path, {} if body is None else body)
                if status == 0:  # the call killed the server
                    return self._drop()
                if fault and fault[0] == "short" and isinstance(payload, list):
                    payload = payload[:-1]
                if fault and fault[0] == "abort" and isinstance(payload, list):
                    payload[0]["meta_info"]["finish_reason"] = {"type": "abort", "message": "weights updated"}
                if fault and fault[0] in CORRUPTIONS and status == 200 and not isinstance(payload, bytes):
                    CORRUPTIONS[fault[0]](payload, server)
                self._send(status, payload)

            def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
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


def free_port_pair() -> int:
    """A free port whose successor is free too (a launcher starts its servers on consecutive ports)."""
    import socket

    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 65000:
            with socket.socket() as s2:
                try:
                    s2.bind(("127.0.0.1", port + 1))
                    return port
                except OSError:
                    continue
    raise RuntimeError("no free port pair")


if __name__ == "__main__":  # stand-in for `python -m sglang.launch_server` in the launcher test
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--model-path", default="/models/fake")
    ap.add_argument("--is-embedding", action="store_true")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--request-log", default=None,
                    help="append every request's path to this file (tests); {port} in it is the server's port")
    args, _ = ap.parse_known_args()
    # srt/environ.py EnvBool: "false", "0", "no", "n" (any case) switch it off; unset keeps SGLang's default, on
    flag = os.environ.get("SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION", "true").lower()
    srv = FakeSGLang(is_embedding=args.is_embedding, model_path=args.model_path, api_key=args.api_key,
                     health_generates=flag not in ("false", "0", "no", "n"),
                     request_log=args.request_log.replace("{port}", str(args.port)) if args.request_log else None)
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
