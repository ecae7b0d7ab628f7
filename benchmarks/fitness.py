"""Which calibration fitness predicts the held-out ratio: perplexity ratio or KL divergence, on 4096 or 16384 tokens.

    python benchmarks/fitness.py --stores sqlite:///a.db,sqlite:///b.db --json > benchmarks/results/fitness.json
    python benchmarks/fitness.py --random 40 --json        # random sets of 1-4 layers instead of a study's
    python benchmarks/fitness.py --render benchmarks/results/fitness.json
    python benchmarks/fitness.py --heal linear --stores sqlite:///h.db --per-size 4 --json   # healed candidates
    python benchmarks/fitness.py --heal linear --sets '14;17' --confirm-tokens 32768 --json  # given sets

The candidates are every removal set the given stores' studies measured (what a search actually
has to rank), or random sets. Each is measured in one process on the default model and corpus:
calibration windows 0..31 (16384 tokens; the first 8 are 4096 tokens, the default calibration
split) and held-out windows 32..47 (8192 tokens, disjoint from both). Per candidate, one pass over
the calibration windows gives its perplexity ratio and its KL divergence from the unpruned model
(coarsened to the unpruned model's top k tokens, evaluators/divergence.py) for several k, and the
full KL over the first 4096 tokens, which measures what keeping only k tokens loses.

With `--heal linear` each candidate is healed as a `--heal linear` study heals it and measured through
that study's own evaluator and windows: the 4096-token figures on its calibration split, the
16384-token ones on those windows plus confirmation's 12288 (`--confirm-tokens 16384`: the figure a
confirming study ranks by), KL over the top 64 tokens as `--fitness kl` keeps, and the held-out
ratio on its held-out split. `--per-size N` keeps, of each size, the N sets with the lowest
calibration perplexity ratio the stores recorded: the close calls a study has to decide.

Agreement is Kendall's tau between a fitness and the held-out ratio over pairs of sets of the same
size (a search only ever compares those: the budget fixes the size), pooled over sizes: 1 when the
fitness orders every pair as the held-out ratio does. `discordant` counts the pairs it orders the
other way; `close` is the share of the close calls (pairs within 2 % of each other on the default
fitness, the perplexity ratio on 4096 tokens: the same pairs for every fitness) it orders correctly.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

import optuna
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluators.data import make_splits  # noqa: E402
from evaluators.divergence import DenseReference, coarse_kl, full_kl, logp_chunks  # noqa: E402
from evaluators.perplexity import window_batches  # noqa: E402
from search.model.loading import load_model  # noqa: E402
from search.model.removal import Removal  # noqa: E402
from search.model.surgery import removal_applied  # noqa: E402
from search.records import COMPLETE, TrialRecord  # noqa: E402

TOP_K = (1, 4, 16, 64, 256)
SHORT, LONG = 8, 32  # calibration windows of 512: 4096 and 16384 tokens
CLOSE = 0.02  # a close call: two sets whose perplexity ratios on the default 4096 tokens are this near


def stored_sets(urls: list[str], per_size: int | None = None) -> list[Removal]:
    """Every set the stores' studies finished; with `per_size`, only that many of each size, those with
    the lowest recorded calibration perplexity ratio."""
    found: dict[Removal, float] = {}
    for url in urls:
        for summary in optuna.get_all_study_summaries(url):
            study = optuna.load_study(study_name=summary.study_name, storage=url)
            for trial in study.get_trials(deepcopy=False, states=COMPLETE):
                record = TrialRecord.of(trial)
                if record.removal and record.ppl_ratio is not None:
                    found[record.removal] = min(found.get(record.removal, math.inf), record.ppl_ratio)
    ranked = sorted(found, key=lambda r: (len(r.layers), found[r], r.key))
    if per_size is not None:
        kept: dict[int, int] = {}
        for removal in list(ranked):
            kept[len(removal.layers)] = kept.get(len(removal.layers), 0) + 1
            if kept[len(removal.layers)] > per_size:
                ranked.remove(removal)
    return sorted(ranked, key=lambda r: (len(r.layers), r.key))


def healed_rows(
    sets: list[Removal],
    dtype: str,
    model: str | None,
    confirm_tokens: int = LONG * 512,
    eval_dataset: str | None = None,
) -> tuple[list[dict], str]:
    """Each set healed and measured as a `--heal linear --fitness kl --confirm-tokens N` study does (the
    `_16384` figures are on N tokens)."""
    from search.confirmation import confirmed_fitness
    from search.evaluator import Fitness
    from search.study import RunConfig, prepare

    config = RunConfig(
        model=model, heal="linear", fitness="kl", dtype=dtype, confirm_tokens=confirm_tokens, eval_dataset=eval_dataset
    )
    loaded, evaluator, _ = prepare(config)
    evaluator.baseline()
    rows = []
    for number, removal in enumerate(sets, 1):
        calib = evaluator.kl(removal)
        ratio = calib.ppl / evaluator.base_ppl["calib"]
        confirmed = confirmed_fitness(evaluator, removal, Fitness(calib.kl, ratio))
        row = {"removal": removal.key, "size": len(removal.layers), "heal": "linear"}
        row["test_ppl_ratio"] = evaluator.ppl(removal, "test") / evaluator.base_ppl["test"]
        if "eval" in evaluator.splits.measured:  # --eval-dataset: the second domain, as a study reports it
            row["eval_ppl_ratio"] = evaluator.ratio(removal, "eval")
        row |= {"ppl_4096": ratio, "kl64_4096": calib.kl}
        row |= {"ppl_16384": confirmed.ppl_ratio, "kl64_16384": confirmed.value}
        rows.append(row)
        print(f"{number}/{len(sets)} {removal.key}: held-out {row['test_ppl_ratio']:.4f}", file=sys.stderr, flush=True)
    return rows, loaded.dtype


def given_sets(keys: str) -> list[Removal]:
    return sorted({Removal.parse(key) for key in keys.split(";")}, key=lambda r: (len(r.layers), r.key))


def random_sets(n_layers: int, count: int, seed: int = 0) -> list[Removal]:
    rng, sets = random.Random(seed), set()
    while len(sets) < count:
        sets.add(Removal.of(rng.sample(range(n_layers), rng.randint(1, 4))))
    return sorted(sets, key=lambda r: (len(r.layers), r.key))


class Dense:
    """The unpruned model's distributions: a reference per k, and in full over the first SHORT windows."""

    def __init__(self, model, windows, bos_id, batch_size):
        widest = DenseReference(max(TOP_K))
        self.full: list[torch.Tensor] = []
        self.nll: list[float] = []
        for index, inputs in enumerate(window_batches(windows, bos_id, batch_size, torch.device("cpu"))):
            logp = torch.cat(list(logp_chunks(model, inputs)))
            top = torch.topk(logp, min(max(TOP_K), logp.shape[-1]), dim=-1)
            widest.logp.append(top.values)
            widest.ids.append(top.indices)
            self.nll.append(-logp.gather(-1, inputs[:, 1:].reshape(-1, 1)).double().sum().item())
            if index * batch_size < SHORT:
                self.full.append(logp)
        self.top = {k: widest.top(k) for k in TOP_K}


