"""Published methods run alone: each picks k layers and is measured like a study trial."""

import json

import pytest

from search import baselines
from search.caching import CachingEvaluator
from search.errors import SearchError
from search.methods import BLOCK_METHODS, METHODS, choose, measure
from search.study import prepare
from tests.search.test_study import tiny_config
from tests.test_cli import TINY_EVALUATION, assert_one_line_error, cli


def test_selection_rules():
    scores = {0: 0.9, 1: 0.1, 2: 0.5, 3: 0.1}
    assert baselines.lowest(scores, 2) == (1, 3)  # ties: the lower index first
    assert baselines.angular_block({0: 0.3, 1: 0.2, 2: 0.25}, 3) == (1, 2, 3)
    assert baselines.drop_last(8, 3) == (4, 5, 6)  # the final layer stays
    draws = baselines.random_sets(8, 2, 5, seed=1)
    assert len(draws) == len(set(draws)) == 5 and all(len(s) == 2 for s in draws)
    assert draws == baselines.random_sets(8, 2, 5, seed=1)


@pytest.fixture(scope="module")
def evaluator(tmp_path_factory, tiny_model_dir, corpus):
    _, evaluator, _ = prepare(tiny_config(tmp_path_factory.mktemp("m"), tiny_model_dir, corpus))
    cached = CachingEvaluator(evaluator)
    cached.baseline()
    return cached


@pytest.mark.parametrize("method", [name for name in METHODS.names if name not in BLOCK_METHODS])
def test_every_method_picks_k_layers_and_is_measured(evaluator, method):
    choice = choose(evaluator, method, 2, sensitivity_tokens=128, draws=3)
    assert all(s.whole_layers_only and len(s.layers) == 2 and all(0 <= i < 6 for i in s.layers) for s in choice.sets)
    assert len(choice.sets) == (3 if method == "random" else 1)
    (row,) = measure(evaluator, [choice])
    assert row["k"] == 2 and row["method"] == method and len(row["removed_layers"]) == 2
    assert (
        row["calib_ppl_ratio"] > 0 and row["test_ppl_ratio"] > 0 and row["latency_ratio"] > 0
    )  # one timed round: noisy
    expected = {"oneshot_ppl": 7, "staged_greedy": 7 + 6, "block_influence": 1, "angular_block": 1, "replaceme": 1}
    expected["greedy_then_healed"] = expected["staged_greedy"]
    assert choice.evaluations == expected.get(method, 0)  # base + one per candidate layer, per stage


def test_staged_greedy_extends_its_own_path(evaluator):
    one = choose(evaluator, "staged_greedy", 1, sensitivity_tokens=128).sets[0]
    three = choose(evaluator, "staged_greedy", 3, sensitivity_tokens=128).sets[0]
    assert three.covers(one)


def test_bad_k_is_refused(evaluator):
    with pytest.raises(SearchError, match="between 1 and 5"):
        choose(evaluator, "drop_last", 6, sensitivity_tokens=128)


def test_method_command_and_its_old_spellings(tmp_path, tiny_model_dir, corpus):
    args = ["--model", str(tiny_model_dir), "--dataset", str(corpus), *TINY_EVALUATION]
    store = f"sqlite:///{tmp_path / 'b.db'}"
    new = ["method", "--method", "oneshot_ppl", "--remove", "2", "--eval-cache", store]
    old = ["baseline", "--method", "oneshot_ppl", "--layers", "2", "--storage", store]
    rows = []
    for spelling in (new, old):
        result = cli(*spelling, "--format", "json", *args, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        rows.append(json.loads(result.stdout))
    assert rows[0]["method"] == "oneshot_ppl" and len(rows[0]["removed_layers"]) == 2 and rows[0]["evaluations"] == 7
    for row in rows:
        del row["latency_ratio"]  # timed anew each run
    assert rows[1] == rows[0]  # the old spelling runs the same thing (answered from the same evaluation cache)
    assert not (tmp_path / "studies").exists()  # the evaluation cache is not a study store: no study appears
    assert_one_line_error(cli("method", "--method", "nope", "--remove", "2", cwd=tmp_path), "invalid choice")
    assert_one_line_error(cli("method", "--method", "drop_last", "--remove", "9", *args, cwd=tmp_path), "--remove")


def test_method_help_lists_every_registered_method(tmp_path):
    result = cli("method", "--help", cwd=tmp_path)
    assert result.returncode == 0 and all(name in result.stdout for name in METHODS.names)


def test_published_healed_methods_are_measured_healed(tmp_path, tiny_model_dir, corpus):
    args = ["--model", str(tiny_model_dir), "--dataset", str(corpus), *TINY_EVALUATION, "--heal-tokens", "512"]
    rows = {}
    for method in ("replaceme", "angular_block", "greedy_then_healed"):
        result = cli("method", "--method", method, "--remove", "2", "--format", "json", *args, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        rows[method] = json.loads(result.stdout)
    replaceme, angular = rows["replaceme"], rows["angular_block"]
    assert replaceme["removed_layers"] == angular["removed_layers"] and replaceme["heal"] == "linear"
    assert angular["heal"] == "none" and "unhealed_calib_ppl_ratio" not in angular
    assert replaceme["unhealed_calib_ppl_ratio"] == pytest.approx(angular["calib_ppl_ratio"])  # the same set, unhealed
    assert replaceme["calib_ppl_ratio"] != pytest.approx(angular["calib_ppl_ratio"])  # healing changed the model
    assert rows["greedy_then_healed"]["heal"] == "linear" and "unhealed_test_ppl_ratio" in rows["greedy_then_healed"]
