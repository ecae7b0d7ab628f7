from search.model.removal import Removal
from search.seeding import seed_sets, staged_greedy
from search.space import Budget

# Layer "costs" that interact: removing 4 makes 5 cheap (like neighbours that back each other up).
BASE = {0: 9.0, 1: 5.0, 2: 1.3, 3: 1.5, 4: 1.1, 5: 1.6, 6: 1.4, 7: 8.0}


def R(*layers):
    return Removal.of(layers)


def fake_score(removed, candidates):
    scores = {}
    for unit in candidates:
        (c,) = unit.layers
        cost = BASE[c] * (0.5 if (c == 5 and 4 in removed.layers) else 1.0)
        scores[unit] = 1.0 + sum(BASE[r] - 1 for r in removed.layers) * 0.1 + (cost - 1)
    return scores


def test_staged_greedy_rescores_each_stage():
    calls = []

    def score(removed, candidates):
        calls.append((removed, tuple(candidates)))
        return fake_score(removed, candidates)

    budget = Budget(0.35, total_params=1000, layer_params=[100] * 8)  # up to 3 layers
    stages = staged_greedy(score, budget)
    assert [s.removed for s in stages] == [R(4), R(4, 5), R(2, 4, 5)]
    # Stage 2 sees that 5 became cheap only because it re-scored on the pruned model.
    assert calls[1][0] == R(4) and R(4) not in calls[1][1]
    assert len(calls) == 3 and [len(c[1]) for c in calls] == [8, 7, 6]
    assert all(budget.allows(s.removed) for s in stages)


def test_staged_greedy_stops_at_budget():
    budget = Budget(0.15, total_params=1000, layer_params=[100] * 8)
    assert [s.removed for s in staged_greedy(fake_score, budget)] == [R(4)]


def test_seed_sets_keep_greedy_path_first_and_distinct():
    budget = Budget(0.35, total_params=1000, layer_params=[100] * 8)
    stages = staged_greedy(fake_score, budget)
    seeds = seed_sets(stages, budget, count=8)
    sets = [s for s, _ in seeds]
    assert sets[:3] == [R(4), R(4, 5), R(2, 4, 5)]
    assert len(sets) == len(set(sets)) == 8
    assert all(budget.allows(s) for s in sets)
    assert seeds[0][1] == "greedy stage 1"
    # Count 0 still keeps every greedy stage and one-shot set; only neighbours are top-ups.
    kept = seed_sets(stages, budget, count=0)
    assert [s for s, _ in kept][:3] == sets[:3]
    assert {reason.split(" ")[0] for _, reason in kept} == {"greedy", "one-shot"}


def test_seed_sets_take_other_methods_before_neighbours():
    budget = Budget(0.35, total_params=1000, layer_params=[100] * 8)
    stages = staged_greedy(fake_score, budget)
    others = [(R(0, 1), "angular block of 2"), (R(4), "block influence top 1"), (R(0, 1, 2, 3), "over budget")]
    seeds = dict(seed_sets(stages, budget, count=0, others=others))
    assert seeds[R(0, 1)] == "angular block of 2"
    assert seeds[R(4)] == "greedy stage 1"  # a set already present keeps its first reason
    assert R(0, 1, 2, 3) not in seeds  # infeasible sets are dropped


def test_map_layer_by_relative_depth():
    from search.seeding import map_layer

    assert map_layer(17, 30, 18) == 10  # 17 * 18 / 30 = 10.2
    assert map_layer(29, 30, 18) == 17 and map_layer(0, 30, 18) == 0
    assert [map_layer(i, 4, 8) for i in range(4)] == [0, 2, 4, 6]


def test_transferred_seeds_map_sets_and_profile():
    from search.seeding import transferred_seeds

    budget = Budget(0.35, total_params=600, layer_params=[100] * 6)  # target: 6 layers, up to 2
    profile = {i: 1.0 + abs(i - 7) for i in range(12)}  # source: 12 layers, layer 7 mildest
    sets = [(R(7), "greedy"), (R(6, 7), "greedy"), (R(6, 7, 8), "best of its size")]
    seeds, mapped = transferred_seeds(sets, profile, 12, budget)
    assert [s for s, _ in seeds][:2] == [R(4), R(3, 4)]  # 7 -> round(3.5) = 4, 6 -> 3
    assert all(budget.allows(s) for s, _ in seeds)  # the 3-layer set collapses or is dropped
    assert set(mapped) == {R(i) for i in range(6)} and min(mapped, key=mapped.get) in (R(3), R(4))


def test_seed_sets_include_each_stage_less_one_layer():
    budget = Budget(0.35, total_params=1000, layer_params=[100] * 8)
    stages = staged_greedy(fake_score, budget)  # (4,), (4, 5), (2, 4, 5)
    seeds = dict(seed_sets(stages, budget, count=0))
    assert seeds[R(5)] == "greedy stage 2 less 4"
    assert seeds[R(2, 5)] == "greedy stage 3 less 4"
    assert seeds[R(2, 4)] == "one-shot top 2"  # already there: the first reason stands
    assert seeds[R(4, 5)] == "greedy stage 2"  # a stage itself keeps its reason


def test_a_shortlist_scores_the_best_of_the_last_scoring_and_the_neighbours_only():
    calls = []

    def score(removed, candidates):
        calls.append((removed, tuple(candidates)))
        return fake_score(removed, candidates)

    budget = Budget(0.35, total_params=1000, layer_params=[100] * 8)
    stages = staged_greedy(score, budget, shortlist=2)
    assert [s.removed for s in stages] == [R(4), R(4, 5), R(2, 4, 5)]  # the full path here
    assert len(calls[0][1]) == 8  # stage 1 scores every layer: it is the sensitivity profile
    # Stage 2: the 2 best of stage 1 (2, 6; 4 is removed) and 4's neighbours (3, 5).
    assert calls[1] == (R(4), (R(2), R(3), R(5), R(6)))
    # Stage 3: the 2 best at stage 2 (2, 6) and the neighbours of {4, 5} (3, 6); 0, 1 and 7 are not scored again.
    assert calls[2] == (R(4, 5), (R(2), R(3), R(6)))
    assert stages[1].scores.keys() == {R(2), R(3), R(5), R(6)}


def test_shortlisted_keeps_neighbours_beyond_the_size():
    from search.seeding.greedy import shortlisted

    latest = {R(0): 1.0, R(1): 1.1, R(2): 1.2, R(5): 1.3, R(7): 1.4}
    units = [R(i) for i in range(8)]
    assert shortlisted([R(0), R(1), R(2), R(5), R(7)], R(6), latest, 2, units) == [R(0), R(1), R(5), R(7)]
