"""Preference objectives over per-sequence log-probabilities: INPO and the paper's baselines (DPO, IPO, SPPO).

Every objective takes the summed response-token log-probs of a batch of pairs (y_w, y_l) under the trainable
policy, the frozen reference pi_ref and the frozen previous iterate pi_t, and returns a loss and metrics. The
frozen columns are precomputed by a forward-only pass (the authors' design), so training holds one model.

INPO (arXiv 2407.00617, Eq. 8 sampled; Algorithm 1 line 5):
    h    = [log pi(y_w) - log pi(y_l)] - (tau/eta) [log ref(y_w) - log ref(y_l)]
                                       - (1 - tau/eta) [log pi_t(y_w) - log pi_t(y_l)]
    loss = (h - 1/(2 eta))^2
with 0 <= tau < eta (tau = 0 is the paper's "INPO w/o KL" ablation; at tau = eta pi_t would drop out).

Baselines (a "margin" is log p(y_w) - log p(y_l) of summed response-token log-probs):
    DPO  (sigmoid, iterative DPO of Dong et al. 2024): -log sigmoid(beta * z),  z = pi-margin - anchor-margin
    IPO  (Azar et al. 2024):                           (z - 1/(2 beta))^2
    The anchor is ObjectiveConfig.dpo_anchor: 'last' (default) = the previous iterate pi_t (the last_* columns),
    as RLHFlow/Online-RLHF's current run_loop.sh runs iterative DPO (it passes the model being trained as
    ref_model; at t = 1 that is pi_1 = pi_ref); 'ref' = pi_ref at every iteration (the ref_* columns), as
    that script's earlier version did (it passed the initial SFT model).
    Our IPO differs from TRL's DPOTrainer(loss_type="ipo"): we form z from the SUMS of token log-probs (the IPO
    paper's sequence log-probs, as DPO); TRL first divides each sequence's log-prob by its token count (a per-token
    mean), so its z, and hence the beta that suits it, are on a per-token scale.
    SPPO (Wu et al. 2024, as in uclaml/SPPO): with r_w = log pi(y_w) - log pi_t(y_w), r_l likewise,
         0.5 [(r_w - (P(y_w > pi_t) - 1/2)/beta)^2 + (r_l - (P(y_l > pi_t) - 1/2)/beta)^2]
         (SPPO's "reference" is the previous iterate pi_t; the win rates come from all-pairs judging, by default
         as uclaml's compute_prob.py defines them: P(y_i beats y_j) averaged over all K responses j, y_i itself
         counted at 1/2; see algorithm.sppo_winrate and judge/tournament.py).

All functions are plain torch; nothing here imports Megatron. The package itself (ObjectiveConfig, the names) does
not import torch either, so a config can be built, validated and printed without it (`run --print-config`); the
losses live in objectives/losses.py and are reached through this package as before (`objectives.OBJECTIVES`,
`objectives.compute_objective`, ...), loaded on first use.
"""
from __future__ import annotations

import importlib
import math
import sys
from dataclasses import dataclass
from typing import Any

from megatron_inpo.config import ConfigError

NAMES = ("inpo", "inpo_nokl", "dpo", "ipo", "sppo")
"""The objectives of losses.OBJECTIVES (checked there), known without importing torch."""
DPO_ANCHORS = ("last", "ref")
"""ObjectiveConfig.dpo_anchor's values."""
_LOSSES = __name__ + ".losses"


def names() -> set[str]:
    """Valid objective names: NAMES, plus any registered in losses.OBJECTIVES once it is loaded."""
    losses = sys.modules.get(_LOSSES)
    return set(NAMES) | (set(losses.OBJECTIVES) if losses is not None else set())


@dataclass
class ObjectiveConfig:
    name: str = "inpo"
    """Objective to minimise: one of the names in OBJECTIVES ('inpo', 'inpo_nokl', 'dpo', 'ipo', 'sppo')."""
    eta: float = 0.005
    """INPO's OMD parameter eta (1/eta is the mirror-descent step size); the paper uses 0.005."""
    tau: float = 0.005 / 3
    """INPO's KL-regularisation strength tau towards pi_ref; the paper uses eta/3. 0 <= tau < eta."""
    beta: float = 0.1
    """Temperature of DPO / IPO / SPPO (SPPO's scripts use 0.001, i.e. a target scale 1/beta = 1000)."""
    dpo_anchor: str = "last"
    """The reference of DPO and IPO: 'last' = the previous iterate pi_t at each iteration (the last_* columns; at
    t = 1 pi_1 = pi_ref), as RLHFlow/Online-RLHF's current run_loop.sh (iterative DPO, the paper's baseline);
    'ref' = pi_ref at every iteration (the ref_* columns), that script's earlier version. INPO and SPPO ignore it."""

    def validate(self) -> None:
        known = names()
        if self.name not in known:
            raise ConfigError(f"objective.name: unknown objective {self.name!r}; choose from {sorted(known)}")
        for key in ("eta", "tau", "beta"):
            v = getattr(self, key)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"objective.{key}: must be a finite number, got {v!r}")
        if self.name in ("inpo", "inpo_nokl"):
            if self.eta <= 0:
                raise ConfigError(f"objective.eta: must be > 0, got {self.eta}")
            if self.tau < 0:
                raise ConfigError(f"objective.tau: must be >= 0, got {self.tau}")
            if self.name == "inpo" and self.tau >= self.eta:
                raise ConfigError(
                    f"objective.tau: INPO needs 0 <= tau < eta, got tau={self.tau} >= eta={self.eta} "
                    "(the weight 1 - tau/eta on pi_t would be <= 0; did you swap tau and eta?)"
                )
        elif self.beta <= 0:
            raise ConfigError(f"objective.beta: must be > 0, got {self.beta}")
        if self.dpo_anchor not in DPO_ANCHORS:
            raise ConfigError(f"objective.dpo_anchor: 'last' (pi_t) or 'ref' (pi_ref), got {self.dpo_anchor!r}")


def __getattr__(name: str) -> Any:
    # PairLogps, OBJECTIVES, compute_objective, ...: the torch half, imported when first asked for
    if name.startswith("__"):
        raise AttributeError(name)
    losses = importlib.import_module(_LOSSES)
    try:
        return getattr(losses, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
