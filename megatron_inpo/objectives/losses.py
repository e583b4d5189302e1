"""The objectives' losses in plain torch (see the package docstring for the formulas and their sources)."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import torch
import torch.nn.functional as F

from megatron_inpo.objectives import NAMES, ObjectiveConfig


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


def _anchor_logits(cfg: ObjectiveConfig, lp: PairLogps) -> torch.Tensor:
    """z = pi-margin - anchor-margin, the anchor being pi_t ('last') or pi_ref ('ref') by cfg.dpo_anchor."""
    if cfg.dpo_anchor == "last":
        anchor = lp.last_chosen - lp.last_rejected
    else:
        anchor = lp.ref_chosen - lp.ref_rejected
    return (lp.policy_chosen - lp.policy_rejected) - anchor


def dpo_loss(cfg: ObjectiveConfig, lp: PairLogps) -> tuple[torch.Tensor, torch.Tensor]:
    """-log sigmoid(beta z) with z anchored on pi_t (dpo_anchor 'last', RLHFlow's current iterative DPO) or on
    pi_ref ('ref'); sums of token log-probs."""
    z = _anchor_logits(cfg, lp)
    return -F.logsigmoid(cfg.beta * z), z


def ipo_loss(cfg: ObjectiveConfig, lp: PairLogps) -> tuple[torch.Tensor, torch.Tensor]:
    """(z - 1/(2 beta))^2 with DPO's z and anchor (dpo_anchor); z from SUMS of token log-probs, where TRL's
    loss_type="ipo" uses per-token means (each sequence's log-prob divided by its length)."""
    z = _anchor_logits(cfg, lp)
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
assert tuple(OBJECTIVES) == NAMES, "objectives.NAMES must list the registry (it answers without torch)"


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
