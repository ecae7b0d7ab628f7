import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import create_trial

from search.front import smallest_front


def _study(points: list[tuple[float, float, float]]) -> optuna.Study:
    """A study of finished trials with (fitness, latency ratio, params reduction)."""
    study = optuna.create_study(directions=["minimize", "minimize"])
    for fitness, latency, removed in points:
        study.add_trial(
            create_trial(
                values=[fitness, latency],
                params={"x": 0.0},
                distributions={"x": FloatDistribution(0, 1)},
                user_attrs={"params_reduction": removed},
            )
        )
    return study


def test_the_best_set_of_each_size_is_kept_where_a_faster_one_dominates_it():
    study = _study(
        [
            (1.10, 0.95, 0.026),  # a whole layer: slower than the blocks below, the best at its size
            (1.08, 0.90, 0.020),  # attention blocks: faster and better, but remove less
            (1.20, 0.96, 0.026),  # as large as the first, worse: off every front
            (1.50, 0.85, 0.105),  # the largest
            (1.60, 0.99, 0.130),  # over a 12 % budget: never shown
        ]
    )
    latency_front = {t.number for t in study.best_trials}
    assert 0 not in latency_front  # (fitness, latency): trial 1 dominates it
    assert {t.number for t in smallest_front(study, 0.12)} == {0, 1, 3}
