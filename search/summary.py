"""What is in a store, and everything about one trial: the `studies` and `show` commands."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from search.errors import SearchError
from search.front import front_report


def study_summaries(storage: optuna.storages.BaseStorage) -> list[dict]:
    rows = []
    for summary in storage.get_all_studies():
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        trials = study.get_trials(deepcopy=False)
        count = {state: sum(t.state == state for t in trials) for state in TrialState}
        settings = study.user_attrs.get("settings", {})
        try:
            front = len(front_report(study)["front"])
        except SearchError:
            front = 0
        rows.append(
            {
                "study": summary.study_name,
                "model": settings.get("model", "?"),
                "budget": settings.get("budget"),
                "complete": count[TrialState.COMPLETE],
                "rejected": sum("rejected" in t.user_attrs for t in trials if t.state == TrialState.PRUNED),
                "failed": count[TrialState.FAIL],
                "running": count[TrialState.RUNNING],
                "waiting": count[TrialState.WAITING],
                "front": front,
            }
        )
    return rows


def trial_details(study: optuna.Study, number: int) -> dict:
    trials = [t for t in study.get_trials(deepcopy=False) if t.number == number]
    if not trials:
        raise SearchError(f"study {study.study_name!r} has no trial {number} (it has {len(study.trials)} trials)")
    t = trials[0]
    attrs = t.user_attrs
    baseline = study.user_attrs.get("baseline", {})
    removed = attrs.get("removed_layers", [])
    details = {
        "study": study.study_name,
        "trial": t.number,
        "state": t.state.name,
        "removed_layers": removed,
        "layers": attrs.get("layers"),
        "params_reduction": attrs.get("params_reduction"),
        "ppl_ratio": t.values[0] if t.values else None,
        "calib_ppl": t.values[0] * baseline["calib_ppl"] if t.values and baseline else None,
        "test_ppl_ratio": attrs.get("test_ppl_ratio"),
        "test_ppl": attrs["test_ppl_ratio"] * baseline["test_ppl"] if "test_ppl_ratio" in attrs and baseline else None,
        "latency_ratio": t.values[1] if t.values else None,
        "latency_ms": attrs.get("latency_ms"),
        "proposed_by": attrs.get("proposed_by", "sampler"),
        "duplicate_of": attrs.get("duplicate_of"),
        "retry_of": t.system_attrs.get("failed_trial"),
        "worker": attrs.get("worker"),
        "started": t.datetime_start.isoformat(timespec="seconds") if t.datetime_start else None,
        "finished": t.datetime_complete.isoformat(timespec="seconds") if t.datetime_complete else None,
        "eval_s": attrs.get("eval_s"),
        "ppl_from": attrs.get("ppl_from"),
    }
    if "rejected" in attrs:  # stopped part-way: what condemned it, and on how much data
        details.update(
            rejected=attrs["rejected"],
            ppl_ratio_lower_bound=attrs.get("ppl_ratio_lower_bound"),
            windows_evaluated=attrs.get("windows_evaluated"),
            latency_ratio=attrs.get("latency_ratio"),
        )
    if details["test_ppl_ratio"] is None and t.state == TrialState.COMPLETE:
        details["test_ppl_ratio_note"] = "not measured: the trial was dominated when it finished, so never on the front"
    return details


def format_rows(rows: list[dict]) -> str:
    if not rows:
        return "no studies in this store"
    header = list(rows[0])
    cells = [[_cell(row[h]) for h in header] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    return "\n".join(lines + ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells])


def format_details(details: dict) -> str:
    width = max(map(len, details))
    return "\n".join(f"{k.ljust(width)}  {_cell(v)}" for k, v in details.items() if v is not None)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.4f}"
    if isinstance(value, list):
        return " ".join(map(str, value)) or "(none)"
    return str(value)
