"""The prefix cache must give the plain full forward pass's perplexity, for any removal set."""

import math
import random

import pytest
import torch

from evaluators.perplexity import perplexity
from evaluators.prefix import build_prefix_cache
from search.model.removal import Removal
from search.model.surgery import decoder_layers, layers_removed
from tests.conftest import FAMILIES, VOCAB, tiny_model


def plain(model, removed, windows, bos_id, batch_size):
    with layers_removed(model, removed):
        return perplexity(model, windows, bos_id, batch_size)


def random_sets(n_layers, count, seed=0):
    rng = random.Random(seed)
    sets = [(n_layers - 2, n_layers - 1), tuple(range(1, n_layers))]  # the tail, and all but the first
    while len(sets) < count:
        sets.append(tuple(sorted(rng.sample(range(n_layers), rng.randint(1, n_layers - 1)))))
    return sets


@pytest.mark.parametrize("bos_id", [None, 1])
def test_cached_equals_full_forward_for_random_sets(family, bos_id):
    model = tiny_model(family, layers=8)
    windows = torch.randint(3, VOCAB, (7, 24))  # 7 windows in batches of 3: a short last batch
    cache = build_prefix_cache(model, windows, bos_id, batch_size=3)
    assert set(cache.states) == set(range(1, 8))  # every boundary but the embedding output
    assert math.isclose(cache.base_ppl, perplexity(model, windows, bos_id, 3), rel_tol=1e-6)
    for removed in random_sets(8, 12):
        expected = plain(model, removed, windows, bos_id, 3)
        assert math.isclose(cache.perplexity(Removal.of(removed)), expected, rel_tol=1e-5), removed
    assert len(decoder_layers(model)) == 8  # the model is whole again


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_equals_full_forward_every_family(family):
    model = tiny_model(family, layers=6)
    windows = torch.randint(3, VOCAB, (4, 16))
    cache = build_prefix_cache(model, windows, None, batch_size=2)
    for removed in [(2,), (3, 5), (1, 2, 4)]:
        assert math.isclose(
            cache.perplexity(Removal.of(removed)), plain(model, removed, windows, None, 2), rel_tol=1e-5
        )


def test_a_cache_that_does_not_fit_keeps_every_other_boundary_and_stays_exact():
    model = tiny_model("llama", layers=8)
    windows = torch.randint(3, VOCAB, (4, 16))
    one = 4 * 16 * model.config.hidden_size * 4  # bytes of one boundary (float32)
    cache = build_prefix_cache(model, windows, None, batch_size=2, max_bytes=3 * one)
    assert len(cache.states) == 3  # 7 boundaries, stride 3: layers 1, 4, 7
    assert (
        cache.start(Removal.of([5, 6])) == 4 and cache.layers_run(Removal.of([5, 6])) == 2
    )  # starts before its first removed layer
    for removed in random_sets(8, 8, seed=1):
        assert math.isclose(
            cache.perplexity(Removal.of(removed)), plain(model, removed, windows, None, 2), rel_tol=1e-5
        )
    off = build_prefix_cache(model, windows, None, batch_size=2, max_bytes=one - 1)
    assert off.states == {} and off.start(Removal.of([3])) is None
    assert math.isclose(off.perplexity(Removal.of([3])), plain(model, (3,), windows, None, 2), rel_tol=1e-5)


def test_cache_of_a_pruned_model_scores_sets_containing_its_base(family):
    model = tiny_model(family, layers=6)
    windows = torch.randint(3, VOCAB, (4, 16))
    cache = build_prefix_cache(model, windows, None, batch_size=2, base=Removal.of([2]))
    assert math.isclose(cache.base_ppl, plain(model, (2,), windows, None, 2), rel_tol=1e-6)
    for extra in (0, 1, 3, 5):
        removed = tuple(sorted((2, extra)))
        assert math.isclose(
            cache.perplexity(Removal.of(removed)), plain(model, removed, windows, None, 2), rel_tol=1e-5
        )
    with pytest.raises(ValueError):
        cache.perplexity(Removal.of([3]))  # does not contain the base


def test_cached_path_runs_only_the_layers_from_the_first_removed_one():
    model = tiny_model("gpt2", layers=8)
    windows = torch.randint(3, VOCAB, (2, 8))
    cache = build_prefix_cache(model, windows, None, batch_size=2)
    ran = []
    handles = [
        layer.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, layer in enumerate(decoder_layers(model))
    ]
    cache.perplexity(Removal.of([5]))
    for handle in handles:
        handle.remove()
    assert ran == [6, 7]  # the original layers after the removed one, nothing before it
    assert cache.layers_run(Removal.of([5])) == 2 and cache.layers_run(Removal.of([0])) == 7
