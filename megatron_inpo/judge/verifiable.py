"""A verifiable judge: IFBench's official checker scores each response (megatron_inpo/task/ifbench.py).

Score of a response = the fraction of its prompt's instructions it follows, strict or loose as configured, over the
instructions whose checker ran (a checker that failed to run is never a miss; task/ifbench.py). The prompt text
(the user turn, before any chat template) is looked up among the IFBench prompts, as the benchmark's own
evaluation_lib does; a prompt that is not one of them is an error naming it.

Two ways in, both fitting the existing selections (judge/tournament.py) and their tie rules:

  IFBenchJudge(mode="loose")          a RewardJudge (kind "reward"): best_worst takes the highest / lowest score
                                      (first index on ties; a prompt whose K scores are all equal yields no pair);
                                      its compare() is the verifier's certainty: P(a beats b) = 1 if a follows
                                      more instructions, 0 if fewer, 1/2 on a tie, so the tournament's tie rule
                                      applies (a tie goes to the first; the final y_w vs y_l is kept only when
                                      y_w follows strictly more).
  judge.kind=programmatic judge.function=megatron_inpo.judge.verifiable:ifbench_loose   (or :ifbench_strict)
                                      the same P(a beats b) as a programmatic pairwise judge (tournament).

A response none of whose instructions could be checked has no score: against anything it ties (P = 1/2), and under
best_worst every response of its prompt in that call gets the same score, so that prompt yields no pair rather
than a pair decided by a checker that crashed. `unchecked` counts such responses.
"""
from __future__ import annotations

import functools
import logging
from typing import Sequence

from megatron_inpo.judge.base import Comparison, RewardJudge

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _prompt_index() -> dict:
    from megatron_inpo.task.ifbench import load_prompts

    return {p.prompt: p for p in load_prompts()}


def _lookup(index: dict, prompt: str):
    from megatron_inpo.task.ifbench import IFBenchError

    try:
        return index[prompt]
    except KeyError:
        raise IFBenchError(f"verifiable judge: prompt {prompt[:60]!r}... is not an IFBench prompt (the judge "
                           "scores only IFBench's prompts, matched by their exact text)") from None


@functools.lru_cache(maxsize=65536)
def _cached_score(prompt: str, response: str, mode: str) -> float | None:
    # a tournament shows a response in about three comparisons; the check itself is deterministic
    from megatron_inpo.task.ifbench import score_response

    return score_response(_lookup(_prompt_index(), prompt), response, mode)


def preference(score_a: float | None, score_b: float | None) -> float:
    """P(a beats b) of a verifier: 1, 0, or 1/2 on a tie or when either side could not be checked."""
    if score_a is None or score_b is None or score_a == score_b:
        return 0.5
    return 1.0 if score_a > score_b else 0.0


def ifbench_loose(prompt: str, a: str, b: str) -> float:
    """P(a beats b | prompt) under IFBench's loose check (judge.kind=programmatic)."""
    return preference(_cached_score(prompt, a, "loose"), _cached_score(prompt, b, "loose"))


def ifbench_strict(prompt: str, a: str, b: str) -> float:
    """P(a beats b | prompt) under IFBench's strict check (judge.kind=programmatic)."""
    return preference(_cached_score(prompt, a, "strict"), _cached_score(prompt, b, "strict"))


class IFBenchJudge(RewardJudge):
    """IFBench's checker as a reward judge (module docstring). `prompts` (IFBenchPrompt records) default to the
    package's whole test set; pass the split's prompts to refuse anything else."""

    kind = "reward"

    def __init__(self, mode: str = "loose", prompts: Sequence | None = None) -> None:
        from megatron_inpo.task.ifbench import MODES, IFBenchError, scorer

        super().__init__()
        if mode not in MODES:
            raise IFBenchError(f"verifiable judge: mode must be strict or loose, got {mode!r}")
        scorer()  # fail now, with the install hint, not at the first judge call
        self.mode = mode
        self.name = f"verifiable:ifbench-{mode}"
        self._index = _prompt_index() if prompts is None else {p.prompt: p for p in prompts}
        self._cache: dict[tuple[str, str], float | None] = {}
        self.unchecked = 0
        """Responses none of whose instructions could be checked, so far."""

    def response_score(self, prompt: str, response: str) -> float | None:
        """Fraction of the instructions followed, or None when no checker ran."""
        key = (prompt, response)
        if key not in self._cache:
            from megatron_inpo.task.ifbench import score_response

            if len(self._cache) >= 65536:  # bounded: one iteration's responses, not the run's
                self._cache.clear()
            self._cache[key] = score_response(_lookup(self._index, prompt), response, self.mode)
        return self._cache[key]

    def _score(self, items: list[tuple[str, str]], ids) -> Sequence[float]:
        raw = [self.response_score(p, r) for p, r in items]
        spoiled = {p for (p, _), s in zip(items, raw) if s is None}
        self.unchecked += sum(s is None for s in raw)
        if spoiled:
            log.warning("verifiable judge: %d responses to %d prompts could not be checked; those prompts yield no "
                        "best/worst pair", sum(s is None for s in raw), len(spoiled))
        # equal scores for every response of a spoiled prompt: best_worst then drops it (module docstring)
        return [0.0 if p in spoiled else float(s) for (p, _), s in zip(items, raw)]

    def _compare(self, items: list[Comparison]) -> Sequence[float]:
        out = []
        for c in items:
            sa, sb = self.response_score(c.prompt, c.a), self.response_score(c.prompt, c.b)
            self.unchecked += (sa is None) + (sb is None)
            out.append(preference(sa, sb))
        return out
