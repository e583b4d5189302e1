"""The Nash meter: how far each iterate is from the Nash policy of the KL-regularised preference game (Eq. 3).

Win rate against pi_ref rewards exploiting pi_ref; INPO's claim (Theorem 4) is about the equilibrium. On the game
task (`task.kind: game`, megatron_inpo/task/game.py) every quantity is exact:

- pi(.|x) of a policy: one forward pass of its HF export (transformers, CPU, float32 weights; the export's digest
  record checked first, as every reader of an export does) per batch of prompts,
  the softmax of the logits at the response position in float64, restricted to the N response tokens. The mass the
  policy puts outside them ("leaked": other words, EOS) is reported and the N-way distribution renormalised; on the
  game an out-of-set response loses to every in-set one, so the leak is pure loss and the table shows it.
- pi*_x: the Nash policy of P_x regularised towards pi_ref(.|x) (renormalised, as read from the pi_ref model) with
  the meter's tau, solved in float64 by megatron_inpo.nash.solve_nash (Newton on pi* ∝ pi_ref exp(P pi* / tau)),
  certified by its fixed-point residual max |pi* - softmax(log pi_ref + P pi*/tau)| and its duality gap. The game
  is restricted to the response set: an out-of-set token loses to everything, so the full game's pi* would give it
  only pi_ref's (small, reported) leaked mass times a factor below 1, which the renormalisation drops.
- per iterate: the mean over the distinct eval prompts of KL(pi*_x || pi_t(.|x)) and of the duality gap
  DualGap(pi_t) = max_pi1 J(pi1, pi_t) - min_pi2 J(pi_t, pi2) of Eq. 3 (megatron_inpo.nash.duality_gap); both 0
  exactly at pi*.

On the word task (`task.kind: synthetic`) responses are sequences, so no exact distribution exists; the meter then
reports the style mix (rock / paper / scissors shares of the first word of the sampled eval responses the
evaluation already produced) and the exploitability of that mix in the style game alone (equal quality,
P(a > b) = sigmoid(RPS_SCALE rps(a, b)), unregularised): max_s P(s > mix) - 1/2, 0 at the uniform mix. That is an
APPROXIMATION of how exploitable the policy is: it ignores quality and the correlation of style with content.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from megatron_inpo import nash

DT = torch.float64


@dataclass
class GameSolution:
    """One eval prompt's game: P_x, pi_ref(.|x) as read from the model, and its certified regularised Nash pi*."""

    prompt: str
    p: torch.Tensor
    """N x N preference matrix P[i, j] = P(y_i beats y_j | x)."""
    log_ref: torch.Tensor
    """log pi_ref(.|x) over the N responses (renormalised)."""
    log_star: torch.Tensor
    """log pi*(.|x)."""
    residual: float
    """max |pi* - softmax(log pi_ref + P pi* / tau)|: the fixed-point residual."""
    gap: float
    """DualGap(pi*): 0 at the Nash policy."""


def solve(prompt: str, p: torch.Tensor, log_ref: torch.Tensor, tau: float) -> GameSolution:
    """pi*_x of one game in float64 with its certificate (nash.solve_nash's Newton; nothing re-implemented)."""
    if tau <= 0:
        raise ValueError(f"the Nash meter needs tau > 0 (the KL-regularised game), got {tau}")
    p, log_ref = p.to(DT), log_ref.to(DT)
    log_star = nash.solve_nash(p, log_ref, tau)
    star = log_star.exp()
    residual = float((star - torch.softmax(log_ref + p @ star / tau, 0)).abs().max())
    return GameSolution(prompt, p, log_ref, log_star, residual, nash.duality_gap(star, p, log_ref, tau))


def read_policy(solutions: Sequence[GameSolution], probs: torch.Tensor, tau: float) -> dict:
    """Exact KL(pi* || pi) and DualGap(pi), per game and their means; probs [G, N] (rows sum to 1, float64)."""
    kls, gaps = [], []
    for sol, pi in zip(solutions, probs.to(DT)):
        log_pi = pi.clamp_min(1e-300).log()
        kls.append(nash.kl(sol.log_star, log_pi))
        gaps.append(nash.duality_gap(pi, sol.p, sol.log_ref, tau))
    return {"kl_to_nash": sum(kls) / len(kls), "duality_gap": sum(gaps) / len(gaps), "kl_per_game": kls,
            "gap_per_game": gaps}


