"""Preference objectives over per-sequence log-probabilities: INPO and the paper's baselines (DPO, IPO, SPPO).

Every objective takes the summed response-token log-probs of a batch of pairs (y_w, y_l) under the trainable
policy, the frozen reference pi_ref and the frozen previous iterate pi_t, and returns a loss and metrics. The
frozen columns are precomputed by a forward-only pass (the authors' design), so training holds one model.

INPO (arXiv 2407.00617, Eq. 8 sampled; Algorithm 1 line 5):
    h    = [log pi(y_w) - log pi(y_l)] - (tau/eta) [log ref(y_w) - log ref(y_l)]
                                       - (1 - tau/eta) [log pi_t(y_w) - log pi_t(y_l)]
    loss = (h - 1/(2 eta))^2
with 0 <= tau < eta (tau = 0 is the paper's "INPO w/o KL" ablation; at tau = eta pi_t would drop out).

Baselines:
    DPO  (sigmoid, iterative DPO of Dong et al. 2024): -log sigmoid(beta * z),  z = pi-margin - ref-margin
    IPO  (Azar et al. 2024):                           (z - 1/(2 beta))^2
    SPPO (Wu et al. 2024, as in uclaml/SPPO): with r_w = log pi(y_w) - log pi_t(y_w), r_l likewise,
         0.5 [(r_w - (P(y_w > pi_t) - 1/2)/beta)^2 + (r_l - (P(y_l > pi_t) - 1/2)/beta)^2]
         (SPPO's "reference" is the previous iterate pi_t; the win rates come from all-pairs judging).

All functions are plain torch; nothing here imports Megatron.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable

import torch
import torch.nn.functional as F

from megatron_inpo.config import ConfigError


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

    def validate(self) -> None:
        if self.name not in OBJECTIVES:
            raise ConfigError(f"objective.name: unknown objective {self.name!r}; choose from {sorted(OBJECTIVES)}")
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


@dataclass
class PairLogps:
    """Per-pair sums of response-token log-probs, each a 1-D tensor of the batch's length B."""

    policy_chosen: torch.Tensor
    """log pi_theta(y_w | x), trainable."""
    policy_rejected: torch.Tensor
    """log pi_theta(y_l | x), trainable."""
    ref_chosen: torch.Tensor
    """log pi_ref(y_w | x), frozen reference (the SFT model)."""
    ref_rejected: torch.Tensor
    """log pi_ref(y_l | x)."""
    last_chosen: torch.Tensor
    """log pi_t(y_w | x), frozen previous iterate (equals ref_chosen at t = 1)."""
    last_rejected: torch.Tensor
    """log pi_t(y_l | x)."""
    chosen_winrate: torch.Tensor | None = None
    """Estimated P(y_w beats pi_t); SPPO only."""
    rejected_winrate: torch.Tensor | None = None
    """Estimated P(y_l beats pi_t); SPPO only."""

    def validate(self) -> None:
        b = None
        for f in fields(self):
            t = getattr(self, f.name)
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"PairLogps.{f.name}: expected a tensor, got {type(t).__name__}")
            if t.dim() != 1:
                raise ValueError(f"PairLogps.{f.name}: expected a 1-D tensor [B], got shape {tuple(t.shape)}")
            if b is None:
                b = t.shape[0]
            elif t.shape[0] != b:
                raise ValueError(
                    f"PairLogps.{f.name}: batch size {t.shape[0]} differs from policy_chosen's {b} (shape mismatch)"
                )
            if not t.is_floating_point():
                raise ValueError(f"PairLogps.{f.name}: expected a floating-point tensor, got {t.dtype}")
            if not bool(torch.isfinite(t.detach()).all()):
                bad = int((~torch.isfinite(t.detach())).sum())
                raise ValueError(f"PairLogps.{f.name}: {bad} non-finite value(s) (NaN or inf)")
        if b == 0:
            raise ValueError("PairLogps: empty batch")


# A loss function maps (config, log-probs) to (per-pair losses [B], per-pair implicit margins [B]); the margin is
# the quantity whose sign says whether the policy already ranks y_w above y_l relative to its anchor (h for INPO).
LossFn = Callable[[ObjectiveConfig, PairLogps], tuple[torch.Tensor, torch.Tensor]]


