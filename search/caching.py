"""An Evaluator that consults the store's evaluation cache first and records what it measures.

The wrapper answers the same calls as the `Evaluator` it wraps (the way lm-evaluation-harness
wraps a model in `CachingLM`): perplexities come from `search_evaluations` when the same model,
windows and numerics measured the set before, in this study or another, and everything else
(model, splits, latency) is the wrapped evaluator's.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field, replace
from typing import Any, cast

import optuna
import torch

from evaluators.data import windows_fingerprint
from evaluators.divergence import DEFAULT_TOP_K, Divergence
from search.evaluations import EvalCache, device_label
from search.evaluator import Evaluator, Fitness, capped_fitness, capped_ratio
from search.model.numerics import mixed_precision
from search.model.placement import layer_device
from search.model.removal import Removal
from search.model.surgery import decoder_layers


@dataclass
class CachingEvaluator:
    evaluator: Evaluator
    stores: dict[str, EvalCache] = field(default_factory=dict)  # split -> the store's evaluation cache
    healed_stores: dict[str, EvalCache] = field(default_factory=dict)  # the same for healed models (--heal)
    # healed models fitted the other way (a sequential study's screens fit every run on the unpruned
    # model): kept under that fit's own key, so a resumed seeding need not screen again
    screen_stores: dict[str, EvalCache] = field(default_factory=dict)
    hits: int = 0  # perplexities answered by the cache instead of a forward pass

    def __getattr__(self, name: str) -> Any:
        # Only reached for what this class does not define: the model, splits, latency, ...
        return getattr(self.__dict__["evaluator"], name)

    def baseline(self, known: dict[str, float] | None = None) -> dict[str, float]:
        """Unpruned perplexities: `known`, else the cache, else measured (and recorded)."""
        found = dict(known or {})
        for split in self.evaluator.splits.scored:
            store = self.stores.get(split)
            if split not in found and store is not None and (cached := store.get(Removal())) is not None:
                found[split] = cached
        measured = [split for split in self.evaluator.splits.scored if split not in found]
        base = self.evaluator.baseline(found)
        for split in measured:  # figures read from the study belong to its numerics, maybe not this run's
            if split in self.stores:
                self.stores[split].put(Removal(), base[split])
        return base

    def ppl(
        self,
        removal: Removal,
        split: str,
        ceiling: float | None = None,
        cap: float | None = None,
        unhealed: bool = False,
        sequential: bool | None = None,
    ) -> float:
        healing = self.evaluator.heal != "none" and not unhealed and bool(removal)
        screen = healing and sequential is not None and sequential != self.evaluator.sequential
        store = (self.screen_stores if screen else self.healed_stores if healing else self.stores).get(split)
        cached = store.get(removal) if store is not None else None
        if cached is not None:
            self.hits += 1
            return cached
        started, built = time.perf_counter(), self.evaluator.has_prefix(split)
        try:
            ppl = self.evaluator.ppl(removal, split, ceiling, cap, unhealed, sequential if screen else None)
        finally:
            if store is not None and not built and self.evaluator.has_prefix(split):
                store.put(Removal(), self.evaluator.prefix(split).base_ppl)  # the unpruned pass, in these numerics
        if store is not None:  # recorded even when over the cap: the figure is true, only the trial is rejected
            store.put(removal, ppl, time.perf_counter() - started)
        return ppl

    def kl(
        self, removal: Removal, ceiling: float | None = None, cap: float | None = None, split: str = "calib"
    ) -> Divergence:
        """`Evaluator.kl` through the cache: the mean KL under its own key, the pass's perplexity as the
        split's perplexity (the same figure a perplexity evaluation would have stored)."""
        healing = self.evaluator.heal != "none" and bool(removal)
        stores = self.healed_stores if healing else self.stores
        kl_store, ppl_store = stores.get(kl_key(split)), stores.get(split)
        kl = kl_store.get(removal) if kl_store is not None else None
        ppl = ppl_store.get(removal) if ppl_store is not None else None
        if kl is not None and ppl is not None:
            self.hits += 1
            return Divergence(kl, ppl)
        started, built = time.perf_counter(), self.evaluator.has_prefix(split)
        try:
            found = self.evaluator.kl(removal, ceiling, cap, split=split)
        finally:
            if ppl_store is not None and not built and self.evaluator.has_prefix(split):
                ppl_store.put(Removal(), self.evaluator.prefix(split).base_ppl)
        seconds = time.perf_counter() - started
        if kl_store is not None and ppl_store is not None:
            kl_store.put(removal, found.kl, seconds)
            ppl_store.put(removal, found.ppl, seconds)
        return found

    def calib_ratio(self, removal: Removal, ceiling: float | None = None) -> float:
        return capped_ratio(self, removal, ceiling)

    def calib_fitness(self, removal: Removal, ceiling: float | None = None) -> Fitness:
        return capped_fitness(self, removal, ceiling)

    def test_ratio(self, removal: Removal) -> float:
        return self.ratio(removal, "test")

    def ratio(self, removal: Removal, split: str, unhealed: bool = False) -> float:
        """A reported (never capped) ratio on `split`: "test", or "eval" (the second corpus)."""
        return self.ppl(removal, split, unhealed=unhealed) / self.evaluator.base_ppl[split]

    def sensitivity(self, tokens: int) -> tuple[torch.Tensor, EvalCache | None]:
        """The windows that rank layers for seeding, and the evaluation cache keyed to exactly them."""
        windows = self.evaluator.sensitivity_windows(tokens)
        store = self.stores.get("calib")
        if store is not None:
            store = replace(store, data_fingerprint=windows_fingerprint(windows, self.evaluator.splits.bos_id))
        return windows, store


