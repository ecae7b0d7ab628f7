"""The `evaluate` command: downstream accuracy of front points (and the unpruned baseline), stored in the study.

Each point's model is built exactly as `export` builds it (layers removed, the study's healing
folded in) and handed to lm-evaluation-harness in memory (evaluators/accuracy.py), in the
study's numerics. Results are stored per task and removal set (records.py), so `front`, `show`
and the plot display them and a second `evaluate` measures only what is missing.

Offline tasks (OFFLINE_TASKS) are built at run time from the study's held-out windows, which the
search never optimised on; standard task names go to the harness's own registry and loaders.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
from tqdm.auto import tqdm

from evaluators.accuracy import TaskResult, Tasks, check_names, harness_version, load_tasks, run_tasks, task_manager
from evaluators.cloze import VERSION as CLOZE_VERSION
from evaluators.cloze import cloze_documents, cloze_task
from evaluators.data import Splits
from search.errors import SearchError
from search.export import finished_trial, prune_trial
from search.front import front_report, retained
from search.model.loading import cache_dir, load_model
from search.model.numerics import STOCK_KERNELS, apply_numerics, mixed_precision
from search.model.removal import Removal
from search.records import StudyRecord, TrialRecord, read_accuracy, removal_key, write_accuracy
from search.registry import Registry

log = logging.getLogger("search")

DEFAULT_LIMIT = 500  # documents per task: the offline task's stderr is about 0.02 at this size
DEFAULT_BATCH_SIZE = 16


@dataclass(frozen=True)
class OfflineTask:
    """A task whose documents are built from the study's tokenizer and held-out windows, never downloaded."""

    documents: Callable[[Any, Splits], list[dict]]
    config: Callable[[str, str], dict]  # (task name, JSON-lines data file) -> the harness's task config
    version: int  # the config's metadata version: a stored result of another version is measured again


OFFLINE_TASKS: Registry[OfflineTask] = Registry("offline task")
OFFLINE_TASKS.add(
    "heldout_cloze",
    OfflineTask(lambda tokenizer, splits: cloze_documents(tokenizer, splits.test), cloze_task, CLOZE_VERSION),
    "last-word cloze over the study's held-out windows, the word named earlier in its passage "
    "(lambada_openai's format: acc, word perplexity)",
)
DEFAULT_TASKS = ("heldout_cloze",)


@dataclass(frozen=True)
class AccuracySettings:
    """Which tasks, and how the harness runs them: shared by `evaluate`, `export --tasks` and `heal --tasks`."""

    tasks: Sequence[str] = DEFAULT_TASKS
    limit: int | None = DEFAULT_LIMIT  # documents per task (None: all)
    batch_size: int = DEFAULT_BATCH_SIZE
    include: Sequence[Path] = ()  # folders of harness task YAML


def prepare_tasks(settings: AccuracySettings, names: Sequence[str] | None = None) -> tuple[Any, Tasks | None]:
    """The harness's registry, with `names` (default: every task) checked and the standard ones'
    data loaded: an unknown name or unreachable data fails here, before any model is loaded."""
    names = list(dict.fromkeys(settings.tasks if names is None else names))
    standard = [t for t in names if t not in OFFLINE_TASKS]
    manager = task_manager(settings.include, defaults=bool(standard))
    check_names(manager, standard, OFFLINE_TASKS.names)
    return manager, load_tasks(manager, standard) if standard else None


def accuracy_numerics(dtype: str) -> str:
    """The study's mixed precision, or float32 (a study with half-precision weights is measured in float32)."""
    return dtype if dtype == "bf16-mixed" else "float32"


@dataclass
class Point:
    trial: int
    removal: Removal
    layers: int  # decoder layers left (a layer that only loses blocks stays)
    results: dict[str, TaskResult]
    retained: dict[str, float | None] = field(default_factory=dict)


@dataclass
class AccuracyReport:
    study: str
    tasks: list[str]
    limit: int | None
    layers: int  # the unpruned model's
    baseline: dict[str, TaskResult]
    points: list[Point]
    measured: int  # results computed by this call (the others were read from the store)
    reused: int

    def to_dict(self) -> dict:
        def results(by_task: dict[str, TaskResult]) -> dict:
            return {
                task: {"metric": r.metric, "value": r.value, "stderr": r.stderr, "n": r.n}
                for task, r in by_task.items()
            }

        return {
            "study": self.study,
            "tasks": self.tasks,
            "limit": self.limit,
            "baseline": {"layers": self.layers, "accuracy": results(self.baseline)},
            "points": [
                {
                    "trial": p.trial,
                    **p.removal.json(),
                    "layers": p.layers,
                    "accuracy": results(p.results),
                    "accuracy_retained": p.retained,
                }
                for p in self.points
            ],
            "measured": self.measured,
            "reused": self.reused,
        }


