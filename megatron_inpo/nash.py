"""`megatron-inpo verify-nash`: the INPO objective checked against the paper's theory, in float64.

On finite response sets with explicit general preference matrices P (P[i, j] = P(y_i beats y_j), P + P^T = 1)
and a tabular softmax policy, the checks are:

1. omd_step       the minimiser of the expected sampled loss (Eq. 8; pairs drawn from pi_t, ordered by the oracle),
                  computed through the registered INPO loss, equals the closed-form OMD step (Eq. 5).
2. prop6          L_t (Eq. 7, written here independently) minus Eq. 8 is the same constant for random policies.
3. nash_*         iterating INPO (each step = exact minimisation of Eq. 8 through the loss) with
                  eta_t = tau (t+2)/2 satisfies Theorem 4's per-step inequality and final bound, KL(pi*, pi_t)
                  falls, and with a constant eta it reaches pi*, the Nash policy of the KL-regularised game
                  (Eq. 3) computed independently by Newton's method on pi* ∝ pi_ref exp(P pi* / tau) and certified
                  by its duality gap; the duality gap of the last iterate is reported.
4. cycling        on rock-paper-scissors, plain best-response iteration cycles (tau = 0: period 3; tau > 0: a
                  logit best response that never settles), while INPO converges (tau > 0: last iterate;
                  tau = 0, "w/o KL": the average iterate, Theorem 3).

Tolerances: 1e-6 for exact identities (checks 1, 2 and convergence to pi*), as stated per check.
The INPO loss is looked up in megatron_inpo.objectives.OBJECTIVES at run time, so a broken loss fails here.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field

import torch

from megatron_inpo import objectives

DT = torch.float64
EXACT_TOL = 1e-6


@dataclass
class CheckResult:
    name: str
    """Short identifier of the check."""
    description: str
    """What the check asserts."""
    figure: float
    """The measured number (e.g. a max abs difference)."""
    tolerance: float
    """Pass when figure <= tolerance (or the comparison stated in `description`)."""
    passed: bool
    """Whether the check held."""
    details: dict = field(default_factory=dict)
    """Further figures (per-iterate values, bounds, ...)."""


# ---------------------------------------------------------------- games


def rps_matrix(strength: float = 1.0) -> torch.Tensor:
    """Rock-paper-scissors: i beats i+1 (mod 3) with probability (1 + strength) / 2."""
    p = torch.full((3, 3), 0.5, dtype=DT)
    for i in range(3):
        j = (i + 1) % 3
        p[i, j] = 0.5 + strength / 2
        p[j, i] = 0.5 - strength / 2
    return p


def rps_transitive_matrix(n: int = 5, cyc: float = 0.6, trans: float = 0.3) -> torch.Tensor:
    """A cyclic (rock-paper-scissors-like on a ring of n) plus a transitive component; not Bradley-Terry."""
    p = torch.full((n, n), 0.5, dtype=DT)
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            d = (j - i) % n
            cyc_term = cyc / 2 if d <= n // 2 else -cyc / 2  # i beats the next n//2 on the ring
            trans_term = trans * (j - i) / (2 * (n - 1))  # lower index is better
            p[i, j] = 0.5 + cyc_term + trans_term
    return p


def random_matrix(n: int, gen: torch.Generator) -> torch.Tensor:
    a = torch.rand((n, n), generator=gen, dtype=DT)
    return 0.5 + 0.5 * (a - a.T)


def check_preference_matrix(p: torch.Tensor) -> None:
    if p.dim() != 2 or p.shape[0] != p.shape[1]:
        raise ValueError(f"preference matrix must be square, got {tuple(p.shape)}")
    if not torch.allclose(p + p.T, torch.ones_like(p), atol=1e-12):
        raise ValueError("preference matrix must satisfy P + P^T = 1")
    if bool(((p < 0) | (p > 1)).any()):
        raise ValueError("preference matrix entries must lie in [0, 1]")


# ---------------------------------------------------------------- INPO step through the registered loss


def expected_sampled_loss(theta: torch.Tensor, p: torch.Tensor, log_ref: torch.Tensor, log_last: torch.Tensor,
                          cfg: objectives.ObjectiveConfig) -> torch.Tensor:
    """Eq. 8 exactly: E_{y, y' ~ pi_t} E_{(y_w, y_l) ~ lambda_p(y, y')} loss(pi, y_w, y_l), via the registry loss.

    Every ordered pair (i, j) is the outcome y_w = i, y_l = j with probability pi_t(i) pi_t(j) P[i, j] + (the same
    outcome from the draw (j, i)) pi_t(j) pi_t(i) P[i, j]; i = j pairs contribute with both orders.
    """
    n = p.shape[0]
    log_pi = torch.log_softmax(theta, dim=0)
    pi_t = log_last.exp()
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    i, j = i.reshape(-1), j.reshape(-1)
    weight = 2.0 * pi_t[i] * pi_t[j] * p[i, j]
    lp = objectives.PairLogps(
        policy_chosen=log_pi[i], policy_rejected=log_pi[j],
        ref_chosen=log_ref[i], ref_rejected=log_ref[j],
        last_chosen=log_last[i], last_rejected=log_last[j],
    )
    losses, _ = objectives.per_pair_losses(cfg, lp)
    return (weight * losses).sum()


def minimise(fn, theta0: torch.Tensor, steps: int = 30) -> torch.Tensor:
    """Damped Newton with a pseudo-inverse (softmax logits have one flat direction: the common shift)."""
    theta = theta0.clone()
    for _ in range(steps):
        theta = theta.detach().requires_grad_(True)
        val = fn(theta)
        (g,) = torch.autograd.grad(val, theta)
        hess = torch.autograd.functional.hessian(fn, theta.detach())
        step = torch.linalg.pinv(hess, hermitian=True, rtol=1e-12) @ g
        t = 1.0
        with torch.no_grad():
            while t > 1e-8 and _value(fn, theta - t * step) > val + 1e-14 * abs(float(val)):
                t *= 0.5
        theta = (theta - t * step).detach()
        theta = theta - theta.mean()
        if float(g.abs().max()) < 1e-13:
            break
    return theta.detach()


def _value(fn, theta: torch.Tensor) -> float:
    """fn(theta), or inf where the loss refuses the point (non-finite log-probs): the line search steps back."""
    try:
        return float(fn(theta))
    except ValueError:
        return math.inf


def inpo_step(p, log_ref, log_last, eta, tau, name="inpo") -> torch.Tensor:
    """pi_{t+1} as the minimiser of Eq. 8 computed through the registered loss; returns log pi_{t+1}."""
    cfg = objectives.ObjectiveConfig(name=name, eta=eta, tau=tau)
    theta = minimise(lambda th: expected_sampled_loss(th, p, log_ref, log_last, cfg), log_last.clone())
    return torch.log_softmax(theta, dim=0)


def omd_closed_form(p, log_ref, log_last, eta, tau) -> torch.Tensor:
    """Eq. 5: pi_{t+1} ∝ exp(P(y > pi_t) / eta) pi_ref^(tau/eta) pi_t^(1 - tau/eta); returns log pi_{t+1}."""
    win = p @ log_last.exp()
    return torch.log_softmax(win / eta + (tau / eta) * log_ref + (1 - tau / eta) * log_last, dim=0)


# ---------------------------------------------------------------- the game, independently of INPO


def kl(log_a: torch.Tensor, log_b: torch.Tensor) -> float:
    return float((log_a.exp() * (log_a - log_b)).sum())


def duality_gap(pi: torch.Tensor, p: torch.Tensor, log_ref: torch.Tensor, tau: float) -> float:
    """DualGap(pi) = max_pi1 J(pi1, pi) - min_pi2 J(pi, pi2) for Eq. 3 (closed forms of both inner problems)."""
    win = p @ pi  # P(y > pi)
    lose = p.T @ pi  # P(pi > y), the column player's payoff direction
    log_pi = pi.clamp_min(1e-300).log()
    kl_pi = float((pi * (log_pi - log_ref)).sum()) if tau > 0 else 0.0
    if tau > 0:
        best_max = tau * float(torch.logsumexp(log_ref + win / tau, 0)) + tau * kl_pi
        best_min = -tau * kl_pi - tau * float(torch.logsumexp(log_ref - lose / tau, 0))
    else:
        best_max = float(win.max())
        best_min = float(lose.min())
    return best_max - best_min


def solve_nash(p: torch.Tensor, log_ref: torch.Tensor, tau: float, iters: int = 200) -> torch.Tensor:
    """pi* of the KL-regularised game: root of G(theta) = theta - log_ref - P softmax(theta) / tau (up to a shift).

    Newton's method on G with backtracking on |G|; independent of the INPO code.
    """
    theta = log_ref.clone()

    def resid(th):
        g = th - log_ref - (p @ torch.softmax(th, 0)) / tau
        return g - g.mean()

    for _ in range(iters):
        g = resid(theta)
        if float(g.abs().max()) < 1e-15:
            break
        jac = torch.autograd.functional.jacobian(resid, theta)
        step = torch.linalg.lstsq(jac, g.unsqueeze(1)).solution.squeeze(1)
        t = 1.0
        while t > 1e-10 and float(resid(theta - t * step).norm()) >= float(g.norm()):
            t *= 0.5
        theta = theta - t * step
    return torch.log_softmax(theta, 0)


# ---------------------------------------------------------------- checks


def check_omd_step(games, etas_taus, gen) -> CheckResult:
    worst, per = 0.0, {}
    for gname, p in games.items():
        n = p.shape[0]
        for eta, tau in etas_taus:
            log_ref = torch.log_softmax(torch.randn(n, generator=gen, dtype=DT), 0)
            log_last = torch.log_softmax(torch.randn(n, generator=gen, dtype=DT), 0)
            got = inpo_step(p, log_ref, log_last, eta, tau).exp()
            want = omd_closed_form(p, log_ref, log_last, eta, tau).exp()
            d = float((got - want).abs().max())
            per[f"{gname} eta={eta:g} tau={tau:g}"] = d
            worst = max(worst, d)
    return CheckResult("omd_step", "argmin of expected Eq. 8 (through the INPO loss) == closed-form OMD step Eq. 5; "
                       "figure = max |pi_argmin - pi_Eq5|", worst, EXACT_TOL, worst <= EXACT_TOL, per)


def population_loss_eq7(log_pi, p, log_ref, log_last, eta, tau) -> float:
    """Eq. 7 written directly from the paper (not through the registry)."""
    pi_t = log_last.exp()
    win = p @ pi_t
    h = (log_pi[:, None] - log_pi[None, :]) - (tau / eta) * (log_ref[:, None] - log_ref[None, :]) \
        - (1 - tau / eta) * (log_last[:, None] - log_last[None, :])
    target = (win[:, None] - win[None, :]) / eta
    return float((pi_t[:, None] * pi_t[None, :] * (h - target) ** 2).sum())


def check_prop6(games, eta, tau, gen, n_policies=25) -> CheckResult:
    worst, per = 0.0, {}
    cfg = objectives.ObjectiveConfig(name="inpo", eta=eta, tau=tau)
    for gname, p in games.items():
        n = p.shape[0]
        log_ref = torch.log_softmax(torch.randn(n, generator=gen, dtype=DT), 0)
        log_last = torch.log_softmax(torch.randn(n, generator=gen, dtype=DT), 0)
        diffs = []
        for _ in range(n_policies):
            theta = 3 * torch.randn(n, generator=gen, dtype=DT)
            eq8 = float(expected_sampled_loss(theta, p, log_ref, log_last, cfg))
            eq7 = population_loss_eq7(torch.log_softmax(theta, 0), p, log_ref, log_last, eta, tau)
            diffs.append(eq7 - eq8)
        spread = max(diffs) - min(diffs)
        per[gname] = {"constant": diffs[0], "spread": spread}
        worst = max(worst, spread)
    return CheckResult("prop6", f"L_t (Eq. 7) - Eq. 8 is one constant over {n_policies} random policies per game "
                       "(Proposition 6); figure = max spread of the difference", worst, EXACT_TOL,
                       worst <= EXACT_TOL, per)


def run_inpo(p, log_ref, tau, eta_fn, steps, name="inpo"):
    log_pi = log_ref.clone()  # Algorithm 1 line 1: pi_1 = pi_ref
    out = [log_pi]
    for t in range(1, steps + 1):
        log_pi = inpo_step(p, log_ref, log_pi, eta_fn(t), tau, name=name)
        out.append(log_pi)
    return out


def check_nash(gname, p, tau, gen, steps=60) -> list[CheckResult]:
    n = p.shape[0]
    log_ref = torch.log_softmax(0.7 * torch.randn(n, generator=gen, dtype=DT), 0)
    log_star = solve_nash(p, log_ref, tau)
    gap_star = duality_gap(log_star.exp(), p, log_ref, tau)

    # Theorem 4 with eta_t = tau (t + 2) / 2.
    eta_fn = lambda t: tau * (t + 2) / 2  # noqa: E731
    iters = run_inpo(p, log_ref, tau, eta_fn, steps)
    kls = [kl(log_star, lp) for lp in iters]  # kls[t-1] = KL(pi*, pi_t)
    b = max(float((lp - log_ref).abs().max()) for lp in iters + [log_star])
    c = max(b * tau, 1.0)
    step_viol = max(kls[t] - ((1 - tau / eta_fn(t)) * kls[t - 1] + 8 * c * c / eta_fn(t) ** 2)
                    for t in range(1, steps + 1))
    final_bound = 32 * c * c / (tau * tau * (steps + 1))
    falls = kls[-1] < kls[0] and kls[-1] <= min(kls[: len(kls) // 2])
    thm_ok = step_viol <= 1e-12 and kls[-1] <= final_bound and falls

    # Constant eta: exact OMD converges to pi* (its fixed point is the regularised Nash policy).
    eta_c = 2.5 * tau
    const = run_inpo(p, log_ref, tau, lambda t: eta_c, 150)
    d_const = float((const[-1].exp() - log_star.exp()).abs().max())
    gap_last = duality_gap(const[-1].exp(), p, log_ref, tau)
    gap_sched = duality_gap(iters[-1].exp(), p, log_ref, tau)
    return [
        CheckResult(f"nash_solver[{gname}]", "independent Newton solution of pi* ∝ pi_ref exp(P pi*/tau) has duality "
                    "gap ~ 0 (figure = DualGap(pi*))", gap_star, 1e-10, abs(gap_star) <= 1e-10,
                    {"tau": tau, "pi_star": log_star.exp().tolist()}),
        CheckResult(f"theorem4[{gname}]", "eta_t = tau(t+2)/2: KL(pi*, pi_t) obeys the per-step inequality of "
                    "Theorem 4 (max violation <= 1e-12), ends below 32C^2/(tau^2 (T+1)) and falls; figure = final KL",
                    kls[-1], final_bound, thm_ok,
                    {"kl_first": kls[0], "kl_every_10": kls[::10], "max_step_violation": step_viol,
                     "final_bound": final_bound, "B": b, "T": steps, "dual_gap_last": gap_sched}),
        CheckResult(f"converges[{gname}]", "constant eta = 2.5 tau, 150 INPO iterations reach pi* (figure = max "
                    "|pi_T - pi*|); duality gap of the last iterate in details", d_const, EXACT_TOL,
                    d_const <= EXACT_TOL, {"dual_gap_last": gap_last, "eta": eta_c}),
    ]


def best_response(p, log_ref, log_pi, tau):
    """argmin_pi l_t(pi): the (KL-regularised) best response to pi_t; tau = 0 gives a pure strategy."""
    win = p @ log_pi.exp()
    if tau > 0:
        return torch.log_softmax(log_ref + win / tau, 0)
    out = torch.full_like(win, -math.inf)
    out[int(torch.argmax(win))] = 0.0
    return out


def check_cycling(gen, steps=60) -> list[CheckResult]:
    p = rps_matrix(1.0)
    log_ref = torch.log(torch.tensor([0.5, 0.3, 0.2], dtype=DT))
    results = []
    # tau > 0: a small tau makes the regularised best response oscillate; INPO's last iterate converges
    # (for eta large enough against tau: Theorem 4's 8C^2/eta^2 term; at eta close to tau OMD itself oscillates).
    tau, eta = 0.15, 0.5
    log_star = solve_nash(p, log_ref, tau)
    br = [log_ref]
    for _ in range(steps):
        br.append(best_response(p, log_ref, br[-1], tau))
    br_dist = min(float((lp.exp() - log_star.exp()).abs().max()) for lp in br[-10:])
    inpo = run_inpo(p, log_ref, tau, lambda t: eta, 150)
    inpo_dist = float((inpo[-1].exp() - log_star.exp()).abs().max())
    results.append(CheckResult(
        "cycling[tau>0]", "RPS, tau=0.15, eta=0.5: best-response iterates stay away from pi* (min distance over the last 10 "
        "> 0.1) while INPO's last iterate reaches it (figure = max |pi_T - pi*| of INPO)", inpo_dist, EXACT_TOL,
        br_dist > 0.1 and inpo_dist <= EXACT_TOL,
        {"best_response_min_dist_last10": br_dist, "inpo_dual_gap_last": duality_gap(inpo[-1].exp(), p, log_ref, tau)}))

    # tau = 0 ("w/o KL"): pure best response cycles with period 3; INPO's average iterate approaches the
    # uniform Nash policy (Theorem 3), its gap shrinking.
    br0 = [log_ref]
    for _ in range(steps):
        br0.append(best_response(p, log_ref, br0[-1], 0.0))
    period3 = all(torch.equal(br0[t], br0[t + 3]) for t in range(steps - 10, steps - 3))
    not_const = not torch.equal(br0[-1], br0[-2])
    eta0 = 1.0
    inpo0 = run_inpo(p, log_ref, 0.0, lambda t: eta0, steps, name="inpo_nokl")
    avg = torch.stack([lp.exp() for lp in inpo0[1:]]).cumsum(0) / torch.arange(1, steps + 1, dtype=DT)[:, None]
    gaps = [duality_gap(avg[t], p, log_ref, 0.0) for t in range(steps)]
    gap_avg, gap_early = gaps[-1], gaps[steps // 10]
    gap_last = duality_gap(inpo0[-1].exp(), p, log_ref, 0.0)
    results.append(CheckResult(
        "cycling[tau=0]", "RPS, tau=0: pure best response cycles with period 3; INPO w/o KL's average iterate "
        "approaches the Nash policy (its duality gap falls; figure = gap of the average at T, tolerance = "
        "gap at T/10)", gap_avg, gap_early, period3 and not_const and gap_avg < gap_early,
        {"best_response_period3": period3, "avg_gap_every_10": gaps[::10], "last_iterate_gap": gap_last}))
    return results


def verify(seed: int = 0) -> list[CheckResult]:
    gen = torch.Generator().manual_seed(seed)
    games = {
        "rps": rps_matrix(1.0),
        "rps_soft": rps_matrix(0.6),
        "ring5_transitive": rps_transitive_matrix(5),
        "random6": random_matrix(6, gen),
        "random8": random_matrix(8, gen),
    }
    for p in games.values():
        check_preference_matrix(p)
    results = _guarded("omd_step", lambda: [check_omd_step(games, [(1.0, 1 / 3), (0.5, 0.1), (0.3, 0.0),
                                                                 (0.015, 0.005)], gen)])
    results += _guarded("prop6", lambda: [check_prop6(games, eta=0.5, tau=0.5 / 3, gen=gen)])
    for gname in ("rps", "ring5_transitive", "random6"):
        results += _guarded(f"nash[{gname}]", lambda gname=gname: check_nash(gname, games[gname], tau=0.2, gen=gen))
    results += _guarded("cycling", lambda: check_cycling(gen))
    return results


def _guarded(name: str, run) -> list[CheckResult]:
    """The check's results; a loss that drives the iteration to non-finite log-probs fails the check (a broken
    loss must be reported as a failed check, not end the verification)."""
    try:
        return run()
    except ValueError as e:
        return [CheckResult(name, f"did not complete: {e}", math.inf, 0.0, False)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="megatron-inpo verify-nash", description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random games and policies")
    args = ap.parse_args(argv)
    torch.set_default_dtype(torch.float64)
    try:
        results = verify(args.seed)
    finally:
        torch.set_default_dtype(torch.float32)
    ok = all(r.passed for r in results)
    if args.json:
        print(json.dumps({"passed": ok, "checks": [asdict(r) for r in results]}, indent=2))
    else:
        for r in results:
            print(f"[{'PASS' if r.passed else 'FAIL'}] {r.name:<28} figure={r.figure:.3e}  tol={r.tolerance:.1e}  "
                  f"{r.description}")
        print("all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
