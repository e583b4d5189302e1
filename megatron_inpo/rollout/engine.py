"""The rollout engine interface, its configs and the data it returns; both engines (SGLang over HTTP and the
in-process transformers engine) implement `RolloutEngine.generate` with the same sampling semantics."""
from __future__ import annotations

import abc
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

from megatron_inpo.config import ConfigError

if TYPE_CHECKING:
    from megatron_inpo.data.prompts import PromptRecord

log = logging.getLogger(__name__)


@dataclass
class SamplingConfig:
    n: int = 8
    """K: responses sampled per prompt (the paper uses 8; the tournament needs a power of two)."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability mass reaches top_p."""
    top_k: int = -1
    """Keep only the top_k most likely tokens; -1 disables."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the most likely token's; 0 disables."""
    max_new_tokens: int = 256
    """Upper bound on response tokens (the stop token included)."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Extra token ids that end a response (the tokenizer's EOS always does unless ignore_eos)."""
    ignore_eos: bool = False
    """Keep generating past EOS (benchmarks only)."""
    seed: int | None = 0
    """Base seed: sample j of prompt p uses prompt_seed(seed, iteration, p, j). None: unseeded (on SGLang servers
    that honour seeds, K distinct seeds per prompt drawn from the OS; elsewhere n=K)."""

    def validate(self) -> None:
        if self.n < 1:
            raise ConfigError(f"sampling.n: must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ConfigError(f"sampling.temperature: must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"sampling.top_p: must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ConfigError(f"sampling.top_k: must be -1 (off) or >= 1, got {self.top_k}")
        if not 0 <= self.min_p < 1:
            raise ConfigError(f"sampling.min_p: must be in [0, 1), got {self.min_p}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"sampling.max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if any((not isinstance(t, int)) or t < 0 for t in self.stop_token_ids):
            raise ConfigError(f"sampling.stop_token_ids: must be non-negative ints, got {self.stop_token_ids}")

    def sglang_params(self, seed: int | None = None, n: int | None = None) -> dict[str, Any]:
        """SGLang `sampling_params` (field names of sglang's SamplingParams; unknown keys would be a 400)."""
        p: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "ignore_eos": self.ignore_eos,
            "skip_special_tokens": True,
        }
        if self.stop_token_ids:
            p["stop_token_ids"] = list(self.stop_token_ids)
        if n is not None and n != 1:
            p["n"] = n
        if seed is not None:
            p["sampling_seed"] = seed
        return p


@dataclass
class RolloutConfig:
    backend: Literal["local", "sglang"] = "local"
    """'local': in-process transformers generation (CPU or one GPU); 'sglang': HTTP clients of SGLang servers."""
    model_path: str = ""
    """HF model directory of pi_t (local engine: loaded; SGLang: what update_weights loads)."""
    tokenizer_path: str = ""
    """Tokenizer directory when prompts need tokenizing; empty means model_path."""
    chat_template: bool = True
    """Render each prompt as one user turn with the tokenizer's chat template (when it has one)."""
    server_urls: list[str] = field(default_factory=list)
    """SGLang server base URLs (e.g. http://127.0.0.1:30000); requests go round-robin, failing over on errors."""
    concurrency: int = 16
    """SGLang: requests in flight at once over all servers."""
    request_prompts: int = 1
    """SGLang: prompts per /generate request (each expands to K sequences)."""
    timeout_s: float = 600.0
    """SGLang: per-request timeout in seconds."""
    max_retries: int = 4
    """SGLang: retries of a failed request (connection error, timeout, 5xx, malformed reply) before giving up."""
    backoff_s: float = 1.0
    """SGLang: first retry delay; doubles after each failure (exponential back-off)."""
    backoff_max_s: float = 30.0
    """SGLang: cap on a single retry delay."""
    api_key: str = ""
    """SGLang: the key of servers started with --api-key, sent as `Authorization: Bearer <key>`; empty: none.
    Give it as `env:VAR` to read it from the environment variable VAR when the client starts: the key itself
    then never lands in config.yaml, the manifest or a command line (launch/slurm_inpo.sbatch passes a random
    per-job key this way). A literal key works too but is saved in config.yaml with the rest of the config."""
    device: str = "cpu"
    """Local engine: torch device ('cpu', 'cuda', 'cuda:1')."""
    dtype: str = "float32"
    """Local engine: parameter dtype ('float32', 'bfloat16', 'float16')."""
    max_batch_sequences: int = 64
    """Local engine: sequences (prompts x K) decoded together in one forward; a batch holds whole prompts (at
    least one: K sequences when K is larger), each prompt run once for its K samples."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Sampling parameters shared by both engines."""

    def validate(self) -> None:
        if self.backend not in ("local", "sglang"):
            raise ConfigError(f"rollout.backend: must be 'local' or 'sglang', got {self.backend!r}")
        if self.backend == "sglang" and not self.server_urls:
            raise ConfigError("rollout.server_urls: backend 'sglang' needs at least one server URL")
        for u in self.server_urls:
            if not u.startswith(("http://", "https://")):
                raise ConfigError(f"rollout.server_urls: {u!r} is not an http(s) URL")
        if self.backend == "local" and not self.model_path:
            raise ConfigError("rollout.model_path: backend 'local' needs an HF model directory")
        for name in ("concurrency", "request_prompts", "max_batch_sequences"):
            if getattr(self, name) < 1:
                raise ConfigError(f"rollout.{name}: must be >= 1, got {getattr(self, name)}")
        if self.timeout_s <= 0:
            raise ConfigError(f"rollout.timeout_s: must be > 0, got {self.timeout_s}")
        if self.max_retries < 0:
            raise ConfigError(f"rollout.max_retries: must be >= 0, got {self.max_retries}")
        if self.backoff_s < 0 or self.backoff_max_s < self.backoff_s:
            raise ConfigError(f"rollout.backoff_s/backoff_max_s: need 0 <= backoff_s <= backoff_max_s, got "
                              f"{self.backoff_s}, {self.backoff_max_s}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"rollout.dtype: must be float32, bfloat16 or float16, got {self.dtype!r}")
        self.sampling.validate()


@dataclass
class Completion:
    text: str
    """Decoded response (special tokens skipped)."""
    token_ids: list[int]
    """Response token ids; the stop/EOS token is included when it ended the response."""
    finish_reason: str = "length"
    """'stop' (a stop/EOS token), 'length' (max_new_tokens) or 'abort'."""
    seed: int | None = None
    """The sampling seed it was drawn with (derived from sampling.seed, or drawn from the OS for an unseeded
    rollout on servers that honour seeds, rollout/sglang.py); None when the engine chose its own randomness.
    Written with the sample to rollouts.jsonl, so a rerun can show what was used."""


@dataclass
class Rollout:
    prompt: "PromptRecord"
    """The prompt record (id, text, extra fields)."""
    prompt_ids: list[int]
    """Token ids fed to the policy (chat template applied)."""
    completions: list[Completion]
    """The K sampled responses, in sample order j = 0..K-1."""


def prompt_seed(base_seed: int, iteration: int, prompt_id: str, sample: int = 0) -> int:
    """A 63-bit seed that depends only on (base seed, iteration, prompt id, sample index): batch-independent."""
    h = hashlib.blake2b(f"{base_seed}|{iteration}|{prompt_id}|{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


class Throughput:
    """Accumulates prompts, sequences and generated tokens over wall time; logs prompts/s and tokens/s."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.prompts = 0
        self.sequences = 0
        self.tokens = 0
        self.seconds = 0.0

    def add(self, prompts: int, sequences: int, tokens: int, seconds: float) -> dict[str, float]:
        self.prompts += prompts
        self.sequences += sequences
        self.tokens += tokens
        self.seconds += seconds
        rate = {"prompts": prompts, "tokens": tokens, "seconds": seconds,
                "prompts_per_s": prompts / max(seconds, 1e-9), "tokens_per_s": tokens / max(seconds, 1e-9)}
        log.info("%s: %d prompts, %d sequences, %d tokens in %.2f s: %.2f prompts/s, %.1f tokens/s", self.name,
                 prompts, sequences, tokens, seconds, rate["prompts_per_s"], rate["tokens_per_s"])
        return rate

    def summary(self) -> dict[str, float]:
        s = max(self.seconds, 1e-9)
        return {"prompts": self.prompts, "sequences": self.sequences, "tokens": self.tokens, "seconds": self.seconds,
                "prompts_per_s": self.prompts / s, "tokens_per_s": self.tokens / s}


def encode_prompt(tokenizer: Any, text: str, chat_template: bool) -> list[int]:
    """Token ids of one prompt: a user turn rendered with the chat template when asked and available."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
        return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    return list(tokenizer(text)["input_ids"])


class RolloutEngine(abc.ABC):
    """Sample K responses per prompt. Subclasses implement generate(); rollout() adds tokenization and seeds."""

    cfg: RolloutConfig
    tokenizer: Any = None
    meter: Throughput

    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingConfig | None = None,
                 seeds: Sequence[Sequence[int]] | None = None) -> list[list[Completion]]:
        """Return, per prompt, `sampling.n` completions; seeds[i][j] seeds sample j of prompt i (None: unseeded).

        Throughput (prompts/s, tokens/s) of every call is logged and accumulated in `self.meter`.
        """
        sampling = sampling or self.cfg.sampling
        sampling.validate()
        if seeds is not None and (len(seeds) != len(prompt_ids) or any(len(s) != sampling.n for s in seeds)):
            raise ValueError(f"seeds must be {len(prompt_ids)} lists of {sampling.n} ints (one per sample)")
        if any(len(p) == 0 for p in prompt_ids):
            raise ValueError("empty prompt (no token ids)")
        t0 = time.perf_counter()
        outs = self._generate([list(p) for p in prompt_ids], sampling, seeds)
        dt = time.perf_counter() - t0
        if len(outs) != len(prompt_ids) or any(len(o) != sampling.n for o in outs):
            raise RuntimeError(f"{type(self).__name__}: expected {len(prompt_ids)} x {sampling.n} completions")
        self.meter.add(len(prompt_ids), sum(len(o) for o in outs), sum(len(c.token_ids) for o in outs for c in o), dt)
        if seeds is not None:
            for o, ss in zip(outs, seeds):
                for c, s in zip(o, ss):
                    c.seed = s
        return outs

    @abc.abstractmethod
    def _generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig,
                  seeds: Sequence[Sequence[int]] | None) -> list[list[Completion]]:
        """The engine's own generation (inputs already validated)."""

    def update_weights(self, model_path: str, version: str = "") -> None:
        """Load new policy weights (the next iterate pi_{t+1}) and drop every cache that depends on the old ones."""
        raise NotImplementedError(f"{type(self).__name__} cannot update weights")

    def close(self) -> None:
        """Release models / connections."""

    def vocab_size(self) -> int | None:
        """Token ids a prompt may use: the tokenizer's vocabulary (None without a tokenizer: not checked here)."""
        return len(self.tokenizer) if self.tokenizer is not None else None

    def max_positions(self) -> int | None:
        """The model's context length (prompt + response tokens), when the engine knows it (the local engine: the
        model's max_position_embeddings); None here. A tokenizer's model_max_length is not used for this hard
        check: it is often stale or a placeholder, and an SGLang server answers an over-long request itself."""
        return None

    def max_prompt_chars(self) -> int | None:
        """Characters a prompt's text may have before it is even tokenized (None: no bound).

        No token of a byte-level BPE or SentencePiece vocabulary covers more input characters than its own string
        has (a byte-level symbol is one byte, and a character is at least one byte; added special tokens are in
        the vocabulary too), and neither drops characters, so a text longer than (longest vocabulary entry) x
        (positions) characters has more tokens than the model has positions and is refused at once: tokenizing a
        10 MB line took minutes and gigabytes only to fail. The floor of 16 characters per token keeps the bound
        generous for vocabularies of short entries whose normalizers may drop characters (word-level tokenizers).
        Positions: max_positions(), else the tokenizer's model_max_length (good enough for this coarse bound).
        """
        if getattr(self, "_char_bound", None) is None:
            self._char_bound = prompt_char_bound(self.tokenizer, self.max_positions())
        return self._char_bound

    def tokenize(self, prompts: Sequence["PromptRecord"], max_new_tokens: int = 0) -> list[list[int]]:
        """Token ids of each prompt: its own prompt_ids or its text tokenized (chat template when configured).

        Checked first, naming the prompt's file:line (DataError): given ids within the tokenizer's vocabulary; a
        text no longer than max_prompt_chars (before tokenizing); the prompt's tokens plus `max_new_tokens` within
        the model's positions (SGLang refuses such a request; the local engine would run past its positions).
        """
        from megatron_inpo.data.preferences import DataError, check_token_ids

        vocab, positions, max_chars = self.vocab_size(), self.max_positions(), self.max_prompt_chars()
        out = []
        for p in prompts:
            where = getattr(p, "where", None) or f"prompt {p.id!r}"
            if p.prompt_ids is not None:
                ids = list(check_token_ids(list(p.prompt_ids), where, "prompt_ids", vocab, empty="no token ids"))
            else:
                if self.tokenizer is None:
                    raise DataError(f"{where}: no field 'prompt_ids', and the engine has no tokenizer for 'prompt' "
                                    "(set rollout.tokenizer_path)")
                if max_chars is not None and len(p.prompt) > max_chars:
                    raise DataError(f"{where}: field 'prompt' has {len(p.prompt)} characters, more than the "
                                    f"model's positions can hold as tokens (limit {max_chars} characters); refused "
                                    "before tokenizing")
                unknown = unknown_words(self.tokenizer, p.prompt)
                if unknown:
                    raise DataError(f"{where}: field 'prompt' has words the tokenizer does not know, which it would "
                                    f"read as its unknown token: {unknown[:5]}")
                ids = encode_prompt(self.tokenizer, p.prompt, self.cfg.chat_template)
                if not ids:
                    raise DataError(f"{where}: field 'prompt' gives no tokens")
            if positions is not None and len(ids) + max_new_tokens > positions:
                field_name = "prompt_ids" if p.prompt_ids is not None else "prompt"
                raise DataError(f"{where}: field {field_name!r} has {len(ids)} tokens; with max_new_tokens="
                                f"{max_new_tokens} that is more than the model's {positions} positions")
            out.append(ids)
        return out

    def rollout(self, prompts: Sequence["PromptRecord"], iteration: int = 1,
                sampling: SamplingConfig | None = None) -> list[Rollout]:
        """Tokenize, derive per-(prompt, sample) seeds and generate K completions per prompt."""
        sampling = sampling or self.cfg.sampling
        ids = self.tokenize(prompts, sampling.max_new_tokens)
        seeds = None
        if sampling.seed is not None:
            seeds = [[prompt_seed(sampling.seed, iteration, p.id, j) for j in range(sampling.n)] for p in prompts]
        outs = self.generate(ids, sampling, seeds)
        return [Rollout(p, i, o) for p, i, o in zip(prompts, ids, outs)]


def unknown_words(tokenizer: Any, text: str) -> list[str]:
    """The words of `text` that a word-level tokenizer (tokenizers' WordLevel model, like the synthetic task's) has
    no entry for: it maps each to its unknown token silently (the synthetic task's is <pad>), so a prompt would
    lose them without a sign. Subword and byte-level tokenizers spell any text and give []."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = getattr(backend, "model", None)
    if model is None or type(model).__name__ != "WordLevel" or backend.pre_tokenizer is None:
        return []
    words = [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text)
                                                                   if backend.normalizer else text)]
    return [w for w in words if model.token_to_id(w) is None]


def prompt_char_bound(tokenizer: Any, positions: int | None) -> int | None:
    """RolloutEngine.max_prompt_chars' bound: (longest vocabulary entry, at least 16) x positions, where positions
    falls back to the tokenizer's model_max_length; None when neither is known."""
    if positions is None:
        n = getattr(tokenizer, "model_max_length", None)
        positions = n if type(n) is int and 0 < n < 10**8 else None  # 1e30: transformers' "no limit"
    if positions is None:
        return None
    try:
        longest = max(map(len, tokenizer.get_vocab()), default=0) if tokenizer is not None else 0
    except Exception:  # noqa: BLE001 - a tokenizer without a listable vocabulary: fall back to the floor
        longest = 0
    return max(longest, 16) * positions


def prompt_limits(cfg: RolloutConfig, tokenizer: Any) -> dict[str, int | None]:
    """read_prompts' limits (vocab_size, max_tokens, max_chars) from the tokenizer and the model's config.json, so
    that a command refuses bad prompts, naming file:line, before the model loads (minutes for a large one); the
    engine checks the same again when it tokenizes. Positions are the model's max_position_embeddings for the
    local engine; an SGLang server judges a request's length itself (its context length may differ)."""
    positions = None
    if cfg.backend == "local" and cfg.model_path:
        try:
            n = json.loads((Path(cfg.model_path) / "config.json").read_text(encoding="utf-8")).get(
                "max_position_embeddings")
        except (OSError, ValueError, AttributeError):
            n = None  # the engine's own load reports a broken config.json with its error
        positions = n if type(n) is int and n > 0 else None
    max_new = cfg.sampling.max_new_tokens
    return {"vocab_size": len(tokenizer) if tokenizer is not None else None,
            "max_tokens": None if positions is None else max(positions - max_new, 0),
            "max_chars": prompt_char_bound(tokenizer, positions)}


def load_tokenizer(path: str) -> Any:
    """AutoTokenizer.from_pretrained(path); a directory it cannot read (corrupt tokenizer.json, missing files) is a
    ConfigError naming it, not transformers' traceback."""
    from transformers import AutoTokenizer

    from megatron_inpo.config import ConfigError

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:  # JSONDecodeError is a ValueError
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(f"{path}: cannot load a tokenizer ({type(e).__name__}: {first})") from None


def make_engine(cfg: RolloutConfig, tokenizer: Any = None) -> RolloutEngine:
    """Build the configured engine (validates the config first)."""
    cfg.validate()
    if cfg.backend == "local":
        from megatron_inpo.rollout.local import LocalEngine

        return LocalEngine.from_pretrained(cfg, tokenizer=tokenizer)
    from megatron_inpo.rollout.sglang import SGLangEngine

    tok_path = cfg.tokenizer_path or cfg.model_path
    if tokenizer is None and tok_path:
        tokenizer = load_tokenizer(tok_path)
    return SGLangEngine(cfg, tokenizer=tokenizer)
