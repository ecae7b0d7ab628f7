"""Downstream accuracy through EleutherAI's lm-evaluation-harness, on a model object in memory.

The harness is the field's tool: its task definitions, prompts and metrics are what papers
report, so this module adds none of its own. It only turns the harness's failures into one-line
errors, loads tasks before any model runs (a missing dataset fails in seconds, not after the
baseline), and reads the harness's result dictionary into typed results. Results differ across
harness versions, so every result records the version that produced it (pyproject pins it).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

from search.errors import SearchError, first_line

BOOTSTRAP_ITERS = 1000  # stderr of non-mean metrics (perplexity); the harness's 100000 takes minutes on 2 cores


def harness_version() -> str:
    return f"lm-eval {version('lm_eval')}"


@dataclass(frozen=True)
class TaskResult:
    """One task's (or group's) result: its headline metric, and every metric the harness reported."""

    task: str
    metric: str  # `acc` where the task has it, else its first higher-is-better metric
    value: float
    stderr: float | None
    n: int  # documents scored
    higher_is_better: bool
    limit: int | None  # --limit it ran with (None: every document)
    harness: str
    numerics: str  # what the forward passes ran in: the study's dtype, or float32
    seconds: float  # the harness call that measured it (every task of that call together)
    metrics: dict[str, list[float | None]] = field(default_factory=dict)  # name: [value, stderr]
    task_version: str | None = None  # the task definition's version, as the harness reports it


@dataclass
class Tasks:
    """Tasks built once (their data loaded), evaluated on any number of models."""

    names: list[str]
    loaded: dict  # the harness's TaskDict: tasks, groups, group_map
    manager: Any
    configs: dict[str, dict] = field(default_factory=dict)  # tasks given as configs (offline ones), by name

    def merged(self, other: Tasks) -> Tasks:
        """Both sets of tasks, as one."""
        loaded = {part: {**self.loaded[part], **other.loaded[part]} for part in self.loaded}
        return Tasks([*self.names, *other.names], loaded, self.manager, {**self.configs, **other.configs})

    def objects(self, names: Sequence[str]) -> list:
        """The harness's task or group object of each name (a group brings its subtasks)."""
        return [self.loaded["groups"].get(name) or self.loaded["tasks"][name] for name in names]


def quiet_harness() -> None:
    """The harness logs every step at INFO and warns about passing a model object; keep its errors only."""
    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.ERROR)


def task_manager(include: Sequence[Path] = (), defaults: bool = True):
    """The harness's task registry: its own tasks (`defaults`) and the YAML in `include` folders."""
    from lm_eval.tasks import TaskManager

    quiet_harness()
    if defaults and not include:
        return _harness_tasks()
    return TaskManager(include_path=[str(p) for p in include] or None, include_defaults=defaults)


