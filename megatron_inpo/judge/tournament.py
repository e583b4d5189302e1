"""Pair selection from K responses per prompt, batched across prompts (one judge call per round for ALL prompts).

- tournament (INPO, paper section 4.1), K a power of two: round 1 plays (0,1), (2,3), ...; then the winners play
  winners and the losers play losers, in bracket order, until one overall winner y_w and one overall loser y_l.
  P(a beats b) >= 0.5 wins for a (a tie goes to the first). Finally y_w plays y_l; the pair is kept only when
  P(y_w beats y_l) > 0.5. Comparisons: K/2 (round 1) + 2 (K/2 - 1) (the brackets) + 1 (final) = 3K/2 - 1.
- best_worst (reward models): y_w = highest reward, y_l = lowest (first index on ties); K scores, dropped when
  all rewards are equal.
- all_pairs (SPPO's estimate): every unordered pair once, K(K-1)/2 comparisons; y_w / y_l = highest / lowest win
  rate. The win rate of i (`winrate`): 'uclaml' (default), as uclaml/SPPO's compute_prob.py, the mean over ALL K
  responses j of P(i beats j) with P(i beats i) = 1/2; 'others', the mean over the K - 1 others j != i. Both
  rank the responses alike (uclaml - 1/2 = (K-1)/K (others - 1/2)), so only the stored win rates differ.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Literal, Sequence

from megatron_inpo.config import ConfigError
from megatron_inpo.data.preferences import PreferencePair
from megatron_inpo.judge.base import Comparison, Judge, RewardJudge
from megatron_inpo.rollout.engine import Rollout

log = logging.getLogger(__name__)

Method = Literal["auto", "tournament", "best_worst", "all_pairs"]
WINRATES = ("uclaml", "others")
"""Definitions of the all-pairs win rate (module docstring)."""


def tournament_comparisons(k: int) -> int:
    """Comparisons the tournament makes for K responses: 3K/2 - 1 (K=2: 2, 4: 5, 8: 11, 16: 23)."""
    check_method("tournament", k)
    return 3 * k // 2 - 1


def all_pairs_comparisons(k: int) -> int:
    """Comparisons of the all-pairs (SPPO) estimate: K(K-1)/2 (K=8: 28)."""
    return k * (k - 1) // 2


def check_method(method: str, k: int) -> None:
    """Whether pair selection `method` (resolved: not 'auto') can pair K = `k` samples per prompt; ConfigError
    naming rollout.sampling.n otherwise (the tournament needs K a power of two >= 2)."""
    if method == "tournament" and (k < 2 or k & (k - 1)):
        raise ConfigError(f"rollout.sampling.n: the tournament needs K a power of two >= 2, got {k}")


@dataclass
class Selection:
    chosen: int
    """Index of y_w among the K responses."""
    rejected: int
    """Index of y_l."""
    chosen_prob: float | None = None
    """P(y_w beats y_l): the final check (tournament / all-pairs) or sigmoid(r_w - r_l) (reward models)."""
    chosen_winrate: float | None = None
    """all_pairs: estimated P(y_w beats pi_t)."""
    rejected_winrate: float | None = None
    """all_pairs: estimated P(y_l beats pi_t)."""
    extra: dict = field(default_factory=dict)
    """Every match as [i, j, P(i beats j)], or the rewards, for the record."""


class _Bracket:
    """Tournament state of one prompt."""

    def __init__(self, k: int) -> None:
        self.pending: list[tuple[str, int, int]] = [("first", 2 * i, 2 * i + 1) for i in range(k // 2)]
        self.winners: list[int] = []
        self.losers: list[int] = []
        self.matches: list[list] = []
        self.result: Selection | None = None
        self.done = False

    def feed(self, probs: Sequence[float]) -> None:
        new_w, new_l = [], []
        final = None
        for (stage, a, b), p in zip(self.pending, probs):
            self.matches.append([a, b, p])
            a_wins = p >= 0.5  # a tie goes to the first
            if stage == "first":
                new_w.append(a if a_wins else b)
                new_l.append(b if a_wins else a)
            elif stage == "winners":
                new_w.append(a if a_wins else b)
            elif stage == "losers":
                new_l.append(b if a_wins else a)
            else:
                final = (a, b, p)
        if final is not None:
            a, b, p = final
            self.result = Selection(a, b, chosen_prob=p, extra={"matches": self.matches}) if p > 0.5 else None
            self.done, self.pending = True, []
            return
        # the two brackets shrink in step (K is a power of two), so each round replaces both lists
        self.winners = new_w or self.winners
        self.losers = new_l or self.losers
        nxt: list[tuple[str, int, int]] = []
        if len(self.winners) > 1:
            nxt += [("winners", self.winners[i], self.winners[i + 1]) for i in range(0, len(self.winners), 2)]
        if len(self.losers) > 1:
            nxt += [("losers", self.losers[i], self.losers[i + 1]) for i in range(0, len(self.losers), 2)]
        if not nxt:
            nxt = [("final", self.winners[0], self.losers[0])]
        self.pending = nxt


def _comparison(r: Rollout, i: int, j: int) -> Comparison:
    a, b = r.completions[i], r.completions[j]
    return Comparison(prompt=r.prompt.prompt, a=a.text, b=b.text, prompt_ids=r.prompt_ids, a_ids=a.token_ids,
                      b_ids=b.token_ids)


def _tournament(rollouts: Sequence[Rollout], judge: Judge) -> list[Selection | None]:
    brackets = []
    for r in rollouts:
        check_method("tournament", len(r.completions))
        brackets.append(_Bracket(len(r.completions)))
    while not all(b.done for b in brackets):
        batch = [_comparison(r, i, j) for r, b in zip(rollouts, brackets) for _, i, j in b.pending]
        probs = judge.compare(batch)  # one call per round over every prompt
        pos = 0
        for b in brackets:
            m = len(b.pending)
            if m:
                b.feed(probs[pos:pos + m])
                pos += m
    return [b.result for b in brackets]


def winrates(table: Sequence[Sequence[float]], winrate: str = "uclaml") -> list[float]:
    """Win rate of each response from the K x K table of P(i beats j) (the diagonal is ignored)."""
    k = len(table)
    if winrate == "uclaml":  # self counted at 1/2, mean over all K
        return [(sum(table[i][j] for j in range(k) if j != i) + 0.5) / k for i in range(k)]
    if winrate == "others":
        return [sum(table[i][j] for j in range(k) if j != i) / (k - 1) for i in range(k)]
    raise ValueError(f"unknown win-rate definition {winrate!r}: one of {WINRATES}")


def _all_pairs(rollouts: Sequence[Rollout], judge: Judge, winrate: str = "uclaml") -> list[Selection | None]:
    batch, index = [], []
    for n, r in enumerate(rollouts):
        k = len(r.completions)
        if k < 2:
            raise ValueError(f"prompt {r.prompt.id!r}: all-pairs needs K >= 2, got {k}")
        for i in range(k):
            for j in range(i + 1, k):
                batch.append(_comparison(r, i, j))
                index.append((n, i, j))
    probs = judge.compare(batch)
    tables = [[[0.0] * len(r.completions) for _ in r.completions] for r in rollouts]
    matches: list[list] = [[] for _ in rollouts]
    for (n, i, j), p in zip(index, probs):
        tables[n][i][j], tables[n][j][i] = p, 1.0 - p
        matches[n].append([i, j, p])
    out: list[Selection | None] = []
    for n, t in enumerate(tables):
        k = len(t)
        rates = winrates(t, winrate)
        w = max(range(k), key=lambda i: (rates[i], -i))
        l_ = min(range(k), key=lambda i: (rates[i], i))
        if rates[w] <= rates[l_]:
            out.append(None)
            continue
        out.append(Selection(w, l_, chosen_prob=t[w][l_], chosen_winrate=rates[w], rejected_winrate=rates[l_],
                             extra={"matches": matches[n], "winrates": rates, "winrate": winrate}))
    return out


def _best_worst(rollouts: Sequence[Rollout], judge: Judge) -> list[Selection | None]:
    if not isinstance(judge, RewardJudge) or judge.kind != "reward":
        raise ValueError(f"best_worst needs a reward judge; {judge.name!r} is {judge.kind}")
    items, ids, spans = [], [], []
    for r in rollouts:
        spans.append((len(items), len(r.completions)))
        items += [(r.prompt.prompt, c.text) for c in r.completions]
        ids += [(r.prompt_ids, c.token_ids) for c in r.completions]
    rewards = judge.score(items, ids)  # one call for every response of every prompt
    out: list[Selection | None] = []
    for start, k in spans:
        rw = rewards[start:start + k]
        w = max(range(k), key=lambda i: (rw[i], -i))
        l_ = min(range(k), key=lambda i: (rw[i], i))
        if rw[w] <= rw[l_]:
            out.append(None)
            continue
        out.append(Selection(w, l_, chosen_prob=1.0 / (1.0 + math.exp(-(rw[w] - rw[l_]))), extra={"rewards": rw}))
    return out


METHODS = ("auto", "tournament", "best_worst", "all_pairs")


def resolve_method(method: Method | str, judge_kind: str, objective_name: str = "") -> str:
    """The pair selection that `method` means for a judge of kind `judge_kind` ('pairwise', 'reward',
    'programmatic', 'verifiable') and the objective `objective_name`: 'auto' is all_pairs for sppo (it needs win rates), else
    best_worst for reward models and the tournament for the others. ConfigError for an unknown method."""
    if method == "auto":
        if objective_name == "sppo":
            return "all_pairs"
        return "best_worst" if judge_kind in ("reward", "verifiable") else "tournament"
    if method not in METHODS:
        raise ConfigError(f"unknown pair-selection method {method!r}: auto, tournament, best_worst or all_pairs")
    return method


def select_pairs(rollouts: Sequence[Rollout], judge: Judge, method: Method = "auto",
                 winrate: str = "uclaml") -> list[Selection | None]:
    """One Selection (or None when the prompt yields no pair) per rollout, judged in batches across prompts;
    `winrate` is the all-pairs win-rate definition (WINRATES)."""
    if not rollouts:
        return []
    m = resolve_method(method, judge.kind)
    if m == "all_pairs":
        return _all_pairs(rollouts, judge, winrate)
    return {"tournament": _tournament, "best_worst": _best_worst}[m](rollouts, judge)


def build_preferences(rollouts: Sequence[Rollout], judge: Judge, method: Method = "auto", iteration: int = 1,
                      model_version: str = "", winrate: str = "uclaml") -> tuple[list[PreferencePair], list[str], dict]:
    """Select pairs and build PreferencePair records; returns (pairs, dropped prompt ids, stats)."""
    c0, k0, t0 = judge.comparisons, judge.calls, time.perf_counter()
    m = resolve_method(method, judge.kind) if rollouts else method
    sels = select_pairs(rollouts, judge, method, winrate)
    dt = time.perf_counter() - t0
    pairs, dropped = [], []
    for r, s in zip(rollouts, sels):
        if s is None:
            dropped.append(r.prompt.id)
            continue
        w, l_ = r.completions[s.chosen], r.completions[s.rejected]
        extra = dict(s.extra)
        extra.update({"method": m, "chosen_index": s.chosen, "rejected_index": s.rejected,
                      "finish_reasons": [w.finish_reason, l_.finish_reason]})
        if r.prompt.extra:
            extra["prompt_extra"] = r.prompt.extra
        pairs.append(PreferencePair(
            prompt_id=r.prompt.id, prompt=r.prompt.prompt, prompt_ids=list(r.prompt_ids), chosen=w.text,
            rejected=l_.text, chosen_ids=list(w.token_ids), rejected_ids=list(l_.token_ids), iteration=iteration,
            model_version=model_version, judge=judge.name, chosen_prob=s.chosen_prob,
            chosen_winrate=s.chosen_winrate, rejected_winrate=s.rejected_winrate, extra=extra))
    stats = {"prompts": len(rollouts), "pairs": len(pairs), "dropped": len(dropped),
             "comparisons": judge.comparisons - c0, "judge_calls": judge.calls - k0, "judge_seconds": dt,
             "comparisons_per_s": (judge.comparisons - c0) / max(dt, 1e-9)}
    log.info("judge %s (%s): %d prompts -> %d pairs, %d dropped, %d comparisons in %d calls, %.2f s",
             judge.name, m, len(rollouts), len(pairs), len(dropped), stats["comparisons"], stats["judge_calls"], dt)
    return pairs, dropped, stats