def inpo_h(cfg: ObjectiveConfig, lp: PairLogps, tau: float | None = None) -> torch.Tensor:
    """h_t(pi, y_w, y_l) of the paper (section 3.2)."""
    tau = cfg.tau if tau is None else tau
    ratio = tau / cfg.eta
    pi_margin = lp.policy_chosen - lp.policy_rejected
    ref_margin = lp.ref_chosen - lp.ref_rejected
    last_margin = lp.last_chosen - lp.last_rejected
    return pi_margin - ratio * ref_margin - (1.0 - ratio) * last_margin


def inpo_loss(cfg: ObjectiveConfig, lp: PairLogps) -> tuple[torch.Tensor, torch.Tensor]:
    h = inpo_h(cfg, lp)
    return (h - 1.0 / (2.0 * cfg.eta)) ** 2, h


def inpo_nokl_loss(cfg: ObjectiveConfig, lp: PairLogps) -> tuple[torch.Tensor, torch.Tensor]:
    # The paper's "w/o KL" ablation: tau = 0, so pi_ref drops out and only pi_t anchors the update.
    h = inpo_h(cfg, lp, tau=0.0)
    return (h - 1.0 / (2.0 * cfg.eta)) ** 2, h


def _ref_logits(lp: PairLogps) -> torch.Tensor:
    return (lp.policy_chosen - lp.policy_rejected) - (lp.ref_chosen - lp.ref_rejected)


def dpo_loss(cfg: ObjectiveConfig, lp: PairLogps) -> tuple[torch.Tensor, torch.Tensor]:
    z = _ref_logits(lp)
    return -F.logsigmoid(cfg.beta * z), z


def ipo_loss(cfg: ObjectiveConfig, lp: PairLogps) -> tuple[torch.Tensor, torch.Tensor]:
    z = _ref_logits(lp)
    return (z - 1.0 / (2.0 * cfg.beta)) ** 2, z


def sppo_loss(cfg: ObjectiveConfig, lp: PairLogps) -> tuple[torch.Tensor, torch.Tensor]:
    if lp.chosen_winrate is None or lp.rejected_winrate is None:
        raise ValueError("sppo: needs chosen_winrate and rejected_winrate (judge with all-pairs win rates)")
    for name in ("chosen_winrate", "rejected_winrate"):
        w = getattr(lp, name).detach()
        if bool(((w < 0) | (w > 1)).any()):
            raise ValueError(f"sppo: PairLogps.{name} must lie in [0, 1]")
    r_w = lp.policy_chosen - lp.last_chosen
    r_l = lp.policy_rejected - lp.last_rejected
    loss_w = (r_w - (lp.chosen_winrate - 0.5) / cfg.beta) ** 2
    loss_l = (r_l - (lp.rejected_winrate - 0.5) / cfg.beta) ** 2
    return 0.5 * (loss_w + loss_l), r_w - r_l


OBJECTIVES: dict[str, LossFn] = {
    "inpo": inpo_loss,
    "inpo_nokl": inpo_nokl_loss,
    "dpo": dpo_loss,
    "ipo": ipo_loss,
    "sppo": sppo_loss,
}


def per_pair_losses(cfg: ObjectiveConfig, lp: PairLogps) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated per-pair losses [B] and implicit margins [B] (looked up in OBJECTIVES at call time)."""
    cfg.validate()
    lp.validate()
    return OBJECTIVES[cfg.name](cfg, lp)


def compute_objective(
    cfg: ObjectiveConfig, lp: PairLogps, reduction: str = "mean"
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss over the batch and detached scalar metrics.

    reduction='sum' lets a pipeline schedule add micro-batch losses and divide by the global pair count once.
    Metrics: h_mean / h_std (the objective's implicit margin: h for INPO, the DPO logit z otherwise), chosen and
    rejected log-ratios against pi_ref, their difference (margin) and pairwise accuracy (margin-of-h > 0 rate).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    losses, h = per_pair_losses(cfg, lp)
    loss = losses.mean() if reduction == "mean" else losses.sum()
    with torch.no_grad():
        chosen = (lp.policy_chosen - lp.ref_chosen).detach()
        rejected = (lp.policy_rejected - lp.ref_rejected).detach()
        hd = h.detach()
        metrics = {
            "h_mean": hd.mean(),
            "h_std": hd.std(unbiased=False),
            "chosen_logratio": chosen.mean(),
            "rejected_logratio": rejected.mean(),
            "margin": (chosen - rejected).mean(),
            "accuracy": (hd > 0).to(hd.dtype).mean(),
        }
    return loss, metrics
