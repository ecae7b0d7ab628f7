"""Does a warm start help? Compare a cold study (own staged greedy) with a warm-started one.

    python benchmarks/warm_start.py --cold NAME@URL --warm NAME@URL

Counts evaluations in calibration-pass equivalents: a trial is one pass over --calib-tokens, a
sensitivity pass over --sensitivity-tokens counts as that fraction of one. Prints one JSON object:
per number of removed layers, each study's best calibration ppl ratio and held-out ratio, and how
many evaluations the warm study needed to match the cold study's final best (null if it never did).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from search.records import COMPLETE, StudyRecord, TrialRecord  # noqa: E402
from search.sampler import removal_set  # noqa: E402


def history(spec: str) -> dict:
    name, url = spec.split("@", 1)
    study = optuna.load_study(study_name=name, storage=url)
    record = StudyRecord.read(study)
    passes = record.sensitivity_passes
    if passes is None:  # studies seeded before the count was stored: every stage scores every fitting layer
        passes = sum(record.baseline.layers - i for i in range(len(record.greedy)))
    seeding = passes * record.settings.sensitivity_tokens / record.settings.calib_tokens
    best: dict[int, dict] = {}
    steps = []
    trials = [t for t in study.get_trials(deepcopy=False, states=COMPLETE) if TrialRecord.of(t).duplicate_of is None]
    for n, trial in enumerate(sorted(trials, key=lambda t: t.number), 1):
        removed = removal_set(trial).layers  # a warm start maps whole layers: layer studies only
        k = len(removed)
        if k not in best or trial.values[0] < best[k]["ppl_ratio"]:
            best[k] = {
                "ppl_ratio": trial.values[0],
                "removed_layers": list(removed),
                "test_ppl_ratio": TrialRecord.of(trial).test_ppl_ratio,
            }
        steps.append((seeding + n, {k: b["ppl_ratio"] for k, b in best.items()}))
    return {"study": name, "seeding_evaluations": seeding, "trials": len(trials), "best": best, "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cold", required=True, help="NAME@URL of the study seeded by its own staged greedy")
    parser.add_argument("--warm", required=True, help="NAME@URL of the study seeded by --warm-start-from")
    args = parser.parse_args()
    cold, warm = history(args.cold), history(args.warm)
    rows = []
    for k in sorted(cold["best"]):
        target = cold["best"][k]["ppl_ratio"]
        reached = next((ev for ev, best in warm["steps"] if best.get(k, float("inf")) <= target), None)
        rows.append(
            {
                "removed": k,
                "cold": cold["best"][k],
                "warm": warm["best"].get(k),
                "cold_evaluations": cold["steps"][-1][0],
                "warm_evaluations_to_match_cold": reached,
            }
        )
    summary = {k: cold[k] for k in ("study", "seeding_evaluations", "trials")}
    print(
        json.dumps(
            {
                "cold": summary,
                "warm": {k: warm[k] for k in ("study", "seeding_evaluations", "trials")},
                "warm_total_evaluations": warm["steps"][-1][0] if warm["steps"] else 0,
                "rows": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
