"""Run one published method alone: choose its k layers on a loaded model, then measure the result.

`python -m search baseline --method NAME --layers K` and benchmarks/compare_methods.py both come
here, so a baseline is chosen and measured exactly as a study would (same windows, same prefix
cache, same evaluation cache, same latency protocol). Choosing uses the first
`--sensitivity-tokens` calibration tokens, as study seeding does; the figures reported are on the
full calibration split and the held-out split.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from evaluators.latency import measure_latencies
from evaluators.sensitivity import removal_sensitivity, similarity
from search import baselines
from search.errors import SearchError
from search.objective import Bench
from search.seeding import staged_greedy
from search.space import Budget


@dataclass
class Choice:
    method: str
    k: int
    sets: list[tuple[int, ...]]  # one set; several for `random`
    evaluations: int  # forward passes over a split it needed to choose (prefix-cache builds included)


class _Counted:
    """An evaluation cache (or none) that counts the perplexities asked of it: what a method needs
    on its own, whether or not an earlier method already paid for them."""

    def __init__(self, store) -> None:
        self.store, self.needed = store, 0

    def get(self, removed: Sequence[int]) -> float | None:
        self.needed += 1
        return self.store.get(removed) if self.store is not None else None

    def put(self, removed: Sequence[int], perplexity: float, seconds: float | None = None) -> None:
        if self.store is not None:
            self.store.put(removed, perplexity, seconds)


def choose(bench: Bench, method: str, k: int, sensitivity_tokens: int, draws: int = 5, seed: int = 0) -> Choice:
    """The set(s) `method` removes for k layers, and how many evaluations choosing them cost."""
    model, splits = bench.model, bench.splits
    n_layers = len(bench.layer_kinds)
    if not 1 <= k < n_layers:
        raise SearchError(f"--layers must be between 1 and {n_layers - 1} for this {n_layers}-layer model")
    windows, store = bench.sensitivity(sensitivity_tokens)
    store = _Counted(store)

    def ppl_scores(removed: tuple[int, ...], candidates: list[int]) -> dict[int, float]:
        return removal_sensitivity(
            model, windows, candidates, removed, splits.bos_id, bench.batch_size, desc=None, store=store
        )

    if method == "oneshot_ppl":
        sets = [baselines.lowest(ppl_scores((), list(range(n_layers))), k)]
    elif method in ("block_influence", "angular_block"):
        found = similarity(model, windows, (), splits.bos_id, bench.batch_size, max_block=k)
        if method == "block_influence":
            sets = [baselines.lowest(found.bi, k)]
        else:
            sets = [baselines.angular_block(found.angular[k], k)]
        return Choice(method, k, sets, 1)
    elif method == "staged_greedy":
        anything = Budget(1.0, total_params=n_layers, layer_params=[1] * n_layers)
        sets = [staged_greedy(ppl_scores, anything, max_stages=k)[-1].removed]
    elif method == "drop_last":
        sets = [baselines.drop_last(n_layers, k)]
    elif method == "random":
        sets = baselines.random_sets(n_layers, k, draws, seed)
    else:
        raise SearchError(f"unknown method {method!r} (one of: {', '.join(baselines.METHODS)})")
    return Choice(method, k, sets, store.needed)


def measure(bench: Bench, choices: Sequence[Choice]) -> list[dict]:
    """Calibration and held-out ratios of every chosen set, and latency per pruned shape, timed together."""
    shapes = {bench.shape_key(s): s for choice in choices for s in choice.sets}
    timed = measure_latencies(
        bench.model, list(shapes.values()), bench.latency_input, 1, bench.latency_repeats, bench.layer_kinds
    )
    latency = {key: t.ratio for key, t in zip(shapes, timed)}
    rows = []
    for choice in choices:
        calib = [bench.calib_ratio(s) for s in choice.sets]
        test = [bench.test_ratio(s) for s in choice.sets]
        rows.append(
            {
                "k": choice.k,
                "method": choice.method,
                "removed_layers": list(choice.sets[0]),
                "calib_ppl_ratio": statistics.fmean(calib),
                "test_ppl_ratio": statistics.fmean(test),
                "latency_ratio": statistics.fmean(latency[bench.shape_key(s)] for s in choice.sets),
                "evaluations": choice.evaluations,
                **({"draws": [list(s) for s in choice.sets]} if len(choice.sets) > 1 else {}),
            }
        )
    return rows
