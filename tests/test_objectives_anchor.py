"""DPO / IPO anchors (objective.dpo_anchor) against closed forms in float64: 'last' reads the last_* columns
(log pi_t, RLHFlow's current iterative DPO), 'ref' the ref_* columns (log pi_ref)."""
import math

import pytest
import torch

from megatron_inpo.config import ConfigError
from megatron_inpo.objectives import ObjectiveConfig, PairLogps, per_pair_losses

DT = torch.float64


def make_logps(b=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return PairLogps(*[-(torch.rand(b, generator=g, dtype=DT) * 20 + 1) for _ in range(6)])


def test_default_anchor_is_the_previous_iterate():
    assert ObjectiveConfig().dpo_anchor == "last"


def test_dpo_last_anchor_closed_form():
    lp = make_logps()
    beta = 0.1
    loss, z = per_pair_losses(ObjectiveConfig("dpo", beta=beta), lp)
    for k in range(6):
        pc, pr = lp.policy_chosen[k].item(), lp.policy_rejected[k].item()
        lc, lr = lp.last_chosen[k].item(), lp.last_rejected[k].item()
        x = beta * ((pc - pr) - (lc - lr))
        want = math.log1p(math.exp(-x)) if x >= 0 else -x + math.log1p(math.exp(x))  # -log sigmoid(x)
        assert loss[k].item() == pytest.approx(want, rel=1e-12, abs=1e-12)
        assert z[k].item() == pytest.approx((pc - pr) - (lc - lr), rel=1e-12, abs=1e-12)


def test_ipo_last_anchor_closed_form():
    lp = make_logps()
    loss, _ = per_pair_losses(ObjectiveConfig("ipo", beta=0.25), lp)
    z = (lp.policy_chosen - lp.policy_rejected) - (lp.last_chosen - lp.last_rejected)
    torch.testing.assert_close(loss, (z - 2.0) ** 2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["dpo", "ipo"])
def test_each_anchor_reads_only_its_columns(name):
    lp = make_logps()
    last, _ = per_pair_losses(ObjectiveConfig(name, dpo_anchor="last"), lp)
    ref, _ = per_pair_losses(ObjectiveConfig(name, dpo_anchor="ref"), lp)
    assert not torch.allclose(last, ref)
    moved = PairLogps(lp.policy_chosen, lp.policy_rejected, lp.ref_chosen + 3.0, lp.ref_rejected - 1.0,
                      lp.last_chosen, lp.last_rejected)
    torch.testing.assert_close(per_pair_losses(ObjectiveConfig(name, dpo_anchor="last"), moved)[0], last)
    moved = PairLogps(lp.policy_chosen, lp.policy_rejected, lp.ref_chosen, lp.ref_rejected,
                      lp.last_chosen + 3.0, lp.last_rejected - 1.0)
    torch.testing.assert_close(per_pair_losses(ObjectiveConfig(name, dpo_anchor="ref"), moved)[0], ref)
    # at t = 1 the log-prob pass stores last = ref (pi_1 = pi_ref): both anchors agree
    first = PairLogps(lp.policy_chosen, lp.policy_rejected, lp.ref_chosen, lp.ref_rejected, lp.ref_chosen,
                      lp.ref_rejected)
    torch.testing.assert_close(per_pair_losses(ObjectiveConfig(name, dpo_anchor="last"), first)[0],
                               per_pair_losses(ObjectiveConfig(name, dpo_anchor="ref"), first)[0])


def test_bad_anchor_names_the_field():
    with pytest.raises(ConfigError, match=r"^objective\.dpo_anchor: 'last' \(pi_t\) or 'ref'"):
        ObjectiveConfig("dpo", dpo_anchor="pi_ref").validate()
