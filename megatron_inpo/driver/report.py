"""The run's report: the per-iteration table printed by `megatron-inpo run` and the win-rate plot."""
from __future__ import annotations

from pathlib import Path


def format_table(rows: list[dict]) -> str:
    head = (f"{'iter':>4} | {'win rate vs pi_ref':>20} | {'mean len (tok)':>14} | {'loss':>9} | {'pairs':>5} | "
            f"{'eta':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        wr = f"{r['win_rate']:.3f} +- {r['stderr']:.3f}" if "win_rate" in r else "-"
        ln = f"{r['mean_tokens']:.2f}" if "mean_tokens" in r else "-"
        loss = f"{r['loss']:.4g}" if r.get("loss") is not None else "-"
        eta = f"{r['eta']:.4g}" if r.get("eta") is not None else "-"
        lines.append(f"{r['iteration']:>4} | {wr:>20} | {ln:>14} | {loss:>9} | {r['pairs']:>5} | {eta:>9}")
    lines = with_meter_columns(rows, lines)
    if rows and "ref_mean_tokens" in rows[0]:
        lines.append(f"pi_ref mean length: {rows[0]['ref_mean_tokens']:.2f} tokens; win rate = mean oracle "
                     "P(pi_t beats pi_ref) over held-out prompts, +- binomial standard error")
    return "\n".join(lines)


def with_meter_columns(rows: list[dict], lines: list[str]) -> list[str]:
    """The Nash meter's columns (megatron_inpo/nash_meter.py) appended to the table's header and rows, a row 0 for
    pi_ref, and pi*'s certificate below: exact KL(pi* || pi_t), duality gap and leaked mass on the game task; the
    style mix and its exploitability in the style game (an approximation) on the word task."""
    if not rows:
        return lines
    if "kl_to_nash" in rows[0]:
        head = f" | {'KL(pi*||pi_t)':>13} | {'duality gap':>11} | {'leaked':>7}"

        def cell(r, p):
            return f" | {r[p + 'kl_to_nash']:>13.4f} | {r[p + 'duality_gap']:>11.4f} | {r[p + 'leaked_mass']:>7.4f}"

        r0 = rows[0]
        note = (f"Nash meter (exact): pi* of each of {r0['nash_games']} eval games, KL-regularised towards pi_ref with "
                f"tau={r0['nash_tau']:.4g}, solved in float64; certificate: max fixed-point residual "
                f"{r0['nash_residual']:.1e}, max duality gap {r0['nash_gap']:.1e}. KL and gap are means over the "
                "games; 'leaked' = probability mass outside the response set (renormalised away).")
    elif "style_mix" in rows[0]:
        head = f" | {'style mix r/p/s':>17} | {'expl~':>6}"

        def cell(r, p):
            m = r[p + "style_mix"]
            mix = f"{m['rock']:.2f}/{m['paper']:.2f}/{m['scissors']:.2f}"
            return f" | {mix:>17} | {r[p + 'style_exploitability']:>6.3f}"

        note = ("style mix = rock/paper/scissors shares of the eval samples' first words; expl~ = max_s P(s beats the "
                "mix) - 1/2 in the style game alone, an APPROXIMATION of exploitability (ignores quality).")
    else:
        return lines
    widths = [len(c) for c in lines[0].split(" | ")]
    ref_cells = ["0", "(pi_ref)"] + ["-"] * (len(widths) - 2)
    ref_line = " | ".join(c.rjust(w) for c, w in zip(ref_cells, widths))
    out = [lines[0] + head, lines[1] + "-" * len(head), ref_line + cell(rows[0], "ref_")]
    out += [line + cell(r, "") for line, r in zip(lines[2:2 + len(rows)], rows)]
    return out + lines[2 + len(rows):] + [note]


def plot(rows: list[dict], path: Path) -> Path | None:
    if not rows or "win_rate" not in rows[0]:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [r["iteration"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(its, [r["win_rate"] for r in rows], yerr=[r["stderr"] for r in rows], marker="o", capsize=4,
                label="win rate vs pi_ref")
    ax.axhline(0.5, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("iteration t")
    ax.set_ylabel("win rate of pi_{t+1} vs pi_ref")
    ax.set_xticks(its)
    ax2 = ax.twinx()
    ax2.plot(its, [r["mean_tokens"] for r in rows], color="tab:orange", marker="s", label="mean length")
    ax2.set_ylabel("mean response length (tokens)")
    fig.legend(loc="upper center", ncol=2, fontsize="small")
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