@functools.cache
def _harness_tasks():
    """The harness's own registry, built once per process: building it parses every task YAML the
    harness ships (tens of thousands of files), and they do not change while it runs.
    A registry is only read after it is built (`load` makes new task objects each time)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=True)


def check_names(manager, names: Sequence[str], others: Sequence[str] = ()) -> None:
    """Unknown names and tags (which expand to several tasks) are refused before anything loads;
    `others`: task names known outside the harness (offline ones), suggested too."""
    from lm_eval.tasks._index import Kind  # private, but what the pinned version's index is made of

    index = manager.task_index
    for name in names:
        entry = index.get(name)
        if entry is None:
            close = difflib.get_close_matches(name, [*others, *index], n=3, cutoff=0.75)
            hint = f"; did you mean {', '.join(close)}?" if close else "; `lm-eval ls tasks` lists the harness's"
            raise SearchError(f"unknown task {name!r}{hint}")
        if entry is not None and entry.kind == Kind.TAG:
            members = sorted(n for n, e in index.items() if name in e.tags)
            raise SearchError(f"{name!r} is a tag of several tasks; pass them by name: {', '.join(members)}")


def load_tasks(manager, names: Sequence[str], configs: dict[str, dict] | None = None) -> Tasks:
    """Build the tasks and load their data now; a dataset that cannot be reached is one error line.

    `configs`: tasks given as config dicts (the offline tasks), by name; the rest are looked up.
    """
    configs = configs or {}
    check_names(manager, [n for n in names if n not in configs])
    loaded: dict = {"tasks": {}, "groups": {}, "group_map": {}}
    for name in names:  # one at a time, so an error names its task
        try:
            built = manager.load([configs.get(name, name)])
        except (ConnectionError, OSError) as exc:  # offline, unreachable, or a local data file missing
            raise SearchError(
                f"task {name}: its data cannot be loaded here ({first_line(exc)}); on a machine with hub access "
                "run the same command once: `datasets` keeps what it downloads in ~/.cache/huggingface (copy it, "
                "or point HF_DATASETS_CACHE at a copy, to run offline)"
            ) from None
        except Exception as exc:  # a task definition the harness cannot build
            raise SearchError(f"cannot build task {name}: {type(exc).__name__}: {first_line(exc)}") from None
        for group in built["groups"].values():
            if not group.has_aggregation:  # the harness reports no score for it, only for its tasks
                raise SearchError(
                    f"group {group.name!r} has no aggregate score; pass its tasks by name: "
                    + ", ".join(t.task_name for t in group.get_all_tasks())
                )
        twice = sorted(set(built["tasks"]) & set(loaded["tasks"]))
        if twice:
            raise SearchError(f"--tasks name {', '.join(twice)} twice (directly or inside a group); name each once")
        for part in loaded:
            loaded[part].update(built[part])
    missing = [n for n in names if n not in loaded["tasks"] and n not in loaded["groups"]]
    if missing:
        raise SearchError(f"the harness built no task named {', '.join(missing)} (check the task's `task:` name)")
    return Tasks(list(names), loaded, manager, configs)


def run_tasks(
    model: Any,
    tokenizer: Any,
    tasks: Tasks,
    limit: int | None,
    batch_size: int,
    numerics: str,
    names: Sequence[str] | None = None,
) -> dict[str, TaskResult]:
    """Evaluate `model` (already in its numerics: autocast applied) on `names` of `tasks` (default
    all) with the harness's Hugging Face wrapper. Log-probabilities are taken in float32 whatever
    the forward pass ran in."""
    import lm_eval
    import lm_eval.evaluator
    import torch
    from lm_eval.models.huggingface import HFLM

    names = list(names or tasks.names)
    quiet_harness()
    # The harness records `git describe` of the working directory (not what is measured here) and lets
    # git print "fatal: not a git repository" outside one; the pinned version's hook is replaced.
    lm_eval.evaluator.get_git_commit_hash = lambda: None
    started = time.perf_counter()
    device = next(model.parameters()).device
    lm = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=batch_size,
        device=str(device),
        softmax_dtype=torch.float32,
    )
    model.eval()
    # The harness prints some progress to stdout, where `--format json` writes its answer: send it to stderr.
    with torch.inference_mode(), contextlib.redirect_stdout(sys.stderr):
        output = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks.objects(names),
            task_manager=tasks.manager,
            limit=limit,
            bootstrap_iters=BOOTSTRAP_ITERS,
            log_samples=False,
        )
    if output is None:
        raise SearchError("lm-evaluation-harness returned no results")
    seconds = time.perf_counter() - started
    return {name: _result(output, name, limit, numerics, seconds) for name in names}


def _result(output: dict, name: str, limit: int | None, numerics: str, seconds: float) -> TaskResult:
    entry = output["results"].get(name)
    if entry is None:
        raise SearchError(f"lm-evaluation-harness reported no result for {name!r}")
    better = output.get("higher_is_better", {}).get(name, {})
    metrics: dict[str, list[float | None]] = {}
    for key, value in entry.items():
        if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
            continue
        metric, filtered = key.split(",", 1)
        stderr = entry.get(f"{metric}_stderr,{filtered}")
        label = metric if filtered == "none" else key
        metrics[label] = [float(value), float(stderr) if isinstance(stderr, (int, float)) else None]
    if not metrics:
        raise SearchError(f"lm-evaluation-harness reported no metric for {name!r}")
    plain = {label.split(",")[0]: label for label in metrics}
    headline = plain.get("acc") or next((plain[m] for m in plain if better.get(m) is True), next(iter(metrics)))
    value, stderr = metrics[headline]
    assert value is not None
    return TaskResult(
        task=name,
        metric=headline,
        value=value,
        stderr=stderr,
        n=_documents(output, name),
        higher_is_better=better.get(headline.split(",")[0]) is not False,  # None: a group's tasks disagree
        limit=limit,
        harness=harness_version(),
        numerics=numerics,
        seconds=seconds,
        metrics=metrics,
        task_version=None if name not in output.get("versions", {}) else str(output["versions"][name]),
    )


def _documents(output: dict, name: str) -> int:
    """Documents scored: a task's own count, a group's the sum over its tasks."""
    counts = output.get("n-samples", {})
    if name in counts:
        return int(counts[name]["effective"])
    return sum(_documents(output, child) for child in output.get("group_subtasks", {}).get(name, []))
