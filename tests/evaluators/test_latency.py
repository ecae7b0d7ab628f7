import torch

from evaluators.latency import latency_input, measure_latencies, measure_latency, time_forward
from search.surgery import decoder_layers
from tests.conftest import VOCAB, tiny_model


def test_measure_latency_interleaves_and_restores(family):
    model = tiny_model(family)
    ids = latency_input(torch.randint(0, VOCAB, (2, 32)), 24, torch.device("cpu"))
    assert ids.shape == (1, 24)
    result = measure_latency(model, [1, 2, 3], ids, warmup=1, repeats=3)
    assert result.baseline_ms > 0 and result.candidate_ms > 0
    assert result.ratio == result.candidate_ms / result.baseline_ms
    assert len(decoder_layers(model)) == 6  # the model is whole again afterwards


def test_time_forward_is_wall_clock_ms(family):
    model = tiny_model(family)
    ms = time_forward(model, torch.randint(0, VOCAB, (1, 8)))
    assert 0 < ms < 10_000


def test_measure_latencies_times_every_variant_round_robin(family):
    model = tiny_model(family)
    ids = torch.randint(0, VOCAB, (1, 16))
    results = measure_latencies(model, [[0], [0, 1], [2, 3, 4]], ids, warmup=1, repeats=3)
    assert len(results) == 3
    assert len({r.baseline_ms for r in results}) == 1  # one shared baseline
    assert all(r.candidate_ms > 0 for r in results)
    assert len(decoder_layers(model)) == 6
