"""Search versus published one-shot and greedy methods, side by side, on one model and corpus.

    python benchmarks/compare_methods.py --json > compare.json        # default model and corpus
    python benchmarks/compare_methods.py --seeds 3 --json > compare.json
    python benchmarks/compare_methods.py --render compare.json        # the README's markdown table

For k = 1..4 removed layers, every method of search/baselines.py picks its set on the first
--sensitivity-tokens calibration tokens and is measured on the full calibration split and the
held-out split (latency: every pruned shape timed round-robin against the baseline). `search`
runs the default study (`python -m search run --budget 12%`) once per sampler seed; its row for k is
the front point with exactly k removed layers and the best held-out ratio (one per seed, then the
mean, with the spread max - min). `evaluations` counts the perplexity evaluations a method needs on
its own: sensitivity passes for the rankings, plus measured trials for the search.

Everything shares one store (a fresh SQLite file unless --storage is given) and so one
evaluation cache: a set two methods pick is measured once.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from search.caching import with_store  # noqa: E402
from search.front import front_report  # noqa: E402
from search.methods import BLOCK_METHODS, HEALED_METHODS, METHODS, choose, measure  # noqa: E402
from search.records import StudyRecord, TrialRecord, counts_towards_trials  # noqa: E402
from search.store import open_storage  # noqa: E402
from search.study import RunConfig, prepare, run  # noqa: E402


def search_rows(config: RunConfig, seeds: list[int], ks: list[int], say) -> list[dict]:
    per_k: dict[int, list[dict]] = {k: [] for k in ks}
    for seed in seeds:
        started = time.perf_counter()
        study = run(RunConfig(**{**config.__dict__, "seed": seed, "study": f"compare-{config.sampler}-seed{seed}"}))
        say(f"search seed {seed} ({config.sampler}): {time.perf_counter() - started:.0f} s")
        trials = [
            t
            for t in study.get_trials(deepcopy=False)
            if counts_towards_trials(t) and TrialRecord.of(t).duplicate_of is None
        ]
        evaluations = (StudyRecord.read(study).sensitivity_passes or 0) + len(trials)
        front = front_report(study)["front"]
        for k in ks:
            points = [p for p in front if len(p["removed_layers"]) == k]
            if points:
                best = min(points, key=lambda p: p["test_ppl_ratio"])
                per_k[k].append({**best, "seed": seed, "evaluations": evaluations})
    rows = []
    for k, found in per_k.items():
        if not found:
            continue
        tests = [p["test_ppl_ratio"] for p in found]
        rows.append(
            {
                "k": k,
                "method": "search",
                "removed_layers": found[tests.index(min(tests))]["removed_layers"],
                "calib_ppl_ratio": statistics.fmean(p["ppl_ratio"] for p in found),
                "test_ppl_ratio": statistics.fmean(tests),
                "latency_ratio": statistics.fmean(p["latency_ratio"] for p in found),
                "evaluations": round(statistics.fmean(p["evaluations"] for p in found)),
                "seeds": len(found),
                "test_ppl_ratio_spread": max(tests) - min(tests),
                "per_seed": [
                    {"seed": p["seed"], "removed_layers": p["removed_layers"], "test_ppl_ratio": p["test_ppl_ratio"]}
                    for p in found
                ],
            }
        )
    return rows


def render(result: dict) -> str:
    """Markdown: one row per k, one column per method, held-out ratio (calibration ratio) [layers]."""
    methods = [m for m in (*METHODS.names, "search") if any(r["method"] == m for r in result["rows"])]
    lines = ["| k | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for k in sorted({r["k"] for r in result["rows"]}):
        cells = []
        for method in methods:
            row = next((r for r in result["rows"] if r["k"] == k and r["method"] == method), None)
            if row is None:
                cells.append("–")
                continue
            layers = "" if method == "random" else f" {row['removed_layers']}"
            spread = f" ±{row['test_ppl_ratio_spread'] / 2:.3f}" if row.get("seeds", 1) > 1 else ""
            cells.append(f"{row['test_ppl_ratio']:.3f}{spread} ({row['calib_ppl_ratio']:.3f}){layers}")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    d = RunConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--dataset")
    parser.add_argument("--budget", type=float, default=d.budget)
    parser.add_argument("--trials", type=int, default=d.trials, help="trials per search study (default: the CLI's)")
    parser.add_argument("--dtype", default=d.dtype)
    parser.add_argument("--sampler", default=d.sampler, choices=["local", "tpe"])
    parser.add_argument("--seeds", type=int, default=1, help="search studies with sampler seeds 0..N-1")
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 3, 4], help="values of k")
    parser.add_argument("--draws", type=int, default=5, help="random sets averaged per k")
    parser.add_argument("--storage", help="store for the search studies and the evaluation cache (default: fresh)")
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    parser.add_argument("--render", metavar="JSON", help="print the markdown table of a saved result and exit")
    args = parser.parse_args()
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr))
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.perf_counter()
    storage = args.storage or f"sqlite:///{tempfile.mkdtemp(prefix='compare-')}/compare.db"
    config = RunConfig(
        model=args.model,
        dataset=args.dataset,
        budget=args.budget,
        trials=args.trials,
        dtype=args.dtype,
        storage=storage,
        sampler=args.sampler,
        confirm_tokens=0,  # as the published results were measured
    )

    loaded, evaluator, _ = prepare(config)
    config = replace(config, dtype=loaded.dtype)  # `auto` resolved once: the studies share the cache key
    cached = with_store(evaluator, open_storage(storage), loaded.fingerprint, loaded.dtype)
    cached.baseline()
    choices = []
    for k in args.layers:
        for method in METHODS.names:
            if method in HEALED_METHODS:  # measured healed: benchmarks/healing.py compares those
                continue
            if method in BLOCK_METHODS:  # k counts blocks there, not layers: not comparable row by row
                continue
            choices.append(choose(cached, method, k, config.sensitivity_tokens, draws=args.draws))
            say(f"k={k} {method}: {[s.describe() for s in choices[-1].sets]}")
    rows = measure(cached, choices)
    baselines_s = time.perf_counter() - started
    del loaded, evaluator, cached  # the studies load their own copy
    rows += search_rows(config, list(range(args.seeds)), args.layers, say)
    result = {
        "model": config.model or "SmolLM2-135M-Instruct (embedded)",
        "dataset": config.dataset or "Lee corpus (embedded)",
        "budget": config.budget,
        "trials": config.trials,
        "dtype": config.dtype,
        "sampler": config.sampler,
        "rows": rows,
        "baselines_s": baselines_s,
        "wall_s": time.perf_counter() - started,
    }
    print(json.dumps(result, indent=None if args.json else 2))
    if not args.json:
        print(render(result), file=sys.stderr)


if __name__ == "__main__":
    main()
