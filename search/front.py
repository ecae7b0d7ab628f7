"""The Pareto front of a stored study, as a table, JSON or CSV. Reads the store only, loads no model."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import asdict

import optuna
from optuna.trial import TrialState

from evaluators.accuracy import TaskResult
from search.errors import SearchError
from search.model.removal import Removal
from search.records import (
    COMPLETE,
    AccuracyKey,
    Retiming,
    StudyRecord,
    TrialRecord,
    calib_ppl_ratio,
    latency_ratio,
    measured_record,
    read_accuracy,
    read_retiming,
    removal_key,
)
from search.tables import cell, table

FRONT_FIELDS = ("trial", "removed_layers", "layers", "params_reduction", "ppl_ratio", "latency_ratio", "test_ppl_ratio")
BLOCK_FIELDS = ("removed_attention", "removed_mlp")  # sub-layer studies: blocks of layers that stay
OPTIONAL_FIELDS = (
    "kl",  # --fitness kl: what the study minimised (on the calibration tokens)
    "confirmed_ppl_ratio",  # --confirm-tokens: on the calibration and confirmation tokens, what the front ranks
    "confirmed_kl",
    "kv_cache_ratio",
    "eval_ppl_ratio",
    "unhealed_ppl_ratio",
    "unhealed_test_ppl_ratio",
    "unhealed_eval_ppl_ratio",
)
LIST_FIELDS = ("removed_layers", *BLOCK_FIELDS)


def ranked_ratio(point: dict) -> float:
    """The calibration ratio a front point is ranked by: the confirmed one where the study confirms."""
    return point.get("confirmed_ppl_ratio", point["ppl_ratio"])


def _fields(report: dict) -> tuple[str, ...]:
    """The columns: the fixed ones (with the block lists in a sub-layer study), then each optional one
    some point carries."""
    blocks = BLOCK_FIELDS if report.get("granularity", "layer") != "layer" else ()
    extra = tuple(key for key in OPTIONAL_FIELDS if any(key in point for point in report["front"]))
    return FRONT_FIELDS[:2] + blocks + FRONT_FIELDS[2:] + extra


def front_report(study: optuna.Study) -> dict:
    """The documented JSON object: study, model, budget, baseline and the deduplicated front."""
    record = StudyRecord.read(study)
    retiming = read_retiming(study)
    best = fastest_front(study, retiming)
    if not best:
        raise SearchError(f"study {study.study_name!r} has no finished trials yet")
    seen: set[Removal] = set()
    front = []
    sublayer = record.settings.granularity != "layer"
    if sublayer:  # latency and parameters part ways: the best set of each size is a point too
        numbers = {t.number for t in best}
        best += [t for t in smallest_front(study, record.settings.budget) if t.number not in numbers]
    for trial in sorted(best, key=lambda t: t.number):
        measured = measured_record(trial, retiming)
        if measured.removal in seen:  # a duplicate proposal answered from the store
            continue
        seen.add(measured.removal)
        removal = measured.removal.json() if sublayer else {"removed_layers": list(measured.removed_layers)}
        front.append(
            {
                "trial": trial.number,
                **removal,
                "layers": measured.layers,
                "params_reduction": measured.params_reduction,
                "ppl_ratio": calib_ppl_ratio(trial),
                "latency_ratio": latency_ratio(trial, retiming),
                "test_ppl_ratio": measured.test_ppl_ratio,
                # Present once measured: a second corpus (--eval-dataset), and with --heal the same set unhealed.
                **{key: getattr(measured, key) for key in OPTIONAL_FIELDS if getattr(measured, key) is not None},
            }
        )
    front.sort(key=lambda p: (p["params_reduction"], ranked_ratio(p)) if sublayer else (-p["layers"], ranked_ratio(p)))
    baseline = {k: v for k, v in asdict(record.baseline).items() if k != "eval_ppl" or v is not None}
    report = {
        "study": study.study_name,
        "model": record.settings.model,
        "budget": record.settings.budget,
        **({"granularity": record.settings.granularity} if sublayer else {}),
        "baseline": baseline,
        "front": front,
    }
    if retiming is not None and retiming.ratios:
        report["retimed_rounds"] = retiming.rounds
    if record.settings.heal != "none":  # the ratios are the healed model's (older studies: unhealed, no key)
        report["heal"] = record.settings.heal
    if record.settings.eval_dataset:
        report["eval_dataset"] = record.settings.eval_dataset
    if record.settings.data_seed:  # calibration windows drawn by a seed (0, the corpus's first, says nothing)
        report["data_seed"] = record.settings.data_seed
    if record.settings.confirm_tokens:
        report["confirmation"] = confirmation_summary(study)
    add_accuracy(study, report)
    return report


def fastest_front(study: optuna.Study, retiming: Retiming | None) -> list[optuna.trial.FrozenTrial]:
    """The finished trials no other beats on both the fitness and the latency ratio, each set's latency
    as the study last measured it: retimed beside the rest of the front at the end of a run where it was
    (search/retime.py), else as its trial recorded it (then Optuna's own front)."""
    if retiming is None or not retiming.ratios:
        try:
            return study.best_trials  # feasible, non-dominated, COMPLETE trials
        except (RuntimeError, ValueError):
            return []
    done = [
        (t, retiming.ratio(t))
        for t in study.get_trials(deepcopy=False, states=COMPLETE)
        if t.values and all(c <= 0 for c in t.constraints.values())  # within --budget, as Optuna's front
    ]
    return [
        t
        for t, fast in done
        if not any(
            o.values[0] <= t.values[0] and other <= fast and (o.values[0] < t.values[0] or other < fast)
            for o, other in done
        )
    ]


def smallest_front(study: optuna.Study, budget: float) -> list[optuna.trial.FrozenTrial]:
    """The finished, feasible trials no other beats on both the fitness and the parameters removed.

    In a sub-layer study an attention block is cheap in parameters and dear in time, so a faster set
    often dominates the best set of a parameter reduction on (fitness, latency); a user who prunes for
    memory still wants that set. The objective measures held-out for this front too (search/objective.py).
    """
    done = [
        (t, TrialRecord.of(t).params_reduction or 0.0)
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.values
    ]
    feasible = [(t, removed) for t, removed in done if removed <= budget + 1e-12]
    return [
        t
        for t, removed in feasible
        if not any(
            o.values[0] <= t.values[0] and other >= removed and (o.values[0] < t.values[0] or other > removed)
            for o, other in feasible
        )
    ]


def confirmation_summary(study: optuna.Study) -> dict:
    """What confirming cost: the trials measured again on more tokens (duplicates not: they copy) and the
    seconds it took, besides the margin and token count it ran with."""
    settings = StudyRecord.read(study).settings
    confirmed = [
        r
        for r in (TrialRecord.of(t) for t in study.get_trials(deepcopy=False))
        if r.confirm_s is not None and r.duplicate_of is None
    ]
    return {
        "tokens": settings.confirm_tokens,
        "margin": settings.confirm_margin,
        "trials": len(confirmed),
        "seconds": sum(r.confirm_s or 0.0 for r in confirmed),
    }


def retained(value: float, baseline: float, higher_is_better: bool) -> float | None:
    """The share of the baseline's score kept: 1.0 is unchanged; for lower-is-better metrics baseline / value."""
    if higher_is_better:
        return value / baseline if baseline else None
    return baseline / value if value else None


def baseline_accuracy(stored: dict[AccuracyKey, TaskResult], keys: Sequence[str]) -> dict[str, TaskResult]:
    """Per task, the baseline result that the removal sets `keys` are compared with. A task may be
    stored with several --limits: the one that most of `keys` were measured with too, then the one
    over the most documents (`all` before any number)."""
    best: dict[str, tuple[tuple, TaskResult]] = {}
    for (key, task, limit), base in stored.items():
        if key != "baseline":
            continue
        covered = sum(_alike(stored.get((k, task, limit)), base) for k in keys)
        rank = (covered, base.n, limit is None, limit or 0)
        if task not in best or rank > best[task][0]:
            best[task] = (rank, base)
    return {task: base for task, (_, base) in best.items()}


def _alike(result: TaskResult | None, base: TaskResult) -> bool:
    """Measured like the baseline: same --limit (by key), harness version and task version."""
    return result is not None and (result.harness, result.task_version) == (base.harness, base.task_version)


def point_accuracy(
    stored: dict[AccuracyKey, TaskResult], chosen: dict[str, TaskResult], removed: Removal
) -> dict[str, tuple[TaskResult, float | None]]:
    """A removal set's results measured like the chosen baseline's, each with its share of it."""
    found = {}
    for task, base in chosen.items():
        result = stored.get((removal_key(removed), task, base.limit))
        if result is not None and _alike(result, base):
            found[task] = (result, retained(result.value, base.value, result.higher_is_better))
    return found


def add_accuracy(study: optuna.Study, report: dict) -> None:
    """Accuracy from `evaluate`, where measured (keys documented in docs/usage.md)."""
    stored = read_accuracy(study)
    chosen = baseline_accuracy(stored, [removal_key(Removal.from_json(p)) for p in report["front"]])
    if not chosen:
        return
    base = report["baseline"]
    base["accuracy"] = {task: r.value for task, r in chosen.items()}
    base["accuracy_stderr"] = {task: r.stderr for task, r in chosen.items()}
    report["accuracy_tasks"] = {
        task: {"metric": r.metric, "n": r.n, "limit": r.limit, "harness": r.harness, "numerics": r.numerics}
        for task, r in chosen.items()
    }
    for point in report["front"]:
        found = point_accuracy(stored, chosen, Removal.from_json(point))
        if found:
            point["accuracy"] = {task: r.value for task, (r, _) in found.items()}
            point["accuracy_stderr"] = {task: r.stderr for task, (r, _) in found.items()}
            point["accuracy_retained"] = {task: kept for task, (_, kept) in found.items()}


def format_table(report: dict) -> str:
    base = report["baseline"]
    title = [
        f"study {report['study']}  model {report['model']}  budget {report['budget']:.1%}",
        f"baseline: {base['layers']} layers, {base['params'] / 1e6:.1f}M params, "
        f"calibration ppl {base['calib_ppl']:.3f}, held-out ppl {base['test_ppl']:.3f}, "
        f"{base['latency_ms']:.1f} ms/forward",
        "",
    ]
    if "confirmation" in report:
        c = report["confirmation"]
        title.insert(
            -1,
            f"confirmed on {c['tokens']} calibration tokens (margin {c['margin']} nats/token): {c['trials']} "
            f"trials, {c['seconds']:.0f} s; the front ranks confirmed_* figures",
        )
    if "retimed_rounds" in report:
        title.insert(
            -1,
            f"latency: the front's shapes timed again side by side at the end of the run "
            f"({report['retimed_rounds']} rounds)",
        )
    if "eval_ppl" in base:
        title.insert(2, f"second corpus {report.get('eval_dataset')}: baseline ppl {base['eval_ppl']:.3f}")
    if "heal" in report:
        unhealed = any(key.startswith("unhealed_") for key in _fields(report))
        title.insert(
            -1,
            f"healed ({report['heal']}): ratios are the healed model's"
            + ("; unhealed_* the same set unhealed" if unhealed else ""),
        )
    tasks = report.get("accuracy_tasks", {})
    for task, about in tasks.items():
        stderr = base["accuracy_stderr"][task]
        title.insert(
            -1,
            f"accuracy {task} ({about['metric']}, n={about['n']}, {about['harness']}, {about['numerics']}): baseline "
            f"{base['accuracy'][task]:.4f}"
            + (f" ± {stderr:.4f}" if stderr is not None else "")
            + "; front points show value (share of the baseline's)",
        )
    fields = _fields(report)
    rows = [
        [cell(p.get(h), fixed=True) if h != "params_reduction" else f"{p[h]:.1%}" for h in fields]
        + [_accuracy_cell(p, task) for task in tasks]
        for p in report["front"]
    ]
    return "\n".join(title) + "\n" + table([*fields, *tasks], rows)


def _accuracy_cell(point: dict, task: str) -> str:
    value = point.get("accuracy", {}).get(task)
    if value is None:
        return "-"
    kept = point["accuracy_retained"][task]
    return f"{value:.4f} ({kept:.0%})" if kept is not None else f"{value:.4f}"


def format_csv(report: dict) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    fields = _fields(report)
    tasks = list(report.get("accuracy_tasks", {}))
    writer.writerow([*fields, *(f"{kind}:{task}" for task in tasks for kind in ("accuracy", "accuracy_retained"))])
    for point in report["front"]:
        writer.writerow(
            [" ".join(map(str, point[f])) if f in LIST_FIELDS else point.get(f) for f in fields]
            + [point.get(kind, {}).get(task) for task in tasks for kind in ("accuracy", "accuracy_retained")]
        )
    return out.getvalue().rstrip("\n")


def format_json(report: dict) -> str:
    return json.dumps(report, indent=2)


FORMATS = {"table": format_table, "json": format_json, "csv": format_csv}
