"""The evaluator: perplexity ratios that stop early when provably out, and the caching wrapper."""

import math
from dataclasses import replace

import pytest
import torch

from evaluators.data import Splits
from evaluators.perplexity import Rejected
from search.caching import CachingEvaluator, with_store
from search.evaluator import Evaluator
from search.model.removal import Removal
from search.model.surgery import decoder_layers
from search.store import open_storage
from tests.conftest import VOCAB, tiny_model


def tiny_evaluator(max_ppl_ratio=None, batch_size=2) -> Evaluator:
    model = tiny_model("llama", layers=6)
    torch.manual_seed(0)
    splits = Splits(calib=torch.randint(3, VOCAB, (8, 16)), test=torch.randint(3, VOCAB, (4, 16)), bos_id=None)
    evaluator = Evaluator(
        model, splits, latency_input=None, batch_size=batch_size, layer_kinds=["a"] * 6, max_ppl_ratio=max_ppl_ratio
    )
    evaluator.baseline()
    return evaluator


def test_rejection_bound_never_exceeds_the_true_ratio():
    evaluator = tiny_evaluator()
    exact = evaluator.calib_ratio(Removal.of([1, 2, 3, 4]))
    with pytest.raises(Rejected) as caught:
        evaluator.calib_ratio(
            Removal.of([1, 2, 3, 4]), ceiling=1e-4
        )  # proven after the first batch: NLL is never negative
    assert caught.value.windows == 2 and caught.value.lower_bound <= exact
    assert math.isclose(evaluator.calib_ratio(Removal.of([1, 2, 3, 4]), ceiling=exact * 1.01), exact)  # not provable


def test_max_ppl_ratio_stops_a_candidate_part_way():
    evaluator = tiny_evaluator()
    cache = evaluator.prefix("calib")
    removed = Removal.of([0, 1, 2, 3, 4])
    first = next(iter(cache.nll_batches(removed)))
    partial = math.exp((first[0] - cache.base_nll[0][0]) / first[1])  # its ratio on the first batch
    evaluator.max_ppl_ratio = partial * 0.999
    with pytest.raises(Rejected, match="--max-ppl-ratio") as caught:
        evaluator.calib_ratio(removed)
    assert caught.value.windows == 2
    evaluator.max_ppl_ratio = None
    assert evaluator.calib_ratio(removed) > 0  # no cap: measured to the end


def test_a_rejected_evaluation_leaves_the_model_whole():
    evaluator = tiny_evaluator()
    with pytest.raises(Rejected) as caught:  # keeps the traceback (and its frames) alive
        evaluator.calib_ratio(Removal.of([1, 2, 3, 4]), ceiling=1e-4)
    assert caught.value.windows == 2
    assert len(decoder_layers(evaluator.model)) == 6


def test_max_ppl_ratio_applies_to_the_final_ratio_and_only_to_calibration():
    evaluator = tiny_evaluator(max_ppl_ratio=1e-3, batch_size=8)  # one batch: only the final ratio decides
    with pytest.raises(Rejected, match="--max-ppl-ratio") as caught:
        evaluator.calib_ratio(Removal.of([2]))
    assert caught.value.windows == 8
    assert evaluator.test_ratio(Removal.of([2])) > 0  # held-out figures are never capped


def test_the_caching_wrapper_answers_from_the_store_and_records_what_it_measures(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'e.db'}")
    first = with_store(tiny_evaluator(), storage, "model", "float32")
    base = first.baseline()
    ratio = first.calib_ratio(Removal.of([2, 3]))
    assert first.hits == 0 and first.stores["calib"].get(Removal()) == base["calib"]
    second = with_store(tiny_evaluator(), storage, "model", "float32")
    second.evaluator.model = None  # nothing may run a forward pass now
    second.evaluator._prefix = {}
    assert second.baseline() == base
    assert second.calib_ratio(Removal.of([2, 3])) == ratio and second.hits == 1
    assert second.n_layers == 6  # everything else is the wrapped evaluator's


