"""The run's report: the per-iteration table printed by `megatron-inpo run` and the win-rate plot."""
from __future__ import annotations

from pathlib import Path


def format_table(rows: list[dict]) -> str:
    head = f"{'iter':>4} | {'win rate vs pi_ref':>20} | {'mean len (tok)':>14} | {'loss':>9} | {'pairs':>5}"
    lines = [head, "-" * len(head)]
    for r in rows:
        wr = f"{r['win_rate']:.3f} +- {r['stderr']:.3f}" if "win_rate" in r else "-"
        ln = f"{r['mean_tokens']:.2f}" if "mean_tokens" in r else "-"
        loss = f"{r['loss']:.4g}" if r.get("loss") is not None else "-"
        lines.append(f"{r['iteration']:>4} | {wr:>20} | {ln:>14} | {loss:>9} | {r['pairs']:>5}")
    if rows and "ref_mean_tokens" in rows[0]:
        lines.append(f"pi_ref mean length: {rows[0]['ref_mean_tokens']:.2f} tokens; win rate = mean oracle "
                     "P(pi_t beats pi_ref) over held-out prompts, +- binomial standard error")
    return "\n".join(lines)


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