def evaluate_study(
    study: optuna.Study,
    trials: Sequence[int] | None = None,
    tasks: Sequence[str] = DEFAULT_TASKS,
    limit: int | None = DEFAULT_LIMIT,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str = "cpu",
    include: Sequence[Path] = (),
    trust_remote_code: bool = False,
) -> AccuracyReport:
    """Accuracy on `tasks` of the baseline and of `trials` (default: the front), measuring only what is not stored."""
    record = StudyRecord.read(study)
    settings = AccuracySettings(list(dict.fromkeys(tasks)), limit, batch_size, include)
    tasks = list(settings.tasks)
    numbers = list(trials) if trials is not None else [p["trial"] for p in front_report(study)["front"]]
    sets = {number: _removed(study, number) for number in numbers}
    stored = read_accuracy(study)
    keys = ["baseline", *dict.fromkeys(removal_key(removed) for removed in sets.values())]
    missing = {key: [t for t in tasks if not _reusable(stored.get((key, t, limit)))] for key in keys}
    todo = {key: names for key, names in missing.items() if names}
    measured = 0
    if todo:  # an unknown name is never stored, so it always gets here
        needed = list(dict.fromkeys(t for names in todo.values() for t in names))
        manager, early = prepare_tasks(settings, needed)
        measured = _measure(study, record, sets, todo, manager, early, settings, device, trust_remote_code)
        stored = read_accuracy(study)
    baseline = {t: stored[("baseline", t, limit)] for t in tasks}
    points = []
    for number, removed in sets.items():
        results = {t: stored[(removal_key(removed), t, limit)] for t in tasks}
        points.append(
            Point(
                trial=number,
                removal=removed,
                layers=record.baseline.layers - len(removed.layers),
                results=results,
                retained={t: retained(r.value, baseline[t].value, r.higher_is_better) for t, r in results.items()},
            )
        )
    total = len(keys) * len(tasks)
    return AccuracyReport(
        study.study_name, tasks, limit, record.baseline.layers, baseline, points, measured, total - measured
    )


def _removed(study: optuna.Study, number: int) -> Removal:
    removed = TrialRecord.of(finished_trial(study, number)).removal
    if not removed:
        raise SearchError(f"trial {number} has no removal set recorded; pick a trial that removed layers")
    return removed


def _reusable(result: TaskResult | None) -> bool:
    """A stored result (same task, set and --limit) answers this request when the same harness version
    made it and, for an offline task, the same version of its documents' rules."""
    if result is None or result.harness != harness_version():
        return False
    return result.task not in OFFLINE_TASKS or result.task_version == str(OFFLINE_TASKS[result.task].version)


def _measure(
    study: optuna.Study,
    record: StudyRecord,
    sets: dict[int, Removal],
    todo: dict[str, list[str]],
    manager,
    early: Tasks | None,
    settings: AccuracySettings,
    device: str,
    trust_remote_code: bool,
) -> int:
    """Evaluate every (removal set, tasks) pair in `todo`, baseline first; returns how many results were written."""
    numerics = accuracy_numerics(record.settings.dtype)
    loaded = load_model(record.model_spec, "float32", device, trust_remote_code)
    if record.model_fingerprint not in ("", loaded.fingerprint):
        raise SearchError(
            f"study {study.study_name!r} measured another model than the one found now (fingerprint mismatch); "
            "evaluate it where its model is"
        )
    needed = list(dict.fromkeys(t for names in todo.values() for t in names))
    tokenizer = loaded.tokenizer
    unpruned: Any = loaded.model
    del loaded
    built = study_tasks(manager, needed, tokenizer, record, early)
    if "baseline" not in todo:
        unpruned = None  # one model in memory at a time
    first = {removal_key(removed): number for number, removed in reversed(list(sets.items()))}
    written = 0
    bar = tqdm(todo.items(), desc="accuracy", unit="model")
    for key, names in bar:
        what = "baseline" if key == "baseline" else f"trial {first[key]} (removed {key})"
        bar.set_postfix_str(what)
        if key == "baseline":
            model, unpruned = unpruned, None
        else:
            model = prune_trial(study, first[key], device=device, trust_remote_code=trust_remote_code).model
        if mixed_precision(model) is None:
            apply_numerics(model, numerics)
        results = run_tasks(model, tokenizer, built, settings.limit, settings.batch_size, numerics, names)
        for result in results.values():
            write_accuracy(study, Removal() if key == "baseline" else sets[first[key]], result)
            written += 1
        log.info("%s: %s", what, ", ".join(f"{t} {r.metric} {r.value:.4f}" for t, r in results.items()))
        del model
        gc.collect()
    return written