def test_a_screen_is_cached_under_its_own_fit_and_a_resume_reads_it_back(tmp_path):
    """Healed greedy screens a sequential study's candidates with every run fitted on the unpruned model:
    a figure of the other fit, stored under that fit's key (never as the study's), so a resumed seeding
    answers its screens from the store."""

    def healed_evaluator() -> Evaluator:
        evaluator = tiny_evaluator()
        evaluator.splits = replace(evaluator.splits, fit=torch.randint(3, VOCAB, (8, 16)))
        evaluator.heal = "linear"
        return evaluator

    storage = open_storage(f"sqlite:///{tmp_path / 'e.db'}")
    two_runs = Removal.of([1, 4])
    first = with_store(healed_evaluator(), storage, "model", "float32")
    first.baseline()
    screened = first.ppl(two_runs, "calib", sequential=False)
    assert first.healed_stores["calib"].get(two_runs) is None  # not the study's own (sequential) figure
    assert first.screen_stores["calib"].get(two_runs) == screened
    study_fit = first.ppl(two_runs, "calib")
    assert study_fit != screened and first.healed_stores["calib"].get(two_runs) == study_fit
    second = with_store(healed_evaluator(), storage, "model", "float32")
    second.evaluator.model = None  # nothing may run a forward pass or a fit now
    second.evaluator._prefix = {}
    assert second.ppl(two_runs, "calib", sequential=False) == screened and second.hits == 1
    assert second.ppl(two_runs, "calib", sequential=True) == study_fit and second.hits == 2  # the study's fit


def test_a_study_baseline_is_not_recorded_under_this_runs_numerics_but_a_measured_one_is(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'e.db'}")
    cached = with_store(tiny_evaluator(), storage, "model", "float32")
    cached.evaluator._prefix = {}
    cached.baseline({"calib": 123.0, "test": 456.0})  # a resume: read from the study, maybe other numerics
    assert cached.stores["calib"].get(Removal()) is None
    cached.calib_ratio(Removal.of([1]))  # builds the calibration prefix: the unpruned pass measured now
    assert cached.stores["calib"].get(Removal()) == cached.evaluator.prefix("calib").base_ppl


def test_a_figure_over_the_cap_is_stored_but_the_candidate_rejected(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'e.db'}")
    cached = with_store(tiny_evaluator(max_ppl_ratio=1e-3, batch_size=8), storage, "model", "float32")
    cached.baseline()
    with pytest.raises(Rejected):
        cached.calib_ratio(Removal.of([0, 1, 2, 3, 4]))
    assert cached.stores["calib"].get(Removal.of([0, 1, 2, 3, 4])) is not None  # a true figure, kept for other studies
    with pytest.raises(Rejected):  # and the cap still applies when the figure comes from the store
        cached.calib_ratio(Removal.of([0, 1, 2, 3, 4]))
    assert cached.hits == 1


def test_a_caching_evaluator_without_a_store_measures():
    cached = CachingEvaluator(tiny_evaluator())
    assert cached.calib_ratio(Removal.of([1])) == cached.evaluator.calib_ratio(Removal.of([1])) and cached.hits == 0


def test_shapes_of_interleaved_layer_kinds():
    from search.space import Budget

    evaluator = Evaluator(model=None, splits=None, latency_input=None, layer_kinds=["a", "b", "a", "b", "a", "b"])
    budget = Budget(0.35, total_params=600, layer_params=[100] * 6)  # up to two layers
    shapes = evaluator.reachable_shapes(budget.allows)
    assert shapes is not None and set(shapes) == {"a*2 b*3", "a*3 b*2", "a*1 b*3", "a*2 b*2", "a*3 b*1"}
    assert evaluator.shape(Removal.of([0, 2])) == evaluator.shape(Removal.of([2, 4])) == "a*1 b*3"
