"""The front as a picture: every finished trial, the front highlighted and labelled (with the accuracy
retained, once `evaluate` measured it), the baseline marked."""

from __future__ import annotations

from pathlib import Path

import optuna

from search.errors import SearchError
from search.front import front_report
from search.records import COMPLETE, calib_ppl_ratio, latency_ratio, read_retiming


def plot_front(study: optuna.Study, path: Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SearchError("--plot needs matplotlib: pip install matplotlib (or the `plot` extra)") from None
    report = front_report(study)
    front = sorted(report["front"], key=lambda p: p["latency_ratio"])
    trials = [t for t in study.get_trials(deepcopy=False, states=COMPLETE) if t.values]
    retiming = read_retiming(study)
    ratios = [calib_ppl_ratio(t) or t.values[0] for t in trials]  # a KL study plots its perplexity ratios too

    # Destroyed models (ratios of 10 or 1000) would flatten the interesting part: clip, and say so.
    top = max(1.1, 1.5 * max(p["ppl_ratio"] for p in front))
    off = sum(r > top for r in ratios)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.scatter(
        [latency_ratio(t, retiming) for t in trials],
        [min(r, top) for r in ratios],
        s=14,
        color="0.7",
        label=f"trials ({off} above the top, drawn at its edge)" if off else "trials",
    )
    ax.plot(
        [p["latency_ratio"] for p in front],
        [p["ppl_ratio"] for p in front],
        "-o",
        color="tab:blue",
        label="Pareto front",
        zorder=3,
    )
    task = next(iter(report.get("accuracy_tasks", {})), None)  # `evaluate` ran: label its accuracy retained
    for p in front:
        kept = p.get("accuracy_retained", {}).get(task) if task else None
        ax.annotate(
            f"{p['layers']}L" + (f", {kept:.0%} {task}" if kept is not None else ""),
            (p["latency_ratio"], p["ppl_ratio"]),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=8,
        )
    ax.scatter(
        [1.0], [1.0], marker="*", s=160, color="tab:red", label=f"baseline ({report['baseline']['layers']}L)", zorder=4
    )
    ax.set_ylim(min(0.98, *(p["ppl_ratio"] for p in front)) - 0.02, top * 1.02)
    ax.set_xlabel("latency ratio (pruned / unpruned)")
    ax.set_ylabel("perplexity ratio, calibration split")
    ax.set_title(f"{report['study']}: {report['model']}, budget {report['budget']:.0%}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
