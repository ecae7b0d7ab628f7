"""Where the first trials come from: staged greedy by a criterion, or another study's findings."""

from search.seeding.greedy import ScoreFn, Stage, seed_sets, staged_greedy
from search.seeding.transfer import map_layer, transferred_seeds

__all__ = ["ScoreFn", "Stage", "map_layer", "seed_sets", "staged_greedy", "transferred_seeds"]
