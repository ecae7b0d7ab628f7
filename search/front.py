"""The Pareto front of a stored study, as a table, JSON or CSV. Reads the store only, loads no model."""

from __future__ import annotations

import csv
import io
import json

import optuna

from search.errors import SearchError

FRONT_FIELDS = ("trial", "removed_layers", "layers", "params_reduction", "ppl_ratio", "latency_ratio", "test_ppl_ratio")


def front_report(study: optuna.Study) -> dict:
    """The documented JSON object: study, model, budget, baseline and the deduplicated front."""
    attrs = study.user_attrs
    if "baseline" not in attrs or "settings" not in attrs:
        raise SearchError(f"study {study.study_name!r} was not created by this engine or was never seeded")
    try:
        best = study.best_trials  # feasible, non-dominated, COMPLETE trials
    except (RuntimeError, ValueError):
        best = []
    if not best:
        raise SearchError(f"study {study.study_name!r} has no finished trials yet")
    seen: set[tuple[int, ...]] = set()
    front = []
    for trial in sorted(best, key=lambda t: t.number):
        removed = tuple(trial.user_attrs["removed_layers"])
        if removed in seen:  # a duplicate proposal answered from the store
            continue
        seen.add(removed)
        front.append(
            {
                "trial": trial.number,
                "removed_layers": list(removed),
                "layers": trial.user_attrs["layers"],
                "params_reduction": trial.user_attrs["params_reduction"],
                "ppl_ratio": trial.values[0],
                "latency_ratio": trial.values[1],
                "test_ppl_ratio": trial.user_attrs.get("test_ppl_ratio"),
            }
        )
    front.sort(key=lambda p: (-p["layers"], p["ppl_ratio"]))
    baseline = attrs["baseline"]
    return {
        "study": study.study_name,
        "model": attrs["settings"]["model"],
        "budget": attrs["settings"]["budget"],
        "baseline": {k: baseline[k] for k in ("layers", "params", "calib_ppl", "test_ppl", "latency_ms")},
        "front": front,
    }


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list):
        return " ".join(map(str, value))
    return str(value)


def format_table(report: dict) -> str:
    base = report["baseline"]
    lines = [
        f"study {report['study']}  model {report['model']}  budget {report['budget']:.1%}",
        f"baseline: {base['layers']} layers, {base['params'] / 1e6:.1f}M params, "
        f"calibration ppl {base['calib_ppl']:.3f}, held-out ppl {base['test_ppl']:.3f}, "
        f"{base['latency_ms']:.1f} ms/forward",
        "",
    ]
    header = ["trial", "removed_layers", "layers", "params_reduction", "ppl_ratio", "latency_ratio", "test_ppl_ratio"]
    rows = [[_cell(p[h]) if h != "params_reduction" else f"{p[h]:.1%}" for h in header] for p in report["front"]]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def format_csv(report: dict) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(FRONT_FIELDS)
    for point in report["front"]:
        writer.writerow([" ".join(map(str, point[f])) if f == "removed_layers" else point[f] for f in FRONT_FIELDS])
    return out.getvalue().rstrip("\n")


def format_json(report: dict) -> str:
    return json.dumps(report, indent=2)


FORMATS = {"table": format_table, "json": format_json, "csv": format_csv}
