"""The objectives against hand-written closed forms (float64), their gradients, and input validation."""
import math

import pytest
import torch
import torch.nn.functional as F

from megatron_inpo.config import ConfigError
from megatron_inpo.objectives import OBJECTIVES, ObjectiveConfig, PairLogps, compute_objective, per_pair_losses

DT = torch.float64


def make_logps(b=7, seed=0, requires_grad=False, winrates=True):
    g = torch.Generator().manual_seed(seed)
    cols = [-(torch.rand(b, generator=g, dtype=DT) * 20 + 1) for _ in range(6)]
    if requires_grad:
        cols[0].requires_grad_(True)
        cols[1].requires_grad_(True)
    wr = [torch.rand(b, generator=g, dtype=DT) for _ in range(2)] if winrates else [None, None]
    return PairLogps(*cols, chosen_winrate=wr[0], rejected_winrate=wr[1])


def test_inpo_matches_paper_formula_elementwise():
    lp = make_logps()
    eta, tau = 0.005, 0.005 / 3
    loss, metrics = compute_objective(ObjectiveConfig("inpo", eta=eta, tau=tau), lp)
    for k in range(lp.policy_chosen.shape[0]):
        # h_t of section 3.2 written with the paper's (eta - tau)/eta factor, one pair at a time, in Python floats.
        h = (lp.policy_chosen[k] - lp.policy_rejected[k]).item() \
            - tau / eta * (lp.ref_chosen[k] - lp.ref_rejected[k]).item() \
            - (eta - tau) / eta * (lp.last_chosen[k] - lp.last_rejected[k]).item()
        per, hh = per_pair_losses(ObjectiveConfig("inpo", eta=eta, tau=tau), lp)
        assert hh[k].item() == pytest.approx(h, rel=1e-12, abs=1e-9)
        assert per[k].item() == pytest.approx((h - 1 / (2 * eta)) ** 2, rel=1e-12)
    hs = per_pair_losses(ObjectiveConfig("inpo", eta=eta, tau=tau), lp)[1]
    assert metrics["h_mean"].item() == pytest.approx(hs.mean().item(), rel=1e-12)
    assert loss.item() == pytest.approx(((hs - 100.0) ** 2).mean().item(), rel=1e-12)


def test_inpo_first_iteration_reduces_to_ipo_like_form():
    # At t = 1, pi_t = pi_ref: h = pi-margin - ref-margin, i.e. IPO's logit with beta = eta.
    lp = make_logps()
    lp.last_chosen, lp.last_rejected = lp.ref_chosen, lp.ref_rejected
    inpo, _ = per_pair_losses(ObjectiveConfig("inpo", eta=0.01, tau=0.004), lp)
    ipo, _ = per_pair_losses(ObjectiveConfig("ipo", beta=0.01), lp)
    torch.testing.assert_close(inpo, ipo, rtol=1e-12, atol=1e-9)


def test_inpo_nokl_ignores_reference():
    lp = make_logps()
    a, _ = per_pair_losses(ObjectiveConfig("inpo_nokl", eta=0.1, tau=0.05), lp)
    lp.ref_chosen = lp.ref_chosen + 3.0  # any change of pi_ref is irrelevant without the KL term
    b, _ = per_pair_losses(ObjectiveConfig("inpo_nokl", eta=0.1, tau=0.05), lp)
    torch.testing.assert_close(a, b)
    c, _ = per_pair_losses(ObjectiveConfig("inpo", eta=0.1, tau=0.0), lp)
    torch.testing.assert_close(a, c)


def test_dpo_ipo_sppo_closed_forms():
    lp = make_logps()
    z = (lp.policy_chosen - lp.policy_rejected) - (lp.ref_chosen - lp.ref_rejected)
    dpo, _ = per_pair_losses(ObjectiveConfig("dpo", beta=0.1, dpo_anchor="ref"), lp)
    want = torch.tensor([math.log1p(math.exp(-0.1 * v)) for v in z.tolist()], dtype=DT)
    torch.testing.assert_close(dpo, want, rtol=1e-12, atol=1e-12)
    ipo, _ = per_pair_losses(ObjectiveConfig("ipo", beta=0.1, dpo_anchor="ref"), lp)
    torch.testing.assert_close(ipo, (z - 5.0) ** 2)
    sppo, _ = per_pair_losses(ObjectiveConfig("sppo", beta=0.5), lp)
    rw = lp.policy_chosen - lp.last_chosen
    rl = lp.policy_rejected - lp.last_rejected
    want = 0.5 * ((rw - 2 * (lp.chosen_winrate - 0.5)) ** 2 + (rl - 2 * (lp.rejected_winrate - 0.5)) ** 2)
    torch.testing.assert_close(sppo, want)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_gradcheck_float64(name):
    lp = make_logps(b=5, requires_grad=True)
    cfg = ObjectiveConfig(name, eta=0.2, tau=0.05, beta=0.3)

    def f(pc, pr):
        lp2 = PairLogps(pc, pr, lp.ref_chosen, lp.ref_rejected, lp.last_chosen, lp.last_rejected,
                        lp.chosen_winrate, lp.rejected_winrate)
        return compute_objective(cfg, lp2)[0]

    assert torch.autograd.gradcheck(f, (lp.policy_chosen, lp.policy_rejected), eps=1e-6, atol=1e-7)


