"""Pair selection: the paper's tournament (hand-worked brackets, exact comparison counts, ties, the final-check
drop), batching across prompts, all-pairs win rates (SPPO) and best/worst-of-K."""
import itertools
import math
import random

import pytest

from megatron_inpo.data.prompts import PromptRecord
from megatron_inpo.judge import (ProgrammaticJudge, all_pairs_comparisons, build_preferences, select_pairs,
                                 tournament_comparisons)
from megatron_inpo.rollout.engine import Completion, Rollout


def rollout(pid, k, scores=None):
    """K responses whose text is the response index; scores ride along in the token ids."""
    comps = [Completion(text=str(i), token_ids=[10 + i, 2], finish_reason="stop") for i in range(k)]
    return Rollout(PromptRecord(id=pid, prompt=f"p{pid}", extra={"scores": scores}), [1, 5], comps)


def score_judge(scores_by_prompt, log=None):
    """P(a beats b) = 1, 0 or 0.5 (tie) from per-prompt scores; records each batch it is called with."""
    def batch(items):
        if log is not None:
            log.append([(c.prompt, int(c.a), int(c.b)) for c in items])
        out = []
        for c in items:
            s = scores_by_prompt[c.prompt]
            sa, sb = s[int(c.a)], s[int(c.b)]
            out.append(1.0 if sa > sb else 0.0 if sa < sb else 0.5)
        return out
    return ProgrammaticJudge(pref_batch_fn=batch)


def test_comparison_counts_formula():
    assert [tournament_comparisons(k) for k in (2, 4, 8, 16, 32)] == [2, 5, 11, 23, 47]
    assert [all_pairs_comparisons(k) for k in (2, 4, 8)] == [1, 6, 28]
    for k in (3, 6, 1, 0):
        with pytest.raises(ValueError, match="power of two"):
            tournament_comparisons(k)


def test_hand_worked_bracket_k8_with_ties():
    # scores: R1 (0,1)->1 | (2,3)->2 | (4,5)->5 | (6,7) tie->6 ; W=[1,2,5,6] L=[0,3,4,7]
    # R2 winners (1,2) tie->1, (5,6)->6 ; losers (0,3)->loser 3, (4,7)->loser 4
    # R3 winners (1,6)->6 ; losers (3,4)->loser 4 ; final (6,4): 7 > 0 -> kept, y_w=6 y_l=4
    scores = [3, 5, 5, 1, 0, 2, 7, 7]
    log = []
    judge = score_judge({"px": scores}, log)
    (sel,) = select_pairs([rollout("x", 8)], judge, "tournament")
    assert (sel.chosen, sel.rejected, sel.chosen_prob) == (6, 4, 1.0)
    assert log == [
        [("px", 0, 1), ("px", 2, 3), ("px", 4, 5), ("px", 6, 7)],
        [("px", 1, 2), ("px", 5, 6), ("px", 0, 3), ("px", 4, 7)],
        [("px", 1, 6), ("px", 3, 4)],
        [("px", 6, 4)],
    ]
    assert judge.comparisons == 11 and judge.calls == 4
    assert [m[:2] for m in sel.extra["matches"]] == [list(m[1:]) for r in log for m in r]


def test_final_check_drops_pair_unless_winner_wins():
    # K=4 with an intransitive judge: 0 beats 1, 2 beats 3, 0 beats 2, 1 beats 3 (loser 3), but 3 beats 0.
    table = {(0, 1): 0.9, (2, 3): 0.8, (0, 2): 0.6, (1, 3): 0.7, (0, 3): 0.3}
    judge = ProgrammaticJudge(pref_fn=lambda p, a, b: table[(int(a), int(b))])
    (sel,) = select_pairs([rollout("y", 4)], judge, "tournament")
    assert sel is None and judge.comparisons == 5
    table[(0, 3)] = 0.5  # a tie in the final check is not a win either
    assert select_pairs([rollout("y", 4)], judge, "tournament") == [None]
    table[(0, 3)] = 0.51
    (sel,) = select_pairs([rollout("y", 4)], judge, "tournament")
    assert (sel.chosen, sel.rejected, sel.chosen_prob) == (0, 3, 0.51)


def test_all_equal_is_dropped():
    judge = ProgrammaticJudge(pref_fn=lambda p, a, b: 0.5)
    assert select_pairs([rollout("z", 8)], judge, "tournament") == [None]


