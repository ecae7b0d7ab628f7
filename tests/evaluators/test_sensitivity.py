import math

import torch

from evaluators.perplexity import perplexity
from evaluators.sensitivity import removal_sensitivity, similarity
from search.model.removal import Removal
from search.model.surgery import layers_removed
from tests.conftest import VOCAB, tiny_model


def reference_states(model, windows):
    """Every layer's input and the last layer's raw output, from output_hidden_states and a hook."""
    last = []
    layers = model.transformer.h if hasattr(model, "transformer") else model.model.layers
    handle = layers[-1].register_forward_hook(lambda m, a, o: last.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        hidden = model(input_ids=windows, output_hidden_states=True).hidden_states
    handle.remove()
    return [h[:, 1:] for h in hidden[:-1]] + [last[0][:, 1:]]  # hidden[-1] is after the final norm


def mean_cos(a, b):
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).mean().item()


def test_one_pass_criteria_match_a_direct_computation(family):
    model = tiny_model(family, layers=6)
    windows = torch.randint(3, VOCAB, (4, 16))
    found = similarity(model, windows, batch_size=4, max_block=3)
    states = reference_states(model, windows)
    for layer in range(6):
        assert math.isclose(found.bi[layer], 1 - mean_cos(states[layer], states[layer + 1]), abs_tol=1e-5)
    for n in (1, 2, 3):
        assert sorted(found.angular[n]) == list(range(6 - n + 1))
        cos = torch.nn.functional.cosine_similarity(states[1].float(), states[1 + n].float(), dim=-1).clamp(-1, 1)
        assert math.isclose(found.angular[n][1], (torch.arccos(cos) / math.pi).mean().item(), abs_tol=1e-5)


def test_criteria_on_a_pruned_model_use_unpruned_indices(family):
    model = tiny_model(family, layers=6)
    windows = torch.randint(3, VOCAB, (4, 16))
    found = similarity(model, windows, already_removed=Removal.of([1, 4]), batch_size=2)
    assert sorted(found.bi) == [0, 2, 3, 5] and sorted(found.angular[1]) == [0, 2, 3, 5]
    with layers_removed(model, (1, 4)):
        states = reference_states(model, windows)
    assert math.isclose(found.bi[2], 1 - mean_cos(states[1], states[2]), abs_tol=1e-5)


def test_removal_sensitivity_is_the_plain_perplexity_ratio(family):
    model = tiny_model(family, layers=6)
    windows = torch.randint(3, VOCAB, (4, 16))
    candidates = [Removal.of([0]), Removal.of([3]), Removal.of([5])]
    scores = removal_sensitivity(model, windows, candidates, already_removed=Removal.of([2]), batch_size=2)
    with layers_removed(model, (2,)):
        base = perplexity(model, windows, None, 2)
    for unit, ratio in scores.items():
        with layers_removed(model, (2, *unit.layers)):
            assert math.isclose(ratio, perplexity(model, windows, None, 2) / base, rel_tol=1e-5)
