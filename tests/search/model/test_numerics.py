import math

import pytest
import torch

import search.model.numerics
from search.model.loading import load_model
from search.model.numerics import MIN_SPEEDUP, bf16_speedup, choose, decide
from tests.conftest import VOCAB


def measured(speedup: float, bf16_weights: float | None = None):
    """A stand-in for product_seconds: float32 takes 1 s, autocast 1/speedup, bfloat16 weights 1/bf16_weights."""
    seconds = {"float32": 1.0, "bf16-mixed": 1.0 / speedup}
    if bf16_weights is not None:
        seconds["bfloat16"] = 1.0 / bf16_weights
    return lambda device, width, tokens: seconds


def test_speedup_is_a_measured_positive_ratio():
    speedup = bf16_speedup("cpu", width=64, tokens=32)
    assert math.isfinite(speedup) and speedup > 0


@pytest.mark.parametrize("bf16_product_s, products", [(5.0, 1), (0.004, 1 + 2 * search.model.numerics.REPEATS)])
def test_a_cpu_emulating_bf16_is_decided_by_its_first_product(monkeypatch, bf16_product_s, products):
    """Emulated bf16 (seconds per product on some CPUs) is not timed again and again: minutes at every start."""
    calls = []

    def timed(a, b, autocast, products=2):
        calls.extend([autocast] * products)
        return products * (bf16_product_s if autocast else 0.01)

    monkeypatch.setattr(search.model.numerics, "_time_product", timed)
    seconds = search.model.numerics.product_seconds("cpu")
    assert calls.count(True) == products
    assert search.model.numerics.decide(seconds) == ("float32" if bf16_product_s > 0.01 else "bf16-mixed")


@pytest.mark.parametrize("speedup, expected", [(0.27, "float32"), (1.1, "float32"), (2.2, "bf16-mixed")])
def test_auto_takes_bf16_only_where_it_is_clearly_faster(monkeypatch, speedup, expected):
    monkeypatch.setattr(search.model.numerics, "product_seconds", measured(speedup))
    dtype, reason = choose("cpu")
    assert dtype == expected
    assert f"{speedup:.2f}x" in reason
    assert (expected == "bf16-mixed") == (speedup >= MIN_SPEEDUP)


@pytest.mark.parametrize("speedup", [0.3, 2.0])
def test_auto_loads_float32_weights_and_applies_what_it_chose(tiny_model_dir, monkeypatch, speedup):
    monkeypatch.setattr(search.model.numerics, "product_seconds", measured(speedup))
    loaded = load_model(str(tiny_model_dir), "auto")
    assert loaded.dtype == ("bf16-mixed" if speedup >= MIN_SPEEDUP else "float32")
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    with torch.no_grad():
        logits = loaded.model(input_ids=torch.randint(3, VOCAB, (1, 8))).logits
    assert logits.dtype == (torch.bfloat16 if loaded.dtype == "bf16-mixed" else torch.float32)


@pytest.mark.parametrize(
    "autocast, weights, expected",
    [(3.0, 3.2, "bf16-mixed"), (3.0, 8.0, "bfloat16"), (1.1, 1.2, "float32"), (1.1, 2.0, "bfloat16")],
)
def test_a_gpu_weighs_bfloat16_weights_too(autocast, weights, expected):
    # bfloat16 weights round the model, so they must beat autocast clearly, not just float32.
    assert decide(measured(autocast, weights)(None, None, None)) == expected


def test_auto_choosing_bfloat16_loads_bfloat16_weights_and_keeps_the_buffers(tiny_model_dir, monkeypatch):
    """Decided from the config before loading: the model never exists in float32 (an 8B one: 32 GB)."""
    import search.model.loading as loading

    widths, loads = [], []
    timing = measured(3.0, 8.0)
    monkeypatch.setattr(
        search.model.numerics, "product_seconds", lambda d, w, tokens: widths.append(w) or timing(d, w, tokens)
    )
    real = loading._from_pretrained
    monkeypatch.setattr(loading, "_from_pretrained", lambda *a, **kw: loads.append(kw["dtype"]) or real(*a, **kw))
    loaded = load_model(str(tiny_model_dir), "auto")
    assert loaded.dtype == "bfloat16" and loads == [torch.bfloat16]
    assert widths == [loaded.model.config.hidden_size]
    assert all(p.dtype == torch.bfloat16 for p in loaded.model.parameters())
    assert loaded.model.model.rotary_emb.inv_freq.dtype == torch.float32  # as from_pretrained(dtype=bfloat16)
    reference = load_model(str(tiny_model_dir), "bfloat16").model
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.parameters(), reference.parameters()))
