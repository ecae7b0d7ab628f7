"""Healing side by side: unhealed greedy, ReplaceMe, greedy-then-healed and the healing-aware search.

    python benchmarks/healing.py --json > benchmarks/results/healing.json     # default model and corpus
    python benchmarks/healing.py --layers 1 2 3 4 --no-search --json          # the methods only
    python benchmarks/healing.py --render benchmarks/results/healing.json     # the README's table

For k = 1..9 removed layers on the default model and corpus:
- `staged_greedy` (heal none): SLEB's path, scored and measured unhealed;
- `replaceme` (heal linear): the contiguous block of least angular distance, healed (ReplaceMe);
- `greedy_then_healed` (heal linear): the staged_greedy pick, healed;
- `search` (heal linear): a `--budget 25% --heal linear` study; for each k its front point with exactly
  k layers removed (the study's own choice: lowest calibration ratio).
Every row has the calibration ratio (the search's fitness), the held-out ratio and the ratio on the
second corpus (`--eval-dataset`, default: the Wikipedia sample in the gensim wheel), each against
the unpruned model on the same windows. `evaluations` counts the perplexity evaluations choosing
needed; `seconds` is the wall time of choosing and measuring (the study's for `search`).

Also printed (`healed_eval_cost`): what a healed evaluation costs against an unhealed one of the
same set, timed interleaved in this process (fit included; the one-off collection of fitting
activations not), for one greedy-then-healed pick per number of removed runs, with each
`--heal-fit` mode.
All methods share one store and so one evaluation cache.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluators.healing import runs  # noqa: E402
from evaluators.wiki import ENWIKI_SAMPLE  # noqa: E402
from search.caching import CachingEvaluator, with_store  # noqa: E402
from search.front import front_report  # noqa: E402
from search.methods import choose  # noqa: E402
from search.model.removal import Removal  # noqa: E402
from search.records import StudyRecord, TrialRecord, counts_towards_trials  # noqa: E402
from search.store import open_storage, sqlite_path  # noqa: E402
from search.study import RunConfig, prepare, run  # noqa: E402

EMBEDDED, EMBEDDED_CORPUS = "SmolLM2-135M-Instruct (embedded)", "Lee corpus (embedded)"
METHODS = (("staged_greedy", "none"), ("replaceme", "linear"), ("greedy_then_healed", "linear"))


def eval_cost(cached: CachingEvaluator, removed: tuple[int, ...], rounds: int = 3) -> dict:
    """Seconds of one healed and one unhealed calibration evaluation of `removed`, interleaved, no cache,
    with each fit mode (sequential: later runs fitted on the model healed so far; parallel)."""
    evaluator = cached.evaluator
    removal = Removal.of(removed)
    evaluator.healing(Removal())  # the fitting statistics: summed once per process, not per evaluation
    mode = evaluator.sequential
    row: dict = {"removed_layers": list(removed)}
    try:
        for name, sequential in (("sequential", True), ("parallel", False)):
            evaluator.sequential = sequential
            healed, unhealed = [], []
            for _ in range(rounds):
                started = time.perf_counter()
                evaluator.ppl(removal, "calib", unhealed=True)
                unhealed.append(time.perf_counter() - started)
                evaluator.clear_fits()  # the fit is part of a healed evaluation
                started = time.perf_counter()
                evaluator.ppl(removal, "calib")
                healed.append(time.perf_counter() - started)
            row[name] = {
                "healed_s": statistics.median(healed),
                "unhealed_s": statistics.median(unhealed),
                "ratio": statistics.median(healed) / statistics.median(unhealed),
            }
    finally:
        evaluator.sequential = mode
        evaluator.clear_fits()
    return row


def method_rows(cached: CachingEvaluator, ks: list[int], sensitivity_tokens: int, say) -> list[dict]:
    rows = []
    for k in ks:
        for method, heal in METHODS:
            started = time.perf_counter()
            choice = choose(cached, method, k, sensitivity_tokens)
            (removed,) = choice.sets
            unhealed = heal == "none"
            row = {
                "k": k,
                "method": method,
                "heal": heal,
                "removed_layers": list(removed.layers),
                **{
                    f"{split}_ppl_ratio": cached.ratio(removed, split, unhealed=unhealed)
                    for split in cached.splits.measured
                },
                "evaluations": choice.evaluations,
                "seconds": time.perf_counter() - started,
            }
            rows.append(row)
            say(f"k={k} {method}: {list(removed.layers)} held-out x{row['test_ppl_ratio']:.3f}")
    return rows


def ranked(point: dict) -> float:
    """A front point's fitness as its study ranks it: KL or perplexity ratio, confirmed where it was."""
    for key in ("confirmed_kl", "kl", "confirmed_ppl_ratio"):
        if key in point:
            return point[key]
    return point["ppl_ratio"]


