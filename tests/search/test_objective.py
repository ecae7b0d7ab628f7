"""What one trial records: measured, rejected part-way, or answered by an earlier trial of the same set."""

import optuna
from optuna.trial import TrialState

from search.records import TrialRecord, completed, counts_towards_trials
from search.sampler import removal_set
from search.study import run
from tests.search.test_study import tiny_config


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
        assert record.removed_layers == removal_set(trial) and record.layers == 6 - len(record.removed_layers)
        assert record.ppl_ratio == trial.values[0] and record.latency_ratio == trial.values[1]
        assert record.worker and record.ppl_from in ("computed", "store") and record.eval_s is not None
    front = {t.number for t in study.best_trials}
    assert all(TrialRecord.of(t).test_ppl_ratio is not None for t in study.best_trials) and front
