"""A judge that is a Python function: for verifiable tasks (the synthetic task's oracle) and tests."""
from __future__ import annotations

from typing import Any, Callable, Literal, Sequence

from megatron_inpo.judge.base import Comparison, RewardJudge


class ProgrammaticJudge(RewardJudge):
    """Wrap P(a beats b | prompt) or a reward function.

    Give exactly one of: pref_fn(prompt, a, b) -> P, pref_batch_fn(list[Comparison]) -> list[P],
    score_fn(prompt, response) -> reward, score_batch_fn(list[(prompt, response)]) -> list[reward].
    inputs="ids" passes token-id lists (prompt_ids, a_ids, b_ids) to pref_fn / score_fn instead of texts.
    With a reward function the judge is of kind 'reward' (best/worst-of-K applies) and compare() is BT.
    """

    def __init__(self, pref_fn: Callable[..., float] | None = None,
                 pref_batch_fn: Callable[[list[Comparison]], Sequence[float]] | None = None,
                 score_fn: Callable[..., float] | None = None,
                 score_batch_fn: Callable[[list[tuple[Any, Any]]], Sequence[float]] | None = None,
                 inputs: Literal["text", "ids"] = "text", name: str = "programmatic") -> None:
        super().__init__()
        given = [f for f in (pref_fn, pref_batch_fn, score_fn, score_batch_fn) if f is not None]
        if len(given) != 1:
            raise ValueError("ProgrammaticJudge needs exactly one of pref_fn, pref_batch_fn, score_fn, score_batch_fn")
        if inputs not in ("text", "ids"):
            raise ValueError(f"inputs must be 'text' or 'ids', got {inputs!r}")
        self.pref_fn, self.pref_batch_fn = pref_fn, pref_batch_fn
        self.score_fn, self.score_batch_fn = score_fn, score_batch_fn
        self.inputs = inputs
        self.name = name
        self.kind = "reward" if (score_fn or score_batch_fn) else "pairwise"

    def _compare(self, items: list[Comparison]) -> Sequence[float]:
        if self.pref_batch_fn is not None:
            return self.pref_batch_fn(items)
        if self.pref_fn is not None:
            if self.inputs == "ids":
                return [self.pref_fn(c.prompt_ids, c.a_ids, c.b_ids) for c in items]
            return [self.pref_fn(c.prompt, c.a, c.b) for c in items]
        return super()._compare(items)

    def _score(self, items: list[tuple[str, str]], ids: list[tuple[list[int], list[int]]] | None) -> Sequence[float]:
        args = ids if (self.inputs == "ids" and ids is not None) else items
        if self.score_batch_fn is not None:
            return self.score_batch_fn(args)
        if self.score_fn is None:
            raise TypeError(f"judge {self.name!r} is pairwise: it has no reward scores")
        return [self.score_fn(p, r) for p, r in args]
