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
from evaluators.healing import DEFAULT_RIDGE, FitData, Healing, collect_fit_data, healed
from evaluators.latency import Latency, measure_latencies, reachable_shapes, shape_key
from evaluators.perplexity import bounded_perplexity, check_cap, target_count
from evaluators.prefix import PrefixCache, build_prefix_cache
from search.healing import HEALINGS

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
    max_ppl_ratio: float | None = None  # --max-ppl-ratio: stop a candidate once it is proven above
    base_ppl: dict[str, float] = field(default_factory=dict)  # split -> the unpruned model's perplexity
    heal: str = "none"  # search/healing.py: HEALINGS; what `ppl` measures unless told otherwise
    ridge: float = DEFAULT_RIDGE
    sequential: bool = True
    _prefix: dict[str, PrefixCache] = field(default_factory=dict, repr=False)
    _fit: FitData | None = field(default=None, repr=False)
    _healings: dict[tuple[int, ...], Healing] = field(default_factory=dict, repr=False)

    @property
    def n_layers(self) -> int:
        return len(self.layer_kinds)

    def windows(self, split: str) -> torch.Tensor:
        return self.splits.windows(split)

    def has_prefix(self, split: str) -> bool:
        return split in self._prefix

    def prefix(self, split: str) -> PrefixCache:
        """The split's prefix cache, built on first use (one forward pass of the unpruned model)."""
        if split not in self._prefix:
            self._prefix[split] = build_prefix_cache(
                self.model, self.windows(split), self.splits.bos_id, self.batch_size
            )
        return self._prefix[split]

    def baseline(self, known: dict[str, float] | None = None) -> dict[str, float]:
        """Unpruned perplexity per split: `known` (from the study) where given, else measured."""
        for split in self.splits.measured:
            self.base_ppl[split] = (known or {}).get(split) or self.prefix(split).base_ppl
        return self.base_ppl

    def healing(self, removed: Sequence[int]) -> Healing:
        """The maps that heal `removed` (fitted once per set; fitting data gathered on first use)."""
        key = tuple(sorted(set(removed)))
        if key not in self._healings:
            fit = HEALINGS[self.heal]
            if fit is None:
                return Healing({})
            if self._fit is None:
                if self.splits.fit is None:
                    raise ValueError("healing needs fitting windows (make_splits(fit_tokens=...))")
                self._fit = collect_fit_data(self.model, self.splits.fit, self.splits.bos_id, self.batch_size)
            if len(self._healings) >= 64:
                self._healings.pop(next(iter(self._healings)))
            self._healings[key] = fit(self.model, self._fit, key, self.ridge, self.sequential)
        return self._healings[key]

    def ppl(
        self,
        removed: Sequence[int],
        split: str,
        ceiling: float | None = None,
        cap: float | None = None,
        unhealed: bool = False,
    ) -> float:
        """Perplexity of the pruned model, healed as `self.heal` says (unless `unhealed`);
        raises Rejected once its ratio provably exceeds `ceiling` (a ratio), or exceeds `cap`
        (--max-ppl-ratio) over the windows seen so far but not all."""
        cache = self.prefix(split)
        healing = Healing({}) if unhealed or not removed else self.healing(removed)
        with healed(self.model, healing):
            evaluation = cache.nll_batches(removed, healing.first_changed)
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

    def calib_ratio(self, removed: Sequence[int], ceiling: float | None = None) -> float:
        """The objective; --max-ppl-ratio applies to it (held-out figures are never capped)."""
        return capped_ratio(self, removed, ceiling)

    def test_ratio(self, removed: Sequence[int]) -> float:
        return self.ppl(removed, "test") / self.base_ppl["test"]

    def sensitivity_windows(self, tokens: int) -> torch.Tensor:
        """The first `tokens` calibration tokens (whole windows), which rank layers for seeding and
        for the baselines."""
        calib = self.splits.calib
        return calib[: max(1, min(len(calib), tokens // calib.shape[1]))]

    def shape(self, removed: Sequence[int]) -> str:
        return shape_key(self.layer_kinds, removed)

    def reachable_shapes(
        self, allows: Callable[[tuple[int, ...]], bool], limit: int = 64
    ) -> dict[str, tuple[int, ...]] | None:
        return reachable_shapes(self.layer_kinds, allows, limit)

    def latencies(self, removal_sets: Sequence[Sequence[int]]) -> list[Latency]:
        """Every set timed round-robin against the unpruned model, smoothed by the additive fit."""
        return measure_latencies(
            self.model, removal_sets, self.latency_input, LATENCY_WARMUP, self.latency_repeats, self.layer_kinds
        )

    def latency(self, removed: Sequence[int] = ()) -> Latency:
        """One set against the unpruned model, raw medians (no fit from a single shape)."""
        return measure_latencies(self.model, [removed], self.latency_input, LATENCY_WARMUP, self.latency_repeats)[0]


def capped_ratio(evaluator: Evaluator | CachingEvaluator, removed: Sequence[int], ceiling: float | None) -> float:
    """Calibration ratio, with --max-ppl-ratio also applied to the finished figure."""
    cap = evaluator.max_ppl_ratio
    ratio = evaluator.ppl(removed, "calib", ceiling, cap) / evaluator.base_ppl["calib"]
    check_cap(ratio, cap, len(evaluator.windows("calib")))
    return ratio
