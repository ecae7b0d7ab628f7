"""Every removal set of k layers from a pool, on the calibration split; the best few also held out.

    python benchmarks/scan_sets.py --k 2 --json                    # pairs of layers 2-27 except 11
    python benchmarks/scan_sets.py --k 4 --pool 12-19 --calib-tokens 16384

The ground truth a search is judged against: whether any set beats the one a method found on
the split it optimises, and whether the two splits agree on the order of the best sets. Uses the
prefix cache (exact) in --dtype (default float32: exact figures). Slow by design (a benchmark).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluators.data import make_splits  # noqa: E402
from evaluators.prefix import build_prefix_cache  # noqa: E402
from search.model.loading import load_model  # noqa: E402
from search.model.removal import Removal  # noqa: E402
from search.study import RunConfig  # noqa: E402


def parse_pool(text: str) -> list[int]:
    layers: set[int] = set()
    try:
        for part in text.split(","):
            low, _, high = part.partition("-")
            layers.update(range(int(low), int(high or low) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a layer list such as 2-10,12-27") from None
    return sorted(layers)


def main() -> None:
    d = RunConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--dataset")
    parser.add_argument("--k", type=int, required=True, help="layers removed per set")
    parser.add_argument(
        "--pool", type=parse_pool, default="2-10,12-27", help="layers to draw from (default: %(default)s)"
    )
    parser.add_argument("--calib-tokens", type=int, default=d.calib_tokens)
    parser.add_argument("--test-tokens", type=int, default=d.test_tokens)
    parser.add_argument("--seq-len", type=int, default=d.seq_len)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--top", type=int, default=15, help="best sets also measured on the held-out split")
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    args = parser.parse_args()

    loaded = load_model(args.model, args.dtype)
    splits = make_splits(loaded.tokenizer, args.dataset, args.calib_tokens, args.test_tokens, args.seq_len)
    calib = build_prefix_cache(loaded.model, splits.calib, splits.bos_id, args.batch_size)
    started = time.perf_counter()
    ratios = {}
    for removed in itertools.combinations(args.pool, args.k):
        ratios[removed] = calib.perplexity(Removal.of(removed)) / calib.base_ppl
        if not args.json:
            print(f"{list(removed)} {ratios[removed]:.4f}", file=sys.stderr)
    scan_s = time.perf_counter() - started
    test = build_prefix_cache(loaded.model, splits.test, splits.bos_id, args.batch_size)
    best = sorted(ratios, key=ratios.get)[: args.top]
    rows = [
        {
            "removed_layers": list(r),
            "calib_ppl_ratio": ratios[r],
            "test_ppl_ratio": test.perplexity(Removal.of(r)) / test.base_ppl,
        }
        for r in best
    ]
    result = {
        "model": loaded.source,
        "dtype": loaded.dtype,
        "k": args.k,
        "pool": args.pool,
        "calib_tokens": int(splits.calib.numel()),
        "sets": len(ratios),
        "scan_s": scan_s,
        "best": rows,
        "all": {" ".join(map(str, r)): v for r, v in ratios.items()},
    }
    print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
