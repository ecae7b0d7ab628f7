"""The command line's flags and help: every choice and its help text come from the registries."""

from __future__ import annotations

import argparse

from search.errors import SearchError
from search.registry import Registry
from search.space import parse_budget

DEFAULTS_NOTE = (
    "Defaults use the embedded SmolLM2-135M-Instruct and the embedded Lee news corpus; nothing is downloaded."
)


def _choices(registry: Registry) -> dict:
    """`choices` and the help sentence for a flag, from its registry (argparse help escapes %)."""
    return {"choices": registry.names, "help": registry.describe().replace("%", "%%")}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 or more")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
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
    """Model, data and compute flags: shared by `run` and `method`, which evaluate the same way."""
    from search.model.numerics import AUTO, DTYPES

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
        "--eval-dataset",
        metavar="SPEC",
        help="a second corpus, another domain than --dataset, that every front point is also measured on "
        "(JSON key eval_ppl_ratio); never used for fitting or choosing. A spec like --dataset, a MediaWiki "
        "dump (.xml or .xml.bz2; markup stripped), or enwiki-sample: the English Wikipedia sample inside "
        "the gensim wheel (default: none)",
    )
    data.add_argument(
        "--eval-tokens",
        type=_positive_int,
        default=d.eval_tokens,
        help=f"tokens of --eval-dataset measured, from its start (default: {d.eval_tokens})",
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
        "--data-seed",
        type=_non_negative_int,
        default=d.data_seed,
        help="which windows form the calibration split: 0 (default) takes the corpus's first, any other seed "
        "draws them from the whole corpus outside the held-out split, which never moves",
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
        choices=[AUTO, *DTYPES.names],
        default=d.dtype,
        help="compute dtype; auto (default) measures this machine and takes bf16-mixed where that is clearly "
        f"faster, else float32; a resumed study keeps its stored dtype. {_choices(DTYPES)['help']}",
    )
    compute.add_argument("--device", default=d.device, help=f"torch device, e.g. cpu or cuda (default: {d.device})")
    compute.add_argument(
        "--device-map",
        default=d.device_map,
        metavar="auto|DEV,DEV,...",
        help="spread the decoder layers over several devices in contiguous runs (auto: every CUDA device; or a "
        "list such as cuda:0,cuda:1); replaces --device. Default: one device",
    )
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

    from search.healing import HEALINGS

    healing = parser.add_argument_group("healing")
    heal = _choices(HEALINGS)
    healing.add_argument("--heal", choices=heal["choices"], default=d.heal, help=f"{heal['help']} (default: {d.heal})")
    healing.add_argument(
        "--heal-tokens",
        type=_positive_int,
        default=d.heal_tokens,
        help="fitting tokens for --heal linear, taken from the corpus after the held-out windows "
        f"(never from them) (default: {d.heal_tokens})",
    )
    healing.add_argument(
        "--heal-fit",
        choices=["sequential", "parallel"],
        default=d.heal_fit,
        help="sequential: each later removed run is fitted on the model already pruned and healed before it "
        "(better held-out, a partial forward pass per later run); parallel: every run on the unpruned model's "
        f"activations (cheaper) (default: {d.heal_fit})",
    )
    return what


