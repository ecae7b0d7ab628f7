import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import create_trial

from search.front import fastest_front, smallest_front
from search.records import Retiming


def _study(points: list[tuple[float, float, float]]) -> optuna.Study:
    """A study of finished trials with (fitness, latency ratio, params reduction); trial i removes layer i."""
    study = optuna.create_study(directions=["minimize", "minimize"])
    for i, (fitness, latency, removed) in enumerate(points):
        study.add_trial(
            create_trial(
                values=[fitness, latency],
                params={"x": 0.0},
                distributions={"x": FloatDistribution(0, 1)},
                user_attrs={"params_reduction": removed, "removed_layers": [i]},
                system_attrs={"constraints": [removed - 0.12]},
            )
        )
    return study


def test_the_latency_front_takes_the_retimed_figures():
    study = _study(
        [
            (1.10, 0.90, 0.05),
            (1.05, 0.92, 0.05),  # better and, timed alone, a little slower
            (1.20, 0.93, 0.05),  # dominated by both, whatever the retiming says of the others
            (1.00, 0.80, 0.20),  # over budget: never on a front, however fast
        ]
    )
    assert [t.number for t in fastest_front(study, None)] == [0, 1] == [t.number for t in study.best_trials]
    # Timed again side by side, trial 0's shape is slower than trial 1's: trial 1 dominates it now.
    retimed = Retiming(rounds=5, ratios={"0": 0.93, "1": 0.91})
    assert [t.number for t in fastest_front(study, retimed)] == [1]
    # Trial 2 comes onto the front when its own figure is now the fastest.
    retimed = Retiming(rounds=5, ratios={"0": 0.93, "1": 0.91, "2": 0.85})
    assert [t.number for t in fastest_front(study, retimed)] == [1, 2]


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
