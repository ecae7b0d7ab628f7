"""The front's shapes timed again side by side when a run ends.

A shape the seeding table did not time (in a sub-layer study, most of them) is timed when a trial first
reaches it, against the unpruned model alone (search/objective.py): a median of its own rounds, taken in
its own minutes of the machine's life. Two such figures a few per cent apart are not an ordering, and a
model exported later, timed beside its in-memory twin, can disagree with the figure the study recorded
for its shape by more than the shapes differ. So when a run ends, every front shape timed that way is
timed again, all together round-robin with the baseline (the seeding table's protocol), and those
figures are what the shape table, the front, `show` and `export` report from then on.
"""

from __future__ import annotations

import logging

import optuna

from search.caching import CachingEvaluator
from search.evaluator import Evaluator
from search.front import fastest_front, smallest_front
from search.model.removal import Removal
from search.objective import latency_entry
from search.records import (
    COMPLETE,
    Retiming,
    StudyRecord,
    TrialRecord,
    read_latency,
    read_retiming,
    removal_key,
    write_latency,
    write_retiming,
)

log = logging.getLogger("search")
PASSES = 3


def front_shapes(
    study: optuna.Study, evaluator: Evaluator | CachingEvaluator, retiming: Retiming | None
) -> dict[str, Removal]:
    """One set per shape of the front (latency and, in a sub-layer study, parameters) that trials timed
    alone: not from the seeding table."""
    settings = StudyRecord.read(study).settings
    front = fastest_front(study, retiming)
    if settings.granularity != "layer":  # the best set of each parameter reduction is a point too
        front += smallest_front(study, settings.budget)
    shapes: dict[str, Removal] = {}
    for trial in front:
        removal = TrialRecord.of(trial).removal
        shape = evaluator.shape(removal)
        entry = read_latency(study, shape)
        if entry is not None and not entry.timed_together:
            shapes.setdefault(shape, removal)
    return shapes


def retime_front(study: optuna.Study, evaluator: Evaluator | CachingEvaluator) -> Retiming | None:
    """Time the front's shapes that trials timed alone again, side by side; None when there are none.

    New figures can move a set onto the front that was off it (a faster set it lost to got slower): its
    shape joins and all are timed together again, at most PASSES times."""
    previous = read_retiming(study)
    shapes = front_shapes(study, evaluator, previous)
    if not shapes:
        return None
    trials = [t for t in study.get_trials(deepcopy=False, states=COMPLETE) if t.values]
    for attempt in range(PASSES):
        log.info("timing the front's %d shapes again, side by side (%d rounds)", len(shapes), evaluator.latency_repeats)
        timed = dict(zip(shapes, evaluator.latencies(list(shapes.values()))))
        ratios = dict(previous.ratios) if previous else {}
        for trial in trials:  # every set of a retimed shape
            removal = TrialRecord.of(trial).removal
            latency = timed.get(evaluator.shape(removal))
            if latency is not None:
                ratios[removal_key(removal)] = latency.ratio
        retiming = Retiming(evaluator.latency_repeats, ratios)
        joined = {shape: r for shape, r in front_shapes(study, evaluator, retiming).items() if shape not in timed}
        if not joined or attempt == PASSES - 1:
            break
        shapes |= joined
    for shape, latency in timed.items():
        write_latency(study, shape, latency_entry(latency, "front"))
    write_retiming(study, retiming)
    moved = max(abs(retiming.ratio(t) / t.values[1] - 1) for t in trials)
    log.info("front latency retimed: the largest change from a trial's own timing is %.1f %%", 100 * moved)
    return retiming