def test_sum_reduction_and_metrics():
    lp = make_logps(b=4)
    cfg = ObjectiveConfig("inpo", eta=0.5, tau=0.1)
    mean, m = compute_objective(cfg, lp, "mean")
    total, _ = compute_objective(cfg, lp, "sum")
    assert total.item() == pytest.approx(4 * mean.item(), rel=1e-12)
    chosen = (lp.policy_chosen - lp.ref_chosen).mean().item()
    rejected = (lp.policy_rejected - lp.ref_rejected).mean().item()
    assert m["chosen_logratio"].item() == pytest.approx(chosen)
    assert m["margin"].item() == pytest.approx(chosen - rejected)
    h = per_pair_losses(cfg, lp)[1]
    assert m["accuracy"].item() == pytest.approx((h > 0).double().mean().item())
    with pytest.raises(ValueError, match="reduction"):
        compute_objective(cfg, lp, "none")


@pytest.mark.parametrize("eta,tau,msg", [(0.005, 0.005, "tau < eta"), (0.003, 0.005, "swap"),
                                         (0.0, 0.0, "eta: must be > 0"), (0.1, -0.1, "tau: must be >= 0"),
                                         (float("nan"), 0.0, "finite")])
def test_config_validation(eta, tau, msg):
    with pytest.raises(ConfigError, match=msg):
        ObjectiveConfig("inpo", eta=eta, tau=tau).validate()


def test_unknown_objective_and_bad_beta():
    with pytest.raises(ConfigError, match="unknown objective 'ppo'"):
        ObjectiveConfig("ppo").validate()
    with pytest.raises(ConfigError, match="beta"):
        ObjectiveConfig("dpo", beta=0.0).validate()


def test_input_validation_names_field():
    lp = make_logps(b=3)
    lp.ref_rejected = lp.ref_rejected[:2]
    with pytest.raises(ValueError, match="ref_rejected.*shape mismatch"):
        compute_objective(ObjectiveConfig(), lp)
    lp = make_logps(b=3)
    lp.last_chosen = lp.last_chosen.clone()
    lp.last_chosen[1] = float("nan")
    with pytest.raises(ValueError, match="last_chosen: 1 non-finite"):
        compute_objective(ObjectiveConfig(), lp)
    lp = make_logps(b=3)
    lp.policy_chosen = lp.policy_chosen.reshape(3, 1)
    with pytest.raises(ValueError, match="policy_chosen: expected a 1-D"):
        compute_objective(ObjectiveConfig(), lp)
    lp = make_logps(b=3, winrates=False)
    with pytest.raises(ValueError, match="sppo: needs chosen_winrate"):
        compute_objective(ObjectiveConfig("sppo"), lp)
    lp = make_logps(b=3)
    lp.chosen_winrate = lp.chosen_winrate + 2
    with pytest.raises(ValueError, match="must lie in"):
        compute_objective(ObjectiveConfig("sppo"), lp)


def test_dpo_gradient_direction():
    # Sanity of signs: DPO and INPO both push log pi(y_w) up and log pi(y_l) down from a neutral start.
    for name in ("dpo", "inpo"):
        lp = make_logps(b=1, requires_grad=True)
        with torch.no_grad():
            lp.policy_chosen.copy_(lp.ref_chosen)
            lp.policy_rejected.copy_(lp.ref_rejected)
            lp.last_chosen, lp.last_rejected = lp.ref_chosen, lp.ref_rejected
        loss, _ = compute_objective(ObjectiveConfig(name, eta=0.1, tau=0.03), lp)
        loss.backward()
        assert lp.policy_chosen.grad.item() < 0 < lp.policy_rejected.grad.item()
    assert F.logsigmoid(torch.tensor(0.0)).item() == pytest.approx(-math.log(2))