def measure(model, removal: Removal, dense: Dense, calib, test, bos_id, batch_size, base_test_nll) -> dict:
    row: dict = {"removal": removal.key, "size": len(removal.layers)}
    nll, kl, full, targets = [], {k: [] for k in TOP_K}, 0.0, []
    with torch.inference_mode(), removal_applied(model, removal):
        for index, inputs in enumerate(window_batches(calib, bos_id, batch_size, torch.device("cpu"))):
            logq = torch.cat(list(logp_chunks(model, inputs)))
            nll.append(-logq.gather(-1, inputs[:, 1:].reshape(-1, 1)).double().sum().item())
            targets.append(len(logq))
            for k in TOP_K:
                kl[k].append(coarse_kl(dense.top[k], index, 0, logq).item())
            if index < len(dense.full):
                full += full_kl(dense.full[index], logq).item()
        test_nll = sum(
            -torch.cat(list(logp_chunks(model, inputs))).gather(-1, inputs[:, 1:].reshape(-1, 1)).double().sum().item()
            for inputs in window_batches(test, bos_id, batch_size, torch.device("cpu"))
        )
    test_targets = test.shape[0] * (test.shape[1] - (0 if bos_id is not None else 1))
    row["test_ppl_ratio"] = math.exp((test_nll - base_test_nll) / test_targets)
    for name, batches in (("4096", SHORT // batch_size), ("16384", LONG // batch_size)):
        count = sum(targets[:batches])
        row[f"ppl_{name}"] = math.exp((sum(nll[:batches]) - sum(dense.nll[:batches])) / count)
        for k in TOP_K:
            row[f"kl{k}_{name}"] = sum(kl[k][:batches]) / count
    row["kl_full_4096"] = full / sum(targets[: SHORT // batch_size])
    return row


def tau(rows: list[dict], key: str) -> dict:
    concordant = discordant = close = close_right = 0
    for a, b in itertools.combinations(rows, 2):
        if a["size"] != b["size"]:
            continue
        x, y = a[key] - b[key], a["test_ppl_ratio"] - b["test_ppl_ratio"]
        if x == 0 or y == 0:
            continue
        right = (x > 0) == (y > 0)
        concordant, discordant = concordant + right, discordant + (not right)
        if abs(a["ppl_4096"] / b["ppl_4096"] - 1) < CLOSE:  # the same pairs for every fitness
            close, close_right = close + 1, close_right + right
    pairs = concordant + discordant
    return {
        "fitness": key,
        "tau": (concordant - discordant) / pairs if pairs else None,
        "pairs": pairs,
        "discordant": discordant,
        "close_pairs": close,
        "close_right": close_right / close if close else None,
    }


MARGINS = (0.0, 0.01, 0.02, 0.03, 0.05)  # --confirm-margin candidates, nats per token


def confirmation(rows: list[dict], fitness: str, margin: float) -> dict:
    """The confirmation rule on these measurements: per size, the sets within `margin` of the size's best
    fitness on 4096 tokens are ranked by their fitness on 16384; how often that pick is not the set best
    held-out (and by how much it is worse), and how many sets it measured again. Margin 0 is no
    confirmation: the best on 4096 tokens."""

    def value(row: dict, tokens: int) -> float:
        found = row[f"{fitness}_{tokens}"]
        return math.log(found) if fitness == "ppl" else found  # both in nats per token

    wrong, confirmed, excess = 0, 0, 0.0
    sizes = sorted({r["size"] for r in rows})
    for size in sizes:
        sets = [r for r in rows if r["size"] == size]
        best = min(value(r, SHORT * 512) for r in sets)
        near = [r for r in sets if value(r, SHORT * 512) - best <= margin] if margin else []
        pick = min(near, key=lambda r: value(r, LONG * 512)) if near else min(sets, key=lambda r: value(r, SHORT * 512))
        truth = min(r["test_ppl_ratio"] for r in sets)
        confirmed += len(near)
        wrong += pick["test_ppl_ratio"] != truth
        excess += pick["test_ppl_ratio"] / truth - 1
    return {
        "fitness": fitness,
        "margin": margin,
        "sizes": len(sizes),
        "wrong": wrong,
        "confirmed": confirmed,
        "held_out_excess": excess,
    }


def render(results: dict) -> str:
    lines = [
        f"{len(results['rows'])} candidate sets, {results['seconds']:.0f} s, {results['dtype']}",
        "",
        "| fitness | Kendall tau (same size) | pairs | discordant | close calls right |",
        "|---|---|---|---|---|",
    ]
    for t in results["agreement"]:
        close = "-" if t["close_right"] is None else f"{t['close_right']:.0%} of {t['close_pairs']}"
        lines.append(f"| {t['fitness']} | {t['tau']:.3f} | {t['pairs']} | {t['discordant']} | {close} |")
    if results.get("top_k_share"):
        lines += ["", "| k | KL kept of the full KL (4096 tokens, mean over sets) | bytes per token |", "|---|---|---|"]
        for k, share in results["top_k_share"].items():
            lines.append(f"| {k} | {share:.4f} | {int(k) * 8 + 4} |")
    lines += [
        "",
        "| fitness | --confirm-margin | sizes picked wrong (held-out) | summed held-out excess | sets confirmed |",
        "|---|---|---|---|---|",
    ]
    rows = results["rows"]
    for fitness in ("ppl", "kl64"):
        for margin in MARGINS:
            c = confirmation(rows, fitness, margin)
            lines.append(
                f"| {fitness} | {margin} | {c['wrong']} of {c['sizes']} | {c['held_out_excess']:.2%} | "
                f"{c['confirmed']} of {len(rows)} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stores", help="comma-separated store URLs whose studies' sets are the candidates")
    parser.add_argument("--random", type=int, default=0, help="this many random sets of 1-4 layers instead")
    parser.add_argument("--per-size", type=int, help="of each size, only the N sets the stores rank best")
    parser.add_argument(
        "--sets", help="semicolon-separated removal keys to measure (e.g. '14;17') instead of a store's"
    )
    parser.add_argument("--heal", choices=["none", "linear"], default="none", help="measure the candidates healed")
    parser.add_argument(
        "--confirm-tokens",
        type=int,
        default=LONG * 512,
        help="--heal linear: the calibration and confirmation tokens of the long figure (default: %(default)s)",
    )
    parser.add_argument("--eval-dataset", help="--heal linear: also the ratio on this second corpus (enwiki-sample)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--model", default=None)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--render", metavar="FILE", help="print the docs/benchmarks.md tables from a --json result")
    args = parser.parse_args()
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return
    warnings.filterwarnings("ignore")
    started = time.perf_counter()
    if args.heal == "linear":
        if not args.stores and not args.sets:
            raise SystemExit("--heal linear measures a study's candidates or given sets: give --stores or --sets")
        candidates = given_sets(args.sets) if args.sets else stored_sets(args.stores.split(","), args.per_size)
        rows, dtype = healed_rows(candidates, args.dtype, args.model, args.confirm_tokens, args.eval_dataset)
        keys = ["ppl_4096", "kl64_4096", "ppl_16384", "kl64_16384"]
        results = {
            "dtype": dtype,
            "heal": "linear",
            "seconds": time.perf_counter() - started,
            "agreement": [tau(rows, key) for key in keys],
            "rows": rows,
        }
        print(json.dumps(results, indent=2) if args.json else render(results))
        return
    loaded = load_model(args.model, args.dtype, "cpu")
    model, batch_size = loaded.model, 4
    splits = make_splits(loaded.tokenizer, None, LONG * 512, 8192, 512)
    bos_id = splits.bos_id
    n_layers = model.config.num_hidden_layers
    if args.sets:
        sets = given_sets(args.sets)
    elif args.stores:
        sets = stored_sets(args.stores.split(","), args.per_size)
    else:
        sets = random_sets(n_layers, args.random)
    with torch.inference_mode():
        dense = Dense(model, splits.calib, bos_id, batch_size)
        base_test = sum(
            -torch.cat(list(logp_chunks(model, inputs))).gather(-1, inputs[:, 1:].reshape(-1, 1)).double().sum().item()
            for inputs in window_batches(splits.test, bos_id, batch_size, torch.device("cpu"))
        )
    rows = []
    for number, removal in enumerate(sets, 1):
        rows.append(measure(model, removal, dense, splits.calib, splits.test, bos_id, batch_size, base_test))
        print(f"{number}/{len(sets)} {removal.key}: held-out {rows[-1]['test_ppl_ratio']:.4f}", file=sys.stderr)
    keys = ["ppl_4096", "kl64_4096", "kl_full_4096", "ppl_16384", "kl64_16384", *(f"kl{k}_4096" for k in TOP_K)]
    results = {
        "dtype": loaded.dtype,
        "seconds": time.perf_counter() - started,
        "agreement": [tau(rows, key) for key in dict.fromkeys(keys)],
        "top_k_share": {str(k): statistics.fmean(r[f"kl{k}_4096"] / r["kl_full_4096"] for r in rows) for k in TOP_K},
        "rows": rows,
    }
    print(json.dumps(results, indent=2) if args.json else render(results))


if __name__ == "__main__":
    main()
