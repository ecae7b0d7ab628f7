import pytest

import search.model.numerics
import search.study
from search.errors import SearchError
from search.export import export_trial
from search.front import front_report
from search.model.removal import Removal
from search.records import COMPLETE
from search.sampler import removal_set
from search.study import RunConfig, completed, run
from tests.search.model.test_numerics import measured


def tiny_config(tmp_path, model_dir, corpus, **overrides) -> RunConfig:
    settings = dict(
        model=str(model_dir),
        dataset=str(corpus),
        budget=0.4,
        trials=8,
        study="tiny",
        storage=f"sqlite:///{tmp_path / 'store.db'}",
        calib_tokens=256,
        test_tokens=128,
        sensitivity_tokens=128,
        seq_len=32,
        latency_tokens=16,
        latency_repeats=1,
        dtype="float32",
        confirm_tokens=0,  # tiny models' ratios lie far apart; tests/search/test_confirmation.py opts in
    )
    return RunConfig(**{**settings, **overrides})


def snapshot(study):
    return [(t.number, t.state.name, t.values, t.params, t.user_attrs) for t in study.get_trials(states=COMPLETE)]


def check_schema(report: dict) -> None:
    assert set(report) - {"confirmation"} == {"study", "model", "budget", "baseline", "front"}
    assert isinstance(report["study"], str) and isinstance(report["model"], str)
    assert isinstance(report["budget"], float)
    base = report["baseline"]
    assert set(base) == {"layers", "params", "calib_ppl", "test_ppl", "latency_ms"}
    assert isinstance(base["layers"], int) and isinstance(base["params"], int)
    assert all(isinstance(base[k], float) for k in ("calib_ppl", "test_ppl", "latency_ms"))
    assert report["front"]
    for point in report["front"]:
        assert set(point) - {"confirmed_ppl_ratio"} == {
            "trial",
            "removed_layers",
            "layers",
            "params_reduction",
            "ppl_ratio",
            "latency_ratio",
            "test_ppl_ratio",
        }
        assert isinstance(point["trial"], int) and isinstance(point["layers"], int)
        assert all(isinstance(i, int) for i in point["removed_layers"])
        assert all(
            isinstance(point[k], float) for k in ("params_reduction", "ppl_ratio", "latency_ratio", "test_ppl_ratio")
        )
        assert ("confirmed_ppl_ratio" in point) == ("confirmation" in report)
        assert point["layers"] == base["layers"] - len(point["removed_layers"])


def test_run_builds_a_study_from_the_greedy_path(tmp_path, tiny_model_dir, corpus):
    study = run(tiny_config(tmp_path, tiny_model_dir, corpus))
    assert completed(study) == 8
    trials = study.get_trials(states=COMPLETE)
    sets = [removal_set(t) for t in trials]
    assert len(set(sets)) == len(sets)  # no set measured twice
    greedy = [tuple(stage["removed_layers"]) for stage in study.user_attrs["greedy"]]
    assert len(greedy) == 2  # a 40% budget allows two of six layers here
    assert sets[: len(greedy)] == [Removal.of(g) for g in greedy]  # the greedy path runs first
    assert [t.user_attrs["proposed_by"] for t in trials[:2]] == ["greedy stage 1", "greedy stage 2"]
    report = front_report(study)
    check_schema(report)
    assert all(p["params_reduction"] <= 0.4 for p in report["front"])
    assert len({tuple(p["removed_layers"]) for p in report["front"]}) == len(report["front"])


def test_rerun_finishes_at_once_and_changes_nothing(tmp_path, tiny_model_dir, corpus, monkeypatch):
    config = tiny_config(tmp_path, tiny_model_dir, corpus, trials=5)
    before = snapshot(run(config))

    def no_model(*args, **kwargs):
        raise AssertionError("a finished study must not load the model")

    monkeypatch.setattr(search.study, "load_model", no_model)
    assert snapshot(run(config)) == before


def test_resume_runs_only_the_missing_trials(tmp_path, tiny_model_dir, corpus):
    first = snapshot(run(tiny_config(tmp_path, tiny_model_dir, corpus, trials=4)))
    study = run(tiny_config(tmp_path, tiny_model_dir, corpus, trials=7))
    after = snapshot(study)
    assert completed(study) == 7
    assert after[:4] == first
    assert len({removal_set(t) for t in study.get_trials(states=COMPLETE)}) == 7


def test_a_new_study_samples_from_seed_and_each_later_run_from_its_own_offset(
    tmp_path, tiny_model_dir, corpus, monkeypatch
):
    import search.sampler

    seeds = []

    class Recorded(search.sampler.RemovalSetSampler):
        def __init__(self, budget, seed=None):
            seeds.append(seed)
            super().__init__(budget, seed)

    monkeypatch.setattr(search.sampler, "RemovalSetSampler", Recorded)
    run(tiny_config(tmp_path, tiny_model_dir, corpus, trials=3, seed=7))
    run(tiny_config(tmp_path, tiny_model_dir, corpus, trials=5, seed=7))  # a resume: must not replay the first
    run(tiny_config(tmp_path, tiny_model_dir, corpus, trials=3, seed=7, study="again"))
    assert seeds == [7, 7 + search.study.RUN_SEED_STRIDE, 7]  # nothing from the process (pid, host) any more


def test_study_with_other_settings_is_refused(tmp_path, tiny_model_dir, corpus):
    before = snapshot(run(tiny_config(tmp_path, tiny_model_dir, corpus, trials=3)))
    with pytest.raises(SearchError, match="created with other settings.*budget"):
        run(tiny_config(tmp_path, tiny_model_dir, corpus, trials=3, budget=0.3))
    assert snapshot(run(tiny_config(tmp_path, tiny_model_dir, corpus, trials=3))) == before


