"""Where the first trials come from: staged greedy removal driven by sensitivity scores.

Stage 1 removes the single least sensitive layer; every later stage re-scores the remaining
layers *on the already pruned model* and removes the least sensitive one again (the SLEB
observation: importance changes once neighbours are gone). Each stage's set becomes an
enqueued trial, so the study starts from the greedy path and the sampler improves on it.

Re-scoring every remaining layer at every stage costs layers x stages evaluations. With a
`shortlist`, stages after the first score only the layers that scored best at their latest
scoring and the layers next to those already removed (where importance changes most once a
neighbour goes), which measured the same path on the default model (README, seeding).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from search.space import Budget

# (already removed, candidate layers) -> each candidate's score on the pruned model (lower: safer to remove)
ScoreFn = Callable[[tuple[int, ...], list[int]], dict[int, float]]


@dataclass(frozen=True)
class Stage:
    removed: tuple[int, ...]
    score: float  # the criterion's score of the layer this stage removed (ppl: the ratio after removing it)
    scores: dict[int, float]  # every candidate's ratio at this stage (stage 1: the sensitivity profile)


def staged_greedy(
    score: ScoreFn, budget: Budget, max_stages: int | None = None, shortlist: int | None = None
) -> list[Stage]:
    """Greedy path from one removed layer up to the most the budget allows (or `max_stages`); with
    `shortlist`, stages after the first score only `shortlisted(...)` candidates."""
    removed: tuple[int, ...] = ()
    stages: list[Stage] = []
    latest: dict[int, float] = {}  # each layer's score when it was last scored
    while max_stages is None or len(stages) < max_stages:
        candidates = [i for i in range(budget.n_layers) if i not in removed and budget.allows((*removed, i))]
        if stages and shortlist is not None:
            candidates = shortlisted(candidates, removed, latest, shortlist)
        if not candidates:
            return stages
        scores = score(removed, candidates)
        latest.update(scores)
        best = min(candidates, key=lambda i: (scores[i], i))
        if not math.isfinite(scores[best]):  # nothing scored (every candidate rejected): the path ends here
            return stages
        removed = tuple(sorted((*removed, best)))
        stages.append(Stage(removed, scores[best], scores))
    return stages


def shortlisted(candidates: list[int], removed: Sequence[int], latest: dict[int, float], size: int) -> list[int]:
    """The `size` candidates that scored best when last scored, and every candidate next to a removed layer."""
    ranked = sorted(candidates, key=lambda i: (latest.get(i, math.inf), i))
    near = {i for i in candidates if i - 1 in removed or i + 1 in removed}
    return sorted(set(ranked[:size]) | near)


def seed_sets(
    stages: Sequence[Stage],
    budget: Budget,
    count: int,
    others: Sequence[tuple[tuple[int, ...], str]] = (),
) -> list[tuple[tuple[int, ...], str]]:
    """Distinct feasible sets with a reason each: the greedy stages, the one-shot ranking by stage-1
    sensitivity (the k least sensitive layers), `others` (other methods' picks), every set one layer
    short of a greedy stage, then neighbours of greedy sets (one removed layer shifted to an adjacent
    layer) up to `count` in all, which start the sampler's population close to the greedy path.

    The sets one short are the backward step of floating selection (Pudil et al. 1994, SFFS): a
    layer greedy removed early can look worse once its neighbours are gone, so stage k+1 less one of
    its earlier layers can beat stage k (the README shows such a case on SmolLM2).
    """
    seeds: dict[tuple[int, ...], str] = {}

    def add(removed: Sequence[int], reason: str) -> None:
        key = tuple(sorted(set(removed)))
        if key not in seeds and budget.allows(key):
            seeds[key] = reason

    for n, stage in enumerate(stages, 1):
        add(stage.removed, f"greedy stage {n}")
    if stages:
        ranking = sorted(stages[0].scores, key=lambda i: (stages[0].scores[i], i))
        for k in range(1, len(stages) + 1):
            add(ranking[:k], f"one-shot top {k}")
    for removed, reason in others:
        add(removed, reason)
    for n, stage in enumerate(stages[1:], 2):
        for layer in stage.removed:
            add([i for i in stage.removed if i != layer], f"greedy stage {n} less {layer}")
    for stage in reversed(stages):
        for layer in stage.removed:
            for shifted in (layer - 1, layer + 1):
                if len(seeds) >= count:
                    break
                if 0 <= shifted < budget.n_layers and shifted not in stage.removed:
                    moved = [shifted if i == layer else i for i in stage.removed]
                    add(moved, f"neighbour of greedy stage {len(stage.removed)}")
    return list(seeds.items())