def with_store(
    evaluator: Evaluator, storage: optuna.storages.RDBStorage, model_fingerprint: str, dtype: str
) -> CachingEvaluator:
    """Wrap `evaluator` in the store's evaluation cache, keyed by model, windows and numerics."""
    numerics = f"{dtype}@{placement_label(evaluator.model)}/b{evaluator.batch_size}"
    splits = evaluator.splits
    healed = f"{numerics}/{heal_key(evaluator)}"
    screened = f"{numerics}/{heal_key(evaluator, sequential=not evaluator.sequential)}"

    def caches(numerics: str) -> dict[str, EvalCache]:
        found = {
            split: EvalCache(storage.engine, model_fingerprint, splits.split_fingerprint(split), numerics)
            for split in splits.scored
        }
        windows = evaluator.windows("sensitivity")  # greedy's windows: the same rows as `sensitivity()`'s cache
        found["sensitivity"] = replace(found["calib"], data_fingerprint=windows_fingerprint(windows, splits.bos_id))
        # --fitness kl: the mean KL from the unpruned model on a split's windows, not a perplexity
        for split in ("calib", "more") if splits.more is not None else ("calib",):
            found[kl_key(split)] = replace(found[split], numerics=f"{numerics}/kl{DEFAULT_TOP_K}")
        return found

    if evaluator.heal == "none":
        return CachingEvaluator(evaluator, caches(numerics))
    return CachingEvaluator(evaluator, caches(numerics), caches(healed), caches(screened))


def kl_key(split: str) -> str:
    """The evaluation cache of a split's mean KL ("kl" alone: calibration's, as stores first named it)."""
    return "kl" if split == "calib" else f"kl:{split}"


def placement_label(model: torch.nn.Module) -> str:
    """Where the model computes, as the evaluation cache keys it: the device kind and model (one GPU and
    several of the same kind compute alike); a stack split across kinds (`--device-map cuda:0,cpu`)
    adds a short hash of which layers run on which, since each kind rounds in its own way."""
    first = cast(torch.device, getattr(model, "device", torch.device("cpu")))
    per_layer = [device_label(layer_device(layer, first)) for layer in decoder_layers(model)]
    if len(set(per_layer)) <= 1:
        return device_label(first)
    return f"{per_layer[0]}+{hashlib.sha256(','.join(per_layer).encode()).hexdigest()[:8]}"


def heal_key(evaluator: Evaluator, sequential: bool | None = None) -> str:
    """What a healed figure also depends on: the method, its settings and its fitting windows (short: the
    store's numerics column is bounded); `sequential` overrides the evaluator's fit (a screen's key)."""
    sequential = evaluator.sequential if sequential is None else sequential
    fit = evaluator.splits.fit
    fitted = windows_fingerprint(fit, evaluator.splits.bos_id) if fit is not None else "-"
    spec = f"{evaluator.heal}:{evaluator.ridge}:{sequential}:{fitted}"
    if sequential:  # since the streamed fit: later runs start from fitting states stored in the compute dtype
        spec += ":streamed"
    if mixed_precision(evaluator.model):  # since sums on demand: summed from the block outputs, in another order
        spec += ":on-demand"
    return f"h:{evaluator.heal}:{hashlib.sha256(spec.encode()).hexdigest()[:12]}"
