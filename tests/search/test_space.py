import pytest

from search import space
from search.errors import SearchError
from search.model.removal import Removal
from search.space import Budget, parse_budget


@pytest.mark.parametrize("text, value", [("12%", 0.12), ("12 %", 0.12), ("0.12", 0.12), ("7.5%", 0.075), (0.3, 0.3)])
def test_parse_budget(text, value):
    assert parse_budget(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["abc", "", "%", "0", "0%", "-5%", "100%", "150%", "1", "nan", "inf"])
def test_parse_budget_rejects(text):
    with pytest.raises(SearchError, match="--budget"):
        parse_budget(text)


def test_encode_decode_round_trip():
    params = space.encode(Removal.of([3, 0, 11]), 12)
    assert params["drop_03"] is True and params["drop_01"] is False and len(params) == 12
    assert space.decode(params) == Removal.of([0, 3, 11])


def test_budget_accounting():
    budget = Budget(0.25, total_params=1000, layer_params=[100] * 8)  # 800 in layers, 200 elsewhere
    assert budget.params_reduction(Removal.of([1, 2])) == pytest.approx(0.2)
    assert budget.allows(Removal.of([1, 2]))
    assert not budget.allows(Removal.of([1, 2, 3]))  # 30% > 25%
    assert not budget.allows(Removal())
    assert budget.max_layers() == 2
    exact = Budget(0.3, total_params=1000, layer_params=[100] * 8)
    assert exact.allows(Removal.of([0, 1, 2]))  # exactly at the budget counts as within it


def test_budget_never_removes_every_layer():
    budget = Budget(0.99, total_params=400, layer_params=[100] * 4)
    assert budget.max_layers() == 3
    assert not budget.allows(Removal.of([0, 1, 2, 3]))


def test_budget_too_small_for_one_layer():
    budget = Budget(0.05, total_params=1000, layer_params=[100] * 8)
    with pytest.raises(SearchError, match="too small to remove even one layer"):
        budget.check_removable()


def test_enumerate_feasible():
    budget = Budget(0.25, total_params=1000, layer_params=[100] * 6)
    sets = budget.enumerate_feasible(limit=100)
    assert len(sets) == 6 + 15 and all(budget.allows(s) for s in sets)
    assert budget.enumerate_feasible(limit=10) is None
