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
from dataclasses import dataclass, field, replace

import optuna
import torch
from optuna.trial import TrialState
from torch import nn

from evaluators.data import Splits, windows_fingerprint
from evaluators.latency import Latency, measure_latency
from evaluators.perplexity import target_count
from evaluators.prefix import PrefixCache, build_prefix_cache
from search import space
from search.evaluations import EvalCache
from search.recovery import worker_gone, worker_id
from search.space import Budget

COMPLETE = (TrialState.COMPLETE,)


def finished(trial: optuna.trial.FrozenTrial) -> bool:
    """Measured to the end, or rejected part-way by a proven bound: either way a trial that ran."""
    return trial.state == TrialState.COMPLETE or (trial.state == TrialState.PRUNED and "rejected" in trial.user_attrs)


DUPLICATE_POLL_S = 2.0


class Rejected(Exception):
    """A candidate stopped part-way: its perplexity provably cannot reach the front (or the cap)."""

    def __init__(self, reason: str, lower_bound: float, windows: int):
        super().__init__(reason)
        self.reason, self.lower_bound, self.windows = reason, lower_bound, windows


@dataclass
class Bench:
    """A loaded model and its data, ready to evaluate removal sets against the unpruned baseline.

    Perplexity is evaluated from a prefix cache per split (see evaluators/prefix.py) and recorded
    in the store's evaluation cache (`stores`, one per split), which is consulted first.
    """

    model: nn.Module
    splits: Splits
    latency_input: torch.Tensor
    batch_size: int = 4
    latency_warmup: int = 1
    latency_repeats: int = 30
    base_calib_ppl: float = float("nan")
    base_test_ppl: float = float("nan")
    layer_kinds: Sequence[str] = ()  # what each layer costs to run: parameter count and attention type
    stores: dict[str, EvalCache] = field(default_factory=dict)  # split -> the store's evaluation cache
    max_ppl_ratio: float | None = None  # --max-ppl-ratio: stop a candidate once it is proven above
    evaluations: int = 0  # perplexity evaluations this process ran (forward passes over a split)
    store_hits: int = 0  # perplexities answered by the store's evaluation cache instead
    _prefix: dict[str, PrefixCache] = field(default_factory=dict, repr=False)

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

    def sensitivity(self, tokens: int) -> tuple[torch.Tensor, EvalCache | None]:
        """The first `tokens` calibration tokens (whole windows), which rank layers for seeding and
        for the baselines, and the evaluation cache keyed to exactly those windows."""
        calib = self.splits.calib
        windows = calib[: max(1, min(len(calib), tokens // calib.shape[1]))]
        store = self.stores.get("calib")
        if store is not None:
            store = replace(store, data_fingerprint=windows_fingerprint(windows, self.splits.bos_id))
        return windows, store

    def prefix(self, split: str) -> PrefixCache:
        """The split's prefix cache, built on first use (one forward pass of the unpruned model)."""
        if split not in self._prefix:
            windows = self.splits.calib if split == "calib" else self.splits.test
            self._prefix[split] = build_prefix_cache(self.model, windows, self.splits.bos_id, self.batch_size)
            self.evaluations += 1
            store = self.stores.get(split)
            if store is not None:
                store.put((), self._prefix[split].base_ppl)
        return self._prefix[split]

    def baseline(self) -> None:
        """Unpruned perplexities: from the store's cache, else from building the prefix caches."""
        for split in ("calib", "test"):
            store = self.stores.get(split)
            ppl = store.get(()) if store is not None else None
            if ppl is None:
                ppl = self.prefix(split).base_ppl
            setattr(self, f"base_{split}_ppl", ppl)

    def ppl(self, removed: Sequence[int], split: str, ceiling: float | None = None, cap: float | None = None) -> float:
        """Perplexity of the pruned model on a split; raises Rejected once it provably exceeds `ceiling`.

        `ceiling` is a perplexity *ratio*. The proof: NLL is never negative, so the windows still to
        come can only add to the sum, and exp(sum so far / all targets) is a lower bound. `cap`
        (--max-ppl-ratio) rejects on the ratio over the windows seen so far, and on the final one.
        """
        base = self.base_calib_ppl if split == "calib" else self.base_test_ppl
        store = self.stores.get(split)
        cached = store.get(removed) if store is not None else None
        if cached is not None:
            self.store_hits += 1
            _check_cap(cached / base, cap, len(self.splits.calib if split == "calib" else self.splits.test))
            return cached
        started = time.perf_counter()
        cache = self.prefix(split)
        total_targets = target_count(cache.windows, cache.bos_id)
        self.evaluations += 1
        nll, seen, base_nll, batches = 0.0, 0, 0.0, 0
        evaluation = cache.nll_batches(removed)
        try:
            for (batch_nll, count), (base_batch, _) in zip(evaluation, cache.base_nll):
                nll, seen, base_nll, batches = nll + batch_nll, seen + count, base_nll + base_batch, batches + 1
                if seen == total_targets:
                    break
                lower = math.exp(nll / total_targets) / base
                windows = min(len(cache.windows), batches * self.batch_size)
                if ceiling is not None and lower > ceiling:
                    raise Rejected(f"proven above ppl x{ceiling:.3f} after {windows} windows", lower, windows)
                partial = math.exp((nll - base_nll) / seen)  # ratio over the windows seen so far
                if cap is not None and partial > cap:
                    reason = f"ppl x{partial:.3f} over the first {windows} windows > --max-ppl-ratio"
                    raise Rejected(reason, lower, windows)
        finally:
            evaluation.close()  # a stopped evaluation restores the model's layers now, not when collected
        ppl = math.exp(nll / seen)
        if store is not None:
            store.put(removed, ppl, time.perf_counter() - started)
        _check_cap(ppl / base, cap, len(cache.windows))
        return ppl

    def calib_ratio(self, removed: Sequence[int], ceiling: float | None = None) -> float:
        return self.ppl(removed, "calib", ceiling, cap=self.max_ppl_ratio) / self.base_calib_ppl

    def test_ratio(self, removed: Sequence[int]) -> float:
        return self.ppl(removed, "test") / self.base_test_ppl

    def latency(self, removed: Sequence[int]) -> Latency:
        return measure_latency(self.model, removed, self.latency_input, self.latency_warmup, self.latency_repeats)


def _check_cap(ratio: float, cap: float | None, windows: int) -> None:
    if cap is not None and ratio > cap:
        raise Rejected(f"ppl x{ratio:.3f} > --max-ppl-ratio", ratio, windows)


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
    if latency.measured_ms is not None:  # the figures above are the additive fit; these the raw medians
        stored |= {"measured_ms": latency.measured_ms, "measured_baseline_ms": latency.measured_baseline_ms}
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
        start, hits = time.perf_counter(), bench.store_hits
        latency_ratio, latency_ms = _latency(study, bench, removed)  # first: it decides what can still win
        measured = study.get_trials(deepcopy=False, states=COMPLETE)
        # A set is dominated once its ppl ratio provably exceeds that of a finished set at least as fast.
        ceiling = min((t.values[0] for t in measured if t.values[1] <= latency_ratio), default=None)
        if bench.max_ppl_ratio is not None:
            ceiling = min(bench.max_ppl_ratio, ceiling if ceiling is not None else math.inf)
        try:
            ppl_ratio = bench.calib_ratio(removed, ceiling)
        except Rejected as rejected:
            # Recorded as what it is: pruned, with the bound that condemned it; it counts as a trial.
            trial.set_user_attr("rejected", rejected.reason)
            trial.set_user_attr("ppl_ratio_lower_bound", rejected.lower_bound)
            trial.set_user_attr("windows_evaluated", rejected.windows)
            trial.set_user_attr("latency_ratio", latency_ratio)
            trial.set_user_attr("eval_s", time.perf_counter() - start)
            if on_result:
                on_result(trial, {"removed": removed, **trial.user_attrs})
            raise optuna.TrialPruned(rejected.reason) from None
        values = (ppl_ratio, latency_ratio)
        # Measured, or an earlier evaluation of the same set on the same model, data and numerics.
        trial.set_user_attr("ppl_from", "store" if bench.store_hits > hits else "computed")
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
