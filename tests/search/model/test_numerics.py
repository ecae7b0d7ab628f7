import math

import pytest
import torch

import search.model.numerics
from search.model.loading import load_model
from search.model.numerics import MIN_SPEEDUP, bf16_speedup, choose
from tests.conftest import VOCAB


def test_speedup_is_a_measured_positive_ratio():
    speedup = bf16_speedup("cpu", width=64, tokens=32)
    assert math.isfinite(speedup) and speedup > 0


@pytest.mark.parametrize("speedup, expected", [(0.27, "float32"), (1.1, "float32"), (2.2, "bf16-mixed")])
def test_auto_takes_bf16_only_where_it_is_clearly_faster(monkeypatch, speedup, expected):
    monkeypatch.setattr(search.model.numerics, "bf16_speedup", lambda device, width: speedup)
    dtype, reason = choose("cpu")
    assert dtype == expected
    assert f"{speedup:.2f}x" in reason
    assert (expected == "bf16-mixed") == (speedup >= MIN_SPEEDUP)


@pytest.mark.parametrize("speedup", [0.3, 2.0])
def test_auto_loads_float32_weights_and_applies_what_it_chose(tiny_model_dir, monkeypatch, speedup):
    monkeypatch.setattr(search.model.numerics, "bf16_speedup", lambda device, width: speedup)
    loaded = load_model(str(tiny_model_dir), "auto")
    assert loaded.dtype == ("bf16-mixed" if speedup >= MIN_SPEEDUP else "float32")
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    with torch.no_grad():
        logits = loaded.model(input_ids=torch.randint(3, VOCAB, (1, 8))).logits
    assert logits.dtype == (torch.bfloat16 if loaded.dtype == "bf16-mixed" else torch.float32)
