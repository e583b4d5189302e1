"""The game task (`task.kind: game`): a finite preference game per prompt whose equilibrium is computable.

Each prompt is "n<N> <three prompt words>" (e.g. "n5 q3 q11 q0"); its responses are the N single tokens
y0 .. y<N-1> (own vocabulary words), generated without EOS (rollout max_new_tokens = 1), so the policy's
distribution over the responses is exactly the softmax of its logits at the response position, restricted to
those N tokens. The prompt's general preference matrix P_x (P + P^T = 1, diag 0.5) is a function of the prompt
text alone (seeded by its sha-512, Python's str seeding), so any judge, evaluation or export sees plain words:

    logit(y_i > y_j | x) = c_x * cyc_x(i, j) + (s_i - s_j),      P_x = sigmoid(logit)

- cyc_x is a rock-paper-scissors cycle on a random ring of the N responses: each beats the next (N-1)//2 on the
  ring (+1), loses to the previous ones (-1), ties with the opposite one when N is even (0); c_x ~ U(1.5, 2.5).
- s is a transitive score, s_i ~ U(-t_x, t_x), t_x ~ U(0.2, 0.6): |s_i - s_j| < 1.5 <= c_x, so the cycle keeps
  every ring edge's sign and the game is intransitive for every prompt (no Bradley-Terry reward represents it).

A response outside the set (another word, an EOS sampled first, an empty text) loses to every in-set response
with probability 1; two out-of-set responses tie. The task seed chooses which prompts exist (hence which games);
training and evaluation use the same pool of `task.games` prompts (the point is the equilibrium of each game,
not generalisation to unseen games).

pi_ref is a short SFT of the tiny Llama on responses drawn from a skewed per-prompt distribution
q_x ∝ ref_skew^rank (a random ranking per prompt): non-uniform and, in general, far from the regularised Nash
policy pi*_x ∝ pi_ref exp(P_x pi*_x / tau). The meter (megatron_inpo/nash_meter.py) reads pi_ref from the model
itself, not from q_x.
"""
from __future__ import annotations

import math
import random
from pathlib import Path
from typing import TYPE_CHECKING

from megatron_inpo.config import ConfigError
from megatron_inpo.task.vocab import BOS, SEP, SPECIAL

if TYPE_CHECKING:
    from megatron_inpo.task.synthetic import TaskConfig

MAX_RESPONSES = 8
"""Largest N (task.responses)."""
MIN_RESPONSES = 3
RESPONSES = [f"y{i}" for i in range(MAX_RESPONSES)]
"""Response words; a game with N responses uses the first N."""
SIZES = [f"n{n}" for n in range(MIN_RESPONSES, MAX_RESPONSES + 1)]
"""First prompt word: the game's number of responses."""
PROMPT_WORDS = [f"q{i}" for i in range(16)]
"""The other prompt words: three distinct ones name a game."""
WORDS = SPECIAL + RESPONSES + SIZES + PROMPT_WORDS
"""The game task's vocabulary in id order."""
PROMPT_WORDS_PER_GAME = 3
CYCLE_STRENGTH = (1.5, 2.5)
"""Range of c_x, the logit weight of the cyclic part."""
TRANSITIVE_RANGE = (0.2, 0.6)
"""Range of t_x; transitive scores lie in [-t_x, t_x]."""


def word_id(w: str) -> int:
    return WORDS.index(w)


def response_token_ids(n: int) -> list[int]:
    """Token ids of the N responses y0 .. y<N-1>, in response order (the rows / columns of P_x)."""
    return [word_id(w) for w in RESPONSES[:n]]


def prompt_ids_of(text: str) -> list[int]:
    """Policy input: <bos> words <sep> (the one-token response follows <sep>)."""
    return [word_id(BOS)] + [word_id(w) for w in text.split()] + [word_id(SEP)]


def game_size(prompt: str) -> int:
    """N of a game prompt (its first word, 'n<N>')."""
    first = prompt.split()[0] if prompt.split() else ""
    if first not in SIZES:
        raise ValueError(f"not a game prompt (first word must be one of {SIZES}): {prompt!r}")
    return int(first[1:])


def _rng(prompt: str, what: str) -> random.Random:
    # str seeds go through sha-512 in Python's random (version 2): stable across runs, machines and PYTHONHASHSEED
    return random.Random(f"game|{what}|{' '.join(prompt.split())}")