@torch.inference_mode()
def policy_distributions(hf_dir: str | Path, prompt_ids: Sequence[Sequence[int]], token_ids: Sequence[int],
                         batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(pi [B, N], leaked [B]): the exact next-token distribution of the HF policy at hf_dir after each prompt,
    restricted to token_ids and renormalised, and the mass it puts outside them. Left-padded batches with real
    positions (the rollout engine's layout, megatron_inpo.data.batching.left_pad)."""
    from transformers import AutoModelForCausalLM

    from megatron_inpo.data.batching import left_pad
    from megatron_inpo.engine.trust import verify_export

    verify_export(hf_dir)  # as every reader of an export: its digest record first
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    pad = model.config.pad_token_id if isinstance(model.config.pad_token_id, int) else 0
    idx = torch.tensor(list(token_ids), dtype=torch.long)
    pis, leaks = [], []
    for s in range(0, len(prompt_ids), batch_size):
        ids, mask, pos = left_pad([list(p) for p in prompt_ids[s:s + batch_size]], pad)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1, :]
        full = torch.softmax(logits.to(DT), dim=-1)
        inside = full[:, idx]
        mass = inside.sum(-1)
        pis.append(inside / mass[:, None])
        leaks.append(1.0 - mass)
    return torch.cat(pis), torch.cat(leaks)


# ---------------------------------------------------------------- the game task


def game_prompts(eval_prompts: str | Path) -> list[tuple[str, list[int]]]:
    """The distinct (prompt text, prompt ids) of an eval prompt file, in first-seen order (each game once)."""
    from megatron_inpo.data.prompts import read_prompts
    from megatron_inpo.task.game import prompt_ids_of

    seen: dict[str, list[int]] = {}
    for r in read_prompts(str(eval_prompts)):
        key = " ".join(r.prompt.split())
        if key not in seen:
            seen[key] = list(r.prompt_ids) if r.prompt_ids is not None else prompt_ids_of(key)
    return list(seen.items())


def reference_reading(hf_ref: str | Path, eval_prompts: str | Path, tau: float) -> dict:
    """pi_ref's reading and pi*'s certificate: solve every game of the eval prompts with pi_ref from the model."""
    from megatron_inpo.task.game import game_size, preference_matrix, response_token_ids

    games = game_prompts(eval_prompts)
    n = game_size(games[0][0])
    pi_ref, leak = policy_distributions(hf_ref, [g[1] for g in games], response_token_ids(n))
    sols = [solve(text, preference_matrix(text), pi.log(), tau) for (text, _), pi in zip(games, pi_ref)]
    r = read_policy(sols, pi_ref, tau)
    return {"tau": tau, "games": len(games), "responses": n,
            "kl_to_nash": r["kl_to_nash"], "duality_gap": r["duality_gap"],
            "leaked_mass": float(leak.mean()), "max_leaked_mass": float(leak.max()),
            "nash_residual": max(s.residual for s in sols), "nash_gap": max(abs(s.gap) for s in sols),
            "pi_ref": {text: pi.tolist() for (text, _), pi in zip(games, pi_ref)},
            "pi_star": {s.prompt: s.log_star.exp().tolist() for s in sols}}


def iterate_reading(hf_policy: str | Path, ref: dict) -> dict:
    """An iterate's exact reading against the games (and pi*) recorded in `ref` (reference_reading's result)."""
    from megatron_inpo.task.game import preference_matrix, prompt_ids_of, response_token_ids

    tau = ref["tau"]
    texts = list(ref["pi_ref"])
    probs, leak = policy_distributions(hf_policy, [prompt_ids_of(t) for t in texts],
                                       response_token_ids(ref["responses"]))
    sols = [GameSolution(t, preference_matrix(t), torch.tensor(ref["pi_ref"][t], dtype=DT).log(),
                         torch.tensor(ref["pi_star"][t], dtype=DT).log(), 0.0, 0.0) for t in texts]
    r = read_policy(sols, probs, tau)
    return {"kl_to_nash": r["kl_to_nash"], "duality_gap": r["duality_gap"], "leaked_mass": float(leak.mean()),
            "max_leaked_mass": float(leak.max()), "policy": {t: pi.tolist() for t, pi in zip(texts, probs)}}


# ---------------------------------------------------------------- the word task (approximation)


def style_mix(generations: str | Path) -> dict:
    """Shares of rock / paper / scissors / no style among the first words of sampled responses (eval generations
    JSONL of megatron_inpo.evaluate.generate)."""
    from megatron_inpo.task.oracle import style_of
    from megatron_inpo.task.vocab import STYLES

    counts = dict.fromkeys(STYLES + ["none"], 0)
    for line in open(generations, encoding="utf-8"):
        if line.strip():
            for text in json.loads(line)["outputs"]:
                counts[style_of(text) or "none"] += 1
    total = max(sum(counts.values()), 1)
    return {k: v / total for k, v in counts.items()}


def style_exploitability(mix: dict) -> float:
    """max_s P(s beats mix) - 1/2 in the style game alone (equal quality; responses without a style left out): 0
    at the uniform mix, the style game's Nash. An approximation of the policy's exploitability (see module doc)."""
    from megatron_inpo.task.oracle import RPS_SCALE, rps
    from megatron_inpo.task.vocab import STYLES

    z = sum(mix[s] for s in STYLES)
    if z <= 0:
        return float("nan")
    q = [mix[s] / z for s in STYLES]
    win = [sum(qj / (1 + math.exp(-RPS_SCALE * rps(a, b))) for b, qj in zip(STYLES, q)) for a in STYLES]
    return max(win) - 0.5