def saved_methods(path: str, expected: dict, ks: list[int]) -> tuple[list[dict], list]:
    """The methods' rows of a saved result, refused unless it measured the same model, corpus, numerics
    and windows (the same baseline perplexities): those rows do not depend on the search's settings."""
    saved = json.loads(Path(path).read_text())
    for key, value in expected.items():
        if key == "baseline_ppl":  # the splits both measured (older results have no confirmation split, "more")
            both = {s: v for s, v in value.items() if s in saved[key]}
            same = {"calib", "test"} <= set(both) and all(abs(saved[key][s] - v) <= 1e-6 * v for s, v in both.items())
        else:
            same = saved.get(key) == value
        if not same:
            raise SystemExit(f"--methods-from {path}: its {key} is {saved.get(key)!r}, this run's {value!r}")
    rows = [r for r in saved["rows"] if r["method"] != "search" and r["k"] in ks]
    cost = saved.get("healed_eval_cost")
    return rows, cost if isinstance(cost, list) else []


def search_rows(config: RunConfig, ks: list[int], say) -> tuple[list[dict], dict]:
    """The study's front point per k, and what the study cost (with --confirm-tokens: what confirming did)."""
    started = time.perf_counter()
    study = run(config)
    seconds = time.perf_counter() - started
    say(f"search ({config.trials} trials, confirm tokens {config.confirmation_tokens}): {seconds:.0f} s")
    trials = [t for t in study.get_trials(deepcopy=False) if counts_towards_trials(t)]
    measured = [t for t in trials if TrialRecord.of(t).duplicate_of is None]
    evaluations = (StudyRecord.read(study).sensitivity_passes or 0) + len(measured)
    rows = []
    for k in ks:
        points = [p for p in front_report(study)["front"] if len(p["removed_layers"]) == k]
        if not points:
            continue
        best = min(points, key=ranked)  # what the study ranks
        rows.append(
            {
                "k": k,
                "method": "search",
                "heal": config.heal,
                "confirm_tokens": config.confirmation_tokens,
                "fitness": config.objective_fitness,
                "removed_layers": best["removed_layers"],
                "calib_ppl_ratio": best["ppl_ratio"],
                **{key: best[key] for key in ("confirmed_ppl_ratio", "kl", "confirmed_kl") if key in best},
                "test_ppl_ratio": best["test_ppl_ratio"],
                "eval_ppl_ratio": best.get("eval_ppl_ratio"),
                "evaluations": evaluations,
                "seconds": seconds,
            }
        )
    cost = {"confirm_tokens": config.confirmation_tokens, "seconds": seconds, "evaluations": evaluations}
    if config.confirmation_tokens:
        cost["confirmation"] = front_report(study)["confirmation"]
    return rows, cost


