"""The front's shapes timed again side by side when a run ends.

A shape the seeding table did not time (in a sub-layer study, most of them) is timed when a trial first
reaches it, against the unpruned model alone (search/objective.py): a median of its own rounds, taken in
its own minutes of the machine's life. Two such figures a few per cent apart are not an ordering, and a
model exported later, timed beside its in-memory twin, can disagree with the figure the study recorded
for its shape by more than the shapes differ. So when a run ends, every front shape timed that way is
timed again, all together round-robin with the baseline (the seeding table's protocol), and those
figures are what the shape table, the front, `show` and `export` report from then on. That protocol
pairs each timing with the baseline timed next to it (evaluators/latency.py); a store retimed before
it did is retimed by its next run.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import optuna

from evaluators.latency import PROTOCOL, Latency
from search.caching import CachingEvaluator
from search.front import fastest_front, smallest_front
from search.model.removal import Removal
from search.objective import latency_entry
from search.records import (
    COMPLETE,
    Retiming,
    StudyRecord,
    TrialRecord,
    measured_record,
    needs_retiming,
    read_latency,
    read_retiming,
    removal_key,
    write_latency,
    write_retiming,
)

log = logging.getLogger("search")
PASSES = 3


def front_trials(study: optuna.Study, retiming: Retiming | None) -> list[optuna.trial.FrozenTrial]:
    """The trials of the fronts a report shows: (fitness, latency), and in a sub-layer study also
    (fitness, parameters removed)."""
    settings = StudyRecord.read(study).settings
    front = fastest_front(study, retiming)
    if settings.granularity != "layer":
        numbers = {t.number for t in front}
        front += [t for t in smallest_front(study, settings.budget) if t.number not in numbers]
    return front


def front_shapes(study: optuna.Study, evaluator: CachingEvaluator, retiming: Retiming | None) -> dict[str, Removal]:
    """One set per front shape that a trial timed alone (or that an earlier retiming timed)."""
    baseline = StudyRecord.read(study).baseline
    shapes: dict[str, Removal] = {}
    for trial in front_trials(study, retiming):
        removal = TrialRecord.of(trial).removal
        shape = evaluator.shape(removal)
        entry = read_latency(study, shape)
        if entry is not None and (entry.timed == "front" or entry.timed_alone(baseline.latency_ms)):
            shapes.setdefault(shape, removal)
    return shapes


def retime_front(study: optuna.Study, evaluator: CachingEvaluator) -> Retiming | None:
    """Time the front's shapes that trials timed alone again, side by side, and measure held-out for
    a set the new figures bring onto a front without one; None when no trial timed a shape alone.

    New figures can move a set onto the front that was off it (a faster set it lost to got slower): its
    shape joins and all are timed together again, at most PASSES times. `evaluator` has its baseline."""
    if not needs_retiming(study):
        return None
    previous = read_retiming(study)
    trials = [t for t in study.get_trials(deepcopy=False, states=COMPLETE) if t.values]
    shapes = front_shapes(study, evaluator, previous)
    timed: dict[str, Latency] = {}
    retiming = Retiming(
        evaluator.latency_repeats, dict(previous.ratios) if previous else {}, len(trials), protocol=PROTOCOL
    )
    for attempt in range(PASSES if shapes else 0):
        log.info("timing the front's %d shapes again, side by side (%d rounds)", len(shapes), evaluator.latency_repeats)
        timed = dict(zip(shapes, evaluator.latencies(list(shapes.values()))))
        ratios = dict(previous.ratios) if previous else {}
        for trial in trials:  # every set of a retimed shape
            removal = TrialRecord.of(trial).removal
            latency = timed.get(evaluator.shape(removal))
            if latency is not None:
                ratios[removal_key(removal)] = latency.ratio
        retiming = Retiming(evaluator.latency_repeats, ratios, len(trials), protocol=PROTOCOL)
        joined = {shape: r for shape, r in front_shapes(study, evaluator, retiming).items() if shape not in timed}
        if not joined or attempt == PASSES - 1:
            break
        shapes |= joined
    held_out = dict(previous.held_out) if previous else {}
    second = "eval" in evaluator.splits.measured  # --eval-dataset, as the objective measures it
    for trial in front_trials(study, retiming):
        removal = TrialRecord.of(trial).removal
        if measured_record(trial, retiming).test_ppl_ratio is None and removal_key(removal) not in held_out:
            held_out[removal_key(removal)] = {
                "test_ppl_ratio": evaluator.test_ratio(removal),
                **({"eval_ppl_ratio": evaluator.ratio(removal, "eval")} if second else {}),
            }
    retiming = replace(retiming, held_out=held_out)
    for shape, latency in timed.items():
        write_latency(study, shape, latency_entry(latency, "front"))
    write_retiming(study, retiming)  # last: an interrupted retiming is redone by the next run
    if timed:
        moved = max(abs(retiming.ratio(t) / t.values[1] - 1) for t in trials)
        log.info("front latency retimed: the largest change from a trial's own timing is %.1f %%", 100 * moved)
    return retiming
