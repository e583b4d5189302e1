"""The synthetic task's word vocabulary (fixed, so ids are stable across runs and machines)."""
from __future__ import annotations

PAD, BOS, EOS, SEP = "<pad>", "<bos>", "<eos>", "<sep>"
SPECIAL = [PAD, BOS, EOS, SEP]
"""Special tokens; SEP ends a prompt, so the policy knows where its response starts."""
STYLES = ["rock", "paper", "scissors"]
"""Style words: the first word of a response; ordered so that STYLES[i+1] beats STYLES[i] (cyclically)."""
CONTENT = [chr(ord("a") + i) for i in range(16)]
"""Content words a..p: prompts are sets of these, good responses repeat them."""
WORDS = SPECIAL + STYLES + CONTENT
"""The whole vocabulary in id order."""
