"""`--dtype auto`: pick the compute dtype by measuring this machine, not by assuming it.

Reduced precision only pays where the hardware runs it natively. On a CPU with bf16 units
(AVX512-BF16, AMX) bfloat16 matrix products are about 2.2x faster than float32; on one without
them, PyTorch emulates bf16 and the same products are about 4x *slower* (both measured on this
project's CI-class machines). So `auto` times a matrix product of the model's width in float32 and
under bf16 autocast, interleaved, and takes `bf16-mixed` only when it is clearly faster; otherwise
float32, which is also exact. A study records the resolved dtype, and resuming with `auto` keeps it.
"""

from __future__ import annotations

import statistics
import time

import torch

AUTO = "auto"
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
