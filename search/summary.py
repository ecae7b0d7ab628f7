"""What is in a store, and everything about one trial: the `studies` and `show` commands."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from search.errors import SearchError
from search.front import OPTIONAL_FIELDS, baseline_accuracy, front_report, point_accuracy
from search.records import (
    calib_ppl_ratio,
    counts_towards_trials,
    find_trial,
    latency_ratio,
    measured_record,
    read_accuracy,
    read_baseline,
    read_retiming,
    read_settings,
    removal_key,
)
from search.tables import cell, key_values, table


def study_summaries(storage: optuna.storages.BaseStorage) -> list[dict]:
    rows = []
    for summary in storage.get_all_studies():
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        trials = study.get_trials(deepcopy=False)
        count = {state: sum(t.state == state for t in trials) for state in TrialState}
        settings = read_settings(study)
        try:
            front = len(front_report(study)["front"])
        except SearchError:
            front = 0
        rows.append(
            {
                "study": summary.study_name,
                "model": settings.model if settings else "?",
                "budget": settings.budget if settings else None,
                "complete": count[TrialState.COMPLETE],
                "rejected": sum(t.state == TrialState.PRUNED and counts_towards_trials(t) for t in trials),
                "failed": count[TrialState.FAIL],
                "running": count[TrialState.RUNNING],
                "waiting": count[TrialState.WAITING],
                "front": front,
            }
        )
    return rows


def trial_details(study: optuna.Study, number: int) -> dict:
    t = find_trial(study, number)
    retiming = read_retiming(study)
    r = measured_record(t, retiming)  # with held-out figures a retiming measured
    baseline = read_baseline(study)
    ratio = calib_ppl_ratio(t)
    retimed = bool(t.values) and latency_ratio(t, retiming) != t.values[1]
    details = {
        "study": study.study_name,
        "trial": t.number,
        "state": t.state.name,
        **(r.removal.json() if not r.removal.whole_layers_only else {"removed_layers": list(r.removed_layers)}),
        "layers": r.layers,
        "params_reduction": r.params_reduction,
        "ppl_ratio": ratio,
        "calib_ppl": ratio * baseline.calib_ppl if ratio is not None and baseline else None,
        "test_ppl_ratio": r.test_ppl_ratio,
        "test_ppl": r.test_ppl_ratio * baseline.test_ppl if r.test_ppl_ratio is not None and baseline else None,
        **{key: getattr(r, key) for key in OPTIONAL_FIELDS if getattr(r, key) is not None},
        **({"unhealed_runs": [list(run) for run in r.unhealed_runs]} if r.unhealed_runs else {}),
        "latency_ratio": latency_ratio(t, retiming) if t.values else None,
        # The front's shapes are timed again side by side when a run ends (search/retime.py): then
        # the figures the trial ran with are kept apart.
        **({"latency_ratio_when_run": t.values[1], "latency_ms_when_run": r.latency_ms} if retimed else {}),
        **({} if retimed else {"latency_ms": r.latency_ms}),
        "proposed_by": r.proposed_by,
        "duplicate_of": r.duplicate_of,
        "retry_of": t.system_attrs.get("failed_trial"),
        "worker": r.worker,
        "started": t.datetime_start.isoformat(timespec="seconds") if t.datetime_start else None,
        "finished": t.datetime_complete.isoformat(timespec="seconds") if t.datetime_complete else None,
        "eval_s": r.eval_s,
        **({"confirm_s": r.confirm_s} if r.confirm_s is not None else {}),
        "ppl_from": r.ppl_from,
    }
    if r.rejected is not None:  # stopped part-way: what condemned it, and on how much data
        details.update(
            rejected=r.rejected,
            ppl_ratio_lower_bound=r.ppl_ratio_lower_bound,
            windows_evaluated=r.windows_evaluated,
            latency_ratio=r.latency_ratio,
        )
    stored = read_accuracy(study)
    chosen = baseline_accuracy(stored, [removal_key(r.removal)])
    accuracy = point_accuracy(stored, chosen, r.removal) if r.removal else {}
    if accuracy:  # from `evaluate`
        details["accuracy"] = {
            task: {
                "metric": res.metric,
                "value": res.value,
                "stderr": res.stderr,
                "n": res.n,
                "retained": kept,
                "metrics": res.metrics,
            }
            for task, (res, kept) in accuracy.items()
        }
    if details["test_ppl_ratio"] is None and t.state == TrialState.COMPLETE:
        details["test_ppl_ratio_note"] = "not measured: the trial was dominated when it finished, so never on the front"
    return details


def format_rows(rows: list[dict]) -> str:
    if not rows:
        return "no studies in this store"
    return table(list(rows[0]), [[cell(row[h]) for h in row] for row in rows])


def format_details(details: dict) -> str:
    flat = {k: v for k, v in details.items() if k != "accuracy"}
    for task, r in details.get("accuracy", {}).items():
        stderr = f" ± {r['stderr']:.4f}" if r["stderr"] is not None else ""
        kept = f", {r['retained']:.1%} of the baseline's" if r["retained"] is not None else ""
        flat[f"accuracy {task}"] = f"{r['metric']} {r['value']:.4f}{stderr} (n={r['n']}{kept})"
    return key_values(flat)
