"""The Nash meter (megatron_inpo/nash_meter.py): known answers, Theorem 4's fall of the gap, exact model reads."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_inpo import nash, nash_meter

DT = torch.float64


def _uniform(n: int) -> torch.Tensor:
    return torch.full((n,), 1.0 / n, dtype=DT)


def test_rps_with_uniform_ref_has_uniform_nash_and_the_meter_reads_zero_at_it():
    p, tau = nash.rps_matrix(1.0), 0.3
    sol = nash_meter.solve("rps", p, _uniform(3).log(), tau)
    assert torch.allclose(sol.log_star.exp(), _uniform(3), atol=1e-14, rtol=0)
    assert sol.residual < 1e-14 and abs(sol.gap) < 1e-12
    r = nash_meter.read_policy([sol], _uniform(3)[None], tau)
    assert abs(r["kl_to_nash"]) < 1e-14 and abs(r["duality_gap"]) < 1e-12


def test_rps_non_uniform_policy_matches_closed_forms():
    """KL(u || pi) and DualGap(pi) written out by hand for rock-paper-scissors (i beats i+1 with probability 1)."""
    p, tau = nash.rps_matrix(1.0), 0.3
    sol = nash_meter.solve("rps", p, _uniform(3).log(), tau)
    pi = [0.5, 0.3, 0.2]
    r = nash_meter.read_policy([sol], torch.tensor([pi], dtype=DT), tau)
    kl = sum(math.log((1 / 3) / x) / 3 for x in pi)
    # P(y_i > pi) = 0.5 pi_i + pi_{i+1}; P(pi > y_i) = 1 - P(y_i > pi). With a uniform pi_ref:
    # max_pi1 J(pi1, pi) = tau log mean_i exp(P(y_i > pi)/tau) + tau KL(pi || u)
    # min_pi2 J(pi, pi2) = -tau log mean_i exp(-P(pi > y_i)/tau) - tau KL(pi || u)
    win = [0.5 * pi[i] + pi[(i + 1) % 3] for i in range(3)]
    kl_pu = sum(x * math.log(3 * x) for x in pi)
    best_max = tau * math.log(sum(math.exp(w / tau) for w in win) / 3) + tau * kl_pu
    best_min = -tau * math.log(sum(math.exp(-(1 - w) / tau) for w in win) / 3) - tau * kl_pu
    assert r["kl_to_nash"] == pytest.approx(kl, abs=1e-13)
    assert r["duality_gap"] == pytest.approx(best_max - best_min, abs=1e-13)
    assert r["duality_gap"] > 0.05  # far from zero: the meter sees the exploitable policy


def test_exact_inpo_with_theorem4_schedule_makes_the_meters_gap_fall():
    """Tabular INPO, each step the exact minimiser of Eq. 8 through the registered loss, eta_t = tau (t + 2) / 2:
    the meter's KL obeys Theorem 4's per-step inequality and final bound, and its duality gap falls."""
    gen = torch.Generator().manual_seed(0)
    tau, steps = 0.2, 24
    for p in (nash.rps_transitive_matrix(5), nash.random_matrix(6, gen)):
        n = p.shape[0]
        log_ref = torch.log_softmax(0.7 * torch.randn(n, generator=gen, dtype=DT), 0)
        sol = nash_meter.solve("g", p, log_ref, tau)
        assert abs(sol.gap) < 1e-10 and sol.residual < 1e-12
        eta = lambda t: tau * (t + 2) / 2  # noqa: E731
        iterates = nash.run_inpo(p, log_ref, tau, eta, steps)  # iterates[t - 1] = log pi_t, pi_1 = pi_ref
        readings = [nash_meter.read_policy([sol], lp.exp()[None], tau) for lp in iterates]
        kls = [r["kl_to_nash"] for r in readings]
        gaps = [r["duality_gap"] for r in readings]
        b = max(float((lp - log_ref).abs().max()) for lp in iterates + [sol.log_star])
        c = max(b * tau, 1.0)
        for t in range(1, steps + 1):  # KL(pi*, pi_{t+1}) <= (1 - tau/eta_t) KL(pi*, pi_t) + 8 C^2 / eta_t^2
            assert kls[t] <= (1 - tau / eta(t)) * kls[t - 1] + 8 * c * c / eta(t) ** 2 + 1e-12
        assert kls[-1] <= 32 * c * c / (tau * tau * (steps + 1))
        assert gaps[-1] < gaps[0] / 10
        assert gaps[-1] <= min(gaps[: steps // 2])
        assert all(g >= -1e-12 for g in gaps)


def test_reading_a_real_model_equals_softmax_of_its_logits(tmp_path):
    """policy_distributions (left-padded batch) == softmax of the logits of each prompt alone, restricted to the
    response tokens and renormalised; the leaked mass is the rest."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_inpo.task import game
    from megatron_inpo.task.synthetic import TaskConfig

    cfg = TaskConfig(kind="game", hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2, num_layers=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**game.hf_config_dict(cfg))).eval()
    model.save_pretrained(str(tmp_path / "m"), safe_serialization=True)
    prompts = [game.prompt_ids_of(x) for x in game.make_game_prompts(TaskConfig(kind="game", games=5))]
    prompts.append(game.prompt_ids_of("n5 q1"))  # shorter: the batch is left-padded
    tokens = game.response_token_ids(5)
    pi, leaked = nash_meter.policy_distributions(tmp_path / "m", prompts, tokens, batch_size=4)
    assert pi.shape == (6, 5) and pi.dtype == DT
    with torch.no_grad():
        for row, ids in enumerate(prompts):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
            full = torch.softmax(logits, 0)
            want = full[tokens] / full[tokens].sum()
            assert torch.allclose(pi[row], want, atol=1e-6, rtol=0)
            assert float(leaked[row]) == pytest.approx(1 - float(full[tokens].sum()), abs=1e-6)
    assert float(leaked.min()) > 0.3  # an untrained model spreads mass over the whole vocabulary


