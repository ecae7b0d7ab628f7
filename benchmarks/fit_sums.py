"""Healing's sums summed up front for every run a study could remove, against summed when a fit needs them.

    python benchmarks/fit_sums.py > benchmarks/results/fit_sums_b25_sublayer.json    # default model, float32
    python benchmarks/fit_sums.py --budget 12% --granularity layer > benchmarks/results/fit_sums_b12_layer.json

One process, on the study's own model, fitting windows and numerics (`search.study.prepare`), one
after the other:
1. up front (before 2026-12-06): one pass of the unpruned stack over the fitting windows that writes the
   fitting states and sums every (block, run) pair the budget allows (`all_pairs`), then every lone
   unit (each block and each whole layer alone: a healed greedy stage 1) fitted from those sums;
2. on demand (now): the same pass writing the states only, then the same fits, each run's sums read back
   from the states the first time it is needed.
Printed: each pass's seconds, the fits' seconds, the sums held in memory after each, the largest
difference between the two ways' maps, and (arithmetic, not measured) what the up-front sums of the
same budget and space come to at the shape of Llama-3.1-8B (32 layers, d = 4096, equal layers).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluators.healing import FitStats, all_pairs, collect_fit_stats, fit_healing  # noqa: E402
from search.model.removal import Removal  # noqa: E402
from search.space import parse_budget  # noqa: E402
from search.study import RunConfig, prepare  # noqa: E402


def held_gb(stats: FitStats) -> float:
    return sum(t.numel() * t.element_size() for t in [*stats.gram.values(), *stats.cross.values()]) / 1e9


def lone_units(n_layers: int, blocks: bool) -> list[Removal]:
    """A healed greedy stage 1: every unit removed alone (a run from block 0 has nothing to fit)."""
    units = [Removal.of([i]) for i in range(1, n_layers)]
    if blocks:
        units += [Removal.of(attention=[i]) for i in range(1, n_layers)]
        units += [Removal.of(mlp=[i]) for i in range(n_layers)]
    return units


def measure(evaluator, pairs: set, units: list[Removal], sequential: bool) -> tuple[dict, dict]:
    """One way: the pass (summing `pairs` in it), then every unit's fit; the maps, and what it took."""
    splits = evaluator.splits
    started = time.perf_counter()
    stats = collect_fit_stats(
        evaluator.model, splits.fit, splits.bos_id, evaluator.batch_size, pairs, True, evaluator.blocks
    )
    pass_s, after_pass = time.perf_counter() - started, held_gb(stats)
    try:
        started = time.perf_counter()
        maps = {u: fit_healing(evaluator.model, stats, u, evaluator.ridge, sequential).maps for u in units}
        fits_s = time.perf_counter() - started
        return maps, {
            "pass_s": pass_s,
            "fits_s": fits_s,
            "sums_gb_after_pass": after_pass,
            "sums_gb_after_fits": held_gb(stats),  # at most SUMS_BYTES: the fits drop the least recently used
            "pairs_after_fits": len(stats.cross),
        }
    finally:
        stats.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", default="25%")
    parser.add_argument("--granularity", default="sublayer", choices=["layer", "sublayer"])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    config = RunConfig(
        budget=parse_budget(args.budget),
        granularity=args.granularity,
        heal="linear",
        dtype=args.dtype,
        model=args.model or RunConfig().model,
    )
    loaded, evaluator, budget = prepare(config)
    blocks = evaluator.blocks
    units = lone_units(budget.n_layers, blocks)
    pairs = all_pairs(budget.n_layers, budget.max_layers(), blocks)
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    say(f"{loaded.source}, {loaded.dtype}, {args.granularity} {args.budget}: {len(pairs)} pairs up front")
    up_maps, up = measure(evaluator, pairs, units, evaluator.sequential)
    say(f"up front: {up}")
    lazy_maps, lazy = measure(evaluator, set(), units, evaluator.sequential)
    say(f"on demand: {lazy}")
    worst = max(
        ((lazy_maps[u][k] - a).norm() / a.norm()).item() for u, maps in up_maps.items() for k, a in maps.items()
    )
    d, layers = 4096, 32  # Llama-3.1-8B; its layers are equal, so the budget's most layers is a fraction of 32
    most = min(layers - 1, int(config.budget * 8.03e9 // 218.1e6))
    big = all_pairs(layers, most, blocks)
    at_8b = (len(big) + len({p for p, _ in big})) * d * d * 8 / 1e9  # a cross per pair, a gram per block
    print(
        json.dumps(
            {
                "model": loaded.source,
                "dtype": str(loaded.dtype),
                "budget": args.budget,
                "granularity": args.granularity,
                "fitting_tokens": int(evaluator.splits.fit.numel()),
                "fits": len(units),
                "up_front": up,
                "on_demand": lazy,
                "max_rel_map_difference": worst,
                "llama_3_1_8b_up_front_sums_gb": at_8b,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
