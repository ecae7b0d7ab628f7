"""Would a study's rejections stand with better latency figures? Replayed from its store, no model run.

    python benchmarks/replay_rejections.py --storage sqlite:///DIR/sublayer-b25-linear-confirm.db \
        --study sublayer-b25-linear-confirm

A trial is rejected when a finished set at least as fast (and, in a sub-layer study, one at least as
small) beats it by more than the margin (search/objective.py `rejection_ceiling`). "At least as fast"
reads each finished trial's own latency, timed alone when its shape was first reached. Each rejection
is replayed against the trials finished before it: with those figures as recorded (every rejection
should reproduce), with the end-of-run retimed figures where the store has them, and with either
loosened by a latency margin. Which rejections flip says what noisy latency figures cost the search.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from search.confirmation import loosened  # noqa: E402
from search.objective import rejection_ceiling  # noqa: E402
from search.records import StudyRecord, TrialRecord, calib_value, read_retiming  # noqa: E402

# Rejections by the rule: proven above the ceiling part-way, or (confirming) further above it than the margin.
REASONS = ("proven above", "above a set at least as fast")


def replay(study: optuna.Study, retimed: bool, latency_margin: float) -> tuple[int, list[int]]:
    """How many trials the rule rejected, and which of them it would keep with these latency figures."""
    settings = StudyRecord.read(study).settings
    retiming = read_retiming(study)
    trials = study.get_trials(deepcopy=False)
    rejected, kept = 0, []
    for trial in trials:
        if trial.state.name != "PRUNED" or not trial.user_attrs.get("rejected", "").startswith(REASONS):
            continue
        rejected += 1
        finished = []
        for other in trials:
            if other.number >= trial.number or other.state.name != "COMPLETE" or not other.values:
                continue
            latency = other.values[1]
            if retimed and retiming is not None:
                latency = retiming.ratios.get(TrialRecord.of(other).removal.key, latency)
            value = (
                max(calib_value(other, settings.fitness), other.values[0])
                if settings.confirm_tokens
                else other.values[0]
            )
            finished.append((value, latency / (1 - latency_margin), TrialRecord.of(other).params_reduction or 0.0))
        record = TrialRecord.of(trial)
        ceiling = rejection_ceiling(
            finished, trial.user_attrs["latency_ratio"], record.params_reduction or 0.0, settings.granularity != "layer"
        )
        if ceiling is not None and settings.confirm_tokens:
            ceiling = loosened(ceiling, settings.confirm_margin or 0.0, settings.fitness)
        key = "kl" if settings.fitness == "kl" else "ppl_ratio"  # its figure, or the bound that stopped it early
        value = trial.user_attrs.get(key, trial.user_attrs.get(f"{key}_lower_bound"))
        if ceiling is None or value <= ceiling:
            kept.append(trial.number)
    return rejected, kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storage", required=True)
    parser.add_argument("--study", required=True)
    parser.add_argument("--latency-margins", default="0,0.05", help="comma-separated (default: 0,0.05)")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=args.study, storage=args.storage)
    for retimed in (False, True):
        for margin in (float(m) for m in args.latency_margins.split(",")):
            rejected, kept = replay(study, retimed, margin)
            figures = "retimed" if retimed else "as recorded"
            print(f"latency {figures}, margin {margin:.0%}: {rejected} rejected, {len(kept)} kept: {kept}")


if __name__ == "__main__":
    main()
