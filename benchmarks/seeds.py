"""The default command over several data seeds: how much of a front is the calibration windows' luck.

    python benchmarks/seeds.py --json > benchmarks/results/seeds.json
    python benchmarks/seeds.py --render benchmarks/results/seeds.json   # the docs/benchmarks.md table
    python benchmarks/seeds.py --fitness kl --json > benchmarks/results/seeds_kl.json

Each seed is `python -m search run --budget B --data-seed S` on a fresh store: the same model, corpus,
held-out split and settings, with the calibration windows (what the search optimises and ranks on)
drawn by the seed (seed 0: the corpus's first windows, the default). Per number of removed layers,
the front points' held-out ratios as mean ± half-spread over the seeds, the sets each seed chose, and
how often the same set comes back: the mean Jaccard similarity of the chosen sets over every pair
of seeds (1: every seed chose the same layers).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from tempfile import TemporaryDirectory

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from search.front import front_report  # noqa: E402
from search.records import StudyRecord  # noqa: E402
from search.space import parse_budget  # noqa: E402
from search.study import RunConfig, run  # noqa: E402


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def one_seed(seed: int, args, scratch: Path, say) -> dict:
    config = RunConfig(
        budget=args.budget,
        trials=args.trials,
        dtype=args.dtype,
        model=args.model,
        dataset=args.dataset,
        data_seed=seed,
        fitness=args.fitness,
        confirm_tokens=0,  # as the published results were measured (the spread of the 4096-token fitness)
        study=f"seed-{seed}" + ("" if args.fitness == "ppl" else f"-{args.fitness}"),
        storage=f"sqlite:///{scratch}/seed-{seed}" + ("" if args.fitness == "ppl" else f"-{args.fitness}") + ".db",
    )
    started = time.perf_counter()
    study = run(config)
    seconds = time.perf_counter() - started
    report = front_report(study)
    say(f"data seed {seed}: {seconds:.0f} s, front {[p['removed_layers'] for p in report['front']]}")
    points = [
        {
            "removed_layers": p["removed_layers"],
            "ppl_ratio": p["ppl_ratio"],
            "test_ppl_ratio": p["test_ppl_ratio"],
            "latency_ratio": p["latency_ratio"],
        }
        for p in report["front"]
    ]
    dtype = StudyRecord.read(study).settings.dtype
    return {"data_seed": seed, "seconds": seconds, "dtype": dtype, "front": points}


def by_size(runs: list[dict]) -> list[dict]:
    """Per number of removed layers that every seed's front reaches: spread of held-out and agreement."""
    sizes = sorted(set.intersection(*({len(p["removed_layers"]) for p in r["front"]} for r in runs)))
    rows = []
    for k in sizes:
        chosen = [next(p for p in r["front"] if len(p["removed_layers"]) == k) for r in runs]
        test = [p["test_ppl_ratio"] for p in chosen]
        sets = [set(p["removed_layers"]) for p in chosen]
        pairs = list(itertools.combinations(sets, 2))
        rows.append(
            {
                "k": k,
                "test_mean": statistics.fmean(test),
                "test_half_spread": (max(test) - min(test)) / 2,
                "calib": [p["ppl_ratio"] for p in chosen],
                "test": test,
                "sets": [p["removed_layers"] for p in chosen],
                "jaccard": statistics.fmean(jaccard(a, b) for a, b in pairs) if pairs else 1.0,
                "same_set": all(s == sets[0] for s in sets),
            }
        )
    return rows


def render(results: dict) -> str:
    seeds = ", ".join(str(r["data_seed"]) for r in results["runs"])
    lines = [
        f"Data seeds {seeds}; seconds per run: " + ", ".join(f"{r['seconds']:.0f}" for r in results["runs"]),
        "",
        "| removed | held-out (mean ± half-spread) | per seed | sets | Jaccard |",
        "|---|---|---|---|---|",
    ]
    for row in results["by_size"]:
        per_seed = " / ".join(f"{t:.4f}" for t in row["test"])
        sets = " / ".join(",".join(map(str, s)) for s in row["sets"])
        lines.append(
            f"| {row['k']} | {row['test_mean']:.4f} ± {row['test_half_spread']:.4f} | {per_seed} | {sets} "
            f"| {row['jaccard']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated data seeds (default: 0,1,2)")
    parser.add_argument("--budget", type=parse_budget, default=RunConfig().budget, help="as `run --budget`")
    parser.add_argument("--trials", type=int, default=RunConfig().trials, help="as `run --trials`")
    parser.add_argument("--fitness", default="ppl", choices=["ppl", "kl"], help="as `run --fitness`")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--model", default=None)
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--stores", metavar="DIR", help="keep the stores in DIR (a stopped run resumes)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--render", metavar="FILE", help="print the docs/benchmarks.md table from a --json result")
    args = parser.parse_args()
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return
    warnings.filterwarnings("ignore")

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    with TemporaryDirectory() as temporary:
        scratch = Path(args.stores or temporary)
        scratch.mkdir(parents=True, exist_ok=True)
        runs = [one_seed(int(s), args, scratch, say) for s in args.seeds.split(",")]
    results = {
        "budget": args.budget,
        "trials": args.trials,
        "fitness": args.fitness,
        "runs": runs,
        "by_size": by_size(runs),
    }
    print(json.dumps(results, indent=2) if args.json else render(results))


if __name__ == "__main__":
    main()
