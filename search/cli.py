"""`python -m search run|baseline|front|studies|show|export`: flag parsing over the library; errors are one line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from dataclasses import replace

from search.baselines import METHODS
from search.errors import SearchError, first_line, redact
from search.space import parse_budget

DEFAULTS_NOTE = (
    "Defaults use the embedded SmolLM2-135M-Instruct and the embedded Lee news corpus; nothing is downloaded."
)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
    return value


def _budget(text: str) -> float:
    try:
        return parse_budget(text)
    except SearchError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--budget ")) from None


def _ratio_cap(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a perplexity ratio above 1, e.g. 2.0")
    return value


class _Parser(argparse.ArgumentParser):
    """Bad flags get one line naming the problem and where help is, not a usage dump."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see: {self.prog} --help)\n")


def _stored_study_flags(parser: argparse.ArgumentParser) -> None:
    """The flags `_stored_study` reads, shared by every command that inspects an existing study."""
    parser.add_argument("--study", help="study name (default: the only study in the store)")
    parser.add_argument(
        "--storage", help="SQLAlchemy URL (default: sqlite:///studies/<study>.db, or the only .db in studies/)"
    )


def _evaluation_flags(parser: argparse.ArgumentParser, d) -> argparse._ArgumentGroup:
    """Model, data and compute flags: shared by `run` and `baseline`, which evaluate the same way."""
    what = parser.add_argument_group("what to prune")
    what.add_argument(
        "--model", help="hub id, local model directory, or .gguf file (default: embedded SmolLM2-135M-Instruct)"
    )
    what.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")
    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset",
        help="text file, folder of text files, or datasets spec name[:config[:split]], "
        "e.g. wikitext:wikitext-2-raw-v1 (default: embedded Lee news corpus)",
    )
    data.add_argument(
        "--calib-tokens",
        type=_positive_int,
        default=d.calib_tokens,
        help=f"calibration tokens the search optimises on (default: {d.calib_tokens})",
    )
    data.add_argument(
        "--test-tokens",
        type=_positive_int,
        default=d.test_tokens,
        help=f"held-out tokens for reported figures (default: {d.test_tokens})",
    )
    data.add_argument(
        "--sensitivity-tokens",
        type=_positive_int,
        default=d.sensitivity_tokens,
        help=f"calibration tokens used to score layers for greedy seeding (default: {d.sensitivity_tokens})",
    )
    data.add_argument(
        "--seq-len", type=_positive_int, default=d.seq_len, help=f"tokens per evaluation window (default: {d.seq_len})"
    )
    data.add_argument(
        "--batch-size",
        type=_positive_int,
        default=d.batch_size,
        help=f"windows per forward pass (default: {d.batch_size})",
    )
    compute = parser.add_argument_group("compute")
    compute.add_argument(
        "--dtype",
        choices=["auto", "bf16-mixed", "bfloat16", "float32", "float16"],
        default=d.dtype,
        help="compute dtype; auto (default) measures this machine and takes bf16-mixed (float32 weights, bf16 "
        "matrix products) where that is clearly faster, else float32; a resumed study keeps its stored dtype",
    )
    compute.add_argument("--device", default=d.device, help=f"torch device, e.g. cpu or cuda (default: {d.device})")
    compute.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=d.compile,
        help="run perplexity passes through torch.compile'd decoder layers (default: off; ~10%% faster passes on "
        "a 2-core CPU, for ~25 s of compiling the first time and a few seconds per process after; falls back to "
        "eager if compiling fails; latency is always timed eager)",
    )
    compute.add_argument(
        "--latency-tokens",
        type=_positive_int,
        default=d.latency_tokens,
        help=f"input length of the timed forward pass (default: {d.latency_tokens})",
    )
    compute.add_argument(
        "--latency-repeats",
        type=_positive_int,
        default=d.latency_repeats,
        help=f"timed rounds of the per-shape latency table; medians are compared (default: {d.latency_repeats})",
    )

    return what


