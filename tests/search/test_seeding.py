from search.seeding import seed_sets, staged_greedy
from search.space import Budget

# Layer "costs" that interact: removing 4 makes 5 cheap (like neighbours that back each other up).
BASE = {0: 9.0, 1: 5.0, 2: 1.3, 3: 1.5, 4: 1.1, 5: 1.6, 6: 1.4, 7: 8.0}


def fake_score(removed, candidates):
    scores = {}
    for c in candidates:
        cost = BASE[c] * (0.5 if (c == 5 and 4 in removed) else 1.0)
        scores[c] = 1.0 + sum(BASE[r] - 1 for r in removed) * 0.1 + (cost - 1)
    return scores


def test_staged_greedy_rescores_each_stage():
    calls = []

    def score(removed, candidates):
        calls.append((removed, tuple(candidates)))
        return fake_score(removed, candidates)

    budget = Budget(0.35, total_params=1000, layer_params=[100] * 8)  # up to 3 layers
    stages = staged_greedy(score, budget)
    assert [s.removed for s in stages] == [(4,), (4, 5), (2, 4, 5)]
    # Stage 2 sees that 5 became cheap only because it re-scored on the pruned model.
    assert calls[1][0] == (4,) and 4 not in calls[1][1]
    assert len(calls) == 3 and [len(c[1]) for c in calls] == [8, 7, 6]
    assert all(budget.allows(s.removed) for s in stages)


def test_staged_greedy_stops_at_budget():
    budget = Budget(0.15, total_params=1000, layer_params=[100] * 8)
    assert [s.removed for s in staged_greedy(fake_score, budget)] == [(4,)]


def test_seed_sets_keep_greedy_path_first_and_distinct():
    budget = Budget(0.35, total_params=1000, layer_params=[100] * 8)
    stages = staged_greedy(fake_score, budget)
    seeds = seed_sets(stages, budget, count=8)
    sets = [s for s, _ in seeds]
    assert sets[:3] == [(4,), (4, 5), (2, 4, 5)]
    assert len(sets) == len(set(sets)) == 8
    assert all(budget.allows(s) for s in sets)
    assert seeds[0][1] == "greedy stage 1"
    # Count 0 still keeps every greedy stage.
    assert [s for s, _ in seed_sets(stages, budget, count=0)] == sets[:3]
