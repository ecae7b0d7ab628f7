"""Warm start: seeds for a new model from what another study learnt, mapped by relative depth.

A study on one model of a family (or another budget) already knows its greedy path, its best set
of each size and its sensitivity profile; mapped onto the new model's depth they replace the greedy
search, whose cost grows with the number of layers.
"""

from __future__ import annotations

from collections.abc import Sequence

from search.errors import SearchError
from search.records import COMPLETE, StudyRecord
from search.sampler import removal_set
from search.space import Budget
from search.store import load_study, open_storage

Seeds = list[tuple[tuple[int, ...], str]]


def map_layer(layer: int, source_layers: int, target_layers: int) -> int:
    """Layer `layer` of a `source_layers` stack at the same relative depth in a `target_layers` stack."""
    return min(target_layers - 1, round(layer * target_layers / source_layers))


def transferred_seeds(
    source_sets: Sequence[tuple[tuple[int, ...], str]],
    source_profile: dict[int, float],
    source_layers: int,
    budget: Budget,
) -> tuple[list[tuple[tuple[int, ...], str]], dict[int, float]]:
    """Seeds for a new model from what another study learnt, mapped by relative depth.

    Returns the mapped sets (deduplicated, within the budget) followed by one-shot top-k sets of the
    mapped sensitivity profile, and that profile (each target layer takes the score of the source
    layer at its depth).
    """
    target = budget.n_layers
    profile = {j: source_profile[map_layer(j, target, source_layers)] for j in range(target)}
    seeds: dict[tuple[int, ...], str] = {}
    for removed, reason in source_sets:
        mapped = tuple(sorted({map_layer(i, source_layers, target) for i in removed}))
        if mapped not in seeds and budget.allows(mapped):
            seeds[mapped] = f"transfer of {list(removed)} ({reason})"
    ranking = sorted(profile, key=lambda j: (profile[j], j))
    for k in range(1, budget.max_layers() + 1):
        top = tuple(sorted(ranking[:k]))
        if top not in seeds and budget.allows(top):
            seeds[top] = f"transferred one-shot top {k}"
    return list(seeds.items()), profile


def seeds_from_study(url: str, name: str, budget: Budget) -> tuple[Seeds, dict[int, float]]:
    """Seeds from study `name` in store `url`: its greedy path and its best set of each size, mapped."""
    source = load_study(open_storage(url, create=False), name)
    try:
        record = StudyRecord.read(source)
    except SearchError:
        record = None
    if record is None or not record.sensitivity:
        raise SearchError(f"--warm-start-from {name!r} has no sensitivity profile to transfer")
    sets = [(tuple(g.removed_layers), "greedy") for g in record.greedy]
    best: dict[int, tuple[float, tuple[int, ...]]] = {}
    for trial in source.get_trials(deepcopy=False, states=COMPLETE):
        removed = removal_set(trial)
        if trial.values and (len(removed) not in best or trial.values[0] < best[len(removed)][0]):
            best[len(removed)] = (trial.values[0], removed)
    sets += [(removed, "best of its size") for _, removed in sorted(best.values(), key=lambda b: len(b[1]))]
    return transferred_seeds(sets, record.sensitivity, record.baseline.layers, budget)
