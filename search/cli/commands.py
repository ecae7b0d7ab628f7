"""What each subcommand does once its flags are parsed: a few lines over the library."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import warnings
from dataclasses import replace

from search.errors import SearchError, redact


def configure_logging(debug: bool) -> None:
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


def run(args: argparse.Namespace) -> None:
    from search.config import RunConfig
    from search.failures import store_failures
    from search.front import format_table, front_report
    from search.store import sqlite_path
    from search.study import run as run_study

    fields = RunConfig.__dataclass_fields__
    config = RunConfig(**{k: v for k, v in vars(args).items() if k in fields})
    with store_failures(config.storage_url, sqlite_path(config.storage_url)):
        study = run_study(config)
    print(format_table(front_report(study)))
    where = f" --study {study.study_name}" + (f" --storage '{redact(config.storage)}'" if config.storage else "")
    print(
        f"next: python -m search export --pick knee --out DIR{where}   (or front --plot, show --trial N)",
        file=sys.stderr,
    )


def method(args: argparse.Namespace) -> None:
    from search.caching import CachingEvaluator, with_store
    from search.config import RunConfig
    from search.failures import store_failures
    from search.methods import BLOCK_METHODS, HEALED_METHODS, choose, measure
    from search.store import open_storage, sqlite_path
    from search.study import prepare

    fields = RunConfig.__dataclass_fields__
    config = RunConfig(**{k: v for k, v in vars(args).items() if k in fields and k != "storage"})
    config = replace(config, heal=HEALED_METHODS.get(args.method, config.heal), confirm_tokens=0)
    if args.method in BLOCK_METHODS:
        config = replace(config, granularity="sublayer")  # latency shapes and healing statistics by block
    loaded, evaluator, _ = prepare(config)
    dtype = loaded.dtype  # `auto` resolved: the store's cache key names what ran
    url = args.eval_cache
    with store_failures(url, sqlite_path(url)) if url else contextlib.nullcontext():
        cached = (
            with_store(evaluator, open_storage(url), loaded.fingerprint, dtype) if url else CachingEvaluator(evaluator)
        )
        cached.baseline()
        choice = choose(cached, args.method, args.remove, config.sensitivity_tokens, draws=args.draws, seed=args.seed)
        (row,) = measure(cached, [choice])
    if args.format == "json":
        print(json.dumps({"model": loaded.source, **row}))
        return
    for key, value in row.items():
        print(f"{key:16} {value:.4f}" if isinstance(value, float) else f"{key:16} {value}")


def stored_study(args: argparse.Namespace):
    from search.store import load_study, locate_store, open_storage

    return load_study(open_storage(locate_store(args.study, args.storage), create=False), args.study)


def front(args: argparse.Namespace) -> None:
    from search.front import FORMATS, front_report

    study = stored_study(args)
    print(FORMATS[args.format](front_report(study)))
    if args.plot:
        from search.plot import plot_front

        print(f"wrote {plot_front(study, args.plot)}", file=sys.stderr)


def studies(args: argparse.Namespace) -> None:
    from search.store import STUDIES_DIR, open_storage
    from search.summary import format_rows, study_summaries

    urls = [args.storage] if args.storage else [f"sqlite:///{p}" for p in sorted(STUDIES_DIR.glob("*.db"))]
    rows = [row for url in urls for row in study_summaries(open_storage(url, create=False))]
    print(format_rows(rows))


def show(args: argparse.Namespace) -> None:
    import json

    from search.summary import format_details, trial_details

    details = trial_details(stored_study(args), args.trial)
    print(json.dumps(details, indent=2) if args.format == "json" else format_details(details))


def export(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from search.export import export_trial, pick_trial

    study = stored_study(args)
    number = args.trial if args.trial is not None else pick_trial(study, args.pick)
    accuracy = prepared = None
    if args.tasks:  # task names and their data are checked before the export
        from search.accuracy import prepare_tasks

        accuracy = _accuracy_settings(args)
        prepared = prepare_tasks(accuracy)
    logging.getLogger("search").info("exporting trial %d of study %r to %s", number, study.study_name, args.out)
    report = export_trial(study, number, args.out, args.device, args.trust_remote_code, args.device_map)
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
    if accuracy is not None:
        from search.accuracy import evaluate_directory

        results = evaluate_directory(Path(args.out), study, accuracy, args.device, prepared)
        for task, result in results.items():
            stderr = f" ± {result.stderr:.4f}" if result.stderr is not None else ""
            print(
                f"{task}: {result.metric} {result.value:.4f}{stderr} (n={result.n}); in {args.out}/pruning.json",
                file=sys.stderr,
            )


def _accuracy_settings(args: argparse.Namespace):
    """`--tasks`, `--limit`, `--batch-size`, `--include-path` of `export` and `heal` (no --tasks: none)."""
    from pathlib import Path

    from search.accuracy import AccuracySettings

    return AccuracySettings(args.tasks or (), args.limit, args.batch_size, [Path(p) for p in args.include_path])


def evaluate(args: argparse.Namespace) -> None:
    from pathlib import Path

    from search.accuracy import evaluate_study, format_accuracy

    study = stored_study(args)
    report = evaluate_study(
        study,
        trials=args.trials,
        tasks=args.tasks,
        limit=args.limit,
        batch_size=args.batch_size,
        device=args.device,
        include=[Path(p) for p in args.include_path],
        trust_remote_code=args.trust_remote_code,
    )
    print(json.dumps(report.to_dict(), indent=2) if args.format == "json" else format_accuracy(report))


def heal(args: argparse.Namespace) -> None:
    from pathlib import Path

    from evaluators.lora import LoraSettings
    from search.export import pick_trial
    from search.lora import format_heal, heal_trial

    study = stored_study(args)
    number = args.trial if args.trial is not None else pick_trial(study, args.pick)
    fields = LoraSettings.__dataclass_fields__  # --steps, --rank, --alpha, --lr, --windows-per-step, --seed
    settings = LoraSettings(**{k: v for k, v in vars(args).items() if k in fields})
    logging.getLogger("search").info("LoRA-healing trial %d of study %r into %s", number, study.study_name, args.out)
    report = heal_trial(
        study,
        number,
        Path(args.out),
        settings,
        tokens=args.tokens,
        eval_dataset=args.eval_dataset,
        eval_tokens=args.eval_tokens,
        reference=args.reference,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
        accuracy=_accuracy_settings(args),
    )
    if args.format == "json":
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(format_heal(report))
    if not report.export.ok:
        raise SearchError("verification failed: the exported model does not reproduce its measured perplexity")
