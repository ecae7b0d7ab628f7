"""Offline-task accuracy of a study's front in both numerics, side by side, and what it costs.

    python -m search run --budget 12%                                  # the default study, once
    python benchmarks/accuracy.py --json > benchmarks/results/accuracy.json
    python benchmarks/accuracy.py --numerics float32 --limit 200         # one numerics, fewer documents

For the unpruned model and each front point (built as `export` builds it), `heldout_cloze` through
lm-evaluation-harness in each `--numerics`, one model at a time: accuracy with its stderr, the
target word's perplexity, the share of the baseline's accuracy kept, and the seconds the harness
took (model building not included). The `evaluate` command does the same in the study's numerics
and stores the results; this script stores nothing, so it can be rerun on any study.

Also printed (`paired`): per front point, the accuracy difference to the baseline on the same
documents and its paired standard error, which is far smaller than either score's own stderr
(the two models are scored on identical documents).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluators.accuracy import BOOTSTRAP_ITERS, harness_version, quiet_harness, task_manager  # noqa: E402
from search.accuracy import DEFAULT_BATCH_SIZE, DEFAULT_LIMIT, study_tasks  # noqa: E402
from search.export import prune_trial  # noqa: E402
from search.front import front_report  # noqa: E402
from search.model.loading import load_model  # noqa: E402
from search.model.numerics import apply_numerics  # noqa: E402
from search.records import StudyRecord  # noqa: E402
from search.store import load_study, locate_store, open_storage  # noqa: E402

TASK = "heldout_cloze"


def per_document(model, tokenizer, tasks, limit: int, batch_size: int) -> tuple[list[float], dict, float]:
    """The harness's per-document `acc` (log_samples) and its aggregate metrics, and the seconds it took."""
    import contextlib

    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM

    quiet_harness()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device="cpu", softmax_dtype=torch.float32)
    started = time.perf_counter()
    with torch.inference_mode(), contextlib.redirect_stdout(sys.stderr):
        out = lm_eval.simple_evaluate(
            model=lm, tasks=tasks.objects([TASK]), task_manager=tasks.manager, limit=limit,
            bootstrap_iters=BOOTSTRAP_ITERS, log_samples=True,
        )  # fmt: skip
    seconds = time.perf_counter() - started
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    return [float(s["acc"]) for s in samples], out["results"][TASK], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study")
    parser.add_argument("--storage")
    parser.add_argument("--numerics", nargs="+", default=["bf16-mixed", "float32"])
    parser.add_argument("--limit", type=int, default=DEFAULT_LIMIT)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    study = load_study(open_storage(locate_store(args.study, args.storage), create=False), args.study)
    record = StudyRecord.read(study)
    front = front_report(study)["front"]
    tokenizer = load_model(record.model_spec, "float32").tokenizer
    tasks = study_tasks(task_manager(defaults=False), [TASK], tokenizer, record)
    rows = []
    for numerics in args.numerics:
        base_docs: list[float] = []
        for point in [None, *front]:
            # A fresh model each time: apply_numerics wraps forward in autocast for good.
            built = load_model(record.model_spec, "float32") if point is None else prune_trial(study, point["trial"])
            model = built.model
            model.__dict__.pop("forward", None)  # a healed study's refit left its own autocast: this row's only
            apply_numerics(model, numerics)
            docs, metrics, seconds = per_document(model, tokenizer, tasks, args.limit, args.batch_size)
            del model, built
            if point is None:
                base_docs = docs
            row = {
                "numerics": numerics,
                "trial": None if point is None else point["trial"],
                "removed_layers": [] if point is None else point["removed_layers"],
                "acc": metrics["acc,none"],
                "acc_stderr": metrics["acc_stderr,none"],
                "word_perplexity": metrics["perplexity,none"],
                "n": len(docs),
                "seconds": round(seconds, 1),
            }
            if point is not None:
                diffs = [d - b for d, b in zip(docs, base_docs)]
                mean = sum(diffs) / len(diffs)
                var = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
                row["paired"] = {"acc_minus_baseline": mean, "stderr": math.sqrt(var / len(diffs))}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    for row in rows:
        base = next(r for r in rows if r["numerics"] == row["numerics"] and r["trial"] is None)
        row["acc_retained"] = row["acc"] / base["acc"] if base["acc"] else None
    result = {
        "study": study.study_name,
        "task": TASK,
        "harness": harness_version(),
        "limit": args.limit,
        "batch_size": args.batch_size,
        "rows": rows,
        "total_seconds": {n: round(sum(r["seconds"] for r in rows if r["numerics"] == n), 1) for n in args.numerics},
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for row in rows:
        paired = row.get("paired")
        print(
            f"{row['numerics']:10} {str(row['removed_layers']):18} acc {row['acc']:.4f} ± {row['acc_stderr']:.4f}"
            f"  kept {row['acc_retained']:.1%}  word ppl {row['word_perplexity']:.1f}  {row['seconds']:.0f} s"
            + (f"  vs baseline {paired['acc_minus_baseline']:+.4f} ± {paired['stderr']:.4f}" if paired else "")
        )


if __name__ == "__main__":
    main()
