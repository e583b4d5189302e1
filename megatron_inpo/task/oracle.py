"""The synthetic task's ground-truth oracle: a GENERAL preference P(a beats b | prompt), not a reward model.

A prompt is a handful of distinct content words ("c f a k"); a response is a style word followed by content words
("paper f c a k"). The preference has two parts:

    logit(a > b) = QUALITY_SCALE * (q(a) - q(b)) + RPS_SCALE * rps(style(a), style(b))

- q is a transitive quality: the share of the prompt's words the response covers, minus a penalty for every
  wrong or repeated word and for a missing / misplaced style word (so padding a response does not pay: length
  cannot be gamed, and the table's mean response length shows it).
- rps is rock-paper-scissors over the style word (paper beats rock, scissors beat paper, rock beats scissors):
  an intransitive term that no Bradley-Terry reward can represent. This is the case INPO's general-preference
  game is made for: with equal quality the Nash policy mixes the styles instead of collapsing onto one.

P(a > b) + P(b > a) = 1 exactly, and P(a > a) = 0.5, so a judge averaging both orders gets the same number.
"""
from __future__ import annotations

import math

from megatron_inpo.task.vocab import CONTENT, STYLES

QUALITY_SCALE = 4.0
"""Weight of the quality difference (quality lies in about [-2, 1])."""
RPS_SCALE = 1.0
"""Weight of the intransitive style term: a better style is worth a quarter of the whole quality range."""
WRONG_PENALTY = 1.5
"""Cost of one wrong or repeated content word, in units of one covered prompt word."""
STYLE_PENALTY = 0.5
"""Cost of a missing style word or of extra style words (absolute, not per prompt word)."""

_CONTENT = set(CONTENT)
_STYLE_INDEX = {s: i for i, s in enumerate(STYLES)}


def prompt_words(prompt: str) -> list[str]:
    """Content words of a prompt text (anything else is ignored)."""
    return [w for w in prompt.split() if w in _CONTENT]


def style_of(response: str) -> str | None:
    """The style word when the response starts with one, else None."""
    words = response.split()
    return words[0] if words and words[0] in _STYLE_INDEX else None


def quality(prompt: str, response: str) -> float:
    """Transitive quality in [-inf, 1]: 1 = style word + every prompt word exactly once, nothing else."""
    want = set(prompt_words(prompt))
    if not want:
        raise ValueError(f"prompt {prompt!r} has no content words")
    words = response.split()
    style = style_of(response)
    body = words[1:] if style is not None else words
    seen: set[str] = set()
    hits = wrong = extra_styles = 0
    for w in body:
        if w in _STYLE_INDEX:
            extra_styles += 1
        elif w in want and w not in seen:
            hits += 1
            seen.add(w)
        else:
            wrong += 1
    q = (hits - WRONG_PENALTY * wrong) / len(want)
    if style is None:
        q -= STYLE_PENALTY
    if extra_styles:
        q -= STYLE_PENALTY
    return q


def rps(style_a: str | None, style_b: str | None) -> int:
    """+1 when style a beats style b at rock-paper-scissors, -1 when it loses, 0 on a tie or a missing style."""
    if style_a is None or style_b is None:
        return 0
    d = (_STYLE_INDEX[style_a] - _STYLE_INDEX[style_b]) % 3
    return {0: 0, 1: 1, 2: -1}[d]


def preference_logit(prompt: str, a: str, b: str) -> float:
    return QUALITY_SCALE * (quality(prompt, a) - quality(prompt, b)) + RPS_SCALE * rps(style_of(a), style_of(b))


def prob_a_beats_b(prompt: str, a: str, b: str) -> float:
    """P(a beats b | prompt): the oracle every synthetic-task judge and evaluation uses."""
    z = preference_logit(prompt, a, b)
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))
