"""Warm start: seeds for a new model from what another study learnt, mapped by relative depth.

A study on one model of a family (or another budget) already knows its greedy path, its best set
of each size and its sensitivity profile; mapped onto the new model's depth they replace the greedy
search, whose cost grows with the number of layers.
"""

from __future__ import annotations

from search.errors import SearchError
from search.model.removal import Removal
from search.records import COMPLETE, StudyRecord
from search.sampler import removal_set, size_of
from search.seeding.greedy import Seeds
from search.space import Budget
from search.store import load_study, open_storage


def map_layer(layer: int, source_layers: int, target_layers: int) -> int:
    """Layer `layer` of a `source_layers` stack at the same relative depth in a `target_layers` stack."""
    return min(target_layers - 1, round(layer * target_layers / source_layers))


def transferred_seeds(
    source_sets: Seeds,
    source_profile: dict[int, float],
    source_layers: int,
    budget: Budget,
) -> tuple[Seeds, dict[Removal, float]]:
    """Seeds for a new model from what another study learnt, mapped by relative depth.

    Returns the mapped sets (deduplicated, within the budget) followed by one-shot top-k sets of the
    mapped sensitivity profile, and that profile (each target layer takes the score of the source
    layer at its depth).
    """
    target = budget.n_layers
    profile = {j: source_profile[map_layer(j, target, source_layers)] for j in range(target)}
    seeds: dict[Removal, str] = {}
    for removed, reason in source_sets:
        mapped = Removal.of({map_layer(i, source_layers, target) for i in removed.layers})
        if mapped not in seeds and budget.allows(mapped):
            seeds[mapped] = f"transfer of {list(removed.layers)} ({reason})"
    ranking = sorted(profile, key=lambda j: (profile[j], j))
    for k in range(1, budget.max_layers() + 1):
        top = Removal.of(ranking[:k])
        if top not in seeds and budget.allows(top):
            seeds[top] = f"transferred one-shot top {k}"
    return list(seeds.items()), {Removal.of([j]): score for j, score in profile.items()}


def seeds_from_study(url: str, name: str, budget: Budget) -> tuple[Seeds, dict[Removal, float]]:
    """Seeds from study `name` in store `url`: its greedy path and its best set of each size, mapped."""
    source = load_study(open_storage(url, create=False), name)
    try:
        record = StudyRecord.read(source)
    except SearchError:
        record = None
    if record is None or not record.sensitivity:
        raise SearchError(f"--warm-start-from {name!r} has no sensitivity profile to transfer")
    if record.settings.granularity != "layer":
        raise SearchError(f"--warm-start-from {name!r} is a sub-layer study; only whole-layer findings map by depth")
    sets: Seeds = [(g.removed, "greedy") for g in record.greedy]
    best: dict[tuple[int, int, int], tuple[float, Removal]] = {}
    for trial in source.get_trials(deepcopy=False, states=COMPLETE):
        removed = removal_set(trial)
        if trial.values and (size_of(removed) not in best or trial.values[0] < best[size_of(removed)][0]):
            best[size_of(removed)] = (trial.values[0], removed)
    sets += [(removed, "best of its size") for _, removed in sorted(best.values(), key=lambda b: size_of(b[1]))]
    profile = {unit.layers[0]: score for unit, score in record.sensitivity.items()}
    return transferred_seeds(sets, profile, record.baseline.layers, budget)
