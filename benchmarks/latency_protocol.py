"""How steady a latency table is: the paired protocol against a ratio of medians, side by side.

    python benchmarks/latency_protocol.py --json > benchmarks/results/latency_protocol.json
    python benchmarks/latency_protocol.py --storage sqlite:///DIR/sublayer-b25-linear.db --study sublayer-b25-linear

On the default model (the run's numerics, `--dtype`), --shapes sub-layer shapes drawn at random within
a 25 % budget (seeded), or with --storage/--study the shapes a study retimed with its front, are timed
--passes times in one process, each pass by both protocols:
- medians (the protocol before pairing): rounds that time the unpruned model and every shape once
  each, rotated and reversed round to round; a shape's ratio is its median over the baseline's
  median, smoothed by the fit time = fixed + per-block cost x kept blocks;
- paired (evaluators/latency.py, what studies use): the same rounds with the unpruned model timed
  before the first shape and after every one; a shape's ratio is the median of its time over the
  mean of the baseline timings either side, smoothed by the fit through the unpruned model.
A figure that moves between two passes of the same protocol on the same models is noise: printed are
the median and largest move between passes, raw and fitted, and the smallest shape's figure timed by
each protocol beside the same shape timed alone against the baseline (the check an export gets).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

import optuna
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluators.latency import kept_kinds, measure_latencies, time_forward  # noqa: E402
from search.model.removal import Removal  # noqa: E402
from search.model.surgery import removal_applied  # noqa: E402
from search.records import COMPLETE, TrialRecord, read_latency  # noqa: E402
from search.space import parse_budget  # noqa: E402
from search.study import RunConfig, prepare  # noqa: E402


def medians_protocol(model, removals, ids, repeats, kinds, blocks) -> tuple[list[float], list[float]]:
    """Raw and fitted ratios as studies timed before pairing: ratio of medians, fit with a fixed part."""
    variants = [Removal(), *removals]
    times: list[list[float]] = [[] for _ in variants]

    def timed(index: int) -> float:
        with removal_applied(model, variants[index]):
            return time_forward(model, ids)

    for index in range(len(variants)):
        timed(index)
    for round_ in range(repeats):
        order = list(range(len(variants)))
        order = order[round_ % len(order) :] + order[: round_ % len(order)]
        for index in reversed(order) if round_ % 2 else order:
            times[index].append(timed(index))
    medians = [statistics.median(t) for t in times]
    kept = [kept_kinds(kinds, v, blocks) for v in variants]
    names = sorted(set().union(*kept))
    x = torch.tensor([[c[k] for k in names] for c in kept], dtype=torch.float64)
    x = torch.cat([torch.ones(len(x), 1, dtype=torch.float64), x[:, (x != x[:1]).any(dim=0)]], dim=1)
    raw = [m / medians[0] for m in medians[1:]]
    if len(x) <= x.shape[1] or int(torch.linalg.matrix_rank(x)) < x.shape[1]:
        return raw, raw  # as studies did then: raw medians where the fit could not smooth
    coef = torch.linalg.lstsq(x, torch.tensor(medians, dtype=torch.float64).unsqueeze(1)).solution
    if (coef[1:] <= 0).any():
        return raw, raw
    fit = (x @ coef).squeeze(1)
    return raw, [f / float(fit[0]) for f in fit[1:].tolist()]


def draw_shapes(evaluator, budget, count: int, seed: int) -> list[Removal]:
    """`count` removals of distinct shapes within the budget: whole layers, attention and MLP blocks."""
    rng = random.Random(seed)
    layers = evaluator.n_layers
    found: dict[str, Removal] = {}
    while len(found) < count:
        whole = rng.sample(range(layers), rng.randint(0, 4))
        rest = [i for i in range(layers) if i not in whole]
        attention = rng.sample(rest, rng.randint(0, 16))
        mlp = rng.sample([i for i in rest if i not in attention], rng.randint(0, 3))
        removal = Removal.of(whole, attention=attention, mlp=mlp)
        if budget.allows(removal):
            found.setdefault(evaluator.shape(removal), removal)
    return list(found.values())


def study_shapes(storage: str, name: str, evaluator) -> list[Removal]:
    """One removal per shape the study timed with its front at the end of a run (search/retime.py)."""
    study = optuna.load_study(study_name=name, storage=storage)
    found: dict[str, Removal] = {}
    for trial in study.get_trials(deepcopy=False, states=COMPLETE):
        removal = TrialRecord.of(trial).removal
        entry = read_latency(study, evaluator.shape(removal))
        if entry is not None and entry.timed == "front":
            found.setdefault(evaluator.shape(removal), removal)
    if len(found) < 2:
        raise SystemExit(f"study {name} has {len(found)} retimed front shapes: nothing to compare")
    return list(found.values())


def movement(a: list[float], b: list[float]) -> dict[str, float]:
    moves = [abs(x / y - 1) for x, y in zip(a, b)]
    return {"median": statistics.median(moves), "max": max(moves)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", type=int, default=35, help="shapes timed together (default: 35)")
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30, help="rounds per pass, as a study's --latency-repeats")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--storage", help="with --study: time the shapes this study retimed with its front")
    parser.add_argument("--study")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    config = RunConfig(granularity="sublayer", budget=parse_budget("25%"), dtype=args.dtype)
    loaded, evaluator, budget = prepare(config)
    if bool(args.storage) != bool(args.study):
        raise SystemExit("--storage and --study go together")
    if args.storage:
        removals = study_shapes(args.storage, args.study, evaluator)
    else:
        removals = draw_shapes(evaluator, budget, args.shapes, args.seed)
    smallest = max(range(len(removals)), key=lambda i: budget.params_reduction(removals[i]))
    model, ids = evaluator.model, evaluator.latency_input
    passes = []
    for number in range(args.passes):
        started = time.perf_counter()
        raw, fitted = medians_protocol(model, removals, ids, args.repeats, evaluator.layer_kinds, evaluator.block_kinds)
        middle = time.perf_counter()
        paired = measure_latencies(model, removals, ids, 1, args.repeats, evaluator.layer_kinds, evaluator.block_kinds)
        done = time.perf_counter()
        alone = measure_latencies(model, [removals[smallest]], ids, 1, args.repeats)[0].ratio
        passes.append(
            {
                "medians": {"raw": raw, "fitted": fitted, "seconds": middle - started},
                "paired": {
                    "raw": [p.measured_ms / p.measured_baseline_ms if p.measured_ms else p.ratio for p in paired],
                    "fitted": [p.ratio for p in paired],
                    "seconds": done - middle,
                },
                "smallest_alone": alone,
            }
        )
        print(f"pass {number + 1} of {args.passes}: {done - started:.0f} s", file=sys.stderr, flush=True)
    summary = {
        "device": str(loaded.model.device),
        "dtype": loaded.dtype,
        "study": args.study,
        "shapes": [r.key for r in removals],
        "smallest": removals[smallest].key,
        "repeats": args.repeats,
        "passes": passes,
        "moves": {
            protocol: {
                kind: movement(passes[0][protocol][kind], passes[1][protocol][kind]) for kind in ("raw", "fitted")
            }
            for protocol in ("medians", "paired")
        }
        if len(passes) > 1
        else {},
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    for protocol, kinds in summary["moves"].items():
        for kind, move in kinds.items():
            print(f"{protocol:8s} {kind:7s} pass-to-pass move: median {move['median']:.2%}, largest {move['max']:.2%}")
    for number, row in enumerate(passes, 1):
        print(
            f"pass {number}: smallest shape {row['medians']['fitted'][smallest]:.3f} (medians, fitted), "
            f"{row['paired']['fitted'][smallest]:.3f} (paired, fitted), alone {row['smallest_alone']:.3f}"
        )


if __name__ == "__main__":
    main()
