"""Is a close call decidable? Two removal sets compared window by window on every split there is.

    python benchmarks/close_calls.py --pairs '14|17' --heal linear --json > benchmarks/results/close_calls.json
    python benchmarks/close_calls.py --render benchmarks/results/close_calls.json

Each set is pruned (and with `--heal linear` healed, as a `--heal linear` study heals it) on the default
model and corpus, and measured one window of 512 tokens at a time on: the calibration windows a study
ranks on, the confirmation windows after them (`--confirm-tokens`, as large as the corpus allows by
default), the held-out windows and the second corpus (`--eval-dataset`). Per pair and split: the
perplexity ratio of A over B (below 1: A is better), and the paired standard error of its log over the
windows (per window, A's NLL minus B's per token, as a paired t-statistic would take it). A held-out
preference within one or two standard errors is the held-out split's own noise: no calibration fitness,
however long, can be expected to agree with it, and a search must not be tuned to it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluators.healing import Healing, healed  # noqa: E402
from search.model.removal import Removal  # noqa: E402
from search.space import parse_budget  # noqa: E402
from search.study import RunConfig, prepare  # noqa: E402

SPLITS = ("calib", "more", "test", "eval")


def per_window(evaluator, removal: Removal, split: str) -> list[tuple[float, int]]:
    """(summed NLL, targets) of each window of `split` (the evaluator's batches hold one window each)."""
    healing = evaluator.healing(removal) if removal else Healing({})
    cache = evaluator.prefix(split)
    with healed(evaluator.model, healing):
        evaluation = cache.nll_batches(removal, healing.first_changed)
        try:
            return [(float(nll), int(count)) for nll, count in evaluation]
        finally:
            evaluation.close()


def paired(a: list[tuple[float, int]], b: list[tuple[float, int]]) -> dict:
    """A over B on one split: the perplexity ratio, and the paired standard error of its log."""
    diffs = [(na - nb) / count for (na, count), (nb, _) in zip(a, b)]
    targets = sum(count for _, count in a)
    log_ratio = (sum(n for n, _ in a) - sum(n for n, _ in b)) / targets
    stderr = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
    return {
        "ratio": math.exp(log_ratio),
        "log_ratio": log_ratio,
        "stderr": stderr,
        "z": log_ratio / stderr if stderr else math.nan,
        "windows": len(diffs),
        "a_better_windows": sum(d < 0 for d in diffs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", help="semicolon-separated pairs of removal keys, A|B (e.g. '14|17;14,17|16,17')")
    parser.add_argument("--heal", choices=["none", "linear"], default="none")
    parser.add_argument("--budget", default="25%", help="the study budget: longest healed run (default: 25%%)")
    parser.add_argument("--confirm-tokens", type=int, default=32768, help="calibration plus confirmation tokens")
    parser.add_argument("--eval-dataset", default="enwiki-sample", help="the second corpus (default: %(default)s)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--model", default=None)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--render", metavar="FILE", help="print the docs/benchmarks.md table from a --json result")
    args = parser.parse_args()
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return
    if not args.pairs:
        raise SystemExit("give --pairs A|B[;A|B...] or --render FILE")
    warnings.filterwarnings("ignore")
    pairs = [tuple(Removal.parse(key) for key in pair.split("|")) for pair in args.pairs.split(";")]
    if any(len(pair) != 2 for pair in pairs):
        raise SystemExit("each pair is two removal keys separated by '|'")
    started = time.perf_counter()
    config = RunConfig(
        model=args.model,
        heal=args.heal,
        budget=parse_budget(args.budget),
        granularity="layer" if all(r.whole_layers_only for pair in pairs for r in pair) else "sublayer",
        dtype=args.dtype,
        confirm_tokens=args.confirm_tokens,
        eval_dataset=args.eval_dataset,
        batch_size=1,  # one window per batch: the windows are the paired samples
    )
    loaded, evaluator, _ = prepare(config)
    evaluator.baseline()
    splits = [s for s in SPLITS if s in evaluator.splits.scored]
    measured: dict[Removal, dict[str, list[tuple[float, int]]]] = {}
    for removal in dict.fromkeys(r for pair in pairs for r in pair):
        measured[removal] = {split: per_window(evaluator, removal, split) for split in splits}
        print(f"{removal.key}: measured", file=sys.stderr, flush=True)
    rows = []
    for a, b in pairs:
        row = {"a": a.key, "b": b.key}
        for split in splits:
            row[split] = paired(measured[a][split], measured[b][split])
        # Calibration and confirmation together: what a confirming study ranks by.
        row["calib+more"] = paired(
            measured[a]["calib"] + measured[a].get("more", []), measured[b]["calib"] + measured[b].get("more", [])
        )
        rows.append(row)
    results = {
        "dtype": loaded.dtype,
        "heal": args.heal,
        "confirm_tokens": args.confirm_tokens,
        "eval_dataset": args.eval_dataset,
        "seconds": time.perf_counter() - started,
        "rows": rows,
    }
    print(json.dumps(results, indent=2) if args.json else render(results))


def render(results: dict) -> str:
    names = {"calib": "calibration", "calib+more": "calibration + confirmation", "test": "held-out", "eval": "2nd"}
    lines = [
        f"{results['dtype']}, heal {results['heal']}, {results['confirm_tokens']} calibration tokens, "
        f"{results['seconds']:.0f} s. A over B: perplexity ratio (below 1: A better) ± one paired standard "
        "error, and z",
        "",
        "| A | B | " + " | ".join(names.values()) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for row in results["rows"]:
        cells = []
        for split in names:
            p = row.get(split)
            cells.append(
                "-"
                if p is None
                else f"{p['ratio']:.4f} ± {math.exp(p['stderr']) - 1:.4f} (z {p['z']:+.1f}, {p['windows']} w)"
            )
        lines.append(f"| `{row['a']}` | `{row['b']}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
