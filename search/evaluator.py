"""What one removal set measures: perplexity ratio on each split (stopping early when it provably
cannot win) and latency, against the unpruned model, on one loaded model and its windows.

Perplexity runs from a prefix cache per split (evaluators/prefix.py): a candidate recomputes only
the layers after its first removed one. Nothing here touches the store; `CachingEvaluator`
(search/caching.py) wraps this with the store's evaluation cache.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from evaluators.data import Splits
from evaluators.divergence import DenseReference, Divergence, bounded_kl, dense_reference, nll_and_kl
from evaluators.healing import DEFAULT_RIDGE, FitStats, Healing, collect_fit_stats, healed
from evaluators.latency import BlockKinds, Latency, kv_cache_bytes, measure_latencies, reachable_shapes, shape_key
from evaluators.perplexity import bounded_perplexity, check_cap, target_count
from evaluators.prefix import PrefixCache, build_prefix_cache
from search.healing import HEALINGS
from search.model.removal import Removal

if TYPE_CHECKING:
    from search.caching import CachingEvaluator

LATENCY_WARMUP = 1


@dataclass
class Evaluator:
    model: nn.Module
    splits: Splits
    latency_input: torch.Tensor
    batch_size: int = 4
    latency_repeats: int = 30
    layer_kinds: Sequence[str] = ()  # what each layer costs to run: parameter count and attention type
    block_kinds: BlockKinds = None  # the same per attention and MLP block: a sub-layer space (shapes by block)
    max_ppl_ratio: float | None = None  # --max-ppl-ratio: stop a candidate once it is proven above
    base_ppl: dict[str, float] = field(default_factory=dict)  # split -> the unpruned model's perplexity
    heal: str = "none"  # search/healing.py: HEALINGS; what `ppl` measures unless told otherwise
    ridge: float = DEFAULT_RIDGE
    sequential: bool = True
    sensitivity_tokens: int = 2048  # the "sensitivity" split: the first calibration tokens, which greedy scores on
    fitness: str = "ppl"  # what the study minimises on calibration: "ppl" (ratio) or "kl" (mean KL from the unpruned)
    confirm_margin: float = 0.0  # --confirm-margin: nats per token (search/confirmation.py); used with `splits.more`
    _prefix: dict[str, PrefixCache] = field(default_factory=dict, repr=False)
    _fit: FitStats | None = field(default=None, repr=False)
    _healings: dict[tuple[Removal, bool], Healing] = field(default_factory=dict, repr=False)
    _kv_base: int | None = field(default=None, repr=False)  # the unpruned model's KV-cache bytes
    _references: dict[str, DenseReference] = field(default_factory=dict, repr=False)  # for --fitness kl

    @property
    def n_layers(self) -> int:
        return len(self.layer_kinds)

    @property
    def blocks(self) -> bool:
        """A sub-layer space: sets remove lone blocks, and healing runs may start or end mid-layer."""
        return self.block_kinds is not None

    def windows(self, split: str) -> torch.Tensor:
        if split == "sensitivity":
            return self.sensitivity_windows(self.sensitivity_tokens)
        return self.splits.windows(split)

    def has_prefix(self, split: str) -> bool:
        return split in self._prefix

    def prefix(self, split: str) -> PrefixCache:
        """The split's prefix cache, built on first use (one forward pass of the unpruned model); the
        sensitivity windows share the calibration cache's states where they are its first batches."""
        if split not in self._prefix:
            shared = None
            if split == "sensitivity":
                shared = self.prefix("calib").head(len(self.windows(split)))
            self._prefix[split] = shared or build_prefix_cache(
                self.model, self.windows(split), self.splits.bos_id, self.batch_size
            )
        return self._prefix[split]

    def baseline(self, known: dict[str, float] | None = None) -> dict[str, float]:
        """Unpruned perplexity per split: `known` (from the study) where given, else measured."""
        for split in self.splits.scored:
            self.base_ppl[split] = (known or {}).get(split) or self.prefix(split).base_ppl
        return self.base_ppl

    def healing(self, removal: Removal, sequential: bool | None = None) -> Healing:
        """The maps that heal `removal` (fitted once per set; the fitting states written on first use);
        `sequential=False` fits every run on the unpruned model's sums (no pass of the model: they come from
        the fitting states), whatever the study's."""
        sequential = self.sequential if sequential is None else sequential
        key = (removal, sequential)
        if key not in self._healings:
            fit = HEALINGS[self.heal]
            if fit is None:
                return Healing({})
            if self._fit is None:
                if self.splits.fit is None:
                    raise ValueError("healing needs fitting windows (make_splits(fit_tokens=...))")
                # The fitting states only: each run's sums are taken from them when a fit first needs it.
                self._fit = collect_fit_stats(
                    self.model, self.splits.fit, self.splits.bos_id, self.batch_size, set(), True, self.blocks
                )
            if len(self._healings) >= 64:
                self._healings.pop(next(iter(self._healings)))
            self._healings[key] = fit(self.model, self._fit, removal, self.ridge, sequential)
        return self._healings[key]

    def clear_fits(self) -> None:
        """Forget every fitted set and the fitting captures (the summed statistics stay): the next healed
        evaluation pays its whole fit again, as benchmarks of that cost need."""
        self._healings.clear()
        if self._fit is not None:
            self._fit.close_captures()

    def ppl(
        self,
        removal: Removal,
        split: str,
        ceiling: float | None = None,
        cap: float | None = None,
        unhealed: bool = False,
        sequential: bool | None = None,
    ) -> float:
        """Perplexity of the pruned model, healed as `self.heal` says (unless `unhealed`; `sequential`
        overrides the study's fit); raises Rejected once its ratio provably exceeds `ceiling` (a ratio),
        or exceeds `cap` (--max-ppl-ratio) over the windows seen so far but not all."""
        cache = self.prefix(split)
        self.base_ppl.setdefault(split, cache.base_ppl)
        healing = Healing({}) if unhealed or not removal else self.healing(removal, sequential)
        with healed(self.model, healing):
            evaluation = cache.nll_batches(removal, healing.first_changed)
            try:
                return bounded_perplexity(
                    evaluation,
                    cache.base_nll,
                    self.base_ppl[split],
                    target_count(cache.windows, cache.bos_id),
                    len(cache.windows),
                    self.batch_size,
                    ceiling,
                    cap,
                )
            finally:
                evaluation.close()  # a stopped evaluation restores the model's layers now, not when collected

    @property
    def confirms(self) -> bool:
        """--confirm-tokens: near-front candidates are measured again on more calibration windows."""
        return self.splits.more is not None

    def reference(self, split: str = "calib") -> DenseReference:
        """The unpruned model's next-token distributions on a split's windows (one pass, on first use)."""
        if split not in self._references:
            self._references[split] = dense_reference(
                self.model, self.windows(split), self.splits.bos_id, self.batch_size
            )
        return self._references[split]

    def kl(
        self,
        removal: Removal,
        ceiling: float | None = None,
        cap: float | None = None,
        unhealed: bool = False,
        split: str = "calib",
    ) -> Divergence:
        """Mean KL from the unpruned model on a split's windows (calibration, or confirmation's "more"), and
        the same pass's perplexity, healed as `ppl` heals; raises Rejected once the mean provably exceeds
        `ceiling` (or the ratio `cap`)."""
        reference = self.reference(split)  # before any healing or removal touches the model
        cache = self.prefix(split)
        self.base_ppl.setdefault(split, cache.base_ppl)
        healing = Healing({}) if unhealed or not removal else self.healing(removal)
        with healed(self.model, healing):
            evaluation = cache.nll_batches(removal, healing.first_changed, nll_and_kl(reference))
            try:
                return bounded_kl(
                    evaluation,
                    cache.base_nll,
                    target_count(cache.windows, cache.bos_id),
                    len(cache.windows),
                    self.batch_size,
                    ceiling,
                    cap,
                )
            finally:
                evaluation.close()

    def calib_ratio(self, removal: Removal, ceiling: float | None = None) -> float:
        """The calibration ratio; --max-ppl-ratio applies to it (held-out figures are never capped)."""
        return capped_ratio(self, removal, ceiling)

    def calib_fitness(self, removal: Removal, ceiling: float | None = None) -> Fitness:
        """The objective: `ceiling` is in the fitness's own units."""
        return capped_fitness(self, removal, ceiling)

    def test_ratio(self, removal: Removal) -> float:
        return self.ppl(removal, "test") / self.base_ppl["test"]

    def sensitivity_windows(self, tokens: int) -> torch.Tensor:
        """The first `tokens` calibration tokens (whole windows), which rank layers for seeding and
        for the baselines."""
        calib = self.splits.calib
        return calib[: max(1, min(len(calib), tokens // calib.shape[1]))]

    def shape(self, removal: Removal) -> str:
        return shape_key(self.layer_kinds, removal, self.block_kinds)

    def reachable_shapes(self, allows: Callable[[Removal], bool], limit: int = 64) -> dict[str, Removal] | None:
        return reachable_shapes(self.layer_kinds, allows, limit, self.block_kinds)

    def latencies(self, removals: Sequence[Removal]) -> list[Latency]:
        """Every set timed round-robin against the unpruned model, smoothed by the additive fit."""
        return measure_latencies(
            self.model,
            removals,
            self.latency_input,
            LATENCY_WARMUP,
            self.latency_repeats,
            self.layer_kinds,
            self.block_kinds,
        )

    def latency(self, removal: Removal = Removal()) -> Latency:
        """One set against the unpruned model, raw medians (no fit from a single shape)."""
        return measure_latencies(self.model, [removal], self.latency_input, LATENCY_WARMUP, self.latency_repeats)[0]

    def kv_cache_ratio(self, removal: Removal) -> float:
        """The pruned model's KV cache after a prefill of the latency input, over the unpruned model's."""
        if self._kv_base is None:
            self._kv_base = kv_cache_bytes(self.model, self.latency_input)
        return kv_cache_bytes(self.model, self.latency_input, removal) / self._kv_base if self._kv_base else 1.0


@dataclass(frozen=True)
class Fitness:
    """What a trial minimises (`value`: the ratio, or the mean KL) and its calibration perplexity ratio."""

    value: float
    ppl_ratio: float


def capped_fitness(evaluator: Evaluator | CachingEvaluator, removal: Removal, ceiling: float | None) -> Fitness:
    if evaluator.fitness == "ppl":
        ratio = capped_ratio(evaluator, removal, ceiling)
        return Fitness(ratio, ratio)
    cap = evaluator.max_ppl_ratio
    found = evaluator.kl(removal, ceiling, cap)
    ratio = found.ppl / evaluator.base_ppl["calib"]
    check_cap(ratio, cap, len(evaluator.windows("calib")))
    return Fitness(found.kl, ratio)


def capped_ratio(evaluator: Evaluator | CachingEvaluator, removal: Removal, ceiling: float | None) -> float:
    """Calibration ratio, with --max-ppl-ratio also applied to the finished figure."""
    cap = evaluator.max_ppl_ratio
    ratio = evaluator.ppl(removal, "calib", ceiling, cap) / evaluator.base_ppl["calib"]
    check_cap(ratio, cap, len(evaluator.windows("calib")))
    return ratio