def render(result: dict) -> str:
    searches = sorted({r.get("confirm_tokens", 0) for r in result["rows"] if r["method"] == "search"})
    columns = [(m, None) for m, _ in METHODS] + [("search", c) for c in searches]
    names = [m if c is None else f"search (confirm {c})" if len(searches) > 1 else m for m, c in columns]
    lines = [
        "| k | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for k in sorted({r["k"] for r in result["rows"]}):
        cells = []
        for method, confirm in columns:
            row = next(
                (
                    r
                    for r in result["rows"]
                    if r["k"] == k
                    and r["method"] == method
                    and (confirm is None or r.get("confirm_tokens", 0) == confirm)
                ),
                None,
            )
            figures = [row.get(key) for key in ("test_ppl_ratio", "eval_ppl_ratio")] if row else []
            cells.append(" / ".join(f"{f:.3f}" for f in figures if f is not None) or "-")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model")
    parser.add_argument("--dataset")
    parser.add_argument("--eval-dataset", default=ENWIKI_SAMPLE)
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--layers", type=int, nargs="+", default=list(range(1, 10)))
    parser.add_argument("--trials", type=int, default=60, help="trials of the healing-aware study")
    parser.add_argument("--heal-tokens", type=int, default=RunConfig.heal_tokens)
    parser.add_argument(
        "--calib-tokens",
        type=int,
        default=RunConfig.calib_tokens,
        help="calibration tokens (the search's fitness; more of them shrink its noise)",
    )
    parser.add_argument(
        "--confirm-tokens",
        type=int,
        nargs="+",
        help="one study per value, one after the other, each from a copy of the store as the methods left it "
        "(so none profits from another's evaluations): its --confirm-tokens, 0 for none (default: the run's)",
    )
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--storage", help="SQLAlchemy URL (default: a fresh SQLite file)")
    parser.add_argument("--no-search", action="store_true", help="the methods only")
    parser.add_argument(
        "--methods-from",
        metavar="JSON",
        help="the methods' rows from a saved result of the same model, corpus, dtype and windows instead of "
        "measuring them again (they do not depend on the search's settings): the searches only",
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--render", metavar="JSON", help="print the markdown table of a saved result")
    args = parser.parse_args()
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    storage = args.storage or f"sqlite:///{tempfile.mkdtemp(prefix='healing-')}/healing.db"
    config = RunConfig(
        model=args.model,
        dataset=args.dataset,
        eval_dataset=args.eval_dataset,
        budget=args.budget,
        trials=args.trials,
        dtype=args.dtype,
        storage=storage,
        study="healing-search",
        heal="linear",
        heal_tokens=args.heal_tokens,
        calib_tokens=args.calib_tokens,
    )
    started = time.perf_counter()
    loaded, evaluator, _ = prepare(config)
    cached = with_store(evaluator, open_storage(storage), loaded.fingerprint, loaded.dtype)
    base = cached.baseline()
    if args.methods_from:
        expected = {
            "model": config.model or EMBEDDED,
            "dataset": config.dataset or EMBEDDED_CORPUS,
            "eval_dataset": config.eval_dataset,
            "dtype": loaded.dtype,
            "heal_tokens": config.heal_tokens,
            "calib_tokens": config.calib_tokens,
            "baseline_ppl": base,
        }
        rows, cost = saved_methods(args.methods_from, expected, args.layers)
    else:
        rows = method_rows(cached, args.layers, config.sensitivity_tokens, say)
        by_runs: dict[int, list[int]] = {}  # one greedy-then-healed pick per number of removed runs
        for row in rows:
            if row["method"] == "greedy_then_healed":
                by_runs.setdefault(len(runs(row["removed_layers"])), row["removed_layers"])
        cost = [eval_cost(cached, tuple(removed)) for _, removed in sorted(by_runs.items())]
    for c in cost:
        say(
            f"healed evaluation of {c['removed_layers']}: x{c['sequential']['ratio']:.2f} sequential, "
            f"x{c['parallel']['ratio']:.2f} parallel (unhealed {c['sequential']['unhealed_s']:.1f} s)"
        )
    dtype = loaded.dtype
    del loaded, evaluator, cached  # the study loads its own copy
    searches = []
    for confirm in [] if args.no_search else args.confirm_tokens or [None]:
        own = storage
        if len(args.confirm_tokens or []) > 1:
            path = sqlite_path(storage)
            if path is None:
                raise SystemExit("several --confirm-tokens need a SQLite --storage (each study starts from a copy)")
            own = f"sqlite:///{path.with_name(f'{path.stem}-confirm{confirm}.db')}"
            shutil.copy(path, own.removeprefix("sqlite:///"))
        study_config = replace(config, dtype=dtype, storage=own, confirm_tokens=confirm)
        found, spent = search_rows(study_config, args.layers, say)
        rows += found
        searches.append(spent)
    result = {
        "model": config.model or EMBEDDED,
        "budget": config.budget,
        "dataset": config.dataset or EMBEDDED_CORPUS,
        "eval_dataset": config.eval_dataset,
        "dtype": dtype,
        "heal_tokens": config.heal_tokens,
        "calib_tokens": config.calib_tokens,
        "searches": searches,
        "trials": config.trials,
        "baseline_ppl": base,
        "healed_eval_cost": cost,
        **({"methods_from": args.methods_from} if args.methods_from else {}),
        "rows": rows,
        "wall_s": time.perf_counter() - started,
    }
    print(json.dumps(result, indent=1) if args.json else render(result))


if __name__ == "__main__":
    main()
