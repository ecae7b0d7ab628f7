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

import contextlib
import statistics
import time
from collections.abc import Iterator

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
# Every `from_pretrained` of a model passes this. With the `kernels` package installed, transformers swaps
# some functions (rotary embeddings on CUDA) for kernels it fetches from the hub, at load and again on each
# train()/eval() switch: code downloaded at run time, an error offline (LoRA's train() on a GPU), and
# arithmetic other than the one the study measured. The stock PyTorch code runs instead.
STOCK_KERNELS = {"use_kernels": False}
CANDIDATE = "bf16-mixed"
MIN_SPEEDUP = 1.3  # below this, float32's exactness is worth more than the time saved
REPEATS = 5
# One bf16 product (its first, warm-up included) this many times a float32 one, plus SLACK_S, is emulated.
EMULATED = 4
SLACK_S = 0.25


def _time_product(a: torch.Tensor, b: torch.Tensor, autocast: bool, products: int = 2) -> float:
    with torch.inference_mode(), torch.autocast(a.device.type, dtype=torch.bfloat16, enabled=autocast):
        _sync(a.device)
        start = time.perf_counter()
        for _ in range(products):
            a @ b
        _sync(a.device)
        return time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def product_seconds(device: str | torch.device = "cpu", width: int = 1024, tokens: int = 256) -> dict[str, float]:
    """Median seconds of a [tokens, width] x [width, 4*width] product per numerics, interleaved: float32,
    bf16 autocast on float32 weights, and (on a GPU) bfloat16 weights. On a CPU whose first bf16 product
    is clearly slower than float32 (emulated), that product alone stands for bf16."""
    device = torch.device(device)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(tokens, width, generator=generator).to(device)
    b = torch.randn(width, 4 * width, generator=generator).to(device)
    variants = {"float32": (a, b, False), CANDIDATE: (a, b, True)}
    if device.type == "cuda":
        variants["bfloat16"] = (a.bfloat16(), b.bfloat16(), False)
    _time_product(*variants["float32"])  # warm-up: kernels, caches, clocks
    first = _time_product(*variants[CANDIDATE], products=1)  # autocast's warm-up
    if device.type == "cpu":
        # A CPU without bf16 units emulates it at a few per cent of float32's speed (one product can take
        # seconds): a first product that clearly cannot be faster decides, instead of minutes of repeats.
        fp32 = _time_product(*variants["float32"])
        if first > EMULATED * fp32 / 2 + SLACK_S:
            return {"float32": fp32, CANDIDATE: 2 * first}
    if "bfloat16" in variants:
        _time_product(*variants["bfloat16"])  # warm-up
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(REPEATS):  # interleaved, so a slow moment hits all alike
        for name, args in variants.items():
            times[name].append(_time_product(*args))
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def bf16_speedup(device: str | torch.device = "cpu", width: int = 1024, tokens: int = 256) -> float:
    """float32 time over bf16-autocast time for a [tokens, width] x [width, 4*width] product (median)."""
    seconds = product_seconds(device, width, tokens)
    return seconds["float32"] / seconds[CANDIDATE]


def decide(seconds: dict[str, float]) -> str:
    """float32 unless reduced precision is clearly faster (MIN_SPEEDUP); bfloat16 weights only where
    they are clearly faster than autocast too (a GPU, where autocast casts every weight on every product)."""
    fp32, mixed, bf16 = seconds["float32"], seconds[CANDIDATE], seconds.get("bfloat16")
    if bf16 is not None and fp32 / bf16 >= MIN_SPEEDUP and mixed / bf16 >= MIN_SPEEDUP:
        return "bfloat16"
    return CANDIDATE if fp32 / mixed >= MIN_SPEEDUP else "float32"


def choose(device: str | torch.device = "cpu", width: int = 1024) -> tuple[str, str]:
    """The dtype `auto` resolves to on `device`, and why (for the log). A GPU gets products big enough to
    time (a CPU's 256 tokens take microseconds there) and also weighs bfloat16 weights."""
    device = torch.device(device)
    seconds = product_seconds(device, width, tokens=4096 if device.type == "cuda" else 256)
    speeds = ", ".join(f"{name} {seconds['float32'] / s:.2f}x" for name, s in seconds.items() if name != "float32")
    return decide(seconds), f"matrix products measured against float32 on this {device.type}: {speeds}"


def apply_numerics(model: torch.nn.Module, dtype: str) -> torch.nn.Module:
    """For a mixed dtype, run every forward pass of the (float32) model under autocast.

    The model remembers it (`mixed_precision`), so code that calls its body and head directly,
    as the perplexity evaluators do, runs under the same autocast.
    """
    setattr(model, "search_autocast", AUTOCAST.get(dtype))  # not a tensor or module: nn.Module's stubs refuse it
    if dtype in AUTOCAST:
        forward = model.forward
        for device_type in device_types(model):
            forward = torch.autocast(device_type=device_type, dtype=AUTOCAST[dtype])(forward)
        model.forward = forward
    return model


def mixed_precision(model: torch.nn.Module) -> torch.dtype | None:
    """The autocast dtype `apply_numerics` gave this model (None: it runs in its weights' dtype)."""
    return getattr(model, "search_autocast", None)


@contextlib.contextmanager
def autocast(model: torch.nn.Module) -> Iterator[None]:
    """The autocast the model's evaluation runs under (none for a single dtype): one per device type it
    computes on, since autocast is per type (`--device-map cuda:0,cpu` needs the CPU's too)."""
    dtype = mixed_precision(model)
    with contextlib.ExitStack() as stack:
        for device_type in device_types(model) if dtype is not None else []:
            stack.enter_context(torch.autocast(device_type, dtype=dtype))
        yield


def device_types(model: torch.nn.Module) -> list[str]:
    """The device types of the model's weights, sorted (one for a model on one device)."""
    return sorted({param.device.type for param in model.parameters()})
