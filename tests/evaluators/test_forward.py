import logging
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.exc import TorchDynamoException

from evaluators import forward
from evaluators.forward import configure, head_nll, logits_nll, on_host, settings
from evaluators.perplexity import perplexity
from evaluators.prefix import build_prefix_cache
from search.model.numerics import apply_numerics
from search.model.removal import Removal
from search.model.surgery import decoder_layers, layers_removed
from tests.conftest import VOCAB, tiny_model


def plain_perplexity(model, windows, bos_id=None) -> float:
    configure(model, fused_head=False)
    try:
        return perplexity(model, windows, bos_id)
    finally:
        configure(model, fused_head=None)  # probe again on next use


def test_chunked_head_nll_equals_full_logits(family):
    model = tiny_model(family)
    inputs = torch.randint(0, VOCAB, (3, 101))  # 300 targets: several chunks and a ragged last one
    with torch.inference_mode():
        hidden = model.base_model(input_ids=inputs).last_hidden_state
        logits = model(input_ids=inputs).logits
    fused, count = head_nll(model.get_output_embeddings(), hidden, inputs)
    plain, plain_count = logits_nll(logits, inputs)
    assert count == plain_count == 300
    assert math.isclose(fused.item(), plain.item(), rel_tol=1e-6)  # sums left on the device, unread


def test_a_float64_model_is_measured_in_float64(family):
    """Not through a float32 head: one ulp of a float32 batch sum is 1e-7 of it, so devices (or
    placements) whose last bits differ would differ by that much (seen on a GPU split with the CPU)."""
    model = tiny_model(family).double()
    windows = torch.randint(0, VOCAB, (4, 40))
    with torch.inference_mode():
        logits = model(input_ids=windows).logits[:, :-1]
    exact = F.cross_entropy(logits.reshape(-1, VOCAB), windows[:, 1:].reshape(-1), reduction="sum").item()
    expected = math.exp(exact / windows[:, 1:].numel())
    assert math.isclose(perplexity(model, windows), expected, rel_tol=1e-12)  # the fused head
    assert math.isclose(plain_perplexity(model, windows), expected, rel_tol=1e-12)


def test_plain_models_take_the_fused_head(family):
    model = tiny_model(family)
    windows = torch.randint(0, VOCAB, (5, 40))
    fused = perplexity(model, windows, bos_id=1)
    assert settings(model).fused_head is True
    assert math.isclose(fused, plain_perplexity(model, windows, bos_id=1), rel_tol=1e-6)


def test_a_model_that_post_processes_logits_keeps_its_own_path():
    model = tiny_model("llama")
    own_forward = model.forward

    def doubled(*args, **kwargs):  # a family whose forward changes logits after the head
        out = own_forward(*args, **kwargs)
        out.logits = out.logits * 2
        return out

    model.forward = doubled
    windows = torch.randint(0, VOCAB, (4, 24))
    value = perplexity(model, windows)
    assert settings(model).fused_head is False
    with torch.inference_mode():
        expected = math.exp(logits_nll(model(input_ids=windows).logits, windows)[0].item() / (4 * 23))
    assert math.isclose(value, expected, rel_tol=1e-6)


def test_soft_capping_config_is_never_fused():
    model = tiny_model("llama")
    model.config.final_logit_softcapping = 30.0
    perplexity(model, torch.randint(0, VOCAB, (2, 12)))
    assert settings(model).fused_head is False


def test_mixed_numerics_apply_to_the_fused_head():
    model = apply_numerics(tiny_model("llama"), "bf16-mixed")
    windows = torch.randint(0, VOCAB, (4, 64))
    mixed = perplexity(model, windows)
    assert settings(model).fused_head is True
    exact = perplexity(tiny_model("llama"), windows)
    assert mixed != exact  # bf16 products really ran
    assert math.isclose(mixed, plain_perplexity(model, windows), rel_tol=1e-3)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++ compiler")
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_compiled_layers_give_the_eager_result(family):
    model = tiny_model(family, layers=6)
    windows = torch.randint(0, VOCAB, (6, 33))
    eager = perplexity(model, windows, bos_id=1, batch_size=4)
    eager_pruned = {}
    for removed in ([0], [2, 3], [1, 5]):
        with layers_removed(model, removed):
            eager_pruned[tuple(removed)] = perplexity(model, windows, bos_id=1, batch_size=4)
    configure(model, compile=True)
    assert math.isclose(perplexity(model, windows, bos_id=1, batch_size=4), eager, rel_tol=1e-5)
    cache = build_prefix_cache(model, windows, bos_id=1, batch_size=4)
    for removed, expected in eager_pruned.items():
        assert math.isclose(cache.perplexity(Removal.of(removed)), expected, rel_tol=1e-5)
    assert settings(model).compile is True  # nothing fell back to eager
    assert all("forward" not in vars(layer) for layer in decoder_layers(model))  # eager again outside passes


def test_other_errors_are_not_taken_for_compile_failures(monkeypatch):
    def failing(fn):
        def call(*args, **kwargs):
            raise ValueError("a real bug")

        return call

    monkeypatch.setattr(forward.torch, "compile", failing)
    model = configure(tiny_model("llama"), compile=True)
    with pytest.raises(ValueError, match="a real bug"):
        perplexity(model, torch.randint(0, VOCAB, (2, 12)))
    assert settings(model).compile is True
    assert all("forward" not in vars(layer) for layer in decoder_layers(model))


def test_a_compile_failure_falls_back_to_eager(monkeypatch, caplog):
    made = []

    def broken(fn):  # layers 0 and 1 "compile"; layer 2 fails, after the cache's hooks saw its input
        made.append(fn)
        works = len(made) <= 2

        def call(*args, **kwargs):
            if works:
                return fn(*args, **kwargs)
            raise TorchDynamoException("no C++ compiler found")

        return call

    monkeypatch.setattr(forward.torch, "compile", broken)
    model = tiny_model("llama")
    windows = torch.randint(0, VOCAB, (6, 20))  # two batches of 4
    eager = perplexity(model, windows)
    with layers_removed(model, [1, 4]):
        eager_pruned = perplexity(model, windows)
    configure(model, compile=True)
    with caplog.at_level(logging.WARNING, logger="search"):
        # Fails inside the first batch, after the cache's hooks stored some of its layer inputs.
        cache = build_prefix_cache(model, windows)
    assert "compiled decoder layers failed (no C++ compiler found)" in caplog.text
    assert settings(model).compile is False
    assert all(len(states) == 2 for states in cache.states.values())  # the re-run batch is stored once
    assert cache.base_ppl == eager and cache.perplexity(Removal.of([1, 4])) == eager_pruned
    assert all("forward" not in vars(layer) for layer in decoder_layers(model))


@pytest.mark.parametrize("device, ahead", [("cpu", 0), ("cuda", 1)])
def test_batch_sums_are_read_one_batch_late_only_on_cuda(device, ahead):
    """On CUDA the next batch is queued before a sum is read (no idle GPU per batch); a CPU reads at once,
    so an early rejection there runs no batch past it."""
    made = []

    def batches():
        for index in range(4):
            made.append(index)
            yield torch.tensor(float(index), dtype=torch.float64), 10

    seen = []
    for value, count in on_host(batches(), device):
        assert isinstance(value, float) and count == 10
        seen.append(value)
        assert len(made) == min(4, len(seen) + ahead)  # how many batches were launched by now
        if value == 1.0:
            break  # a rejection after the second batch
    assert seen == [0.0, 1.0] and made == list(range(2 + ahead))
