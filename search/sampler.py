"""The default sampler: local search around the best removal set of each size.

Generic samplers waste most proposals here: a random boolean per layer removes half the model,
far over any useful budget. This sampler (an ordinary Optuna `BaseSampler`) only proposes sets
that fit the budget and were never tried: it takes an elite set (one of the best few by
perplexity ratio for its size: attention and MLP blocks removed, which latency follows) and
applies one move to its parts (layers, or in a sub-layer space blocks): shift one to a neighbour,
swap it for a kept one, add one, drop one, split a removed layer into a block, or join two blocks
into a layer. Seeds (greedy path, rankings) give it the first elites.
"""

from __future__ import annotations

import random
from collections import defaultdict

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.trial import TrialState

from search import space
from search.model.removal import KINDS, Removal
from search.records import counts_towards_trials
from search.registry import Registry
from search.space import Budget

ELITES_PER_SIZE = 3
ATTEMPTS = 500


def removal_set(trial: optuna.trial.FrozenTrial) -> Removal:
    """The removal a trial evaluates, including enqueued and still-running trials."""
    params = trial.params or trial.system_attrs.get("fixed_params", {})
    return space.decode(params)


def tried_sets(trials: list[optuna.trial.FrozenTrial]) -> set[Removal]:
    """Sets already measured, being measured, or queued: all but the free (over-budget) proposals."""
    return {removal_set(t) for t in trials if t.state != TrialState.PRUNED or counts_towards_trials(t)}


def size_of(removal: Removal) -> tuple[int, int, int]:
    """What latency follows: attention blocks and MLP blocks removed (a whole layer is one of each), and
    layers removed whole."""
    return len(removal.without_attention), len(removal.without_mlp), len(removal.layers)


class RemovalSetSampler(optuna.samplers.BaseSampler):
    def __init__(self, budget: Budget, seed: int | None = None) -> None:
        self._budget = budget
        self._rng = random.Random(seed)

    def reseed_rng(self) -> None:
        self._rng.seed()

    def infer_relative_search_space(self, study, trial) -> dict[str, BaseDistribution]:
        names = space.param_names(self._budget.n_layers, self._budget.granularity)
        return {name: CategoricalDistribution([False, True]) for name in names}

    def sample_relative(self, study, trial, search_space) -> dict[str, bool]:
        if not search_space:
            return {}
        trials = study.get_trials(deepcopy=False)
        tried = tried_sets([t for t in trials if t.number != trial.number])
        elites = self._elites(trials)
        budget = self._budget
        for _ in range(ATTEMPTS):
            child = self._move(self._rng.choice(elites)) if elites else self._random_set()
            if child not in tried and budget.allows(child):
                return space.encode(child, budget.n_layers, budget.granularity)
        # Neighbourhoods exhausted: a random feasible set (a repeat is answered from the store).
        return space.encode(self._random_set(), budget.n_layers, budget.granularity)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._rng.choice(param_distribution.choices)

    def _elites(self, trials: list[optuna.trial.FrozenTrial]) -> list[Removal]:
        by_size: dict[tuple[int, int, int], list[tuple[float, Removal]]] = defaultdict(list)
        for t in trials:
            if t.state == TrialState.COMPLETE and t.values:
                removed = removal_set(t)
                by_size[size_of(removed)].append((t.values[0], removed))
        elites: list[Removal] = []
        for ranked in by_size.values():
            elites += [removed for _, removed in sorted(set(ranked))[:ELITES_PER_SIZE]]
        return elites

    def _move(self, removed: Removal) -> Removal:
        """One step: shift a removed part to a neighbouring layer, swap it for a kept part, add a part,
        drop one; in a sub-layer space also split a removed layer into one of its blocks, or join a lone
        block with another layer's lone block of the other kind into a whole layer."""
        n = self._budget.n_layers
        units = self._budget.units()
        chosen = list(removed.parts()) if self._budget.block_params is None else _blocks(removed)
        kept = [u for u in units if not removed.covers(u)]
        moves = ["shift", "swap", "add", "drop"]
        if self._budget.block_params is not None:
            moves += ["split"] if removed.layers else []
            moves += ["join"] if removed.attention and removed.mlp else []
        move = self._rng.choice(moves)
        if move == "add" and kept:
            return removed | self._rng.choice(kept)
        if move == "drop" and len(chosen) > 1:
            return removed - self._rng.choice(chosen)
        if move == "split":
            layer = self._rng.choice(removed.layers)
            return removed - Removal.from_blocks([(layer, self._rng.choice(KINDS))])
        if move == "join":
            layer = self._rng.choice([*removed.attention, *removed.mlp])  # keeps its lone block, gains the other
            if layer in removed.mlp:
                joined = Removal.of(attention=[self._rng.choice(removed.attention)])
            else:
                joined = Removal.of(mlp=[self._rng.choice(removed.mlp)])
            return (removed - joined) | Removal.of([layer])
        out = self._rng.choice(chosen)
        if move == "shift":
            moved = [out.shifted(step, n) for step in (-1, 1)]
            targets = [u for u in moved if u is not None and not removed.covers(u)]
        else:
            targets = kept
        return (removed - out) | self._rng.choice(targets) if targets else removed

    def _random_set(self) -> Removal:
        k = self._rng.randint(1, max(1, self._budget.max_units()))
        return space.union(self._rng.sample(self._budget.units(), k))


def _blocks(removal: Removal) -> list[Removal]:
    return [Removal.from_blocks([block]) for block in sorted(removal.blocks())]


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