def build_parser() -> argparse.ArgumentParser:
    from search.config import RunConfig
    from search.export import PICKS
    from search.methods import METHODS
    from search.sampler import SAMPLERS
    from search.seeding.criteria import CRITERIA
    from search.space import GRANULARITIES

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
    what.add_argument(
        "--granularity",
        choices=list(GRANULARITIES),
        default=d.granularity,
        help="what a removal is made of: whole decoder layers, or (sublayer) attention and MLP blocks "
        f"separately, a layer losing one, the other or both (default: {d.granularity})",
    )
    what.add_argument(
        "--fitness",
        choices=["ppl", "kl"],
        default=d.fitness,
        help="what trials minimise on the calibration tokens: the perplexity ratio to the unpruned model, or "
        "(kl) the mean KL divergence from its next-token distributions; every point still reports perplexity "
        "ratios (default: kl with --heal, ppl without; a resumed study keeps its own)",
    )
    what.add_argument(
        "--confirm-tokens",
        type=_non_negative_int,
        metavar="N",
        help="rank a candidate that comes within --confirm-margin of the best set at least as fast by its "
        "fitness on N calibration tokens (the calibration windows and more, taken after the held-out and "
        "healing windows); 0 turns confirmation off (default: 4 x --calib-tokens for a new study, what "
        "the study used when resuming one)",
    )
    what.add_argument(
        "--confirm-margin",
        type=_positive_float,
        metavar="NATS",
        help="how near (in nats per token: 0.02 is a 2%% perplexity ratio) a candidate must come to the best "
        f"set at least as fast to be confirmed; further above it, it is rejected (default: {d.confirmation_margin}"
        " for a new study, what the study used when resuming one)",
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
    study.add_argument(
        "--seed",
        type=int,
        default=d.seed,
        help="seed of the sampler's proposals: a new study run again with the same seed and flags proposes the "
        "same sets wherever the measured figures agree; a resumed or second worker's run offsets it, so it "
        f"does not repeat the runs before it (default: {d.seed})",
    )
    sampler = _choices(SAMPLERS)
    study.add_argument(
        "--sampler", choices=sampler["choices"], default=d.sampler, help=f"{sampler['help']} (default: {d.sampler})"
    )
    criterion = _choices(CRITERIA)
    study.add_argument(
        "--criterion",
        choices=criterion["choices"],
        default=d.criterion,
        help=f"what staged greedy seeding ranks layers by: {criterion['help']}; the one-pass picks of angular and "
        f"bi seed the study either way (default: {d.criterion})",
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

    method = sub.add_parser(
        "method",
        aliases=["baseline"],
        help="run one published layer-removal method alone and measure its pick (old name: baseline)",
        description="Choose k layers with one method (the same code seeds studies) and report calibration "
        "and held-out perplexity ratios (to the unpruned model), latency ratio, and the evaluations choosing "
        "needed.",
        epilog=DEFAULTS_NOTE,
    )
    methods = _choices(METHODS)
    method.add_argument("--method", required=True, choices=methods["choices"], help=methods["help"])
    method.add_argument(
        "--remove",
        "--layers",
        dest="remove",
        type=_positive_int,
        required=True,
        metavar="K",
        help="how many layers to remove; blocks for block_greedy and attention_drop (--layers is the old spelling)",
    )
    method.add_argument(
        "--draws", type=_positive_int, default=5, help="random sets averaged by --method random (default: 5)"
    )
    method.add_argument("--seed", type=int, default=d.seed, help=f"seed of --method random (default: {d.seed})")
    method.add_argument(
        "--eval-cache",
        "--storage",
        dest="eval_cache",
        metavar="URL",
        help="SQLAlchemy URL of a store whose evaluation cache to read and fill, e.g. a study's store; "
        "no study is created (--storage is the old spelling; default: none)",
    )
    method.add_argument("--format", choices=["table", "json"], default="table", help="output format (default: table)")
    _evaluation_flags(method, d)

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
    picks = _choices(PICKS)
    which.add_argument("--pick", choices=picks["choices"], help=f"pick a point of the front: {picks['help']}")
    export.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    _stored_study_flags(export)
    export.add_argument("--device", default="cpu", help="device for the verification pass (default: cpu)")
    export.add_argument(
        "--device-map",
        metavar="auto|DEV,DEV,...",
        help="prune, heal and verify with the model spread over several devices, as `run --device-map` "
        "(replaces --device for those; --tasks still runs on --device; default: one device)",
    )
    export.add_argument(
        "--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)"
    )
    _accuracy_flags(export, "also measure accuracy on these tasks (as `evaluate`) and write it into pruning.json")
    _heal_parser(sub, picks)
    _evaluate_parser(sub)
    return parser


def _task_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("name at least one task")
    return names


def _limit(text: str) -> int | None:
    return None if text == "all" else _positive_int(text)


def _accuracy_flags(
    parser: argparse.ArgumentParser, tasks_help: str, default: tuple[str, ...] = (), with_device: bool = False
) -> None:
    """Which tasks and how the harness runs them: shared by `evaluate`, `export --tasks` and `heal --tasks`
    (`--device` and `--trust-remote-code` only where the command has none already)."""
    from search.accuracy import DEFAULT_BATCH_SIZE, DEFAULT_LIMIT

    group = parser.add_argument_group("accuracy (lm-evaluation-harness)")
    group.add_argument(
        "--tasks",
        type=_task_list,
        default=list(default) or None,
        help=f"{tasks_help} (default: {','.join(default) or 'none'})",
    )
    group.add_argument(
        "--limit",
        type=_limit,
        default=DEFAULT_LIMIT,
        help=f"documents per task, or `all` (default: {DEFAULT_LIMIT})",
    )
    group.add_argument(
        "--batch-size",
        type=_positive_int,
        default=DEFAULT_BATCH_SIZE,
        help=f"documents per forward pass (default: {DEFAULT_BATCH_SIZE})",
    )
    group.add_argument(
        "--include-path",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder of the harness's task YAML files to add to its registry (repeatable)",
    )
    if with_device:
        group.add_argument("--device", default="cpu", help="torch device (default: cpu)")
        group.add_argument(
            "--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)"
        )


def _evaluate_parser(sub) -> None:
    from search.accuracy import DEFAULT_TASKS, OFFLINE_TASKS

    evaluate = sub.add_parser(
        "evaluate",
        help="downstream accuracy (lm-evaluation-harness) of front points and the baseline, stored in the study",
        description="Build each chosen trial's model as `export` would (in memory, the study's healing folded "
        "in), run lm-evaluation-harness tasks on it and on the unpruned baseline, and store the results in the "
        "study, where `front`, `show` and `front --plot` display them. Results already stored (same task, "
        "removal set, --limit and harness version) are reused; another --limit is stored beside them.",
        epilog=f"Offline tasks, built from the study's held-out windows: {OFFLINE_TASKS.describe()}. Any other "
        "name is a harness task (e.g. arc_easy, hellaswag, piqa, winogrande, boolq, lambada_openai), whose data the "
        "harness loads from the hub or the local `datasets` cache.",
    )
    which = evaluate.add_mutually_exclusive_group()
    which.add_argument(
        "--trial", type=int, action="append", dest="trials", metavar="N", help="a trial to evaluate (repeatable)"
    )
    which.add_argument("--front", action="store_true", help="every point of the front (the default)")
    _stored_study_flags(evaluate)
    _accuracy_flags(evaluate, "comma-separated task names", DEFAULT_TASKS, with_device=True)
    evaluate.add_argument("--format", choices=["table", "json"], default="table", help="output format (default: table)")


def _heal_parser(sub, picks: dict) -> None:
    from evaluators.lora import LoraSettings

    d = LoraSettings()
    heal = sub.add_parser(
        "heal",
        help="LoRA-heal one trial's pruned model, export it and report held-out perplexity before and after",
        description="Fine-tune LoRA adapters (peft) on the trial's pruned model (its study's linear healing "
        "folded in first) on fitting tokens taken after the held-out windows, merge them, and export and "
        "verify the model like `export`. Because fine-tuning on a corpus adapts any model to it, the unpruned "
        "model is fine-tuned the same way as a reference and both ratios are reported.",
        epilog=DEFAULTS_NOTE,
    )
    which = heal.add_mutually_exclusive_group(required=True)
    which.add_argument("--trial", type=int, help="trial number to heal")
    which.add_argument("--pick", choices=picks["choices"], help=f"pick a point of the front: {picks['help']}")
    heal.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    _stored_study_flags(heal)
    lora = heal.add_argument_group("LoRA")
    lora.add_argument("--steps", type=_positive_int, default=d.steps, help=f"optimiser steps (default: {d.steps})")
    lora.add_argument("--rank", type=_positive_int, default=d.rank, help=f"adapter rank (default: {d.rank})")
    lora.add_argument(
        "--alpha", type=_positive_int, default=d.alpha, help=f"LoRA alpha; the scale is alpha/rank (default: {d.alpha})"
    )
    lora.add_argument("--lr", type=_positive_float, default=d.lr, help=f"peak learning rate (default: {d.lr})")
    lora.add_argument(
        "--windows-per-step",
        type=_positive_int,
        default=d.windows_per_step,
        help=f"fitting windows per step (default: {d.windows_per_step})",
    )
    lora.add_argument(
        "--tokens",
        type=_positive_int,
        help="fitting tokens, taken from the corpus after the held-out windows (default: the study's "
        "--heal-tokens, or 32768)",
    )
    lora.add_argument("--seed", type=int, default=d.seed, help=f"seed of the window order (default: {d.seed})")
    lora.add_argument(
        "--no-reference",
        dest="reference",
        action="store_false",
        help="skip fine-tuning the unpruned model as the reference (saves about half the time)",
    )
    measure = heal.add_argument_group("measurement")
    measure.add_argument(
        "--eval-dataset",
        metavar="SPEC",
        help="a second corpus (another domain) measured before and after, never fitted on; a spec like "
        "`run --eval-dataset`, e.g. enwiki-sample (default: the study's, if any)",
    )
    measure.add_argument(
        "--eval-tokens", type=_positive_int, help="tokens of --eval-dataset measured (default: the study's, or 8192)"
    )
    measure.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    measure.add_argument(
        "--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)"
    )
    _accuracy_flags(heal, "also score all four models on these accuracy tasks (as `evaluate`)")
    heal.add_argument("--format", choices=["table", "json"], default="table", help="output format (default: table)")
