"""SPPO's all-pairs win rate as uclaml/SPPO's compute_prob.py defines it, on a K = 5 example worked by hand.

compute_prob.py fills a K x K matrix prb[i][j] = P(y_i beats y_j) for ALL i, j (the diagonal is 1/2) and takes
win rate_i = sum_j prb[i][j] / K. Our earlier definition ('others') averages over the K - 1 responses j != i.
"""
import pytest

from megatron_inpo.config import ConfigError, apply_overrides, validate_all
from megatron_inpo.data.prompts import PromptRecord
from megatron_inpo.driver.recipes import get_recipe
from megatron_inpo.judge import ProgrammaticJudge, build_preferences, select_pairs
from megatron_inpo.judge.tournament import winrates
from megatron_inpo.rollout.engine import Completion, Rollout

# P(i beats j) for i < j; the judge is asked only these (all-pairs plays every unordered pair once).
UPPER = {(0, 1): 0.9, (0, 2): 0.8, (0, 3): 0.7, (0, 4): 0.6,
         (1, 2): 0.6, (1, 3): 0.3, (1, 4): 0.5,
         (2, 3): 0.4, (2, 4): 0.2,
         (3, 4): 0.7}

# By hand. Row i of prb = [P(i beats j) for j = 0..4], P(j beats i) = 1 - P(i beats j), diagonal 1/2:
#   row 0: 0.5 0.9 0.8 0.7 0.6  sum 3.5  -> uclaml 3.5/5 = 0.70   others (3.5-0.5)/4 = 3.0/4 = 0.75
#   row 1: 0.1 0.5 0.6 0.3 0.5  sum 2.0  -> uclaml 2.0/5 = 0.40   others 1.5/4 = 0.375
#   row 2: 0.2 0.4 0.5 0.4 0.2  sum 1.7  -> uclaml 1.7/5 = 0.34   others 1.2/4 = 0.30
#   row 3: 0.3 0.7 0.6 0.5 0.7  sum 2.8  -> uclaml 2.8/5 = 0.56   others 2.3/4 = 0.575
#   row 4: 0.4 0.5 0.8 0.3 0.5  sum 2.5  -> uclaml 2.5/5 = 0.50   others 2.0/4 = 0.50
# (the row sums add to K^2/2 = 12.5). y_w = 0 (highest), y_l = 2 (lowest), P(y_w beats y_l) = 0.8.
UCLAML = [0.70, 0.40, 0.34, 0.56, 0.50]
OTHERS = [0.75, 0.375, 0.30, 0.575, 0.50]


def _judge():
    def pref(prompt, a, b):
        i, j = int(a), int(b)
        assert i < j, "all-pairs asks each unordered pair once, in index order"
        return UPPER[(i, j)]
    return ProgrammaticJudge(pref_fn=pref, name="k5")


def _rollout():
    comps = [Completion(text=str(i), token_ids=[10 + i, 2], finish_reason="stop") for i in range(5)]
    return Rollout(PromptRecord(id="x", prompt="px"), [1, 5], comps)


@pytest.mark.parametrize("winrate, want", [("uclaml", UCLAML), ("others", OTHERS)])
def test_k5_winrates_match_the_hand_calculation(winrate, want):
    judge = _judge()
    (sel,) = select_pairs([_rollout()], judge, "all_pairs", winrate=winrate)
    assert judge.comparisons == 10 and judge.calls == 1
    assert sel.extra["winrates"] == pytest.approx(want, abs=1e-12)
    assert sel.extra["winrate"] == winrate
    assert (sel.chosen, sel.rejected) == (0, 2)
    assert sel.chosen_winrate == pytest.approx(want[0], abs=1e-12)
    assert sel.rejected_winrate == pytest.approx(want[2], abs=1e-12)
    assert sel.chosen_prob == pytest.approx(0.8, abs=1e-12)


def test_uclaml_is_the_default_and_reaches_the_preference_records():
    (sel,) = select_pairs([_rollout()], _judge(), "all_pairs")
    assert sel.chosen_winrate == pytest.approx(0.70, abs=1e-12)
    (pair,), dropped, _ = build_preferences([_rollout()], _judge(), "all_pairs")
    assert not dropped and (pair.chosen, pair.rejected) == ("0", "2")
    assert (pair.chosen_winrate, pair.rejected_winrate) == pytest.approx((0.70, 0.34), abs=1e-12)
    (pair,), _, _ = build_preferences([_rollout()], _judge(), "all_pairs", winrate="others")
    assert (pair.chosen_winrate, pair.rejected_winrate) == pytest.approx((0.75, 0.30), abs=1e-12)


def test_the_two_definitions_differ_by_the_factor_k_minus_1_over_k_around_one_half():
    table = [[0.5] * 5 for _ in range(5)]
    for (i, j), p in UPPER.items():
        table[i][j], table[j][i] = p, 1 - p
    u, o = winrates(table, "uclaml"), winrates(table, "others")
    for ui, oi in zip(u, o):
        assert ui - 0.5 == pytest.approx(4 / 5 * (oi - 0.5), abs=1e-12)
    with pytest.raises(ValueError, match="win-rate definition"):
        winrates(table, "mean")


def test_sppo_winrate_is_validated_by_name():
    cfg = get_recipe("tiny_cpu")
    assert cfg.algorithm.sppo_winrate == "uclaml"
    validate_all(apply_overrides(cfg, ["algorithm.sppo_winrate=others"]))
    with pytest.raises(ConfigError, match=r"^algorithm\.sppo_winrate: 'uclaml' or 'others'"):
        validate_all(apply_overrides(cfg, ["algorithm.sppo_winrate=self"]))
