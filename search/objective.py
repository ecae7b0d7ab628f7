"""The objective: what one trial measures for its removal set.

Objectives (both minimised): perplexity ratio to the unpruned model on the calibration split,
and measured latency ratio. Parameter reduction is a constraint (`--budget`), checked before any
forward pass, so an over-budget proposal costs nothing. Held-out perplexity is measured only for
trials that land on the Pareto front when they finish: a trial dominated then stays dominated,
so every front point ends up with its held-out figure without paying for the rest.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import optuna
import torch
from torch import nn

from evaluators.data import Splits
from evaluators.latency import Latency, measure_latency
from evaluators.perplexity import perplexity
from search import space
from search.space import Budget
from search.surgery import layers_removed

COMPLETE = (optuna.trial.TrialState.COMPLETE,)


@dataclass
class Bench:
    """A loaded model and its data, ready to evaluate removal sets against the unpruned baseline."""

    model: nn.Module
    splits: Splits
    latency_input: torch.Tensor
    batch_size: int = 4
    latency_warmup: int = 1
    latency_repeats: int = 5
    base_calib_ppl: float = float("nan")
    base_test_ppl: float = float("nan")

    def ppl(self, removed: Sequence[int], windows: torch.Tensor) -> float:
        with layers_removed(self.model, removed):
            return perplexity(self.model, windows, self.splits.bos_id, self.batch_size)

    def calib_ratio(self, removed: Sequence[int]) -> float:
        return self.ppl(removed, self.splits.calib) / self.base_calib_ppl

    def test_ratio(self, removed: Sequence[int]) -> float:
        return self.ppl(removed, self.splits.test) / self.base_test_ppl

    def latency(self, removed: Sequence[int]) -> Latency:
        return measure_latency(
            self.model, removed, self.latency_input, self.latency_warmup, self.latency_repeats
        )


def dominated(values: Sequence[float], by: Sequence[float]) -> bool:
    return all(b <= v for b, v in zip(by, values)) and any(b < v for b, v in zip(by, values))


def find_duplicate(study: optuna.Study, removed: tuple[int, ...]) -> optuna.trial.FrozenTrial | None:
    for trial in study.get_trials(deepcopy=False, states=COMPLETE):
        if tuple(trial.user_attrs.get("removed_layers", ())) == removed:
            return trial
    return None


def make_objective(
    bench: Bench, budget: Budget, on_result: Callable[[optuna.Trial, dict], None] | None = None
) -> Callable[[optuna.Trial], tuple[float, float]]:
    def objective(trial: optuna.Trial) -> tuple[float, float]:
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
        original = find_duplicate(study, removed)
        if original is not None:
            # The sampler proposed a set already measured: answer from the store, no forward pass.
            for key, value in original.user_attrs.items():
                if key not in ("proposed_by", "duplicate_of"):
                    trial.set_user_attr(key, value)
            trial.set_user_attr("duplicate_of", original.number)
            result = {"removed": removed, "duplicate_of": original.number, **original.user_attrs}
            if on_result:
                on_result(trial, result)
            return tuple(original.values)
        start = time.perf_counter()
        ppl_ratio = bench.calib_ratio(removed)
        latency = bench.latency(removed)
        values = (ppl_ratio, latency.ratio)
        trial.set_user_attr("ppl_ratio", ppl_ratio)
        trial.set_user_attr("latency_ratio", latency.ratio)
        trial.set_user_attr("latency_ms", latency.candidate_ms)
        on_front = not any(dominated(values, t.values) for t in study.get_trials(deepcopy=False, states=COMPLETE))
        if on_front:
            trial.set_user_attr("test_ppl_ratio", bench.test_ratio(removed))
        trial.set_user_attr("eval_s", time.perf_counter() - start)
        if on_result:
            on_result(trial, {"removed": removed, **trial.user_attrs})
        return values

    return objective
