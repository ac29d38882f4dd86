"""How ``alignq bench allocation`` shows its rows: the text table with 95% intervals, and the PNG plot."""

from __future__ import annotations

from typing import TYPE_CHECKING

from middleware.bench.report import format_interval

if TYPE_CHECKING:
    from middleware.bench.allocation import BenchRow

BASELINES = ("null", "oracle")


def plot_rows(rows: list[BenchRow], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for method in dict.fromkeys(r.method for r in rows):
        mine = [r for r in rows if r.method == method]
        ks = [r.k for r in mine]
        style = {"linestyle": "--"} if method in BASELINES else {}
        left.errorbar(ks, [r.median_bwr for r in mine], capsize=3, label=method, marker="o", **style,
                      yerr=[[r.median_bwr - r.q1_bwr for r in mine], [r.q3_bwr - r.median_bwr for r in mine]])
        right.plot(ks, [r.median_est_over_budget for r in mine], marker="o", label=method, **style)
    left.axhline(0.5, color="grey", linewidth=0.8)
    right.axhline(1.0, color="grey", linewidth=0.8)
    left.set(xlabel="K (prompts per batch)", ylabel="batch win rate vs uniform (median, IQR)", xscale="log")
    right.set(xlabel="K (prompts per batch)", ylabel="EST / B (median)", xscale="log")
    ks = sorted({r.k for r in rows})
    for axis in (left, right):
        axis.set_xticks(ks, [str(k) for k in ks])
        axis.minorticks_off()
    left.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(rows: list[BenchRow]) -> str:
    header = (f"{'K':>3} {'method':<24} {'BWR med [95% CI]':<22} {'BWR>.5':>6} {'EST/B':>6} "
              f"{'equiv ×B [95% CI]':<23} {'saving [95% CI]':<23} {'gain/prompt':>11} {'ms':>6}")
    lines = [header]
    for r in rows:
        saving = f"{r.budget_saving:.3f} {format_interval(r.budget_saving_ci)}" if r.budget_saving is not None else "-"
        lines.append(f"{r.k:>3} {r.method:<24} {r.median_bwr:.3f} {format_interval(r.median_bwr_ci):<16} "
                     f"{r.frac_bwr_gt_half:>6.0%} {r.median_est_over_budget:>6.3f} "
                     f"{r.budget_equivalence:.3f} {format_interval(r.budget_equivalence_ci):<17} {saving:<23} "
                     f"{r.mean_gain:>11.4f} {r.mean_allocation_ms:>6.2f}")
    return "\n".join(lines)
