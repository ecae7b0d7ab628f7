"""Linear healing: folding is exact in every family that allows it, the fit solves its least-squares
problem on activations computed independently here, and healed perplexity from the prefix cache is
the plain forward pass's."""

import math

import pytest
import torch

from evaluators.healing import (
    Healing,
    collect_fit_data,
    fit_healing,
    fold_permanently,
    fold_reason,
    healed,
    output_projection,
    runs,
    unreachable_runs,
)
from evaluators.perplexity import perplexity
from evaluators.prefix import build_prefix_cache
from search.errors import SearchError
from search.healing import check_healable
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


def _activations(model, windows, removed, layer):
    """Independently of healing.py: the pruned model's MLP output at `layer` and every layer's input."""
    outputs = []
    handle = output_projection(model, layer).register_forward_hook(lambda m, a, out: outputs.append(out))
    with torch.no_grad(), layers_removed(model, removed):
        hidden = model(input_ids=windows, output_hidden_states=True).hidden_states
    handle.remove()
    return outputs[0][:, 1:].reshape(-1, 32).double(), [h[:, 1:].reshape(-1, 32).double() for h in hidden]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_each_map_solves_its_least_squares_problem_sequentially(family):
    model = tiny_model(family, layers=8)
    windows = torch.randint(3, VOCAB, (6, 40))
    data = collect_fit_data(model, windows, None, batch_size=4)
    removed, ridge = [2, 3, 6], 1e-3
    healing = fit_healing(model, data, removed, ridge=ridge, sequential=True)
    assert set(healing.maps) == {1, 5} and healing.unhealed == ()
    _, dense = _activations(model, windows, [], 1)
    # First run (2..3): on the unpruned model, map layer 1's MLP output onto what layers 2..3 added.
    m, _ = _activations(model, windows, [], 1)
    target = dense[4] - dense[2]  # hidden_states[i] is layer i's input
    # Second run (6): on the model pruned of 2, 3 and healed at 1; target the unpruned input of layer 7.
    with healed(model, Healing({1: healing.maps[1]})):
        m2, pruned = _activations(model, windows, [2, 3, 6], 5)
    target2 = dense[7] - pruned[4]  # the pruned stack's 4th input is layer 5's output
    for (x, y), layer in (((m, target), 1), ((m2, target2), 5)):
        gram = x.T @ x
        lhs = (gram + ridge * gram.diagonal().mean() * torch.eye(32, dtype=torch.float64)) @ healing.maps[layer]
        assert torch.allclose(lhs, x.T @ y, rtol=1e-3, atol=1e-3 * (x.T @ y).abs().max().item())


def test_a_run_from_layer_0_is_left_unhealed_and_reported():
    model = tiny_model("llama", layers=6)
    data = collect_fit_data(model, torch.randint(3, VOCAB, (4, 20)), None, batch_size=4)
    healing = fit_healing(model, data, [0, 1, 4])
    assert healing.unhealed == ((0, 1),) == unreachable_runs([0, 1, 4]) and set(healing.maps) == {3}


@pytest.mark.parametrize("family", FOLDABLE)
def test_healed_perplexity_from_the_prefix_cache_is_the_plain_forward_pass(family):
    model = tiny_model(family, layers=6)
    fit_windows, windows = torch.randint(3, VOCAB, (8, 32)), torch.randint(3, VOCAB, (5, 24))
    data = collect_fit_data(model, fit_windows, 1, batch_size=4)
    cache = build_prefix_cache(model, windows, 1, batch_size=2)
    for removed in ([3], [2, 4], [1, 2, 5]):
        healing = fit_healing(model, data, removed)
        with healed(model, healing):
            cached = math.exp(sum(n for n, _ in cache.nll_batches(removed, healing.first_changed)) / (5 * 24))
            with layers_removed(model, removed):
                plain = perplexity(model, windows, 1, 2)
        assert math.isclose(cached, plain, rel_tol=1e-5), removed
        # Not starting before the healed layer would miss the change: the cache would answer unhealed.
        with layers_removed(model, removed):
            unhealed = perplexity(model, windows, 1, 2)
        assert not math.isclose(plain, unhealed, rel_tol=1e-6)
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
