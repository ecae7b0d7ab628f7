"""What one trial's perplexity evaluation costs, naive versus the engine's evaluation path.

    python benchmarks/eval_cost.py --json            # embedded SmolLM2, embedded corpus, CPU

A fixed list of random removal sets of 1-4 layers (fixed seed) is evaluated three ways in one
process, the order rotating from set to set so no method always runs first:

- naive:   the pruned model's plain full forward pass (full logits, then cross-entropy), float32;
- cached:  the same from the prefix hidden-state cache (evaluators/prefix.py), float32;
- default: the engine's default evaluation: prefix cache and fused LM head + NLL
  (evaluators/forward.py), in --dtype (`auto` unless overridden, which measures this machine and
  resolves to bf16-mixed or float32: see search/model/numerics.py); with --compile also compiled decoder
  layers, compiled in the default cache's build pass (reported on its own), not inside `default_s`.

`flop_ratio` is the arithmetic the cached path must still do over what the naive one does for the
list (decoder layers actually run, plus embedding, final norm and LM head): the best the prefix
cache could possibly reach. The cache-building pass is the unpruned model's own perplexity pass,
which a study needs anyway for its ratios; its time is reported as `cache_build_s` on its own.
Ratios are each method's perplexity over its own unpruned perplexity, as the search ranks them.
Also times the layer-sensitivity criteria on the --sensitivity-tokens windows: one pass for angular
distance and Block Influence together, versus removal perplexity for every layer (cached and not).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluators.data import make_splits  # noqa: E402
from evaluators.forward import configure, settings  # noqa: E402
from evaluators.perplexity import perplexity  # noqa: E402
from evaluators.prefix import build_prefix_cache  # noqa: E402
from evaluators.sensitivity import removal_sensitivity, similarity  # noqa: E402
from search.model.loading import load_model  # noqa: E402
from search.model.removal import Removal  # noqa: E402
from search.model.surgery import decoder_layers, layer_param_counts, layers_removed  # noqa: E402
from search.study import RunConfig  # noqa: E402


def random_sets(n_layers: int, count: int, seed: int) -> list[tuple[int, ...]]:
    rng = random.Random(seed)
    sets: list[tuple[int, ...]] = []
    while len(sets) < count:
        drawn = tuple(sorted(rng.sample(range(n_layers), rng.randint(1, 4))))
        if drawn not in sets:
            sets.append(drawn)
    return sets


def per_token_flops(model, seq: int) -> tuple[list[float], float]:
    """Multiply-adds x2 per token: each decoder layer's, and the rest (embedding, final norm, LM head)."""
    config = model.config
    hidden, vocab = config.hidden_size, config.vocab_size
    attention = 4 * hidden * (seq + 1) / 2  # QK^T and AV over the causal context, on average
    layers = [2 * params + attention for params in layer_param_counts(model)]
    return layers, 2 * hidden * vocab + 2 * hidden  # LM head; embedding lookup and norm are ~free


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def main() -> None:
    d = RunConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model spec (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--dataset", help="dataset spec (default: embedded corpus)")
    parser.add_argument("--calib-tokens", type=int, default=d.calib_tokens)
    parser.add_argument("--sensitivity-tokens", type=int, default=d.sensitivity_tokens)
    parser.add_argument("--seq-len", type=int, default=d.seq_len)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--dtype", default=d.dtype, help=f"the default configuration's dtype (default: {d.dtype})")
    parser.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=d.compile, help="the default's compiled layers"
    )
    parser.add_argument("--sets", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    args = parser.parse_args()
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr))

    exact = load_model(args.model, "float32")
    configure(exact.model, fused_head=False)  # naive and cached: the model's own logits path
    fast = load_model(args.model, args.dtype)  # `auto` measures here
    configure(fast.model, compile=args.compile)
    splits = make_splits(exact.tokenizer, args.dataset, args.calib_tokens, 1, args.seq_len)
    windows, bos = splits.calib, splits.bos_id
    n_layers = len(decoder_layers(exact.model))
    sets = random_sets(n_layers, args.sets, args.seed)

    # Baseline passes, which also build the prefix caches.
    naive_base, naive_base_s = timed(lambda: perplexity(exact.model, windows, bos, args.batch_size))
    cached, cache_build_s = timed(lambda: build_prefix_cache(exact.model, windows, bos, args.batch_size))
    default, default_build_s = timed(lambda: build_prefix_cache(fast.model, windows, bos, args.batch_size))

    def naive(removal: Removal):
        with layers_removed(exact.model, removal.layers):
            return perplexity(exact.model, windows, bos, args.batch_size)

    methods = {"naive": naive, "cached": cached.perplexity, "default": default.perplexity}
    seconds = dict.fromkeys(methods, 0.0)
    rows = []
    for n, removed in enumerate(sets):
        removal = Removal.of(removed)
        names = list(methods)
        names = names[n % 3 :] + names[: n % 3]  # rotate the order
        ppl = {}
        for name in names:
            ppl[name], spent = timed(lambda name=name: methods[name](removal))
            seconds[name] += spent
        rows.append({"removed_layers": list(removed), **ppl})
        rows[-1]["ratio_naive"] = ppl["naive"] / naive_base
        rows[-1]["ratio_default"] = ppl["default"] / default.base_ppl
        say(f"{list(removed)}: " + ", ".join(f"{k} {v:.4f}" for k, v in ppl.items()))

    layer_flops, other_flops = per_token_flops(exact.model, windows.shape[1])
    naive_flops = sum(other_flops + sum(f for i, f in enumerate(layer_flops) if i not in r) for r in sets)
    cached_flops = 0.0
    for removed in sets:
        start = cached.start(Removal.of(removed)) or 0
        cached_flops += other_flops + sum(f for i, f in enumerate(layer_flops) if i >= start and i not in removed)

    def ratio_diff(row):
        naive_ratio = row["naive"] / naive_base
        return abs(row["default"] / default.base_ppl - naive_ratio) / naive_ratio

    n_sens = max(1, min(len(windows), args.sensitivity_tokens // args.seq_len))
    sens = windows[:n_sens]
    model = fast.model
    _, one_pass_s = timed(lambda: similarity(model, sens, Removal(), bos, args.batch_size, max_block=4))
    singles = [Removal.of([layer]) for layer in range(n_layers)]
    _, removal_s = timed(lambda: removal_sensitivity(model, sens, singles, Removal(), bos, args.batch_size))

    def uncached_removal():
        base = perplexity(model, sens, bos, args.batch_size)
        for layer in range(n_layers):
            with layers_removed(model, [layer]):
                perplexity(model, sens, bos, args.batch_size) / base

    _, removal_uncached_s = timed(uncached_removal)

    result = {
        "model": exact.source,
        "sets": len(sets),
        "calib_tokens": int(windows.numel()),
        "default_dtype": fast.dtype,
        "default_compiled": settings(fast.model).compile,  # False if compiling failed and it fell back
        "default_fused_head": settings(fast.model).fused_head,
        "naive_s": seconds["naive"],
        "cached_s": seconds["cached"],
        "cached_over_naive": seconds["cached"] / seconds["naive"],
        "flop_ratio": cached_flops / naive_flops,
        "max_rel_ppl_diff": max(abs(r["cached"] - r["naive"]) / r["naive"] for r in rows),
        "default_s": seconds["default"],
        "default_over_naive": seconds["default"] / seconds["naive"],
        "default_max_rel_ratio_diff": max(ratio_diff(r) for r in rows),
        "default_max_rel_ppl_diff": max(abs(r["default"] - r["naive"]) / r["naive"] for r in rows),
        "naive_base_ppl": naive_base,
        "default_base_ppl": default.base_ppl,
        "cache_build_s": cache_build_s,
        "default_cache_build_s": default_build_s,
        "naive_baseline_s": naive_base_s,
        "sensitivity_tokens": int(sens.numel()),
        "sensitivity_one_pass_s": one_pass_s,
        "sensitivity_removal_s": removal_s,
        "sensitivity_removal_uncached_s": removal_uncached_s,
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
    }
    print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
