"""`verify-nash`: every check passes with the real loss, and deliberately broken losses make it fail."""
import json
import subprocess
import sys

import pytest
import torch

from megatron_inpo import nash, objectives


def _swapped(cfg, lp):  # tau and eta swapped in h
    ratio = cfg.eta / cfg.tau if cfg.tau else 0.0
    h = (lp.policy_chosen - lp.policy_rejected) - ratio * (lp.ref_chosen - lp.ref_rejected) \
        - (1 - ratio) * (lp.last_chosen - lp.last_rejected)
    return (h - 1 / (2 * cfg.eta)) ** 2, h


def _no_half(cfg, lp):  # target 1/eta instead of 1/(2 eta)
    h = objectives.inpo_h(cfg, lp)
    return (h - 1 / cfg.eta) ** 2, h


def _sign(cfg, lp):  # y_w and y_l swapped
    h = -objectives.inpo_h(cfg, lp)
    return (h - 1 / (2 * cfg.eta)) ** 2, h


def test_cli_json_all_checks_pass():
    out = subprocess.run([sys.executable, "-m", "megatron_inpo", "verify-nash", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    res = json.loads(out.stdout)
    names = [c["name"] for c in res["checks"]]
    assert res["passed"] and all(c["passed"] for c in res["checks"])
    for required in ("omd_step", "prop6", "theorem4[rps]", "converges[random6]", "cycling[tau>0]", "cycling[tau=0]"):
        assert required in names
    omd = next(c for c in res["checks"] if c["name"] == "omd_step")
    assert omd["figure"] <= 1e-6 and omd["tolerance"] == 1e-6


@pytest.mark.parametrize("broken", [_swapped, _no_half, _sign], ids=["tau_eta_swapped", "no_half", "sign"])
def test_broken_loss_fails(monkeypatch, broken, capsys):
    monkeypatch.setitem(objectives.OBJECTIVES, "inpo", broken)
    rc = nash.main(["--json"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 1 and not res["passed"]
    failed = {c["name"] for c in res["checks"] if not c["passed"]}
    assert "omd_step" in failed


def test_games_are_valid_and_not_bradley_terry():
    gen = torch.Generator().manual_seed(0)
    for p in (nash.rps_matrix(), nash.rps_transitive_matrix(), nash.random_matrix(6, gen)):
        nash.check_preference_matrix(p)
    # Intransitivity: rock-paper-scissors has a preference cycle, which no Bradley-Terry model can produce.
    p = nash.rps_matrix()
    assert p[0, 1] > 0.5 and p[1, 2] > 0.5 and p[2, 0] > 0.5
    with pytest.raises(ValueError, match="P \\+ P\\^T = 1"):
        nash.check_preference_matrix(torch.rand(3, 3, dtype=torch.float64))


def test_duality_gap_zero_only_at_nash():
    p = nash.rps_matrix(0.6)
    log_ref = torch.log(torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64))
    star = nash.solve_nash(p, log_ref, 0.2)
    assert abs(nash.duality_gap(star.exp(), p, log_ref, 0.2)) < 1e-12
    assert nash.duality_gap(log_ref.exp(), p, log_ref, 0.2) > 1e-3
