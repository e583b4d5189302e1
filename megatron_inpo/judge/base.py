"""The judge interface: every oracle answers P(a beats b | prompt) for a batch of comparisons at once."""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

from megatron_inpo.config import ConfigError


@dataclass
class Comparison:
    prompt: str
    """Prompt text (the user turn, before any chat template)."""
    a: str
    """Text of the first response."""
    b: str
    """Text of the second response."""
    prompt_ids: list[int] = field(default_factory=list)
    """Token ids of the prompt as fed to the policy (for judges over token ids)."""
    a_ids: list[int] = field(default_factory=list)
    """Token ids of response a."""
    b_ids: list[int] = field(default_factory=list)
    """Token ids of response b."""


class Judge(abc.ABC):
    """An oracle. `compare` must be called with ALL comparisons of a stage round, so judges can batch them."""

    name: str = "judge"
    kind: str = "pairwise"  # "pairwise" or "reward" (rewards allow best/worst-of-K without comparisons)

    def __init__(self) -> None:
        self.comparisons = 0
        """Comparisons answered so far (a pairwise model spends two forward passes on each)."""
        self.calls = 0
        """compare() / score() calls so far (one per tournament round when batched across prompts)."""

    def compare(self, items: Sequence[Comparison]) -> list[float]:
        """P(a beats b | prompt) for every comparison, each in [0, 1]."""
        self.calls += 1
        self.comparisons += len(items)
        if not items:
            return []
        probs = [float(p) for p in self._compare(list(items))]
        if len(probs) != len(items):
            raise RuntimeError(f"judge {self.name!r} returned {len(probs)} probabilities for {len(items)} comparisons")
        for p in probs:
            if not (0.0 <= p <= 1.0) or math.isnan(p):
                raise ValueError(f"judge {self.name!r} returned P={p!r}, not a probability")
        return probs

    @abc.abstractmethod
    def _compare(self, items: list[Comparison]) -> Sequence[float]:
        ...

    def close(self) -> None:
        """Release models / connections."""


class RewardJudge(Judge):
    """A Bradley-Terry reward model: score() per response; compare() = sigmoid(r_a - r_b)."""

    kind = "reward"

    def score(self, items: Sequence[tuple[str, str]], ids: Sequence[tuple[list[int], list[int]]] | None = None
              ) -> list[float]:
        """Reward of each (prompt, response); `ids` gives the matching (prompt_ids, response_ids) if known."""
        self.calls += 1
        if not items:
            return []
        out = [float(r) for r in self._score(list(items), list(ids) if ids is not None else None)]
        if len(out) != len(items) or any(math.isnan(r) for r in out):
            raise RuntimeError(f"judge {self.name!r} returned {len(out)} rewards for {len(items)} responses")
        return out

    @abc.abstractmethod
    def _score(self, items: list[tuple[str, str]], ids: list[tuple[list[int], list[int]]] | None) -> Sequence[float]:
        ...

    def _compare(self, items: list[Comparison]) -> Sequence[float]:
        self.calls -= 1  # the inner score() call is the real one
        r = self.score([(c.prompt, c.a) for c in items] + [(c.prompt, c.b) for c in items],
                       [(c.prompt_ids, c.a_ids) for c in items] + [(c.prompt_ids, c.b_ids) for c in items])
        n = len(items)
        return [1.0 / (1.0 + math.exp(-(r[i] - r[n + i]))) for i in range(n)]