def study_tasks(manager, names: Sequence[str], tokenizer, record: StudyRecord, loaded: Tasks | None = None) -> Tasks:
    """Build `names` for this study: offline ones from its held-out windows (checked against the
    study's fingerprint), the rest through the harness's registry; all data is loaded here.
    `loaded`: tasks already built (loaded before the model, so missing data fails first)."""
    if loaded is not None:
        rest = [n for n in names if n not in loaded.names]
        return loaded.merged(study_tasks(manager, rest, tokenizer, record)) if rest else loaded
    configs = {}
    offline = [n for n in names if n in OFFLINE_TASKS]
    if offline:
        splits = record.splits(tokenizer)
        for name in offline:
            task = OFFLINE_TASKS[name]
            docs = task.documents(tokenizer, splits)
            if not docs:
                raise SearchError(f"task {name}: the held-out windows hold no usable documents")
            configs[name] = task.config(name, str(_write_documents(name, docs)))
    return load_tasks(manager, names, configs)


def _write_documents(name: str, docs: list[dict]) -> Path:
    """A JSON-lines file named by its content, so `datasets` reuses its cache of it across runs."""
    text = "".join(json.dumps(doc) + "\n" for doc in docs)
    folder = cache_dir() / "tasks"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:16]}.jsonl"
    if not path.exists():
        staging = path.with_suffix(f".{os.getpid()}.tmp")
        staging.write_text(text)
        staging.replace(path)
    return path


def evaluate_directory(
    out: Path,
    study: optuna.Study,
    settings: AccuracySettings = AccuracySettings(),
    device: str = "cpu",
    prepared: tuple[Any, Tasks | None] | None = None,
) -> dict[str, TaskResult]:
    """`export --tasks`: the exported directory, reloaded with stock transformers, on the tasks; the
    results are added to its pruning.json (with the study's baseline result where one was measured
    the same way). `prepared`: `prepare_tasks(settings)`, called before the export so that a bad
    task name fails before any work."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from search.export import load_kwargs

    record = StudyRecord.read(study)
    tasks = list(dict.fromkeys(settings.tasks))
    manager, early = prepared or prepare_tasks(settings)
    kwargs = load_kwargs(out)  # a sub-layer export loads with its modeling file, as a user would
    tokenizer = AutoTokenizer.from_pretrained(out, **kwargs)
    built = study_tasks(manager, tasks, tokenizer, record, early)
    numerics = accuracy_numerics(record.settings.dtype)
    model: Any = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **kwargs, **STOCK_KERNELS)
    model = model.to(device).eval()
    apply_numerics(model, numerics)
    results = run_tasks(model, tokenizer, built, settings.limit, settings.batch_size, numerics)
    stored = read_accuracy(study)
    pruning_file = Path(out) / "pruning.json"
    pruning = json.loads(pruning_file.read_text())
    pruning["accuracy"] = {task: asdict(r) for task, r in results.items()}
    baseline = {
        t: b
        for t in tasks
        if (b := stored.get(("baseline", t, settings.limit))) is not None
        and (b.harness, b.numerics, b.task_version) == (results[t].harness, numerics, results[t].task_version)
    }
    if baseline:
        pruning["accuracy_baseline"] = {task: asdict(r) for task, r in baseline.items()}
        pruning["accuracy_retained"] = {
            t: retained(results[t].value, b.value, results[t].higher_is_better) for t, b in baseline.items()
        }
    staging = pruning_file.with_suffix(".json.tmp")
    staging.write_text(json.dumps(pruning, indent=2) + "\n")
    staging.replace(pruning_file)
    return results


def format_accuracy(report: AccuracyReport) -> str:
    """The baseline and each point: value ± stderr and the share of the baseline's, per task."""
    from search.tables import table

    def shown(result: TaskResult, kept: float | None = None) -> str:
        stderr = f" ± {result.stderr:.4f}" if result.stderr is not None else ""
        return f"{result.value:.4f}{stderr}" + (f" ({kept:.0%})" if kept is not None else "")

    header = ["trial", "removed", "layers", *(f"{t} {report.baseline[t].metric}" for t in report.tasks)]
    rows = [["baseline", "(none)", str(report.layers), *(shown(report.baseline[t]) for t in report.tasks)]]
    for p in report.points:
        rows.append(
            [str(p.trial), p.removal.describe(), str(p.layers)]
            + [shown(p.results[t], p.retained[t]) for t in report.tasks]
        )
    first = report.baseline[report.tasks[0]]
    limit = "every document" if report.limit is None else f"--limit {report.limit}"
    title = (
        f"study {report.study}: {first.harness}, {first.numerics}, {limit}; "
        f"{report.measured} result(s) measured now, {report.reused} read from the store"
    )
    return title + "\n" + table(header, rows) + "\n(percentages: share of the baseline's score)"
