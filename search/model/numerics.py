"""Numerics a model runs with: the dtypes on offer, mixed precision, and `--dtype auto`.

`--dtype auto` picks the compute dtype by measuring this machine, not by assuming it.

Reduced precision only pays where the hardware runs it natively: on a CPU with bf16 units
(AVX512-BF16, AMX) bfloat16 matrix products are much faster than float32, on one without them
PyTorch emulates bf16 and they are much *slower* (docs/method.md, "What a trial costs"). So `auto` times
a matrix product of the model's width in float32 and under bf16 autocast, interleaved, and takes
`bf16-mixed` only when it is clearly faster; otherwise float32, which is also exact. A study
records the resolved dtype, and resuming with `auto` keeps it.
"""

from __future__ import annotations

import statistics
import time
from typing import cast

import torch

from search.registry import Registry

AUTO = "auto"
# Weight dtypes. "bf16-mixed" keeps float32 weights and residual stream and runs matrix products in
# bfloat16 (torch.autocast): about as fast as bfloat16 weights where the CPU has bf16 units, and
# closer to float32, because the weights themselves are not rounded (benchmarks/eval_cost.py).
DTYPES: Registry[torch.dtype] = Registry("dtype")
DTYPES.add("bf16-mixed", torch.float32, "float32 weights, bf16 matrix products (autocast)")
DTYPES.add("bfloat16", torch.bfloat16, "bfloat16 weights")
DTYPES.add("float32", torch.float32, "exact")
DTYPES.add("float16", torch.float16, "float16 weights (GPU)")
AUTOCAST = {"bf16-mixed": torch.bfloat16}
CANDIDATE = "bf16-mixed"
MIN_SPEEDUP = 1.3  # below this, float32's exactness is worth more than the time saved
REPEATS = 5


def _time_product(a: torch.Tensor, b: torch.Tensor, autocast: bool) -> float:
    with torch.inference_mode(), torch.autocast(a.device.type, dtype=torch.bfloat16, enabled=autocast):
        start = time.perf_counter()
        for _ in range(2):
            a @ b
        if a.device.type == "cuda":
            torch.cuda.synchronize(a.device)
        return time.perf_counter() - start


def bf16_speedup(device: str | torch.device = "cpu", width: int = 1024, tokens: int = 256) -> float:
    """float32 time over bf16-autocast time for a [tokens, width] x [width, 4*width] product (median)."""
    device = torch.device(device)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(tokens, width, generator=generator).to(device)
    b = torch.randn(width, 4 * width, generator=generator).to(device)
    _time_product(a, b, False), _time_product(a, b, True)  # warm-up: kernels, caches, clocks
    fp32, bf16 = [], []
    for _ in range(REPEATS):  # interleaved, so a slow moment hits both alike
        fp32.append(_time_product(a, b, False))
        bf16.append(_time_product(a, b, True))
    return statistics.median(fp32) / statistics.median(bf16)


def choose(device: str | torch.device = "cpu", width: int = 1024) -> tuple[str, str]:
    """The dtype `auto` resolves to on `device`, and why (for the log)."""
    speedup = bf16_speedup(device, width)
    reason = f"bf16 matrix products measured {speedup:.2f}x the speed of float32 on this {torch.device(device).type}"
    return (CANDIDATE if speedup >= MIN_SPEEDUP else "float32"), reason


def apply_numerics(model: torch.nn.Module, dtype: str) -> torch.nn.Module:
    """For a mixed dtype, run every forward pass of the (float32) model under autocast.

    The model remembers it (`mixed_precision`), so code that calls its body and head directly,
    as the perplexity evaluators do, runs under the same autocast.
    """
    setattr(model, "search_autocast", AUTOCAST.get(dtype))  # not a tensor or module: nn.Module's stubs refuse it
    if dtype in AUTOCAST:
        device = cast(torch.device, model.device)  # a transformers model's device (nn.Module has none)
        model.forward = torch.autocast(device_type=device.type, dtype=AUTOCAST[dtype])(model.forward)
    return model


def mixed_precision(model: torch.nn.Module) -> torch.dtype | None:
    """The autocast dtype `apply_numerics` gave this model (None: it runs in its weights' dtype)."""
    return getattr(model, "search_autocast", None)