@pytest.mark.parametrize("k", [2, 4, 8, 16])
def test_strict_order_finds_max_and_min_batched_across_prompts(k):
    rng = random.Random(k)
    n = 5
    scores = {f"p{i}": rng.sample(range(100), k) for i in range(n)}
    log = []
    judge = score_judge(scores, log)
    sels = select_pairs([rollout(str(i), k) for i in range(n)], judge, "tournament")
    for i, s in enumerate(sels):
        sc = scores[f"p{i}"]
        assert (s.chosen, s.rejected) == (sc.index(max(sc)), sc.index(min(sc)))
    # one judge call per round for ALL prompts: log2(K) bracket rounds + the final check
    assert judge.calls == int(math.log2(k)) + 1 == len(log)
    assert judge.comparisons == n * tournament_comparisons(k)
    # round 1: K/2 matches; round r > 1: K/2^r in each of the two brackets; then the final
    rounds = [k // 2] + [2 * (k >> r) for r in range(2, int(math.log2(k)) + 1)] + [1]
    assert [len(b) for b in log] == [n * m for m in rounds] and sum(rounds) == tournament_comparisons(k)


def test_all_pairs_winrates_match_brute_force():
    k = 6
    rng = random.Random(0)
    P = {}
    for i, j in itertools.combinations(range(k), 2):
        P[(i, j)] = rng.random()
        P[(j, i)] = 1 - P[(i, j)]
    judge = ProgrammaticJudge(pref_fn=lambda p, a, b: P[(int(a), int(b))])
    (sel,) = select_pairs([rollout("w", k)], judge, "all_pairs", winrate="others")
    rates = [sum(P[(i, j)] for j in range(k) if j != i) / (k - 1) for i in range(k)]
    assert judge.comparisons == all_pairs_comparisons(k) == 15 and judge.calls == 1
    assert sel.chosen == max(range(k), key=rates.__getitem__) and sel.rejected == min(range(k), key=rates.__getitem__)
    assert sel.chosen_winrate == pytest.approx(rates[sel.chosen], abs=1e-12)
    assert sel.rejected_winrate == pytest.approx(rates[sel.rejected], abs=1e-12)
    assert sel.chosen_prob == pytest.approx(P[(sel.chosen, sel.rejected)])
    assert sum(rates) == pytest.approx(k / 2)  # P(i>j) + P(j>i) = 1 over every pair


def test_best_worst_reward_and_pairwise_rejected():
    rewards = {"0": 0.5, "1": 2.0, "2": -1.0, "3": 2.0}
    judge = ProgrammaticJudge(score_fn=lambda p, r: rewards[r])
    assert judge.kind == "reward"
    (sel,) = select_pairs([rollout("v", 4)], judge)  # auto -> best_worst
    assert (sel.chosen, sel.rejected) == (1, 2)  # tie for best -> the first
    assert sel.chosen_prob == pytest.approx(1 / (1 + math.exp(-3.0)))
    assert judge.comparisons == 0 and judge.calls == 1
    flat = ProgrammaticJudge(score_fn=lambda p, r: 1.0)
    assert select_pairs([rollout("v", 4)], flat) == [None]
    with pytest.raises(ValueError, match="needs a reward judge"):
        select_pairs([rollout("v", 4)], ProgrammaticJudge(pref_fn=lambda p, a, b: 0.7), "best_worst")
    # a reward judge can also play the tournament through Bradley-Terry probabilities
    (sel,) = select_pairs([rollout("v", 4)], judge, "tournament")
    assert (sel.chosen, sel.rejected) == (1, 2)


def test_build_preferences_records():
    scores = {"p0": [1, 4, 3, 2], "p1": [2, 2, 2, 2]}
    judge = score_judge(scores)
    judge.name = "oracle"
    pairs, dropped, stats = build_preferences([rollout("0", 4), rollout("1", 4)], judge, "tournament",
                                              iteration=2, model_version="it1")
    assert dropped == ["1"] and len(pairs) == 1
    p = pairs[0]
    assert (p.prompt_id, p.chosen, p.rejected, p.chosen_ids, p.rejected_ids) == ("0", "1", "0", [11, 2], [10, 2])
    assert (p.iteration, p.model_version, p.judge, p.chosen_prob) == (2, "it1", "oracle", 1.0)
    assert p.extra["method"] == "tournament" and len(p.extra["matches"]) == 5
    assert stats["comparisons"] == 10 and stats["judge_calls"] == 3


def test_judge_output_validated():
    bad = ProgrammaticJudge(pref_batch_fn=lambda items: [1.5] * len(items))
    with pytest.raises(ValueError, match="not a probability"):
        select_pairs([rollout("u", 2)], bad, "tournament")
    short = ProgrammaticJudge(pref_batch_fn=lambda items: [0.5])
    with pytest.raises(RuntimeError, match="returned 1 probabilities for 4"):
        select_pairs([rollout("u", 8)], short, "tournament")


def test_programmatic_judge_over_token_ids():
    # the synthetic task's oracle reads token ids: here "the response whose first token is larger wins"
    judge = ProgrammaticJudge(pref_fn=lambda p, a, b: 1.0 if a[0] > b[0] else 0.0, inputs="ids")
    (sel,) = select_pairs([rollout("i", 8)], judge)
    assert (sel.chosen, sel.rejected) == (7, 0)  # token ids are 10 + index
    seen = []
    rj = ProgrammaticJudge(score_fn=lambda p, r: seen.append(p) or -r[0], inputs="ids")
    (sel,) = select_pairs([rollout("i", 4)], rj)
    assert (sel.chosen, sel.rejected) == (0, 3) and seen == [[1, 5]] * 4
    with pytest.raises(ValueError, match="exactly one of"):
        ProgrammaticJudge(pref_fn=len, score_fn=len)