def build_parser() -> argparse.ArgumentParser:
    from search.study import RunConfig

    d = RunConfig()
    parser = _Parser(
        prog="python -m search",
        description="Search which decoder layers to remove from a transformer LM: an Optuna study "
        "over removal sets, seeded by staged greedy sensitivity, stored in SQL.",
        epilog=DEFAULTS_NOTE,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="create or resume a study and run it to --trials finished trials",
        description="Create a study (baseline, sensitivity, greedy seeds) or resume it, run trials until "
        "--trials are finished, then print the Pareto front. Re-running the same command resumes.",
        epilog=DEFAULTS_NOTE,
    )
    what = _evaluation_flags(run, d)
    what.add_argument(
        "--budget",
        type=_budget,
        default=d.budget,
        help="largest fraction of parameters to remove, e.g. 12%% or 0.12 (default: 12%%)",
    )
    study = run.add_argument_group("study")
    study.add_argument(
        "--trials",
        type=_positive_int,
        default=d.trials,
        help=f"finished trials the study should reach, seeds included (default: {d.trials})",
    )
    study.add_argument("--study", help="study name (default: derived from model and budget)")
    study.add_argument("--storage", help="SQLAlchemy URL of the study store (default: sqlite:///studies/<study>.db)")
    study.add_argument("--seed", type=int, default=d.seed, help=f"sampler seed (default: {d.seed})")
    study.add_argument(
        "--sampler",
        choices=["local", "tpe"],
        default=d.sampler,
        help="local: moves around the best sets of each size, never repeating a set; tpe: Optuna's "
        f"multi-objective TPE (default: {d.sampler})",
    )
    study.add_argument(
        "--criterion",
        choices=["ppl", "angular", "bi"],
        default=d.criterion,
        help="what staged greedy seeding ranks layers by: ppl (removal perplexity), angular (angular distance, "
        "Gromov et al.) or bi (Block Influence, ShortGPT); the one-pass picks of angular and bi seed the study "
        f"either way (default: {d.criterion})",
    )
    study.add_argument(
        "--max-ppl-ratio",
        type=_ratio_cap,
        metavar="R",
        help="stop evaluating a candidate once its perplexity ratio is above R on the windows seen so far; "
        "it is recorded as rejected (default: no cap; a candidate that provably cannot reach the front "
        "is always stopped)",
    )
    study.add_argument(
        "--warm-start-from",
        metavar="STUDY",
        help="seed a new study from another study's sensitivity "
        "profile and best sets, mapped by relative depth, instead of running staged greedy",
    )
    study.add_argument(
        "--warm-start-storage",
        metavar="URL",
        help="store holding the --warm-start-from study (default: this run's store)",
    )

    baseline = sub.add_parser(
        "baseline",
        help="run one published layer-removal method alone and measure its pick",
        description="Choose k layers with one method (the same code seeds studies) and report calibration "
        "and held-out perplexity ratios, latency ratio, and the evaluations choosing needed.",
        epilog=DEFAULTS_NOTE,
    )
    baseline.add_argument("--method", required=True, choices=METHODS, help="which method")
    baseline.add_argument("--layers", type=_positive_int, required=True, metavar="K", help="how many layers to remove")
    baseline.add_argument(
        "--draws", type=_positive_int, default=5, help="random sets averaged by --method random (default: 5)"
    )
    baseline.add_argument("--seed", type=int, default=d.seed, help=f"seed of --method random (default: {d.seed})")
    baseline.add_argument(
        "--storage", help="SQLAlchemy URL whose evaluation cache to read and fill, e.g. a study's store (default: none)"
    )
    baseline.add_argument("--format", choices=["table", "json"], default="table", help="output format (default: table)")
    _evaluation_flags(baseline, d)

    front = sub.add_parser(
        "front",
        help="print the Pareto front of a stored study",
        description="Print the Pareto front of a stored study; reads the store only.",
    )
    _stored_study_flags(front)
    front.add_argument(
        "--format", choices=["table", "json", "csv"], default="table", help="output format (default: table)"
    )
    front.add_argument(
        "--plot", metavar="PNG", help="also draw the front (ppl ratio vs latency ratio) to this PNG file"
    )

    studies = sub.add_parser(
        "studies",
        help="list the studies in a store",
        description="List the studies in a store: model, budget, trials by state, front size.",
    )
    studies.add_argument("--storage", help="SQLAlchemy URL (default: every .db in studies/)")

    show = sub.add_parser(
        "show",
        help="everything about one trial",
        description="Print one trial: removed layers, metrics on both splits, how it was proposed.",
    )
    show.add_argument("--trial", type=int, required=True, help="trial number")
    _stored_study_flags(show)
    show.add_argument("--format", choices=["table", "json"], default="table", help="output format (default: table)")

    export = sub.add_parser(
        "export",
        help="write a pruned model directory that stock transformers loads",
        description="Write the pruned model of one trial (safetensors, shrunk config, tokenizer, "
        "pruning.json), reload it in a fresh model and verify held-out perplexity and KV-cache generation.",
    )
    which = export.add_mutually_exclusive_group(required=True)
    which.add_argument("--trial", type=int, help="trial number to export")
    which.add_argument(
        "--pick",
        choices=["knee", "best-ppl", "fastest"],
        help="pick from the front: knee (best balance), best-ppl, or fastest",
    )
    export.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    _stored_study_flags(export)
    export.add_argument("--device", default="cpu", help="device for the verification pass (default: cpu)")
    export.add_argument(
        "--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)"
    )
    return parser