@dataclass
class JudgeConfig:
    kind: Literal["pairwise", "reward", "programmatic", "verifiable"] = "pairwise"
    """'pairwise': a preference model (RLHFlow style); 'reward': a BT reward model; 'programmatic': a callable;
    'verifiable': a benchmark's own checker scores each response (`verifier`); it acts as a reward judge, so the
    default selection is best/worst of K, and the tournament works too (P = 1, 0 or 1/2 on a tie)."""
    backend: Literal["local", "sglang"] = "local"
    """Where the judge model runs: in-process transformers or SGLang servers."""
    model_path: str = ""
    """HF directory of the judge model (local backend; for SGLang its tokenizer renders the prompts)."""
    server_urls: list[str] = field(default_factory=list)
    """SGLang judge servers (reward models need --is-embedding)."""
    function: str = ""
    """'module:function' for kind 'programmatic': f(prompt, a, b) -> P(a beats b)."""
    verifier: Literal["ifbench_loose", "ifbench_strict"] = "ifbench_loose"
    """Kind 'verifiable': the checker. 'ifbench_loose' / 'ifbench_strict': IFBench's official scorer
    (megatron_inpo/task/ifbench.py); a response's score is the fraction of its prompt's instructions it follows
    under the loose / strict check (prompts must be IFBench's, matched by text; judge/verifiable.py)."""
    function_inputs: Literal["text", "ids"] = "text"
    """Programmatic judges: pass texts, or token-id lists (prompt_ids, a_ids, b_ids), to the function."""
    preset: Literal["rlhflow_pm", "chat"] = "rlhflow_pm"
    """Pairwise models: how the judge input is written, for the kind of model the judge is (PAIRWISE_PRESETS).
    'rlhflow_pm': a pairwise preference model trained on RLHFlow's format (RLHFlow/pair-preference-model-LLaMA3-8B):
    '[CONTEXT] {context} [RESPONSE A] ... [RESPONSE B] ...' as one user turn, the context in RLHFlow's
    '<turn> user' format, no generation prompt, a leading BOS text removed; 'chat': an instruction-tuned chat model
    (e.g. SmolLM2-Instruct) asked in words which response is better, the plain prompt as context, the template's
    assistant header appended so that the next token is its answer. The fields below left empty take the
    preset's values; one that is set overrides it."""
    token_a: str = ""
    """Pairwise models: the answer token meaning 'response A is better' (empty: the preset's, 'A')."""
    token_b: str = ""
    """Pairwise models: the answer token meaning 'response B is better' (empty: the preset's, 'B')."""
    template: str = ""
    """Pairwise models: the user turn shown to the judge, with {context}, {response_a}, {response_b} (empty: the
    preset's)."""
    context_format: Literal["", "rlhflow", "chat_template", "plain"] = ""
    """Pairwise models: how {context} is written: 'rlhflow' is the plain '<turn> user' format the RLHFlow PM was
    trained on; 'chat_template' uses the judge tokenizer's own template; 'plain' is the prompt text as it is
    (empty: the preset's)."""
    add_generation_prompt: bool | None = None
    """Pairwise models: append the template's assistant header (RLHFlow's PM reads the answer without it; a chat
    model needs it). Unset (null): the preset's."""
    strip_bos: bool | None = None
    """Pairwise models: remove the BOS text the chat template puts at the start of the input, as the RLHFlow
    reference code does; never done when the BOS token is a turn marker of the template (ChatML models such as
    SmolLM2 use `<|im_start|>` as BOS). Unset (null): the preset's."""
    both_orders: bool = True
    """Pairwise models: average P(A>B) over (a, b) and (b, a) to cancel position bias (two passes each)."""
    batch_size: int = 16
    """Local backend: sequences per forward; SGLang: sequences per request."""
    max_length: int = 4096
    """Judge inputs longer than this (in tokens) are truncated from the left of the context. With an SGLang judge,
    keep it below the server's context length: SGLang refuses (HTTP 400) a prompt of context-length tokens, and the
    pairwise judge also asks for one new token."""
    device: str = "cpu"
    """Local backend: torch device."""
    dtype: str = "float32"
    """Local backend: parameter dtype."""
    timeout_s: float = 600.0
    """SGLang: per-request timeout."""
    max_retries: int = 4
    """SGLang: retries with exponential back-off."""
    backoff_s: float = 1.0
    """SGLang: first retry delay (doubles each retry)."""
    backoff_max_s: float = 30.0
    """SGLang: cap on one retry delay."""
    api_key: str = ""
    """SGLang: the key of servers started with --api-key, sent as `Authorization: Bearer <key>`; empty: none.
    Give it as `env:VAR` to read it from the environment variable VAR when the client starts: the key itself
    then never lands in config.yaml, the manifest or a command line (launch/slurm_inpo.sbatch passes a random
    per-job key this way). A literal key works too but is saved in config.yaml with the rest of the config."""
    concurrency: int = 16
    """SGLang: requests in flight."""

    def validate(self) -> None:
        if self.kind not in ("pairwise", "reward", "programmatic", "verifiable"):
            raise ConfigError(f"judge.kind: must be pairwise, reward, programmatic or verifiable, got {self.kind!r}")
        if self.kind == "verifiable":
            if self.verifier not in VERIFIERS:
                raise ConfigError(f"judge.verifier: one of {list(VERIFIERS)}, got {self.verifier!r}")
            return
        if self.backend not in ("local", "sglang"):
            raise ConfigError(f"judge.backend: must be local or sglang, got {self.backend!r}")
        if self.kind == "programmatic":
            if ":" not in self.function:
                raise ConfigError(f"judge.function: need 'module:function', got {self.function!r}")
            if self.function_inputs not in ("text", "ids"):
                raise ConfigError(f"judge.function_inputs: must be 'text' or 'ids', got {self.function_inputs!r}")
            return
        if self.backend == "sglang" and not self.server_urls:
            raise ConfigError("judge.server_urls: backend 'sglang' needs at least one URL")
        if not self.model_path:
            raise ConfigError("judge.model_path: the judge's HF directory (model or, for SGLang, tokenizer) is needed")
        if self.preset not in PAIRWISE_PRESETS:
            raise ConfigError(f"judge.preset: one of {sorted(PAIRWISE_PRESETS)}, got {self.preset!r}")
        r = self.rendering()
        if r.token_a == r.token_b:
            raise ConfigError("judge.token_a/token_b: must differ")
        for f in ("{context}", "{response_a}", "{response_b}"):
            if f not in r.template:
                raise ConfigError(f"judge.template: missing placeholder {f}")
        if self.batch_size < 1 or self.concurrency < 1 or self.max_length < 8:
            raise ConfigError("judge.batch_size/concurrency must be >= 1 and max_length >= 8")


    def rendering(self) -> "PairwiseRendering":
        """The pairwise judge's input format: the preset's, with every field that is set laid on top."""
        base = PAIRWISE_PRESETS[self.preset]
        return PairwiseRendering(
            token_a=self.token_a or base.token_a, token_b=self.token_b or base.token_b,
            template=self.template or base.template, context_format=self.context_format or base.context_format,
            add_generation_prompt=(base.add_generation_prompt if self.add_generation_prompt is None
                                   else self.add_generation_prompt),
            strip_bos=base.strip_bos if self.strip_bos is None else self.strip_bos)


