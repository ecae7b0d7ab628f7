"""What one trial records: measured, rejected part-way, or answered by an earlier trial of the same set."""

import subprocess
import sys
import threading
from pathlib import Path

import optuna
from optuna.trial import TrialState

from search import objective
from search.model.removal import Removal
from search.records import TrialRecord, completed, counts_towards_trials, write_trial
from search.recovery import worker_id
from search.sampler import removal_set
from search.store import exclusive
from search.study import run
from tests.search.test_study import tiny_config

ROOT = Path(__file__).resolve().parents[2]


def test_rejected_trials_are_recorded_and_count(tmp_path, tiny_model_dir, corpus):
    study = run(tiny_config(tmp_path, tiny_model_dir, corpus, trials=6, max_ppl_ratio=1.0000001))
    rejected = [t for t in study.get_trials() if t.state == TrialState.PRUNED and "rejected" in t.user_attrs]
    assert rejected and all(counts_towards_trials(t) for t in rejected)
    assert all(t.user_attrs["ppl_ratio_lower_bound"] > 0 and t.user_attrs["windows_evaluated"] for t in rejected)
    assert completed(study) == 6
    assert len({removal_set(t) for t in study.get_trials() if counts_towards_trials(t)}) == 6  # never retried
    assert not any(t.state == TrialState.FAIL for t in study.get_trials())
    from search.summary import study_summaries, trial_details

    shown = trial_details(study, rejected[0].number)
    assert shown["rejected"] == rejected[0].user_attrs["rejected"] and shown["windows_evaluated"]
    (summary,) = study_summaries(study._storage)
    assert summary["rejected"] == len(rejected)
    optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'store.db'}")  # store readable


def test_every_finished_trial_records_what_it_measured(tmp_path, tiny_model_dir, corpus):
    study = run(tiny_config(tmp_path, tiny_model_dir, corpus, trials=6))
    for trial in study.get_trials(states=(TrialState.COMPLETE,)):
        record = TrialRecord.of(trial)
        assert record.removal == removal_set(trial) and record.layers == 6 - len(record.removed_layers)
        assert record.ppl_ratio == trial.values[0] and record.latency_ratio == trial.values[1]
        assert record.worker and record.ppl_from in ("computed", "store") and record.eval_s is not None
    front = {t.number for t in study.best_trials}
    assert all(TrialRecord.of(t).test_ppl_ratio is not None for t in study.best_trials) and front


def test_a_set_claimed_by_a_later_trial_is_not_measured_twice(tmp_path, monkeypatch):
    # Worker B's trial (number 1) claims [2, 3] before worker A's earlier trial (number 0) has looked:
    # A must wait for B's result and answer from it, not measure the set as well.
    monkeypatch.setattr(objective, "DUPLICATE_POLL_S", 0.05)
    url = f"sqlite:///{tmp_path / 'claim.db'}"
    study = optuna.create_study(storage=url, directions=["minimize", "minimize"])
    early, late = study.ask(), study.ask()
    write_trial(late, worker=worker_id())
    lock = lambda: exclusive(url, "claim:test", announce=False)  # noqa: E731
    assert objective.claim(late, Removal.of([2, 3]), lock) is None  # nobody had it: `late` measures
    answer: list[optuna.trial.FrozenTrial | None] = []
    waiter = threading.Thread(target=lambda: answer.append(objective.claim(early, Removal.of([2, 3]), lock)))
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive()  # waiting on the live trial measuring it
    study.tell(late, (1.2, 0.9))
    waiter.join(10)
    assert [a.number for a in answer if a is not None] == [late.number]
    assert "removed_layers" not in study.trials[early.number].user_attrs  # a waiter never looks like it measures


def test_a_set_whose_measuring_worker_died_is_claimed_again(tmp_path):
    url = f"sqlite:///{tmp_path / 'claim.db'}"
    study = optuna.create_study(storage=url, directions=["minimize", "minimize"])
    dead, alive = study.ask(), study.ask()
    code = "from search.recovery import worker_id; print(worker_id())"
    ended = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    write_trial(dead, worker=ended.stdout.strip(), removed_layers=(4,))  # its worker has ended
    lock = lambda: exclusive(url, "claim:test", announce=False)  # noqa: E731
    assert objective.claim(alive, Removal.of([4]), lock) is None  # claimed again at once, no waiting on the dead
    assert TrialRecord.of(study.trials[alive.number]).removed_layers == (4,)


def test_early_rejection_needs_a_faster_set_and_in_sublayer_studies_a_smaller_one_too():
    # (fitness, latency ratio, params reduction) of the finished sets
    fast = (1.10, 0.90, 0.05)  # fast and good, but removes little
    big = (1.30, 0.95, 0.10)  # removes as much as the candidate
    finished = [fast, big]
    # Whole layers: the best set at least as fast decides (latency goes with parameters there).
    assert objective.rejection_ceiling(finished, 0.92, 0.10, sublayer=False) == 1.10
    # Sub-layer: the candidate may be the best of its size, so only the worse of the two bounds rejects.
    assert objective.rejection_ceiling(finished, 0.92, 0.10, sublayer=True) == 1.30
    # Faster than every finished set: nothing at least as fast, never rejected.
    assert objective.rejection_ceiling(finished, 0.80, 0.10, sublayer=False) is None
    # Removing more than any finished set: in a sub-layer study nothing at least as small, never rejected.
    assert objective.rejection_ceiling(finished, 0.99, 0.20, sublayer=True) is None
    assert objective.rejection_ceiling(finished, 0.99, 0.20, sublayer=False) == 1.10
    assert objective.rejection_ceiling([], 0.99, 0.20, sublayer=True) is None
