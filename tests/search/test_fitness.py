"""--fitness kl: the mean KL from the unpruned model, through the prefix cache, healing, early rejection,
the evaluation cache and a study; every report still shows perplexity ratios."""

import math
from dataclasses import replace

import pytest
import torch

from evaluators.divergence import nll_and_kl
from evaluators.perplexity import Rejected, window_batches
from search.caching import with_store
from search.errors import SearchError
from search.front import front_report
from search.model.numerics import apply_numerics
from search.model.removal import Removal
from search.model.surgery import removal_applied
from search.records import COMPLETE, StudyRecord, TrialRecord, calib_ppl_ratio
from search.store import open_storage
from search.study import run
from tests.search.test_evaluator import tiny_evaluator
from tests.search.test_study import tiny_config


def kl_evaluator(**changes):
    evaluator = tiny_evaluator(**changes)
    evaluator.fitness = "kl"
    return evaluator


def full_pass_kl(evaluator, removal: Removal) -> float:
    measure, windows = nll_and_kl(evaluator.reference()), evaluator.splits.calib
    with removal_applied(evaluator.model, removal), torch.inference_mode():
        batches = [measure(evaluator.model, x, i) for i, x in enumerate(window_batches(windows, None, 2, "cpu"))]
    return sum(kl.item() for _, _, kl in batches) / sum(n for _, n, _ in batches)  # sums left on the device


@pytest.mark.parametrize("dtype", ["float32", "bf16-mixed"])
@pytest.mark.parametrize("removal", [Removal.of([3]), Removal.of([1, 4]), Removal.of([0, 2])])
def test_kl_from_the_prefix_cache_is_the_full_pass_kl_and_its_ppl_the_ratio(removal, dtype):
    evaluator = kl_evaluator()
    apply_numerics(evaluator.model, dtype)
    fitness = evaluator.calib_fitness(removal)
    # bf16 products round differently when the stack starts from a stored state than from the embedding
    tolerance = 1e-5 if dtype == "float32" else 2e-2
    assert math.isclose(fitness.value, full_pass_kl(evaluator, removal), rel_tol=tolerance)
    assert math.isclose(fitness.ppl_ratio, evaluator.calib_ratio(removal), rel_tol=1e-6)
    assert fitness.value > 0 and evaluator.calib_fitness(Removal()).value == pytest.approx(0, abs=1e-6)


def test_kl_rejection_is_a_sound_bound_and_the_cap_bounds_the_ratio():
    evaluator = kl_evaluator()
    removal = Removal.of([1, 2, 3, 4])
    exact = evaluator.calib_fitness(removal).value
    with pytest.raises(Rejected, match="KL") as caught:
        evaluator.calib_fitness(removal, ceiling=exact / 100)
    assert caught.value.windows == 2 and caught.value.lower_bound <= exact
    assert math.isclose(evaluator.calib_fitness(removal, ceiling=exact * 1.01).value, exact)
    evaluator.max_ppl_ratio = evaluator.calib_ratio(removal) * 0.999  # perplexity-ratio units, whatever the fitness
    with pytest.raises(Rejected, match="--max-ppl-ratio"):
        evaluator.calib_fitness(removal)


def test_the_evaluation_cache_keeps_kl_apart_from_perplexity(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'e.db'}")
    first = with_store(kl_evaluator(), storage, "model", "float32")
    first.baseline()
    measured = first.calib_fitness(Removal.of([2, 3]))
    second = with_store(kl_evaluator(), storage, "model", "float32")
    second.evaluator.model = None  # nothing may run a forward pass now
    second.evaluator._prefix = {}
    second.baseline()
    assert second.calib_fitness(Removal.of([2, 3])) == measured and second.hits == 1
    assert second.stores["kl"].get(Removal.of([2, 3])) == measured.value  # under its own key
    ppl = with_store(tiny_evaluator(), storage, "model", "float32")
    ppl.baseline()
    assert ppl.calib_ratio(Removal.of([2, 3])) == measured.ppl_ratio and ppl.hits == 1  # the same pass's figure


def test_a_kl_study_minimises_kl_and_reports_perplexity(tmp_path, tiny_model_dir, corpus):
    config = tiny_config(tmp_path, tiny_model_dir, corpus, trials=6, fitness="kl")
    study = run(config)
    done = [t for t in study.get_trials(states=COMPLETE)]
    for t in done:
        record = TrialRecord.of(t)
        assert t.values[0] == record.kl and record.ppl_ratio is not None and calib_ppl_ratio(t) == record.ppl_ratio
    report = front_report(study)
    for point in report["front"]:
        assert point["kl"] >= 0 and point["ppl_ratio"] > 0 and point["test_ppl_ratio"] is not None
    with pytest.raises(SearchError, match="created with other settings.*fitness"):
        run(replace(config, fitness="ppl"))
    plain = run(replace(config, fitness="ppl", study="plain"))  # same windows: perplexities from the cache
    assert study.metric_names == ["kl", "latency_ratio"] and plain.metric_names == ["ppl_ratio", "latency_ratio"]
    by_set = {TrialRecord.of(t).removal: calib_ppl_ratio(t) for t in done}
    for t in plain.get_trials(states=COMPLETE):
        removal = TrialRecord.of(t).removal
        if removal in by_set:
            assert t.values[0] == pytest.approx(by_set[removal], rel=1e-9)


def test_the_unpruned_reference_is_taken_before_any_removal():
    evaluator = kl_evaluator()
    with torch.inference_mode():
        first = evaluator.calib_fitness(Removal.of([2])).value
    again = kl_evaluator()
    again.calib_fitness(Removal())  # reference built by an empty set's evaluation
    assert math.isclose(again.calib_fitness(Removal.of([2])).value, first, rel_tol=1e-6)


def test_a_healed_study_defaults_to_kl_and_a_resumed_one_keeps_its_own_fitness(tmp_path, tiny_model_dir, corpus):
    config = tiny_config(tmp_path, tiny_model_dir, corpus, trials=4, heal="linear", heal_tokens=512)
    assert config.fitness is None and replace(config, heal="none").objective_fitness == "ppl"
    study = run(config)
    assert StudyRecord.read(study).settings.fitness == "kl"
    done = study.get_trials(states=COMPLETE)
    assert done and all(t.values[0] == TrialRecord.of(t).kl for t in done)
    # Healed with ppl, as every healed study was before kl became its default: resumed with --fitness unset,
    # it keeps ranking by the perplexity ratio (a changed default never changes what stored numbers mean).
    older = replace(config, study="older", fitness="ppl")
    run(older)
    resumed = run(replace(older, fitness=None, trials=6))
    assert StudyRecord.read(resumed).settings.fitness == "ppl"
    done = resumed.get_trials(states=COMPLETE)
    assert len([t for t in done if TrialRecord.of(t).duplicate_of is None]) > 0
    assert all(t.values[0] == calib_ppl_ratio(t) and TrialRecord.of(t).kl is None for t in done)