def test_a_data_seed_searches_other_calibration_windows_and_keeps_the_held_out_ones(tmp_path, tiny_model_dir, corpus):
    first = run(tiny_config(tmp_path, tiny_model_dir, corpus, trials=3))
    seeded = run(tiny_config(tmp_path, tiny_model_dir, corpus, trials=3, data_seed=1, study="seeded"))
    base, other = (first.user_attrs["baseline"], seeded.user_attrs["baseline"])
    assert base["test_ppl"] == other["test_ppl"] and base["calib_ppl"] != other["calib_ppl"]
    report = front_report(seeded)
    assert report["data_seed"] == 1 and "data_seed" not in front_report(first)
    with pytest.raises(SearchError, match="created with other settings.*data_seed"):
        run(tiny_config(tmp_path, tiny_model_dir, corpus, trials=3, data_seed=2, study="seeded"))
    exported = export_trial(seeded, report["front"][0]["trial"], tmp_path / "out")
    assert exported.ok  # export's check finds the study's windows again: its held-out figure reproduces


def test_small_space_is_measured_exhaustively(tmp_path, tiny_model_dir, corpus):
    study = run(tiny_config(tmp_path, tiny_model_dir, corpus, trials=100))
    sets = {removal_set(t) for t in study.get_trials(states=COMPLETE)}
    assert len(sets) == completed(study) == 6 + 15  # every single and every pair, once


def test_gpt2_family_runs(tmp_path, tiny_gpt2_dir, corpus):
    study = run(tiny_config(tmp_path, tiny_gpt2_dir, corpus, trials=4, study="gpt2"))
    check_schema(front_report(study))


def test_latency_is_timed_once_per_shape_at_seeding(tmp_path, tiny_model_dir, corpus):
    study = run(tiny_config(tmp_path, tiny_model_dir, corpus, trials=8))
    table = {k: v for k, v in study.user_attrs.items() if k.startswith("latency:")}
    assert len(table) == 2  # five or four layers left: the only shapes a 40% budget reaches
    by_size = {}
    for t in study.get_trials(states=COMPLETE):
        by_size.setdefault(len(removal_set(t).layers), set()).add(t.values[1])
    assert all(len(ratios) == 1 for ratios in by_size.values())  # same shape, same latency


def test_warm_start_from_another_study(tmp_path, tiny_model_dir, tiny_gpt2_dir, corpus):
    source = run(tiny_config(tmp_path, tiny_model_dir, corpus, trials=6, study="source"))
    target = run(tiny_config(tmp_path, tiny_gpt2_dir, corpus, trials=4, study="target", warm_start_from="source"))
    assert target.user_attrs["greedy"] == [] and target.user_attrs["warm_start_from"] == "source"
    reasons = [t.user_attrs["proposed_by"] for t in target.get_trials(states=COMPLETE)]
    assert reasons and all(r.startswith("transfer") for r in reasons[:2])
    assert set(target.user_attrs["sensitivity"]) == {str(i) for i in range(6)}
    assert source.user_attrs["sensitivity"]  # untouched source
    with pytest.raises(SearchError, match="no study named 'nope'"):
        run(tiny_config(tmp_path, tiny_gpt2_dir, corpus, trials=4, study="t2", warm_start_from="nope"))


def test_resume_with_more_trials_completes_a_small_space(tmp_path, tiny_model_dir, corpus):
    run(tiny_config(tmp_path, tiny_model_dir, corpus, trials=10))  # 21 feasible sets: too many to enumerate
    study = run(tiny_config(tmp_path, tiny_model_dir, corpus, trials=100))
    sets = {removal_set(t) for t in study.get_trials(states=COMPLETE)}
    assert len(sets) == completed(study) == 21


@pytest.mark.parametrize("criterion", ["angular", "bi"])
def test_one_pass_criteria_drive_greedy_seeding(tmp_path, tiny_model_dir, corpus, criterion):
    study = run(tiny_config(tmp_path, tiny_model_dir, corpus, trials=4, criterion=criterion))
    assert study.user_attrs["criterion"] == criterion
    greedy = [tuple(stage["removed_layers"]) for stage in study.user_attrs["greedy"]]
    assert len(greedy) == 2 and set(greedy[0]) <= set(greedy[1])
    assert study.user_attrs["sensitivity_passes"] == 3  # one pass per stage, one for the other picks
    reasons = {t.user_attrs["proposed_by"] for t in study.get_trials()}
    assert {"greedy stage 1", "greedy stage 2"} <= reasons


def test_auto_dtype_is_recorded_resolved_and_kept_on_resume(tmp_path, tiny_model_dir, corpus, monkeypatch):
    monkeypatch.setattr(search.model.numerics, "product_seconds", measured(2.0))  # a machine with bf16 units
    study = run(tiny_config(tmp_path, tiny_model_dir, corpus, trials=3, dtype="auto"))
    assert study.user_attrs["settings"]["dtype"] == "bf16-mixed"
    before = snapshot(study)
    # Resumed where bf16 is slow: auto keeps the study's numerics instead of refusing or mixing them.
    monkeypatch.setattr(search.model.numerics, "product_seconds", measured(0.3))
    study = run(tiny_config(tmp_path, tiny_model_dir, corpus, trials=5, dtype="auto"))
    assert study.user_attrs["settings"]["dtype"] == "bf16-mixed"
    assert snapshot(study)[:3] == before and completed(study) == 5
    with pytest.raises(SearchError, match="created with other settings.*dtype"):
        run(tiny_config(tmp_path, tiny_model_dir, corpus, trials=5, dtype="float32"))
