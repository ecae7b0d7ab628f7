import math

import pytest
import torch

from evaluators.divergence import DenseReference, dense_reference, full_kl, logp_chunks, nll_and_kl
from evaluators.forward import configure
from evaluators.perplexity import window_batches
from search.model.removal import Removal
from search.model.surgery import removal_applied
from tests.conftest import FAMILIES, VOCAB, tiny_model


def _windows(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (6, 24), generator=torch.Generator().manual_seed(seed))


def _exact_kl(model, removal: Removal, windows: torch.Tensor, bos_id) -> float:
    total, count = 0.0, 0
    with torch.inference_mode():
        for inputs in window_batches(windows, bos_id, 4, torch.device("cpu")):
            dense = torch.cat(list(logp_chunks(model, inputs)))
            with removal_applied(model, removal):
                pruned = torch.cat(list(logp_chunks(model, inputs)))
            total, count = total + full_kl(dense, pruned).item(), count + len(dense)
    return total / count


def _mean_kl(model, removal: Removal, windows, bos_id, reference: DenseReference) -> float:
    measure = nll_and_kl(reference)
    with removal_applied(model, removal), torch.inference_mode():
        batches = [measure(model, inputs, i) for i, inputs in enumerate(window_batches(windows, bos_id, 4, "cpu"))]
    return sum(kl.item() for _, _, kl in batches) / sum(n for _, n, _ in batches)  # sums left on the device


@pytest.mark.parametrize("family", FAMILIES)
def test_kl_over_the_whole_vocabulary_is_the_full_kl_and_fewer_tokens_bound_it(family):
    model = tiny_model(family).eval()
    windows, bos_id = _windows(), 1
    removal = Removal.of([2, 3])
    exact = _exact_kl(model, removal, windows, bos_id)
    whole = dense_reference(model, windows, bos_id, 4, k=VOCAB)
    assert math.isclose(_mean_kl(model, removal, windows, bos_id, whole), exact, rel_tol=1e-4)
    assert _mean_kl(model, Removal(), windows, bos_id, whole) == pytest.approx(0.0, abs=1e-6)  # unpruned
    bounds = [_mean_kl(model, removal, windows, bos_id, dense_reference(model, windows, bos_id, 4, k)) for k in (1, 8)]
    assert 0 <= bounds[0] <= bounds[1] + 1e-9 <= exact + 2e-9  # a lower bound that tightens with k
    narrowed = whole.top(8)  # a wider reference narrowed to k = 8 is the reference taken at k = 8
    assert math.isclose(_mean_kl(model, removal, windows, bos_id, narrowed), bounds[1], rel_tol=1e-5)
    assert whole.nbytes == 6 * 24 * (
        VOCAB * 8 + 4
    )  # per target (BOS is context only): k log-probs and ids, and the rest's log


def test_fused_and_plain_heads_give_the_same_kl():
    model = tiny_model("llama").eval()
    windows, removal = _windows(1), Removal.of([1])
    figures = []
    for fused in (True, False):
        configure(model, fused_head=fused)
        reference = dense_reference(model, windows, None, 4, k=16)
        figures.append(_mean_kl(model, removal, windows, None, reference))
    assert math.isclose(*figures, rel_tol=1e-4)
