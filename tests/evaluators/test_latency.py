import pytest
import torch

from evaluators.latency import latency_input, measure_latencies, measure_latency, time_forward
from search.model.removal import Removal
from search.model.surgery import decoder_layers
from tests.conftest import VOCAB, tiny_model


def test_measure_latency_interleaves_and_restores(family):
    model = tiny_model(family)
    ids = latency_input(torch.randint(0, VOCAB, (2, 32)), 24, torch.device("cpu"))
    assert ids.shape == (1, 24)
    result = measure_latency(model, Removal.of([1, 2, 3]), ids, warmup=1, repeats=3)
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
    results = measure_latencies(model, [Removal.of(s) for s in ([0], [0, 1], [2, 3, 4])], ids, warmup=1, repeats=3)
    assert len(results) == 3
    assert len({r.baseline_ms for r in results}) == 1  # one shared baseline
    assert all(r.candidate_ms > 0 for r in results)
    assert len(decoder_layers(model)) == 6


def test_additive_fit_recovers_per_layer_cost_and_orders_noisy_ratios():
    from evaluators.latency import fit_additive

    # 10 ms fixed + 2 ms per layer, exactly: the fit gives the same ratios back.
    exact = [(10 + 2 * n) / 70 for n in (30, 29, 28, 27, 26)]
    assert fit_additive([[n] for n in (30, 29, 28, 27, 26)], exact) == pytest.approx(exact)
    # Medians seen on a loaded machine (27 kept layers timed slower than 28): the fit is monotone.
    noisy = [m / 259.9 for m in (259.9, 255.7, 250.1, 253.8, 228.7)]
    fitted = fit_additive([[30], [29], [28], [27], [26]], noisy)
    assert fitted[0] == 1.0 and all(a > b for a, b in zip(fitted, fitted[1:]))
    # Two kinds, one of which never changes: it belongs to the fixed part.
    assert fit_additive([[30, 2], [29, 2], [28, 2]], [1.0, 68 / 70, 66 / 70]) == pytest.approx([1.0, 68 / 70, 66 / 70])


def test_additive_fit_takes_a_kind_that_noise_makes_cheaper_than_free_as_free():
    from evaluators.latency import fit_additive

    # Kind a costs 1 % a block; kind b (a layer call with a block skipped) nothing, but its rows came
    # out a little faster: a negative cost would rank keeping more b above keeping fewer.
    counts = [[10, 10], [9, 10], [8, 9], [7, 9], [6, 8], [9, 9]]
    ratios = [1.0] + [1 - 0.01 * (10 - a) + 0.002 * (10 - b) for a, b in counts[1:]]
    fitted = fit_additive(counts, ratios)
    assert fitted is not None
    by_a = {a: f for (a, _), f in zip(counts, fitted)}
    assert fitted[1] == pytest.approx(fitted[5])  # the cost is a's alone: same a, same figure
    # Fitted again on a alone (least squares through the unpruned model), not a's first cost kept as it was.
    removed_a = [10 - a for a, _ in counts[1:]]
    cost = sum(r * (1 - y) for r, y in zip(removed_a, ratios[1:])) / sum(r * r for r in removed_a)
    assert fitted[1:] == pytest.approx([1 - cost * r for r in removed_a]) and cost != pytest.approx(0.01)
    assert all(by_a[a] > by_a[a - 1] for a in (10, 9, 8, 7))


def test_additive_fit_declines_what_it_cannot_smooth():
    from evaluators.latency import fit_additive

    assert fit_additive([[30], [29]], [1.0, 68 / 70]) is None  # as many unknowns as variants
    assert fit_additive([[30], [29], [28]], [1.0, 65 / 60, 70 / 60]) is None  # removing layers made it slower
    assert fit_additive([[4, 4], [3, 3], [2, 2], [1, 1]], [1.0, 0.9, 0.8, 0.7]) is None  # kinds not separable


def test_pairing_with_the_baseline_cancels_drift():
    from evaluators.latency import interleaved_timings

    # The machine slows by 1 ms per forward pass; one variant always takes half the time the unpruned
    # model takes at that moment, the other 80 %. A ratio of medians over a round would carry the drift.
    calls = []

    def clock(share: float):
        def run() -> float:
            calls.append(share)
            return share * (100 + len(calls))

        return run

    base, ratios = interleaved_timings(clock(1.0), [clock(0.5), clock(0.8)], warmup=1, repeats=4)
    assert ratios == pytest.approx([0.5, 0.8])
    assert len(calls) == 3 + 1 + 4 * 4  # warm-up, the first baseline, then each variant with one after it
    assert calls[3:8] == [1.0, 0.5, 1.0, 0.8, 1.0]  # the baseline between every two variants
    assert 100 < base < 125


def test_measure_latencies_with_layer_kinds_reports_fit_and_raw_medians(family):
    model = tiny_model(family)
    ids = torch.randint(0, VOCAB, (1, 64))
    sets = [Removal.of(s) for s in ([0], [0, 1], [0, 1, 2])]
    results = measure_latencies(model, sets, ids, warmup=1, repeats=5, layer_kinds=["a"] * 6)
    if results[0].measured_ms is None:  # the tiny model's timings came out non-additive: raw figures
        assert all(r.measured_baseline_ms is None for r in results)
        return
    ratios = [r.ratio for r in results]
    assert ratios[0] > ratios[1] > ratios[2]  # fitted: one layer fewer is always faster
    assert all(r.measured_ms > 0 and r.measured_baseline_ms > 0 for r in results)
    assert len(decoder_layers(model)) == 6
