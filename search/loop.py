"""The optimisation loop: run trials until `--trials` count, with progress and one line per trial."""

from __future__ import annotations

import logging
import sys

import optuna
from tqdm.auto import tqdm

from search.caching import CachingEvaluator
from search.objective import Lock, make_objective
from search.records import TrialRecord, completed, counts_towards_trials
from search.space import Budget

log = logging.getLogger("search")
# Give up when the sampler keeps proposing only over-budget or empty sets (tiny spaces, converged runs).
MAX_FREE_PROPOSALS = 300


def describe(number: int, record: TrialRecord) -> str:
    """One line per finished trial, for the progress output."""
    if record.duplicate_of is not None:
        how = f"= trial {record.duplicate_of}"
    else:
        how = f"{record.eval_s or 0:.1f} s"
    if record.rejected is not None:
        outcome = f"rejected: {record.rejected}"
    else:
        test = f", held-out x{record.test_ppl_ratio:.3f}" if record.test_ppl_ratio is not None else ""
        confirmed = f" (x{record.confirmed_ppl_ratio:.3f} confirmed)" if record.confirmed_ppl_ratio is not None else ""
        outcome = f"ppl x{record.ppl_ratio:.3f}{confirmed}, latency x{record.latency_ratio:.3f}{test}"
    return f"trial {number}: remove {record.removal.describe()} -> {outcome} ({how})"


def optimize(study: optuna.Study, evaluator: CachingEvaluator, budget: Budget, target: int, lock: Lock) -> None:
    """Trials until `target` count towards --trials (or the sampler only proposes infeasible sets)."""
    bar = tqdm(total=target, initial=completed(study), desc="trials", unit="trial")
    free_streak = 0

    def on_result(trial: optuna.Trial, record: TrialRecord) -> None:
        bar.write(describe(trial.number, record), file=sys.stderr)

    def progress(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        nonlocal free_streak
        if counts_towards_trials(trial):
            free_streak = 0
            done = completed(study)
            bar.n = min(target, done)
            bar.refresh()
            if done >= target:
                study.stop()
        else:
            free_streak += 1
            if free_streak >= MAX_FREE_PROPOSALS:
                bar.write(
                    f"the sampler proposed {free_streak} infeasible sets in a row; stopping early", file=sys.stderr
                )
                study.stop()

    try:
        while completed(study) < target:
            try:
                study.optimize(
                    make_objective(evaluator, budget, on_result, lock),
                    callbacks=[progress],
                    gc_after_trial=False,
                    show_progress_bar=False,
                )
                return
            except ValueError as exc:
                # SQLite has no SELECT ... FOR UPDATE: two workers can pop the same queued trial, and
                # the second to finish cannot record it. The first result stands; nothing is lost.
                if not str(exc).startswith("Cannot tell a "):
                    raise
                log.info("another worker recorded the same queued trial first; continuing")
    finally:
        bar.close()