def _configure_logging(debug: bool) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    from transformers.utils import logging as hf_logging

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # sub-second weight loading; our own bars cover the long work
    if not debug:
        from search.failures import quiet_known_failures

        quiet_known_failures()


def _run(args: argparse.Namespace) -> None:
    from search.failures import store_failures
    from search.front import format_table, front_report
    from search.store import sqlite_path
    from search.study import RunConfig, run

    fields = RunConfig.__dataclass_fields__
    config = RunConfig(**{k: v for k, v in vars(args).items() if k in fields})
    with store_failures(config.storage_url, sqlite_path(config.storage_url)):
        study = run(config)
    print(format_table(front_report(study)))
    where = f" --study {study.study_name}" + (f" --storage '{redact(config.storage)}'" if config.storage else "")
    print(
        f"next: python -m search export --pick knee --out DIR{where}   (or front --plot, show --trial N)",
        file=sys.stderr,
    )


def _baseline(args: argparse.Namespace) -> None:
    from search.methods import choose, measure
    from search.study import RunConfig, attach_store, prepare

    fields = RunConfig.__dataclass_fields__
    config = RunConfig(**{k: v for k, v in vars(args).items() if k in fields and k != "storage"})
    loaded, bench, _ = prepare(config)
    config = replace(config, dtype=loaded.dtype)  # `auto` resolved: the store's cache key names what ran
    if args.storage:
        from search.store import open_storage

        attach_store(bench, open_storage(args.storage), loaded.fingerprint, config)
    bench.baseline()
    choice = choose(bench, args.method, args.layers, config.sensitivity_tokens, draws=args.draws, seed=args.seed)
    (row,) = measure(bench, [choice])
    if args.format == "json":
        print(json.dumps({"model": loaded.source, **row}))
        return
    for key, value in row.items():
        print(f"{key:16} {value:.4f}" if isinstance(value, float) else f"{key:16} {value}")


def _stored_study(args: argparse.Namespace):
    from search.store import load_study, locate_store, open_storage

    return load_study(open_storage(locate_store(args.study, args.storage), create=False), args.study)


def _front(args: argparse.Namespace) -> None:
    from search.front import FORMATS, front_report

    study = _stored_study(args)
    print(FORMATS[args.format](front_report(study)))
    if args.plot:
        from search.plot import plot_front

        print(f"wrote {plot_front(study, args.plot)}", file=sys.stderr)


def _studies(args: argparse.Namespace) -> None:
    from search.store import STUDIES_DIR, open_storage
    from search.summary import format_rows, study_summaries

    urls = [args.storage] if args.storage else [f"sqlite:///{p}" for p in sorted(STUDIES_DIR.glob("*.db"))]
    rows = [row for url in urls for row in study_summaries(open_storage(url, create=False))]
    print(format_rows(rows))


def _show(args: argparse.Namespace) -> None:
    import json

    from search.summary import format_details, trial_details

    details = trial_details(_stored_study(args), args.trial)
    print(json.dumps(details, indent=2) if args.format == "json" else format_details(details))


def _export(args: argparse.Namespace) -> None:
    import json

    from search.export import export_trial, pick_trial

    study = _stored_study(args)
    number = args.trial if args.trial is not None else pick_trial(study, args.pick)
    logging.getLogger("search").info("exporting trial %d of study %r to %s", number, study.study_name, args.out)
    report = export_trial(study, number, args.out, args.device, args.trust_remote_code)
    expected = (
        "nothing (this trial was never on the front, so no held-out figure was stored: check skipped)"
        if report.expected_test_ppl is None
        else f"{report.expected_test_ppl:.3f}"
    )
    diff = "" if report.ppl_rel_diff is None else f" (diff {report.ppl_rel_diff:.2%}, limit 1%)"
    print(json.dumps(report.to_dict(), indent=2))
    print(
        f"reloaded {report.out}: {report.layers} layers, held-out ppl {report.measured_test_ppl:.3f} vs reported "
        f"{expected}{diff}; float32 logits with and without KV cache {report.kv_cache_verdict}",
        file=sys.stderr,
    )
    if not report.ok:
        raise SearchError("verification failed: the exported model does not reproduce the trial (see above)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.debug)
    try:
        {"run": _run, "baseline": _baseline, "front": _front, "studies": _studies, "show": _show, "export": _export}[
            args.command
        ](args)
    except SearchError as exc:
        if args.debug and exc.__cause__ is not None:  # a translated failure: show what lies beneath
            raise
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished trials are saved; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        from search.failures import out_of_space

        known = out_of_space(exc)
        if known is not None:
            print(f"error: {redact(str(known))}", file=sys.stderr)
            return 1
        print(
            f"error: {type(exc).__name__}: {redact(first_line(exc))} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
    return 0
