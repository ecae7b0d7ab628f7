"""How linear healing is fitted, decided by measurement: sequential vs parallel runs, ridge strength.

    python benchmarks/healing_fit.py                       # default model and corpus, float32
    python benchmarks/healing_fit.py --ridge 1e-3 1e-2 1e-1 --sets 14,16,17,18 24,25,26,27

For each removal set: held-out and second-corpus (Wikipedia sample) ratios unhealed, then healed
with each fitting variant, and the seconds the fit took (the one-off collection of fitting
activations excluded). Calibration windows are not used here, so nothing reported is fitted on.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluators.data import eval_windows, make_splits  # noqa: E402
from evaluators.healing import DEFAULT_RIDGE  # noqa: E402
from evaluators.latency import layer_kinds  # noqa: E402
from evaluators.wiki import ENWIKI_SAMPLE  # noqa: E402
from search.evaluator import Evaluator  # noqa: E402
from search.model.loading import load_model  # noqa: E402
from search.model.removal import Removal  # noqa: E402

SETS = ["14,16,17,18", "14,15,17,19", "16,17,18", "12,13,14,15", "24,25,26,27"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--heal-tokens", type=int, default=32768)
    parser.add_argument("--ridge", type=float, nargs="+", default=[DEFAULT_RIDGE])
    parser.add_argument("--sets", nargs="+", default=SETS, help="comma-separated removal sets")
    args = parser.parse_args()
    loaded = load_model(args.model, args.dtype, "cpu", False)
    splits = make_splits(loaded.tokenizer, None, 4096, 8192, 512, args.heal_tokens)
    splits = replace(splits, eval=eval_windows(loaded.tokenizer, ENWIKI_SAMPLE, 8192, 512))
    evaluator = Evaluator(
        loaded.model, splits, torch.zeros(1, 8, dtype=torch.long), layer_kinds=layer_kinds(loaded.model), heal="linear"
    )
    base = evaluator.baseline()
    print(f"baseline ppl: held-out {base['test']:.3f}, Wikipedia {base['eval']:.3f} ({loaded.dtype})", flush=True)
    evaluator.healing(Removal())  # sums the fitting statistics once
    for text in args.sets:
        removed = [int(i) for i in text.split(",")]
        removal = Removal.of(removed)
        unhealed = [evaluator.ppl(removal, s, unhealed=True) / base[s] for s in ("test", "eval")]
        print(f"{removed} unhealed: held-out {unhealed[0]:.3f}, Wikipedia {unhealed[1]:.3f}", flush=True)
        one_run = max(removed) - min(removed) == len(removed) - 1
        for ridge in args.ridge:
            for sequential in (True,) if one_run else (True, False):
                evaluator.ridge, evaluator.sequential = ridge, sequential
                evaluator.clear_fits()
                started = time.perf_counter()
                evaluator.healing(removal)
                fit_s = time.perf_counter() - started
                healed = [evaluator.ppl(removal, s) / base[s] for s in ("test", "eval")]
                how = "sequential" if sequential else "parallel"
                print(
                    f"{removed} healed ({how}, ridge {ridge:g}): held-out {healed[0]:.3f}, "
                    f"Wikipedia {healed[1]:.3f}, fit {fit_s:.1f} s",
                    flush=True,
                )


if __name__ == "__main__":
    main()
