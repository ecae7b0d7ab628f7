"""Latency of pruned shapes on any device, and a KV-cache check there: validates the timing path.

    python benchmarks/latency_shapes.py                         # embedded SmolLM2 on CPU
    python benchmarks/latency_shapes.py --device cuda --random-init --tokens 512

`--random-init` builds a model with SmolLM2-135M's exact shapes and random weights: latency
depends on the arithmetic, not the weights, so a machine without the embedded model (a GPU box)
can still time it. Prints one JSON object: for k = 0..--max-removed layers removed, the median
forward time and the ratio to the unpruned model, all variants timed round-robin in one process.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluators.latency import measure_latencies  # noqa: E402
from search.model.removal import Removal  # noqa: E402
from search.model.surgery import (  # noqa: E402
    KV_CACHE_TOLERANCE,
    KV_CACHE_TOLERANCE_REDUCED,
    kv_cache_divergence,
    layers_removed,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def smollm2_shaped(dtype: torch.dtype, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    parser.add_argument("--tokens", type=int, default=128, help="input length of the timed forward pass")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--max-removed", type=int, default=4)
    parser.add_argument("--random-init", action="store_true", help="SmolLM2-135M shapes with random weights")
    args = parser.parse_args()

    started = time.perf_counter()
    if args.random_init:
        model, name = smollm2_shaped(DTYPES[args.dtype], args.device), "SmolLM2-135M shapes (random weights)"
    else:
        from search.model.loading import load_model

        model, name = load_model(None, args.dtype, args.device).model, "SmolLM2-135M-Instruct"
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.tokens), device=args.device)
    # Remove from the middle, as the searches do; which layers does not change the arithmetic.
    sets = [list(range(15, 15 + k)) for k in range(1, args.max_removed + 1)]
    timed = measure_latencies(model, [Removal.of(s) for s in sets], ids, warmup=2, repeats=args.repeats)
    with layers_removed(model, sets[-1]):
        divergence = kv_cache_divergence(model, ids[:1, :8], new_tokens=16)
    bound = KV_CACHE_TOLERANCE if DTYPES[args.dtype] == torch.float32 else KV_CACHE_TOLERANCE_REDUCED
    print(
        json.dumps(
            {
                "model": name,
                "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
                "dtype": args.dtype,
                "input": [args.batch, args.tokens],
                "repeats": args.repeats,
                "baseline_ms": timed[0].baseline_ms,
                "rows": [
                    {
                        "removed_layers": len(s),
                        "layers": 30 - len(s),
                        "latency_ms": t.candidate_ms,
                        "latency_ratio": t.ratio,
                        "layer_fraction": (30 - len(s)) / 30,
                    }
                    for s, t in zip(sets, timed)
                ],
                "kv_cache_generation_match_after_removal": divergence <= bound,
                "kv_cache_max_rel_diff_after_removal": divergence,
                "wall_s": time.perf_counter() - started,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
