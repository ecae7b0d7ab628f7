"""Published one-shot and greedy layer-removal methods, as plain choices of k layers.

Each takes the scores it ranks by (computed by evaluators/sensitivity.py) and returns the removed
layers, so the same code seeds a study and runs alone (`python -m search method`, registered in
search/methods.py). In every score dict, lower means "safer to remove".

- oneshot_ppl: the k layers whose single removal costs least perplexity (Shortened LLaMA, PPL).
- block_influence: the k layers of lowest Block Influence, 1 - cos(input, output) (ShortGPT).
- angular_block: the contiguous block of k layers whose input and output are closest in angular
  distance (Gromov et al. 2024).
- staged_greedy: remove the least sensitive layer, re-score on the pruned model, repeat (SLEB);
  see search/seeding/greedy.py, it is the study's main seed.
- drop_last: the k layers before the final one (the "deeper layers are redundant" heuristic).
- random: uniformly random sets, averaged over several draws.
"""

from __future__ import annotations

import random as _random


def lowest(scores: dict[int, float], k: int) -> tuple[int, ...]:
    """The k layers with the lowest scores (ties: the lower index first)."""
    return tuple(sorted(sorted(scores, key=lambda i: (scores[i], i))[:k]))


def angular_block(block_distances: dict[int, float], k: int) -> tuple[int, ...]:
    """The block of k layers starting where the angular distance over k layers is smallest."""
    start = min(block_distances, key=lambda i: (block_distances[i], i))
    return tuple(range(start, start + k))


def drop_last(n_layers: int, k: int) -> tuple[int, ...]:
    """The k layers just before the final one: the final layer is known to matter (Gromov et al.)."""
    if k > n_layers - 1:
        raise ValueError(f"cannot keep the final layer and remove {k} of {n_layers} layers")
    return tuple(range(n_layers - 1 - k, n_layers - 1))


def random_sets(n_layers: int, k: int, count: int, seed: int = 0) -> list[tuple[int, ...]]:
    """`count` distinct random sets of k layers (fewer if fewer exist), reproducible from `seed`."""
    rng = _random.Random(seed)
    sets: list[tuple[int, ...]] = []
    for _ in range(100 * count):
        if len(sets) == count:
            break
        drawn = tuple(sorted(rng.sample(range(n_layers), k)))
        if drawn not in sets:
            sets.append(drawn)
    return sets
