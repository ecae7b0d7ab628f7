"""The Pareto front of a stored study, as a table, JSON or CSV. Reads the store only, loads no model."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict

import optuna

from search.errors import SearchError
from search.records import StudyRecord, TrialRecord
from search.tables import cell, table

FRONT_FIELDS = ("trial", "removed_layers", "layers", "params_reduction", "ppl_ratio", "latency_ratio", "test_ppl_ratio")


def front_report(study: optuna.Study) -> dict:
    """The documented JSON object: study, model, budget, baseline and the deduplicated front."""
    record = StudyRecord.read(study)
    try:
        best = study.best_trials  # feasible, non-dominated, COMPLETE trials
    except (RuntimeError, ValueError):
        best = []
    if not best:
        raise SearchError(f"study {study.study_name!r} has no finished trials yet")
    seen: set[tuple[int, ...]] = set()
    front = []
    for trial in sorted(best, key=lambda t: t.number):
        measured = TrialRecord.of(trial)
        if measured.removed_layers in seen:  # a duplicate proposal answered from the store
            continue
        seen.add(measured.removed_layers)
        front.append(
            {
                "trial": trial.number,
                "removed_layers": list(measured.removed_layers),
                "layers": measured.layers,
                "params_reduction": measured.params_reduction,
                "ppl_ratio": trial.values[0],
                "latency_ratio": trial.values[1],
                "test_ppl_ratio": measured.test_ppl_ratio,
            }
        )
    front.sort(key=lambda p: (-p["layers"], p["ppl_ratio"]))
    return {
        "study": study.study_name,
        "model": record.settings.model,
        "budget": record.settings.budget,
        "baseline": asdict(record.baseline),
        "front": front,
    }


def format_table(report: dict) -> str:
    base = report["baseline"]
    title = [
        f"study {report['study']}  model {report['model']}  budget {report['budget']:.1%}",
        f"baseline: {base['layers']} layers, {base['params'] / 1e6:.1f}M params, "
        f"calibration ppl {base['calib_ppl']:.3f}, held-out ppl {base['test_ppl']:.3f}, "
        f"{base['latency_ms']:.1f} ms/forward",
        "",
    ]
    rows = [
        [cell(p[h], fixed=True) if h != "params_reduction" else f"{p[h]:.1%}" for h in FRONT_FIELDS]
        for p in report["front"]
    ]
    return "\n".join(title) + "\n" + table(FRONT_FIELDS, rows)


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
