"""The evaluation cache in the store, and early rejection."""

import math

import optuna
import pytest
import torch
from optuna.trial import TrialState

from evaluators.data import Splits
from search.evaluations import EvalCache
from search.objective import Bench, Rejected, finished
from search.sampler import removal_set
from search.store import open_storage
from search.study import completed, run
from tests.conftest import VOCAB, tiny_model
from tests.search.test_study import tiny_config


def test_eval_cache_round_trip_and_first_writer_wins(tmp_path):
    engine = open_storage(f"sqlite:///{tmp_path / 'e.db'}").engine
    cache = EvalCache(engine, "model-a", "data-a", "float32@cpu/b4")
    assert cache.get((3, 1)) is None
    cache.put((3, 1), 12.5, seconds=0.1)
    cache.put((1, 3), 99.0)  # same set, other order: the first figure stays
    assert cache.get((1, 3)) == 12.5 and cache.count() == 1
    assert EvalCache(engine, "model-a", "data-a", "bfloat16@cpu/b4").get((1, 3)) is None  # other numerics
    assert EvalCache(engine, "model-b", "data-a", "float32@cpu/b4").get((1, 3)) is None  # other weights
    assert EvalCache(engine, "model-a", "data-b", "float32@cpu/b4").get((1, 3)) is None  # other windows


def test_eval_cache_on_postgresql(postgres_url):
    cache = EvalCache(open_storage(postgres_url).engine, "m", "d", "float32@cpu/b4")
    cache.put((), 7.0)
    cache.put((), 8.0)
    assert cache.get(()) == 7.0


def test_a_second_study_on_the_same_model_and_data_reuses_every_evaluation(tmp_path, tiny_model_dir, corpus):
    first = run(tiny_config(tmp_path, tiny_model_dir, corpus, trials=8, study="one"))
    second = run(tiny_config(tmp_path, tiny_model_dir, corpus, trials=8, study="two", budget=0.4, seed=5))
    by_set = {removal_set(t): t.values for t in first.get_trials(states=(TrialState.COMPLETE,))}
    reused = [t for t in second.get_trials(states=(TrialState.COMPLETE,)) if removal_set(t) in by_set]
    assert reused  # the greedy path is the same, at least
    for trial in reused:
        assert trial.user_attrs["ppl_from"] == "store"
        assert trial.values[0] == pytest.approx(by_set[removal_set(trial)][0], rel=1e-12)
    fresh = [t for t in second.get_trials(states=(TrialState.COMPLETE,)) if removal_set(t) not in by_set]
    assert all(t.user_attrs["ppl_from"] == "computed" for t in fresh)


def tiny_bench(max_ppl_ratio=None):
    model = tiny_model("llama", layers=6)
    torch.manual_seed(0)
    splits = Splits(calib=torch.randint(3, VOCAB, (8, 16)), test=torch.randint(3, VOCAB, (4, 16)), bos_id=None)
    bench = Bench(model, splits, latency_input=None, batch_size=2, max_ppl_ratio=max_ppl_ratio)
    bench.baseline()
    return bench


def test_rejection_bound_never_exceeds_the_true_ratio():
    bench = tiny_bench()
    exact = bench.calib_ratio((1, 2, 3, 4))
    with pytest.raises(Rejected) as caught:
        bench.calib_ratio((1, 2, 3, 4), ceiling=1e-4)  # proven after the first batch: NLL is never negative
    assert caught.value.windows == 2 and caught.value.lower_bound <= exact
    assert math.isclose(bench.calib_ratio((1, 2, 3, 4), ceiling=exact * 1.01), exact)  # not provable: runs to the end


def test_max_ppl_ratio_stops_a_candidate_part_way():
    bench = tiny_bench()
    cache = bench.prefix("calib")
    removed = (0, 1, 2, 3, 4)
    first = next(iter(cache.nll_batches(removed)))
    partial = math.exp((first[0] - cache.base_nll[0][0]) / first[1])  # its ratio on the first batch
    bench.max_ppl_ratio = partial * 0.999
    with pytest.raises(Rejected, match="--max-ppl-ratio") as caught:
        bench.calib_ratio(removed)
    assert caught.value.windows == 2
    bench.max_ppl_ratio = None
    assert bench.calib_ratio(removed) > 0  # no cap: measured to the end


def test_rejected_trials_are_recorded_and_count(tmp_path, tiny_model_dir, corpus):
    study = run(tiny_config(tmp_path, tiny_model_dir, corpus, trials=6, max_ppl_ratio=1.0000001))
    rejected = [t for t in study.get_trials() if t.state == TrialState.PRUNED and "rejected" in t.user_attrs]
    assert rejected and all(finished(t) for t in rejected)
    assert all(t.user_attrs["ppl_ratio_lower_bound"] > 0 and t.user_attrs["windows_evaluated"] for t in rejected)
    assert completed(study) == 6
    assert len({removal_set(t) for t in study.get_trials() if finished(t)}) == 6  # never retried
    assert not any(t.state == TrialState.FAIL for t in study.get_trials())
    from search.summary import study_summaries, trial_details

    shown = trial_details(study, rejected[0].number)
    assert shown["rejected"] == rejected[0].user_attrs["rejected"] and shown["windows_evaluated"]
    (summary,) = study_summaries(study._storage)
    assert summary["rejected"] == len(rejected)
    optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'store.db'}")  # store readable


def test_a_rejected_evaluation_leaves_the_model_whole():
    from search.model.surgery import decoder_layers

    bench = tiny_bench()
    with pytest.raises(Rejected) as caught:  # keeps the traceback (and its frames) alive
        bench.calib_ratio((1, 2, 3, 4), ceiling=1e-4)
    assert caught.value.windows == 2
    assert len(decoder_layers(bench.model)) == 6


def test_max_ppl_ratio_applies_to_the_final_ratio_and_only_to_calibration():
    bench = tiny_bench()
    bench.batch_size = 8  # one batch: no partial check happens, the final ratio decides
    bench._prefix.clear()
    bench.max_ppl_ratio = 1e-3
    with pytest.raises(Rejected, match="--max-ppl-ratio") as caught:
        bench.calib_ratio((2,))
    assert caught.value.windows == 8
    assert bench.test_ratio((2,)) > 0  # held-out figures are never capped
