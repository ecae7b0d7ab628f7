"""The objective: what one trial measures for its removal set.

Objectives (both minimised): perplexity ratio to the unpruned model on the calibration split,
and measured latency ratio. Parameter reduction is a constraint (`--budget`), checked before any
forward pass, so an over-budget proposal costs nothing. Held-out perplexity is measured only for
trials that land on the Pareto front when they finish: a trial dominated then stays dominated,
so every front point ends up with its held-out figure without paying for the rest. The front of
perplexity against parameter reduction counts too: in a sub-layer space latency and parameters
part ways (an attention block is cheap in parameters and dear in time), and the best set of a
parameter budget must carry its held-out figure even where a faster set dominates it.
With `--confirm-tokens` the objective of a finished trial is its figure on more calibration tokens
(search/confirmation.py), and the candidates further from the front than the noise are rejected.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import optuna
from optuna.trial import TrialState

from evaluators.healing import unreachable_runs
from evaluators.latency import Latency
from evaluators.perplexity import Rejected
from search import space
from search.caching import CachingEvaluator
from search.confirmation import confirmed_fitness, loosened
from search.model.removal import Removal
from search.records import (
    COMPLETE,
    LatencyEntry,
    Retiming,
    TrialRecord,
    calib_value,
    latency_ratio,
    proposer_known,
    read_latency,
    read_retiming,
    removal_attrs,
    write_latency,
    write_trial,
)
from search.recovery import worker_gone, worker_id
from search.space import Budget

DUPLICATE_POLL_S = 2.0
# Called with each trial and its record as it finishes (measured, rejected or a duplicate).
OnResult = Callable[[optuna.Trial, TrialRecord], None]
# The store's cross-process lock for deciding who measures a set (`search.store.exclusive`).
Lock = Callable[[], AbstractContextManager[None]]


def dominated(values: Sequence[float], by: Sequence[float]) -> bool:
    return all(b <= v for b, v in zip(by, values)) and any(b < v for b, v in zip(by, values))


def on_a_front(trial: optuna.Trial, values: Sequence[float], reduction: float, retiming: Retiming | None) -> bool:
    """No finished trial dominates (perplexity, latency), or none dominates (perplexity, parameters kept)."""
    finished = trial.study.get_trials(deepcopy=False, states=COMPLETE)
    if not any(dominated(values, (t.values[0], latency_ratio(t, retiming))) for t in finished if t.values):
        return True
    kept = (values[0], -reduction)
    return not any(
        dominated(kept, (t.values[0], -(TrialRecord.of(t).params_reduction or 0.0))) for t in finished if t.values
    )


def rejection_ceiling(
    finished: Sequence[tuple[float, float, float]], latency: float, reduction: float, sublayer: bool
) -> float | None:
    """The fitness above which a candidate of this `latency` and parameter `reduction` is provably off
    the fronts the study keeps, from the finished sets' (fitness, latency ratio, params reduction);
    None: it cannot be rejected. Whole layers: beaten by a set at least as fast. Sub-layer: latency and
    parameters part ways, so it must also be beaten by a set at least as small (removing as much)."""
    ceiling = min((value for value, lat, _ in finished if lat <= latency), default=None)
    if ceiling is None or not sublayer:
        return ceiling
    smaller = [value for value, _, removed in finished if removed >= reduction]
    return max(ceiling, min(smaller)) if smaller else None


def claim(trial: optuna.Trial, removal: Removal, lock: Lock, **record: object) -> optuna.trial.FrozenTrial | None:
    """Decide which trial measures `removal`: None when this one does, else a finished trial of the same set.

    Checking the store and writing this trial's set happen under the store's lock, so of two workers
    proposing one set at once, the second always sees the first (checking without it let both
    measure it). Only a trial that measures carries its set while running, so waiting trials never
    wait on each other; when the one measuring dies, the next to look claims the set.
    """
    while True:
        with lock():
            measuring = False
            for other in trial.study.get_trials(deepcopy=False, states=(*COMPLETE, TrialState.RUNNING)):
                if other.number == trial.number or TrialRecord.of(other).removal != removal:
                    continue
                if other.state == TrialState.COMPLETE:
                    return other
                measuring |= not worker_gone(TrialRecord.of(other).worker or "")
            if not measuring:
                write_trial(trial, **removal_attrs(removal), **record)
                return None
        time.sleep(DUPLICATE_POLL_S)
        optuna.storages.fail_stale_trials(trial.study)  # a worker elsewhere that died: failed after the grace period


def latency_entry(latency: Latency, timed: str) -> LatencyEntry:
    return LatencyEntry(
        latency.ratio,
        latency.candidate_ms,
        latency.baseline_ms,
        latency.measured_ms,
        latency.measured_baseline_ms,
        timed,
    )


def shape_latency(study: optuna.Study, evaluator: CachingEvaluator, removal: Removal) -> LatencyEntry:
    """The pruned shape's latency: from the study's table (timed at seeding, or again with the front at
    the end of a run: search/retime.py), else timed now and stored."""
    shape = evaluator.shape(removal)
    entry = read_latency(study, shape)
    if entry is None:
        entry = latency_entry(evaluator.latency(removal), "alone")
        write_latency(study, shape, entry)
    return entry


def make_objective(
    evaluator: CachingEvaluator, budget: Budget, on_result: OnResult | None = None, lock: Lock = nullcontext
) -> Callable[[optuna.Trial], tuple[float, float]]:
    def objective(trial: optuna.Trial) -> tuple[float, float]:
        write_trial(trial, worker=worker_id())  # first: lets a restart prove this trial was interrupted
        if not proposer_known(trial):  # seeds and retries carry theirs from the queue
            write_trial(trial, proposed_by="sampler")
        removed = space.suggest(trial, budget)
        reduction = budget.params_reduction(removed)
        shape = {"layers": budget.n_layers - len(removed.layers), "params_reduction": reduction}
        trial.set_constraint("params_reduction", reduction - budget.fraction)
        if not budget.allows(removed):
            # Free: no forward pass, and not counted towards --trials.
            write_trial(trial, **removal_attrs(removed), **shape)
            raise optuna.TrialPruned("empty or over budget" if removed else "empty")
        study = trial.study
        original = claim(trial, removed, lock, **shape)
        if original is not None:
            # The sampler proposed a set already measured: answer from the store, no forward pass.
            write_trial(trial, **TrialRecord.of(original).measurements(), duplicate_of=original.number)
            _report(trial, on_result)
            return original.values[0], original.values[1]
        start, hits = time.perf_counter(), evaluator.hits
        latency = shape_latency(study, evaluator, removed)  # first: it decides what can still win
        measured = study.get_trials(deepcopy=False, states=COMPLETE)
        # On the calibration tokens, the figure this candidate is about to get. Confirming: a set also
        # condemns only by its confirmed figure where that is worse (never rejected against a figure
        # that more tokens took back).
        calib = {
            t.number: max(calib_value(t, evaluator.fitness), t.values[0]) if evaluator.confirms else t.values[0]
            for t in measured
        }
        retiming = read_retiming(study)  # a resumed study: the front's latencies as last timed
        finished = [
            (calib[t.number], latency_ratio(t, retiming), TrialRecord.of(t).params_reduction or 0.0) for t in measured
        ]
        ceiling = rejection_ceiling(finished, latency.ratio, reduction, evaluator.block_kinds is not None)
        if ceiling is not None and evaluator.confirms:  # within the noise of the best: measured again, not rejected
            ceiling = loosened(ceiling, evaluator.confirm_margin, evaluator.fitness)
        front_ceiling = ceiling
        if evaluator.max_ppl_ratio is not None and evaluator.fitness == "ppl":  # KL: the cap bounds the pass's ratio
            ceiling = min(evaluator.max_ppl_ratio, ceiling if ceiling is not None else math.inf)
        try:
            fitness = evaluator.calib_fitness(removed, ceiling)
            if evaluator.confirms and front_ceiling is not None and fitness.value > front_ceiling:
                # Further above a set at least as fast than the noise: not worth more tokens, and never
                # finished with a figure on fewer tokens than the confirmed ones it would be ranked with.
                write_trial(trial, ppl_ratio=fitness.ppl_ratio, kl=fitness.value if evaluator.fitness == "kl" else None)
                windows = len(evaluator.windows("calib"))
                raise Rejected("above a set at least as fast by more than --confirm-margin", fitness.value, windows)
        except Rejected as rejected:
            # Recorded as what it is: pruned, with the bound that condemned it; it counts as a trial.
            kl = evaluator.fitness == "kl"
            write_trial(
                trial,
                rejected=rejected.reason,
                ppl_ratio_lower_bound=None if kl else rejected.lower_bound,
                kl_lower_bound=rejected.lower_bound if kl else None,
                windows_evaluated=rejected.windows,
                latency_ratio=latency.ratio,
                eval_s=time.perf_counter() - start,
            )
            _report(trial, on_result)
            raise optuna.TrialPruned(rejected.reason) from None
        write_trial(
            trial,
            # Measured, or an earlier evaluation of the same set on the same model, data and numerics.
            ppl_from="store" if evaluator.hits > hits else "computed",
            ppl_ratio=fitness.ppl_ratio,
            kl=fitness.value if evaluator.fitness == "kl" else None,
        )
        if evaluator.confirms:  # every finished trial of a confirming study is near the best: ranked on more tokens
            confirming = time.perf_counter()
            fitness = confirmed_fitness(evaluator, removed, fitness)
            write_trial(
                trial,
                confirmed_ppl_ratio=fitness.ppl_ratio,
                confirmed_kl=fitness.value if evaluator.fitness == "kl" else None,
                confirm_s=time.perf_counter() - confirming,
            )
        values = (fitness.value, latency.ratio)
        write_trial(
            trial,
            latency_ratio=latency.ratio,
            latency_ms=latency.ms,
            # Sub-layer studies: removing attention shrinks the cache faster than the parameter count.
            kv_cache_ratio=evaluator.kv_cache_ratio(removed) if evaluator.block_kinds is not None else None,
        )
        if evaluator.heal != "none":
            write_trial(trial, unhealed_runs=unreachable_runs(removed) or None)
        if on_a_front(trial, values, reduction, retiming):
            write_trial(trial, test_ppl_ratio=evaluator.test_ratio(removed))
            second = "eval" in evaluator.splits.measured  # --eval-dataset: another domain, never fitted on
            write_trial(trial, eval_ppl_ratio=evaluator.ratio(removed, "eval") if second else None)
        write_trial(trial, eval_s=time.perf_counter() - start)
        _report(trial, on_result)
        return values

    return objective


def _report(trial: optuna.Trial, on_result: OnResult | None) -> None:
    if on_result is not None:
        on_result(trial, TrialRecord.of(trial))
