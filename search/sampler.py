"""The default sampler: local search around the best removal set of each size.

Generic samplers waste most proposals here: a random boolean per layer removes half the model,
far over any useful budget. This sampler (an ordinary Optuna `BaseSampler`) only proposes sets
that fit the budget and were never tried: it takes an elite set (one of the best few by
perplexity ratio for its number of removed layers; latency follows the layer count) and applies
one move: shift a removed layer to a neighbour, swap it for any kept layer, add a layer, or drop
one. Seeds (greedy path, rankings) give it the first elites.
"""

from __future__ import annotations

import random
from collections import defaultdict

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.trial import TrialState

from search import space
from search.records import counts_towards_trials
from search.registry import Registry
from search.space import Budget

ELITES_PER_SIZE = 3
ATTEMPTS = 500


def removal_set(trial: optuna.trial.FrozenTrial) -> tuple[int, ...]:
    """The set a trial evaluates, including enqueued and still-running trials."""
    params = trial.params or trial.system_attrs.get("fixed_params", {})
    return space.decode(params)


def tried_sets(trials: list[optuna.trial.FrozenTrial]) -> set[tuple[int, ...]]:
    """Sets already measured, being measured, or queued: all but the free (over-budget) proposals."""
    return {removal_set(t) for t in trials if t.state != TrialState.PRUNED or counts_towards_trials(t)}


class RemovalSetSampler(optuna.samplers.BaseSampler):
    def __init__(self, budget: Budget, seed: int | None = None) -> None:
        self._budget = budget
        self._rng = random.Random(seed)

    def reseed_rng(self) -> None:
        self._rng.seed()

    def infer_relative_search_space(self, study, trial) -> dict[str, BaseDistribution]:
        return {space.param_name(i): CategoricalDistribution([False, True]) for i in range(self._budget.n_layers)}

    def sample_relative(self, study, trial, search_space) -> dict[str, bool]:
        if not search_space:
            return {}
        trials = study.get_trials(deepcopy=False)
        tried = tried_sets([t for t in trials if t.number != trial.number])
        elites = self._elites(trials)
        for _ in range(ATTEMPTS):
            child = self._move(self._rng.choice(elites)) if elites else self._random_set()
            if child not in tried and self._budget.allows(child):
                return space.encode(child, self._budget.n_layers)
        # Neighbourhoods exhausted: a random feasible set (a repeat is answered from the store).
        return space.encode(self._random_set(), self._budget.n_layers)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._rng.choice(param_distribution.choices)

    def _elites(self, trials: list[optuna.trial.FrozenTrial]) -> list[tuple[int, ...]]:
        by_size: dict[int, list[tuple[float, tuple[int, ...]]]] = defaultdict(list)
        for t in trials:
            if t.state == TrialState.COMPLETE and t.values:
                removed = removal_set(t)
                by_size[len(removed)].append((t.values[0], removed))
        elites: list[tuple[int, ...]] = []
        for ranked in by_size.values():
            elites += [removed for _, removed in sorted(set(ranked))[:ELITES_PER_SIZE]]
        return elites

    def _move(self, removed: tuple[int, ...]) -> tuple[int, ...]:
        n = self._budget.n_layers
        chosen = set(removed)
        kept = [i for i in range(n) if i not in chosen]
        move = self._rng.choice(("shift", "swap", "add", "drop"))
        if move == "add" and kept:
            chosen.add(self._rng.choice(kept))
        elif move == "drop" and len(chosen) > 1:
            chosen.discard(self._rng.choice(sorted(chosen)))
        else:
            out = self._rng.choice(sorted(chosen))
            if move == "shift":
                into = [j for j in (out - 1, out + 1) if 0 <= j < n and j not in chosen]
            else:
                into = kept
            if into:
                chosen.discard(out)
                chosen.add(self._rng.choice(into))
        return tuple(sorted(chosen))

    def _random_set(self) -> tuple[int, ...]:
        k = self._rng.randint(1, max(1, self._budget.max_layers()))
        return tuple(sorted(self._rng.sample(range(self._budget.n_layers), k)))


# --sampler: (budget, seed) -> an Optuna sampler.
SAMPLERS: Registry = Registry("sampler")
SAMPLERS.add(
    "local",
    lambda budget, seed: RemovalSetSampler(budget, seed=seed),
    "moves around the best sets of each size, never repeating a set",
)
# NSGA-II is not offered: its first generation is random booleans, ~15 of 30 layers removed, all
# far over any useful budget, and enqueued seeds do not stand in for it.
SAMPLERS.add(
    "tpe",
    lambda budget, seed: optuna.samplers.TPESampler(seed=seed % 2**32, multivariate=True, n_startup_trials=4),
    "Optuna's multi-objective TPE, for comparison",
)
