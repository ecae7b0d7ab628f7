"""`python -m search run|front`: thin argument parsing over the library; every error is one line."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from search.errors import SearchError
from search.space import parse_budget
from search.store import redact

DEFAULTS_NOTE = (
    "Defaults use the embedded SmolLM2-135M-Instruct and the embedded Lee news corpus; "
    "nothing is downloaded."
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


class _Parser(argparse.ArgumentParser):
    """Bad flags get one line naming the problem and where help is, not a usage dump."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see: {self.prog} --help)\n")


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
        "run", help="create or resume a study and run it to --trials finished trials",
        description="Create a study (baseline, sensitivity, greedy seeds) or resume it, run trials until "
        "--trials are finished, then print the Pareto front. Re-running the same command resumes.",
        epilog=DEFAULTS_NOTE,
    )
    what = run.add_argument_group("what to prune")
    what.add_argument("--model", help="hub id, local model directory, or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    what.add_argument("--budget", type=_budget, default=d.budget, help="largest fraction of parameters to remove, e.g. 12%% or 0.12 (default: 12%%)")
    what.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")
    data = run.add_argument_group("data")
    data.add_argument("--dataset", help="text file, folder of text files, or datasets spec name[:config[:split]], "
                      "e.g. wikitext:wikitext-2-raw-v1 (default: embedded Lee news corpus)")
    data.add_argument("--calib-tokens", type=_positive_int, default=d.calib_tokens, help=f"calibration tokens the search optimises on (default: {d.calib_tokens})")
    data.add_argument("--test-tokens", type=_positive_int, default=d.test_tokens, help=f"held-out tokens for reported figures (default: {d.test_tokens})")
    data.add_argument("--sensitivity-tokens", type=_positive_int, default=d.sensitivity_tokens, help=f"calibration tokens used to score layers for greedy seeding (default: {d.sensitivity_tokens})")
    data.add_argument("--seq-len", type=_positive_int, default=d.seq_len, help=f"tokens per evaluation window (default: {d.seq_len})")
    data.add_argument("--batch-size", type=_positive_int, default=d.batch_size, help=f"windows per forward pass (default: {d.batch_size})")
    study = run.add_argument_group("study")
    study.add_argument("--trials", type=_positive_int, default=d.trials, help=f"finished trials the study should reach, seeds included (default: {d.trials})")
    study.add_argument("--study", help="study name (default: derived from model and budget)")
    study.add_argument("--storage", help="SQLAlchemy URL of the study store (default: sqlite:///studies/<study>.db)")
    study.add_argument("--seed", type=int, default=d.seed, help=f"sampler seed (default: {d.seed})")
    compute = run.add_argument_group("compute")
    compute.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default=d.dtype, help=f"compute dtype (default: {d.dtype})")
    compute.add_argument("--device", default=d.device, help=f"torch device, e.g. cpu or cuda (default: {d.device})")
    compute.add_argument("--latency-tokens", type=_positive_int, default=d.latency_tokens, help=f"input length of the timed forward pass (default: {d.latency_tokens})")
    compute.add_argument("--latency-repeats", type=_positive_int, default=d.latency_repeats, help=f"timed repetitions per variant; medians are compared (default: {d.latency_repeats})")

    front = sub.add_parser("front", help="print the Pareto front of a stored study",
                           description="Print the Pareto front of a stored study; reads the store only.")
    front.add_argument("--study", help="study name (default: the only study in the store)")
    front.add_argument("--storage", help="SQLAlchemy URL (default: sqlite:///studies/<study>.db, or the only .db in studies/)")
    front.add_argument("--format", choices=["table", "json", "csv"], default="table", help="output format (default: table)")
    return parser


def _configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    from transformers.utils import logging as hf_logging

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # sub-second weight loading; our own bars cover the long work


def _run(args: argparse.Namespace) -> None:
    from search.front import front_report, format_table
    from search.study import RunConfig, run

    fields = RunConfig.__dataclass_fields__
    config = RunConfig(**{k: v for k, v in vars(args).items() if k in fields})
    study = run(config)
    print(format_table(front_report(study)))


def _front(args: argparse.Namespace) -> None:
    from search.front import FORMATS, front_report
    from search.store import load_study, locate_store, open_storage

    url = locate_store(args.study, args.storage)
    study = load_study(open_storage(url, create=False), args.study)
    print(FORMATS[args.format](front_report(study)))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging()
    try:
        {"run": _run, "front": _front}[args.command](args)
    except SearchError as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished trials are saved; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"error: {type(exc).__name__}: {redact(first)} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    return 0
