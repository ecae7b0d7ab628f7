import optuna

from search import space
from search.model.removal import Removal
from search.sampler import RemovalSetSampler, removal_set
from search.space import Budget


def test_sampler_proposes_new_feasible_sets_near_elites():
    budget = Budget(0.35, total_params=1000, layer_params=[100] * 12)  # up to 3 of 12 layers
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=RemovalSetSampler(budget, seed=0))
    for seed_set in [(5,), (5, 6), (4, 5, 6)]:
        study.enqueue_trial(space.encode(Removal.of(seed_set), 12))

    def objective(trial):
        removed = space.suggest(trial, budget)
        assert budget.allows(removed)
        return sum(removed.layers) / 10 + len(removed.layers), 1 - len(removed.layers) / 12

    study.optimize(objective, n_trials=40)
    sets = [removal_set(t) for t in study.trials]
    assert len(set(sets)) == len(sets) == 40  # never repeats while new feasible sets exist
    assert all(budget.allows(s) for s in sets)


def test_sampler_falls_back_when_space_is_exhausted():
    budget = Budget(0.3, total_params=400, layer_params=[100] * 3)  # only singles fit
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=RemovalSetSampler(budget, seed=1))
    study.optimize(lambda t: (len(space.suggest(t, budget).layers), 0.0), n_trials=6)
    sets = [removal_set(t) for t in study.trials]
    assert set(sets) <= {Removal.of([0]), Removal.of([1]), Removal.of([2])}
    assert len(set(sets)) == 3
