"""The objective: what one trial measures for its removal set.

Objectives (both minimised): perplexity ratio to the unpruned model on the calibration split,
and measured latency ratio. Parameter reduction is a constraint (`--budget`), checked before any
forward pass, so an over-budget proposal costs nothing. Held-out perplexity is measured only for
trials that land on the Pareto front when they finish: a trial dominated then stays dominated,
so every front point ends up with its held-out figure without paying for the rest.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import optuna
import torch
from optuna.trial import TrialState
from torch import nn

from evaluators.data import Splits
from evaluators.latency import Latency, measure_latency
from evaluators.perplexity import perplexity
from search import space
from search.recovery import worker_gone, worker_id
from search.space import Budget
from search.surgery import layers_removed

COMPLETE = (TrialState.COMPLETE,)
DUPLICATE_POLL_S = 2.0


@dataclass
class Bench:
    """A loaded model and its data, ready to evaluate removal sets against the unpruned baseline."""

    model: nn.Module
    splits: Splits
    latency_input: torch.Tensor
    batch_size: int = 4
    latency_warmup: int = 1
    latency_repeats: int = 30
    base_calib_ppl: float = float("nan")
    base_test_ppl: float = float("nan")
    layer_kinds: Sequence[str] = ()  # what each layer costs to run: parameter count and attention type

    def shape_key(self, removed: Sequence[int]) -> str:
        """Identical for removal sets that leave the same multiset of layer kinds, e.g. `9280*26`.

        Such models do the same arithmetic, so they share one latency measurement: timing each set
        separately would only add noise that lets a set dominate its twin by chance.
        """
        kept = Counter(kind for i, kind in enumerate(self.layer_kinds) if i not in set(removed))
        return " ".join(f"{kind}*{count}" for kind, count in sorted(kept.items()))

    def shapes(self, budget: Budget, limit: int = 64) -> dict[str, tuple[int, ...]] | None:
        """One removal set per shape the budget can reach; None when there are too many to time upfront."""
        by_kind: dict[str, list[int]] = defaultdict(list)
        for index, kind in enumerate(self.layer_kinds):
            by_kind[kind].append(index)
        kinds = sorted(by_kind)
        if math.prod(len(by_kind[k]) + 1 for k in kinds) > 100 * limit:
            return None
        found: dict[str, tuple[int, ...]] = {}
        for counts in itertools.product(*(range(len(by_kind[k]) + 1) for k in kinds)):
            removed = tuple(sorted(i for k, c in zip(kinds, counts) for i in by_kind[k][len(by_kind[k]) - c :]))
            if budget.allows(removed):
                found[self.shape_key(removed)] = removed
                if len(found) > limit:
                    return None
        return found

    def ppl(self, removed: Sequence[int], windows: torch.Tensor) -> float:
        with layers_removed(self.model, removed):
            return perplexity(self.model, windows, self.splits.bos_id, self.batch_size)

    def calib_ratio(self, removed: Sequence[int]) -> float:
        return self.ppl(removed, self.splits.calib) / self.base_calib_ppl

    def test_ratio(self, removed: Sequence[int]) -> float:
        return self.ppl(removed, self.splits.test) / self.base_test_ppl

    def latency(self, removed: Sequence[int]) -> Latency:
        return measure_latency(self.model, removed, self.latency_input, self.latency_warmup, self.latency_repeats)


def dominated(values: Sequence[float], by: Sequence[float]) -> bool:
    return all(b <= v for b, v in zip(by, values)) and any(b < v for b, v in zip(by, values))


def find_duplicate(study: optuna.Study, removed: tuple[int, ...], number: int) -> optuna.trial.FrozenTrial | None:
    """A finished trial of the same set; waits while an earlier trial (another worker) is measuring it."""
    while True:
        earlier_running = False
        for trial in study.get_trials(deepcopy=False, states=(*COMPLETE, TrialState.RUNNING)):
            if tuple(trial.user_attrs.get("removed_layers", ())) != removed or trial.number == number:
                continue
            if trial.state == TrialState.COMPLETE:
                return trial
            earlier_running |= trial.number < number and not worker_gone(trial.user_attrs.get("worker", ""))
        if not earlier_running:
            return None
        time.sleep(DUPLICATE_POLL_S)
        optuna.storages.fail_stale_trials(study)  # a worker elsewhere that died: failed after the grace period


def store_latency(study: optuna.Study, key: str, latency: Latency) -> dict:
    stored = {"ratio": latency.ratio, "ms": latency.candidate_ms, "baseline_ms": latency.baseline_ms}
    study.set_user_attr(f"latency:{key}", stored)
    return stored


def _latency(study: optuna.Study, bench: Bench, removed: Sequence[int]) -> tuple[float, float]:
    """Latency ratio and ms of the pruned shape: from the study's table (timed at seeding), else timed now."""
    key = bench.shape_key(removed)
    stored = study.user_attrs.get(f"latency:{key}") or store_latency(study, key, bench.latency(removed))
    return stored["ratio"], stored["ms"]


def make_objective(
    bench: Bench, budget: Budget, on_result: Callable[[optuna.Trial, dict], None] | None = None
) -> Callable[[optuna.Trial], tuple[float, float]]:
    def objective(trial: optuna.Trial) -> tuple[float, float]:
        trial.set_user_attr("worker", worker_id())  # first: lets a restart prove this trial was interrupted
        if "proposed_by" not in trial.user_attrs:  # seeds and retries carry theirs from the queue
            trial.set_user_attr("proposed_by", "sampler")
        removed = space.suggest(trial, budget.n_layers)
        reduction = budget.params_reduction(removed)
        trial.set_user_attr("removed_layers", list(removed))
        trial.set_user_attr("layers", budget.n_layers - len(removed))
        trial.set_user_attr("params_reduction", reduction)
        trial.set_constraint("params_reduction", reduction - budget.fraction)
        if not budget.allows(removed):
            # Free: no forward pass, and not counted towards --trials.
            raise optuna.TrialPruned("empty or over budget" if removed else "empty")
        study = trial.study
        original = find_duplicate(study, removed, trial.number)
        if original is not None:
            # The sampler proposed a set already measured: answer from the store, no forward pass.
            for key, value in original.user_attrs.items():
                if key not in ("proposed_by", "duplicate_of", "worker"):
                    trial.set_user_attr(key, value)
            trial.set_user_attr("duplicate_of", original.number)
            result = {"removed": removed, "duplicate_of": original.number, **original.user_attrs}
            if on_result:
                on_result(trial, result)
            return tuple(original.values)
        start = time.perf_counter()
        ppl_ratio = bench.calib_ratio(removed)
        latency_ratio, latency_ms = _latency(study, bench, removed)
        values = (ppl_ratio, latency_ratio)
        trial.set_user_attr("ppl_ratio", ppl_ratio)
        trial.set_user_attr("latency_ratio", latency_ratio)
        trial.set_user_attr("latency_ms", latency_ms)
        on_front = not any(dominated(values, t.values) for t in study.get_trials(deepcopy=False, states=COMPLETE))
        if on_front:
            trial.set_user_attr("test_ppl_ratio", bench.test_ratio(removed))
        trial.set_user_attr("eval_s", time.perf_counter() - start)
        if on_result:
            on_result(trial, {"removed": removed, **trial.user_attrs})
        return values

    return objective