@dataclass(frozen=True)
class PairwiseRendering:
    """How a pairwise judge writes its input and reads its answer (JudgeConfig.rendering())."""

    token_a: str
    token_b: str
    template: str
    context_format: str
    add_generation_prompt: bool
    strip_bos: bool


PAIRWISE_PRESETS: dict[str, PairwiseRendering] = {
    # RLHFlow/pair-preference-model-LLaMA3-8B, as its authors' reference pipeline feeds it
    "rlhflow_pm": PairwiseRendering(
        token_a="A", token_b="B",
        template="[CONTEXT] {context} [RESPONSE A] {response_a} [RESPONSE B] {response_b} \n",
        context_format="rlhflow", add_generation_prompt=False, strip_bos=True),
    # an instruction-tuned chat model as judge: asked in words, its answer is the first token of its reply
    "chat": PairwiseRendering(
        token_a="A", token_b="B",
        template="Which response answers the request better?\n\n[REQUEST]\n{context}\n\n[RESPONSE A]\n{response_a}"
                 "\n\n[RESPONSE B]\n{response_b}\n\nReply with one letter: A or B.",
        context_format="plain", add_generation_prompt=True, strip_bos=False),
}
"""judge.preset -> the pairwise input format (README: "Judges")."""


VERIFIERS = ("ifbench_loose", "ifbench_strict")
"""judge.verifier values (kind 'verifiable')."""


def make_judge(cfg: JudgeConfig) -> Judge:
    """Build the configured judge (validates the config first)."""
    cfg.validate()
    if cfg.kind == "verifiable":
        from megatron_inpo.judge.verifiable import IFBenchJudge

        return IFBenchJudge(mode=cfg.verifier.removeprefix("ifbench_"))
    if cfg.kind == "programmatic":
        import importlib

        mod, _, fn = cfg.function.partition(":")
        try:
            func: Any = getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"judge.function: cannot load {cfg.function!r}: {e}") from None
        from megatron_inpo.judge.programmatic import ProgrammaticJudge

        return ProgrammaticJudge(pref_fn=func, inputs=cfg.function_inputs, name=f"programmatic:{cfg.function}")
    if cfg.kind == "pairwise":
        from megatron_inpo.judge.pairwise import PairwiseJudge

        return PairwiseJudge.from_config(cfg)
    from megatron_inpo.judge.reward import make_reward_judge

    return make_reward_judge(cfg)
