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
    return "\n".join(lines + ifbench_lines(rows))


IFBENCH_COLUMNS = (("strict", "prompt_level", "strict prompt"), ("strict", "instruction_level", "strict instr."),
                   ("loose", "prompt_level", "loose prompt"), ("loose", "instruction_level", "loose instr."))
"""(mode, level, header) of the IFBench accuracy table, in IFBench's own order."""


def ifbench_lines(rows: list[dict]) -> list[str]:
    """The IFBench accuracy block (task.kind 'ifbench'): pi_ref, then pi_{t+1} of each iteration t, each accuracy
    +- its standard error (task/ifbench.py), and the subset it is computed on."""
    if not rows or "ifbench" not in rows[0]:
        return []

    def line(name: str, acc: dict) -> str:
        return f"{name:>6} | " + " | ".join(f"{acc[m][lv]:.3f} +- {acc[m][lv + '_se']:.3f}".rjust(15)
                                             for m, lv, _ in IFBENCH_COLUMNS)

    head = f"{'policy':>6} | " + " | ".join(h.rjust(15) for _, _, h in IFBENCH_COLUMNS)
    out = ["", f"IFBench accuracy of each policy on the held-out prompts (one response each, eval.sampling), +- standard error:", head,
           "-" * len(head), line("pi_ref", rows[0]["ref_ifbench"])]
    out += [line(f"pi_{r['iteration'] + 1}", r["ifbench"]) for r in rows]
    unchecked = sum(r["ifbench"]["unchecked_instructions"] for r in rows) + rows[0]["ref_ifbench"][
        "unchecked_instructions"]
    out.append(rows[0]["ifbench"]["subset"] + (f"; {unchecked} instructions whose checker failed to run left out"
                                                if unchecked else ""))
    return out


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
    if "ifbench" in rows[0]:
        fig, (ax, ax3) = plt.subplots(1, 2, figsize=(11, 4))
        # IFBench accuracy of pi_ref (x = 0) and of pi_{t+1} (x = t)
        for mode, level, name in IFBENCH_COLUMNS:
            accs = [rows[0]["ref_ifbench"]] + [r["ifbench"] for r in rows]
            ax3.errorbar([0] + its, [a[mode][level] for a in accs], yerr=[a[mode][level + "_se"] for a in accs],
                         marker="o", capsize=3, label=name)
        ax3.set_xlabel("iteration t (0: pi_ref)")
        ax3.set_ylabel("IFBench accuracy (x = 0: pi_ref, x = t: pi_{t+1})")
        ax3.set_xticks([0] + its)
        ax3.legend(fontsize="small")
    else:
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
    handles = [h for a in (ax, ax2) for h in a.get_legend_handles_labels()[0]]  # the IFBench panel has its own
    fig.legend(handles=handles, loc="upper center", ncol=2, fontsize="small")
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
