"""Where the first trials come from: staged greedy removal driven by sensitivity scores.

Stage 1 removes the single least sensitive layer; every later stage re-scores the remaining
layers *on the already pruned model* and removes the least sensitive one again (the SLEB
observation: importance changes once neighbours are gone). In a sub-layer space the same walk
goes block by block (BlockPruner's rule); a layer whose two blocks both went is removed whole.
Each stage's set becomes an enqueued trial, so the study starts from the greedy path and the
sampler improves on it.

Re-scoring every remaining layer at every stage costs layers x stages evaluations. With a
`shortlist`, stages after the first score only the layers that scored best at their latest
scoring and the layers next to those already removed (where importance changes most once a
neighbour goes), which measured the same path on the default model (docs/method.md, seeding).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from search.model.removal import Removal
from search.space import Budget

# (already removed, candidate parts) -> each candidate's score on the pruned model (lower: safer to remove)
ScoreFn = Callable[[Removal, list[Removal]], dict[Removal, float]]
Seeds = list[tuple[Removal, str]]


@dataclass(frozen=True)
class Stage:
    removed: Removal
    score: float  # the criterion's score of the part this stage removed (ppl: the ratio after removing it)
    scores: dict[Removal, float]  # every candidate's score at this stage (stage 1: the sensitivity profile)


def staged_greedy(
    score: ScoreFn, budget: Budget, max_stages: int | None = None, shortlist: int | None = None
) -> list[Stage]:
    """Greedy path from one removed part (a layer, or in a sub-layer space a block) up to the most the
    budget allows (or `max_stages`); with `shortlist`, stages after the first score only
    `shortlisted(...)` candidates."""
    units = budget.units()
    order = {unit: n for n, unit in enumerate(units)}
    removed = Removal()
    stages: list[Stage] = []
    latest: dict[Removal, float] = {}  # each part's score when it was last scored
    while max_stages is None or len(stages) < max_stages:
        candidates = [u for u in units if not removed.covers(u) and budget.allows(removed | u)]
        if stages and shortlist is not None:
            candidates = shortlisted(candidates, removed, latest, shortlist, units)
        if not candidates:
            return stages
        scores = score(removed, candidates)
        latest.update(scores)
        best = min(candidates, key=lambda u: (scores[u], order[u]))
        if not math.isfinite(scores[best]):  # nothing scored (every candidate rejected): the path ends here
            return stages
        removed = removed | best
        stages.append(Stage(removed, scores[best], scores))
    return stages


def shortlisted(
    candidates: list[Removal], removed: Removal, latest: dict[Removal, float], size: int, units: list[Removal]
) -> list[Removal]:
    """The `size` candidates that scored best when last scored, and every candidate next to a removed
    part (the part before or after it in `units`, the stack's order)."""
    order = {unit: n for n, unit in enumerate(units)}
    ranked = sorted(candidates, key=lambda u: (latest.get(u, math.inf), order[u]))
    gone = {order[u] for u in units if removed.covers(u)}
    near = {u for u in candidates if order[u] - 1 in gone or order[u] + 1 in gone}
    return sorted(set(ranked[:size]) | near, key=order.__getitem__)


def parts(removal: Removal, budget: Budget) -> list[Removal]:
    """The removal as the budget's units: its layers, or in a sub-layer space its blocks."""
    return [unit for unit in budget.units() if removal.covers(unit)]


def seed_sets(stages: Sequence[Stage], budget: Budget, count: int, others: Seeds | None = None) -> Seeds:
    """Distinct feasible sets with a reason each: the greedy stages, the one-shot ranking by stage-1
    sensitivity (the k least sensitive parts), `others` (other methods' picks), every set one part
    short of a greedy stage, then neighbours of greedy sets (one removed part shifted to an adjacent
    layer) up to `count` in all, which start the sampler's population close to the greedy path.

    The sets one short are the backward step of floating selection (Pudil et al. 1994, SFFS): a
    part greedy removed early can look worse once its neighbours are gone, so stage k+1 less one of
    its earlier parts can beat stage k (docs/benchmarks.md shows such a case on SmolLM2).
    """
    seeds: dict[Removal, str] = {}
    order = {unit: n for n, unit in enumerate(budget.units())}

    def add(removal: Removal, reason: str) -> None:
        if removal not in seeds and budget.allows(removal):
            seeds[removal] = reason

    for n, stage in enumerate(stages, 1):
        add(stage.removed, f"greedy stage {n}")
    if stages:
        ranking = sorted(stages[0].scores, key=lambda u: (stages[0].scores[u], order[u]))
        total = Removal()
        for k, unit in enumerate(ranking[: len(stages)], 1):
            total = total | unit
            add(total, f"one-shot top {k}")
    for removal, reason in others or []:
        add(removal, reason)
    for n, stage in enumerate(stages[1:], 2):
        for part in parts(stage.removed, budget):
            add(stage.removed - part, f"greedy stage {n} less {part}")
    for number, stage in reversed(list(enumerate(stages, 1))):
        for part in parts(stage.removed, budget):
            for step in (-1, 1):
                if len(seeds) >= count:
                    break
                moved = part.shifted(step, budget.n_layers)
                if moved is not None and not stage.removed.covers(moved):
                    add((stage.removed - part) | moved, f"neighbour of greedy stage {number}")
    return list(seeds.items())
