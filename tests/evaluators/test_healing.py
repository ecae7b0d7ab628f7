"""Linear healing: folding is exact in every family that allows it; the streamed sums and the progressive
sequential fit equal the least-squares problem set up on activations held and computed independently
here; healed perplexity from the prefix cache is the plain forward pass's."""

import math

import pytest
import torch

from evaluators.healing import (
    DEFAULT_RIDGE,
    Healing,
    all_pairs,
    collect_fit_stats,
    fit_healing,
    fold_permanently,
    fold_reason,
    healed,
    output_projection,
    runs,
    solve,
    unreachable_runs,
)
from evaluators.perplexity import perplexity
from evaluators.prefix import build_prefix_cache
from search.errors import SearchError
from search.healing import check_healable
from search.model.removal import Removal
from search.model.surgery import decoder_layers, layers_removed
from tests.conftest import FAMILIES, VOCAB, tiny_model

FOLDABLE = [f for f in FAMILIES if f != "gemma3"]


def test_runs_are_maximal_consecutive_stretches():
    assert runs([5, 1, 2, 7, 8, 9]) == [(1, 2), (5, 5), (7, 9)]
    assert runs([]) == []


@pytest.mark.parametrize("family", FOLDABLE)
def test_folding_equals_mapping_the_mlp_output(family):
    model = tiny_model(family, layers=4)
    inputs = torch.randint(3, VOCAB, (2, 12))
    delta = torch.randn(32, 32, dtype=torch.float64) * 0.1
    projection = output_projection(model, 2)
    handle = projection.register_forward_hook(lambda m, a, out: out @ (torch.eye(32) + delta.float()))
    with torch.no_grad():
        mapped = model(input_ids=inputs).logits
    handle.remove()
    before = [p.clone() for p in model.parameters()]
    with torch.no_grad(), healed(model, Healing({2: delta})):
        folded = model(input_ids=inputs).logits
    assert torch.allclose(folded, mapped, atol=1e-5, rtol=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # restored exactly


def test_a_family_with_a_norm_after_its_mlp_is_refused_in_one_line():
    model = tiny_model("gemma3", layers=4)
    assert "post_feedforward_layernorm" in fold_reason(model)
    with pytest.raises(SearchError, match=r"^--heal linear is not available for this model: gemma3: ") as info:
        check_healable(model, "linear")
    assert "\n" not in str(info.value)
    check_healable(model, "none")  # unhealed search works on every family


def _activations(model, windows, removed, layer, width=32):
    """Independently of healing.py: the pruned model's MLP output at `layer` and every layer's input,
    every window held at once (the last entry: the last layer's output before the final norm)."""
    outputs, last = [], []
    projection = output_projection(model, layer)  # by its index in the unpruned stack
    with torch.no_grad(), layers_removed(model, removed):
        handles = [
            projection.register_forward_hook(lambda m, a, out: outputs.append(out)),
            decoder_layers(model)[-1].register_forward_hook(
                lambda m, a, out: last.append(out[0] if isinstance(out, tuple) else out)
            ),
        ]
        hidden = list(model(input_ids=windows, output_hidden_states=True).hidden_states)
        for handle in handles:
            handle.remove()
    hidden[-1] = last[-1]  # output_hidden_states' last entry is after the final norm
    flat = [h[:, 1:].reshape(-1, width).double() for h in hidden]
    return outputs[0][:, 1:].reshape(-1, width).double(), flat


def _reference_healing(model, windows, removed, ridge, sequential):
    """The sequential fit as first specified, on activations held for every window: each later run is
    fitted on the whole pruned model, healed so far, run again from the embedding."""
    maps = {}
    _, dense = _activations(model, windows, [], 0)
    for first, last in runs(removed):
        if first == 0:
            continue
        layer, target = first - 1, last + 1
        earlier = [i for i in removed if i < first]
        if sequential and earlier:
            with healed(model, Healing(dict(maps))):
                m, pruned = _activations(model, windows, [*earlier, *range(first, last + 1)], layer)
            position = layer - len([i for i in earlier if i < layer])  # layer's index in the pruned stack
            out = pruned[position + 1]
        else:
            m, _ = _activations(model, windows, [], layer)
            out = dense[layer + 1]
        y = dense[target] - out
        gram = m.T @ m
        lam = ridge * gram.diagonal().mean()
        maps[layer] = torch.linalg.solve(gram + lam * torch.eye(32, dtype=torch.float64), m.T @ y)
    return maps


@pytest.mark.parametrize("family", FOLDABLE)
def test_streamed_sums_equal_the_sums_over_held_activations(family):
    model = tiny_model(family, layers=6).double()
    windows = torch.randint(3, VOCAB, (7, 24))  # 7 windows in batches of 3: a short last batch
    stats = collect_fit_stats(model, windows, None, 3, all_pairs(6, 3), keep_states=False)
    _, dense = _activations(model, windows, [], 0)
    assert stats.tokens == 7 * 23 and stats.states is None
    assert set(stats.cross) == all_pairs(6, 3) and set(stats.gram) == {p for p, _ in all_pairs(6, 3)}
    for (p, b), cross in stats.cross.items():
        m, _ = _activations(model, windows, [], p)
        assert torch.allclose(stats.gram[p], m.T @ m, rtol=1e-10, atol=1e-10)
        assert torch.allclose(cross, m.T @ (dense[b] - dense[p + 1]), rtol=1e-10, atol=1e-10)
        assert cross.shape == (32, 32)  # O(d²) per pair, whatever the number of tokens


@pytest.mark.parametrize("family", FOLDABLE)
@pytest.mark.parametrize("sequential", [True, False], ids=["sequential", "parallel"])
def test_streamed_progressive_fit_equals_the_fit_on_held_activations(family, sequential):
    """Three runs (the last one ending at the stack's output) fitted progressively from streamed sums and
    states on disk give the maps of the held-activation fit, to float64 rounding."""
    model = tiny_model(family, layers=8).double()
    windows = torch.randint(3, VOCAB, (7, 24))
    stats = collect_fit_stats(model, windows, None, 3, all_pairs(8, 2), keep_states=sequential)
    try:
        # [2, 3, 5] and [2, 3, 5, 6] continue from the capture [2, 3, 5, 7] left at layer 4 (another target)
        for removed in ([2, 3, 5, 7], [1, 4, 5], [0, 2, 5], [2, 3, 5], [2, 3, 5, 6]):
            healing = fit_healing(model, stats, removed, ridge=1e-3, sequential=sequential)
            expected = _reference_healing(model, windows, removed, 1e-3, sequential)
            assert set(healing.maps) == set(expected)
            for layer, delta in expected.items():
                assert torch.allclose(healing.maps[layer], delta, rtol=1e-7, atol=1e-9 * delta.abs().max().item())
        if sequential:
            assert len(stats.captures) == 5  # one per distinct (runs before, layer): the last two sets ran nothing
    finally:
        stats.close()
    if sequential:
        assert len(stats.captures) == 0 and stats.states.closed  # closed: the scratch files are gone


def test_a_run_longer_than_the_summed_ones_is_summed_on_demand():
    model = tiny_model("llama", layers=6)
    windows = torch.randint(3, VOCAB, (4, 20))
    stats = collect_fit_stats(model, windows, None, 4, all_pairs(6, 1), keep_states=True)
    try:
        healing = fit_healing(model, stats, [1, 2, 3])  # a run of 3 with sums for runs of 1 only
        full = collect_fit_stats(model, windows, None, 4, all_pairs(6, 3), keep_states=False)
        assert torch.allclose(healing.maps[0], solve(full.gram[0], full.cross[(0, 4)], DEFAULT_RIDGE))
    finally:
        stats.close()


def test_a_run_from_layer_0_is_left_unhealed_and_reported():
    model = tiny_model("llama", layers=6)
    stats = collect_fit_stats(model, torch.randint(3, VOCAB, (4, 20)), None, 4, all_pairs(6, 2))
    healing = fit_healing(model, stats, [0, 1, 4])
    stats.close()
    assert healing.unhealed == ((0, 1),) == unreachable_runs([0, 1, 4]) and set(healing.maps) == {3}


@pytest.mark.parametrize("family", FOLDABLE)
def test_healed_perplexity_from_the_prefix_cache_is_the_plain_forward_pass(family):
    model = tiny_model(family, layers=6)
    fit_windows, windows = torch.randint(3, VOCAB, (8, 32)), torch.randint(3, VOCAB, (5, 24))
    stats = collect_fit_stats(model, fit_windows, 1, 4, all_pairs(6, 2))
    cache = build_prefix_cache(model, windows, 1, batch_size=2)
    for removed in ([3], [2, 4], [1, 2, 5]):
        healing = fit_healing(model, stats, removed)
        with healed(model, healing):
            cached = math.exp(
                sum(n for n, _ in cache.nll_batches(Removal.of(removed), healing.first_changed)) / (5 * 24)
            )
            with layers_removed(model, removed):
                plain = perplexity(model, windows, 1, 2)
        assert math.isclose(cached, plain, rel_tol=1e-5), removed
        # Not starting before the healed layer would miss the change: the cache would answer unhealed.
        with layers_removed(model, removed):
            unhealed = perplexity(model, windows, 1, 2)
        assert not math.isclose(plain, unhealed, rel_tol=1e-6)
    stats.close()
    assert len(decoder_layers(model)) == 6


def test_fold_permanently_leaves_the_healed_weights():
    model = tiny_model("llama", layers=4)
    delta = torch.randn(32, 32, dtype=torch.float64) * 0.1
    inputs = torch.randint(3, VOCAB, (1, 10))
    with torch.no_grad(), healed(model, Healing({1: delta})):
        expected = model(input_ids=inputs).logits
    fold_permanently(model, Healing({1: delta}))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=inputs).logits, expected)


def test_a_capture_is_reused_only_for_the_same_ridge():
    model = tiny_model("llama", layers=6).double()
    windows = torch.randint(3, VOCAB, (4, 20))
    stats = collect_fit_stats(model, windows, None, 4, all_pairs(6, 2))
    try:
        for ridge in (1e-3, 1e-1, 1e-3):  # the earlier run's map, and so the state after it, differs by ridge
            healing = fit_healing(model, stats, [1, 3, 4], ridge=ridge)
            expected = _reference_healing(model, windows, [1, 3, 4], ridge, True)
            assert all(torch.allclose(healing.maps[k], v, rtol=1e-7, atol=1e-12) for k, v in expected.items())
        assert len(stats.captures) == 2
    finally:
        stats.close()
