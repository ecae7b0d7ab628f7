import math

import torch

from evaluators.perplexity import perplexity
from tests.conftest import VOCAB, tiny_model


def test_perplexity_matches_transformers_loss(family):
    model = tiny_model(family)
    windows = torch.randint(0, VOCAB, (5, 16))
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    # Every window has the same number of targets, so the mean of means is the token mean.
    assert math.isclose(perplexity(model, windows, batch_size=2), math.exp(sum(losses) / len(losses)), rel_tol=1e-5)


def test_bos_is_context_never_target(family):
    model = tiny_model(family)
    windows = torch.randint(3, VOCAB, (3, 10))
    with_bos = torch.cat([torch.full((3, 1), 1), windows], dim=1)
    with torch.no_grad():
        logits = model(input_ids=with_bos).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), windows.reshape(-1))
    assert math.isclose(perplexity(model, windows, bos_id=1), math.exp(nll.item()), rel_tol=1e-5)


def test_batch_size_does_not_change_result(family):
    model = tiny_model(family)
    windows = torch.randint(0, VOCAB, (7, 12))
    assert math.isclose(
        perplexity(model, windows, batch_size=1), perplexity(model, windows, batch_size=4), rel_tol=1e-5
    )