def preference_matrix(prompt: str):
    """P_x of a game prompt as an N x N float64 tensor: P[i, j] = P(y_i beats y_j | x)."""
    import torch

    n = game_size(prompt)
    rng = _rng(prompt, "P")
    ring = list(range(n))
    rng.shuffle(ring)
    pos = {r: k for k, r in enumerate(ring)}
    c = rng.uniform(*CYCLE_STRENGTH)
    t = rng.uniform(*TRANSITIVE_RANGE)
    s = [rng.uniform(-t, t) for _ in range(n)]
    m = (n - 1) // 2
    logit = torch.zeros((n, n), dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            d = (pos[j] - pos[i]) % n
            cyc = 1.0 if d <= m else (-1.0 if d >= n - m else 0.0)
            logit[i, j] = c * cyc + (s[i] - s[j])
    return torch.sigmoid(logit)


def reference_distribution(prompt: str, skew: float) -> list[float]:
    """q_x, the SFT data's response distribution: skew^rank over a random ranking of the N responses."""
    n = game_size(prompt)
    order = list(range(n))
    _rng(prompt, "ref").shuffle(order)
    w = [0.0] * n
    for rank, i in enumerate(order):
        w[i] = skew ** rank
    z = sum(w)
    return [x / z for x in w]


def response_index(prompt: str, response: str) -> int | None:
    """Index of a response text in the prompt's response set, None when outside it."""
    words = response.split()
    if len(words) != 1 or words[0] not in RESPONSES:
        return None
    i = RESPONSES.index(words[0])
    return i if i < game_size(prompt) else None


_P_CACHE: dict[str, list[list[float]]] = {}


def prob_a_beats_b(prompt: str, a: str, b: str) -> float:
    """P(a beats b | prompt) of the game: P_x for in-set responses; an out-of-set response loses to every in-set one
    (probability 0) and ties with another out-of-set one (0.5). The oracle judge of `task.kind: game`."""
    i, j = response_index(prompt, a), response_index(prompt, b)
    if i is None or j is None:
        return 0.5 if i is None and j is None else (1.0 if j is None else 0.0)
    key = " ".join(prompt.split())
    if key not in _P_CACHE:
        _P_CACHE[key] = preference_matrix(key).tolist()
    return _P_CACHE[key][i][j]


# ---------------------------------------------------------------- files


def make_game_prompts(cfg: "TaskConfig") -> list[str]:
    """The task's pool of `games` distinct prompt texts (chosen by the task seed)."""
    rng = random.Random(f"{cfg.seed}|game|prompts")
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < cfg.games:
        words = rng.sample(PROMPT_WORDS, PROMPT_WORDS_PER_GAME)
        text = " ".join([f"n{cfg.responses}"] + words)
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def make_prompts(cfg: "TaskConfig", split: str, n: int) -> list[dict]:
    """n prompt records of a split: the pool of games in a seeded order, cycled (each game about n / games times)."""
    games = make_game_prompts(cfg)
    rng = random.Random(f"{cfg.seed}|game|{split}")
    out = []
    order: list[str] = []
    for i in range(n):
        if not order:
            order = list(games)
            rng.shuffle(order)
        text = order.pop()
        out.append({"id": f"{split}-{i:05d}", "prompt": text, "prompt_ids": prompt_ids_of(text)})
    return out


def make_sft(cfg: "TaskConfig") -> list[dict]:
    """SFT data of pi_ref: one response per record, drawn from q_x (reference_distribution); no EOS (one token)."""
    rng = random.Random(f"{cfg.seed}|game|sft")
    out = []
    for p in make_prompts(cfg, "sft", cfg.sft_examples):
        q = reference_distribution(p["prompt"], cfg.ref_skew)
        i = rng.choices(range(len(q)), weights=q)[0]
        out.append({"prompt": p["prompt"], "response": RESPONSES[i], "prompt_ids": p["prompt_ids"],
                    "response_ids": [word_id(RESPONSES[i])]})
    return out


def build_tokenizer(out_dir: str | Path):
    """The word-level tokenizer of the word task over the game's WORDS."""
    from megatron_inpo.task import synthetic

    return synthetic.build_tokenizer(out_dir, WORDS, model_max_length=16)


def hf_config_dict(cfg: "TaskConfig") -> dict:
    """config.json of the tiny Llama over the game vocabulary (16 positions: a prompt and one response token)."""
    from megatron_inpo.task import synthetic

    return synthetic.hf_config_dict(cfg, WORDS, positions=16)


def validate(cfg: "TaskConfig") -> None:
    if not MIN_RESPONSES <= cfg.responses <= MAX_RESPONSES:
        raise ConfigError(f"task.responses: the game's N must lie in [{MIN_RESPONSES}, {MAX_RESPONSES}], "
                          f"got {cfg.responses}")
    most = math.comb(len(PROMPT_WORDS), PROMPT_WORDS_PER_GAME)
    if not 1 <= cfg.games <= most:
        raise ConfigError(f"task.games: must lie in [1, {most}], got {cfg.games}")
    if not 0 < cfg.ref_skew <= 1:
        raise ConfigError(f"task.ref_skew: must lie in (0, 1], got {cfg.ref_skew}")

