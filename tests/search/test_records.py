"""Typed study and trial records: round trips through a real store, and stores written before them."""

import optuna
import pytest
from optuna.trial import TrialState

from search.errors import SearchError
from search.model.removal import Removal
from search.records import (
    Baseline,
    GreedyStage,
    LatencyEntry,
    Settings,
    StudyRecord,
    TrialRecord,
    completed,
    count_run_started,
    counts_towards_trials,
    find_trial,
    joined_workers,
    read_latency,
    runs_started,
    write_latency,
    write_trial,
)

SETTINGS = Settings("m", 0.12, None, 64, 64, 32, 16, "float32")


def study_in(tmp_path) -> optuna.Study:
    return optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", directions=["minimize", "minimize"])


def test_study_record_round_trip(tmp_path):
    study = study_in(tmp_path)
    record = StudyRecord(
        settings=SETTINGS,
        model_source="src",
        model_spec=None,
        model_fingerprint="mf",
        data_fingerprint="df",
        baseline=Baseline(6, 1000, 10.0, 11.0, 2.5),
        layer_params=[100] * 6,
        sensitivity={Removal.of([0]): 1.5, Removal.of([3]): 1.1},
        criterion="ppl",
        greedy=[GreedyStage(Removal.of([3]), 1.1)],
        sensitivity_passes=7,
    )
    record.write(study)
    assert StudyRecord.read(optuna.load_study(study_name=study.study_name, storage=study._storage)) == record
    write_latency(study, "a*5", LatencyEntry(0.8, 2.0, 2.5))
    assert read_latency(study, "a*5") == LatencyEntry(0.8, 2.0, 2.5) and read_latency(study, "a*4") is None


def test_a_study_in_the_old_attribute_layout_reads(tmp_path):
    study = study_in(tmp_path)  # as the code before the records module wrote it: plain keys, no warm start
    study.set_user_attr("settings", {**SETTINGS.__dict__})
    study.set_user_attr("baseline", {"layers": 6, "params": 1000, "calib_ppl": 10.0, "test_ppl": 11.0, "latency_ms": 2})
    study.set_user_attr("sensitivity", {"0": 1.5})
    study.set_user_attr("greedy", [{"removed_layers": [0], "ppl_ratio": 1.5}])  # before criteria: `ppl_ratio`
    record = StudyRecord.read(study)
    assert (
        record.settings == SETTINGS and record.sensitivity == {Removal.of([0]): 1.5} and record.warm_start_from is None
    )
    assert record.greedy == [GreedyStage(Removal.of([0]), 1.5)] and runs_started(study) == 0
    assert record.sensitivity_passes is None  # not recorded then


def test_a_study_this_engine_did_not_create_is_one_error(tmp_path):
    study = study_in(tmp_path)
    with pytest.raises(SearchError, match="not created by this engine"):
        StudyRecord.read(study)
    study.set_user_attr("settings", {"model": "m"})
    study.set_user_attr("baseline", {"layers": 6})
    with pytest.raises(SearchError, match="baseline without params"):
        StudyRecord.read(study)


def test_settings_name_what_differs():
    other = Settings("m", 0.25, None, 64, 64, 32, 16, "bf16-mixed")
    assert other.differences(SETTINGS) == ["budget: stored 0.12, now 0.25", "dtype: stored 'float32', now 'bf16-mixed'"]


def test_trial_records_and_what_counts(tmp_path):
    study = study_in(tmp_path)
    for state, attrs in [
        (TrialState.COMPLETE, {"ppl_ratio": 1.2}),
        (TrialState.PRUNED, {"rejected": "proven above"}),
        (TrialState.PRUNED, {}),  # over budget: free
        (TrialState.FAIL, {}),
    ]:
        trial = study.ask()
        write_trial(trial, removed_layers=(1, 2), proposed_by="greedy stage 2", **attrs)
        study.tell(trial, [1.2, 0.9] if state == TrialState.COMPLETE else None, state=state)
    trials = study.get_trials()
    assert [counts_towards_trials(t) for t in trials] == [True, True, False, False] and completed(study) == 2
    record = TrialRecord.of(trials[0])
    assert record.removed_layers == (1, 2) and record.ppl_ratio == 1.2 and record.proposed_by == "greedy stage 2"
    assert trials[0].user_attrs["removed_layers"] == [1, 2]  # stored as JSON lists, as before
    assert TrialRecord.from_attrs({"removed_layers": [4], "written_by_a_newer_version": 1}).removed_layers == (4,)
    with pytest.raises(KeyError):
        write_trial(study.ask(), not_a_field=1)
    assert find_trial(study, 1).number == 1
    with pytest.raises(SearchError, match="has no trial 99"):
        find_trial(study, 99)


def test_runs_joining_a_study_are_counted_and_named(tmp_path):
    study = study_in(tmp_path)
    assert [count_run_started(study, f"host:{pid}:1") for pid in range(3)] == [0, 1, 2] and runs_started(study) == 3
    assert joined_workers(study) == ["host:0:1", "host:1:1", "host:2:1"]
    study.set_user_attr("runs_started", 4)  # a run of a version that did not name itself joined
    assert joined_workers(study) is None
