"""--confirm-tokens: the confirmed figure is the fitness on the calibration and confirmation windows
together, near-front candidates get it and the front ranks by it, the rest are rejected, and studies
from before confirmation resume without it."""

import math

import pytest
import torch
from optuna.trial import TrialState

from evaluators.data import Splits
from search.confirmation import confirmed_fitness, loosened
from search.errors import SearchError
from search.front import front_report
from search.model.numerics import apply_numerics
from search.model.removal import Removal
from search.records import COMPLETE, TrialRecord, read_settings
from search.study import run
from tests.search.test_evaluator import tiny_evaluator
from tests.search.test_study import tiny_config


def with_more(evaluator, more: torch.Tensor):
    """The same evaluator with confirmation windows, and one whose calibration split is both parts."""
    calib = evaluator.splits.calib
    confirming = type(evaluator)(**{**evaluator.__dict__, "_prefix": {}, "_references": {}, "base_ppl": {}})
    confirming.splits = Splits(calib=calib, test=evaluator.splits.test, bos_id=None, more=more)
    whole = type(evaluator)(**{**evaluator.__dict__, "_prefix": {}, "_references": {}, "base_ppl": {}})
    whole.splits = Splits(calib=torch.cat([calib, more]), test=evaluator.splits.test, bos_id=None)
    confirming.baseline(), whole.baseline()
    return confirming, whole


@pytest.mark.parametrize("fitness", ["ppl", "kl"])
@pytest.mark.parametrize("dtype", ["float32", "bf16-mixed"])
def test_the_confirmed_figure_is_the_fitness_on_both_parts_measured_at_once(fitness, dtype):
    evaluator = tiny_evaluator()
    apply_numerics(evaluator.model, dtype)
    evaluator.fitness = fitness
    torch.manual_seed(1)
    confirming, whole = with_more(evaluator, torch.randint(3, 64, (4, 16)))
    assert confirming.confirms and not whole.confirms
    # Rounding is the same per window in both: the parts and the whole are the same batches of two.
    tolerance = 1e-5 if dtype == "float32" else 1e-3
    for removal in (Removal.of([3]), Removal.of([1, 4])):
        confirmed = confirmed_fitness(confirming, removal, confirming.calib_fitness(removal))
        direct = whole.calib_fitness(removal)
        assert math.isclose(confirmed.value, direct.value, rel_tol=tolerance)
        assert math.isclose(confirmed.ppl_ratio, direct.ppl_ratio, rel_tol=tolerance)
        assert confirmed.value != confirming.calib_fitness(removal).value  # the extra windows count


def test_the_margin_loosens_a_ratio_by_its_exponential_and_a_kl_by_itself():
    assert loosened(1.2, 0.02, "ppl") == pytest.approx(1.2 * math.exp(0.02))
    assert loosened(0.3, 0.02, "kl") == pytest.approx(0.32)


def test_a_confirming_study_ranks_on_more_tokens_and_rejects_beyond_the_margin(tmp_path, tiny_model_dir, corpus):
    # A tiny margin: most candidates come further than it above a set at least as fast, and are rejected.
    study = run(tiny_config(tmp_path, tiny_model_dir, corpus, trials=10, confirm_tokens=512, confirm_margin=0.001))
    settings = read_settings(study)
    assert settings.confirm_tokens == 512 and settings.confirm_margin == 0.001
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    finished, margin_rejected = [], 0
    for trial in trials:
        record = TrialRecord.of(trial)
        if trial.state == TrialState.COMPLETE and record.duplicate_of is None:
            assert trial.values[0] == record.confirmed_ppl_ratio != record.ppl_ratio
            assert record.confirm_s is not None and record.confirm_s <= record.eval_s
        if record.rejected and "--confirm-margin" in record.rejected:
            margin_rejected += 1
            # Measured in full, then judged against a faster set's worse figure, on 4096 tokens or confirmed.
            faster = [
                max(TrialRecord.of(t).ppl_ratio, t.values[0]) for t in finished if t.values[1] <= record.latency_ratio
            ]
            assert record.ppl_ratio > math.exp(0.001) * min(faster)
            assert record.windows_evaluated == 8
        if trial.state == TrialState.COMPLETE:
            finished.append(trial)
    assert margin_rejected
    report = front_report(study)
    assert all("confirmed_ppl_ratio" in point for point in report["front"])
    confirmation = report["confirmation"]
    assert confirmation["tokens"] == 512 and confirmation["margin"] == 0.001
    assert confirmation["trials"] == sum(
        TrialRecord.of(t).duplicate_of is None for t in study.get_trials(deepcopy=False, states=COMPLETE)
    )


def test_resuming_keeps_the_stored_confirmation_and_refuses_another(tmp_path, tiny_model_dir, corpus):
    study = run(tiny_config(tmp_path, tiny_model_dir, corpus, trials=4, confirm_tokens=0))
    assert read_settings(study).confirm_tokens == 0 and "confirmation" not in front_report(study)
    resumed = run(tiny_config(tmp_path, tiny_model_dir, corpus, trials=5, confirm_tokens=None))  # unset: the study's
    assert all(TrialRecord.of(t).confirmed_ppl_ratio is None for t in resumed.get_trials(states=COMPLETE))
    with pytest.raises(SearchError, match="confirm_tokens"):
        run(tiny_config(tmp_path, tiny_model_dir, corpus, trials=6, confirm_tokens=512))


def test_a_new_study_confirms_by_default_on_four_times_its_calibration_windows(tmp_path, tiny_model_dir, corpus):
    study = run(tiny_config(tmp_path, tiny_model_dir, corpus, trials=3, confirm_tokens=None, calib_tokens=250))
    settings = read_settings(study)
    assert settings.confirm_tokens == 4 * 7 * 32 and settings.confirm_margin == 0.02  # whole windows of 32
    done = study.get_trials(states=COMPLETE)
    assert done and all(t.values[0] == TrialRecord.of(t).confirmed_ppl_ratio for t in done)


def test_confirmation_needs_windows_beyond_the_calibration_ones(tmp_path, tiny_model_dir, corpus):
    with pytest.raises(SearchError, match="adds no window"):
        run(tiny_config(tmp_path, tiny_model_dir, corpus, confirm_tokens=256))
    with pytest.raises(SearchError, match="--confirm-tokens 10000000"):
        run(tiny_config(tmp_path, tiny_model_dir, corpus, confirm_tokens=10_000_000))
