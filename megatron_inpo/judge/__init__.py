"""Judging: turn K responses per prompt into one preference pair (Algorithm 1, step 4).

API summary::

    from megatron_inpo.judge import (Comparison, Judge, RewardJudge, ProgrammaticJudge, JudgeConfig, make_judge,
                                     select_pairs, build_preferences, tournament_comparisons)

    Judge.compare(list[Comparison]) -> list[float]     # P(a beats b | prompt) per comparison, ONE batched call
    Comparison(prompt, a, b, prompt_ids, a_ids, b_ids) # texts (what a PM/RM reads) and token ids
    RewardJudge.score(list[(prompt, response)]) -> list[float]   # BT rewards; compare() = sigmoid(r_a - r_b)

    Judges:
      ProgrammaticJudge(pref_fn=f(prompt, a, b) -> P)            # verifiable tasks / tests; or
      ProgrammaticJudge(score_fn=f(prompt, response) -> reward)  # reward-style (kind "reward");
      batch variants pref_batch_fn / score_batch_fn take list[Comparison] / list[(prompt, response)];
      inputs="ids" passes token-id lists instead of texts.
      PairwiseJudge over LocalPairwiseBackend (transformers) or SGLangPairwiseBackend (HTTP): RLHFlow prompt
        "[CONTEXT] {context} [RESPONSE A] {A} [RESPONSE B] {B}", P(A>B) = softmax over the next-token logits of
        "A" and "B", averaged over both orders.
      LocalRewardJudge (transformers *ForSequenceClassification) / SGLangRewardJudge (/classify, embedding[0]).

    Pair selection (tournament.py), batched across prompts (one judge call per bracket round for all prompts):
      select_pairs(rollouts, judge, method, winrate="uclaml") -> list[Selection | None]  (None = dropped)
        "tournament": K a power of two; winners/losers brackets, tie -> the first, final y_w vs y_l check kept
                      only if P > 0.5; exactly tournament_comparisons(K) = 3K/2 - 1 comparisons (K=8: 11).
        "best_worst": reward judges: argmax / argmin reward (K scores, no comparisons); dropped when all equal.
        "all_pairs":  SPPO: K(K-1)/2 comparisons; win rate_i = mean over all K j of P(i beats j), P(i beats i) =
                      1/2 (uclaml; winrate="others": mean over j != i); chosen/rejected = max/min
                      win rate, stored in chosen_winrate / rejected_winrate.
      build_preferences(rollouts, judge, method, iteration, model_version, winrate) -> (pairs, dropped_ids, stats)
"""
from megatron_inpo.judge.base import Comparison, Judge, JudgeConfig, RewardJudge, make_judge  # noqa: F401
from megatron_inpo.judge.programmatic import ProgrammaticJudge  # noqa: F401
from megatron_inpo.judge.tournament import (  # noqa: F401
    Selection,
    all_pairs_comparisons,
    build_preferences,
    select_pairs,
    tournament_comparisons,
)