def test_style_exploitability():
    assert nash_meter.style_exploitability({"rock": 1 / 3, "paper": 1 / 3, "scissors": 1 / 3, "none": 0}) == \
        pytest.approx(0.0, abs=1e-15)
    # all rock: paper beats it with sigmoid(RPS_SCALE)
    from megatron_inpo.task.oracle import RPS_SCALE

    got = nash_meter.style_exploitability({"rock": 0.9, "paper": 0, "scissors": 0, "none": 0.1})
    assert got == pytest.approx(1 / (1 + math.exp(-RPS_SCALE)) - 0.5)


def test_style_mix_of_generations_and_the_tables_meter_columns(tmp_path):
    import json

    from megatron_inpo.driver.report import format_table

    gens = tmp_path / "g.jsonl"
    gens.write_text("".join(json.dumps({"id": str(i), "prompt": "a b", "outputs": [o], "output_ids": [[1]]}) + "\n"
                            for i, o in enumerate(["rock a", "paper b", "paper a b", "a b"])))
    mix = nash_meter.style_mix(gens)
    assert mix == {"rock": 0.25, "paper": 0.5, "scissors": 0.0, "none": 0.25}
    base = {"iteration": 1, "pairs": 8, "loss": 1.0, "win_rate": 0.6, "stderr": 0.1, "mean_tokens": 2.0,
            "ref_mean_tokens": 2.0}
    styled = format_table([{**base, "style_mix": mix, "style_exploitability": 0.1, "ref_style_mix": mix,
                            "ref_style_exploitability": 0.2}]).splitlines()
    assert "style mix r/p/s" in styled[0] and "(pi_ref)" in styled[2] and "0.33/0.67/0.00" not in styled[3]
    assert "0.25/0.50/0.00" in styled[3] and "APPROXIMATION" in styled[4]
    exact = format_table([{**base, "kl_to_nash": 0.1, "duality_gap": 0.05, "leaked_mass": 0.01, "ref_kl_to_nash": 0.3,
                           "ref_duality_gap": 0.2, "ref_leaked_mass": 0.02, "nash_tau": 0.1, "nash_games": 4,
                           "nash_residual": 1e-16, "nash_gap": 2e-16}]).splitlines()
    assert "KL(pi*||pi_t)" in exact[0] and "duality gap" in exact[0]
    assert exact[2].split(" | ")[:2] == ["   0", "            (pi_ref)"]
    assert exact[2].endswith("0.3000 |      0.2000 |  0.0200")
    assert exact[3].endswith("0.1000 |      0.0500 |  0.0100") and "certificate" in exact[4] and "2.0e-16" in exact[4]
