"""An offline accuracy task: LAMBADA-style last-word cloze over the study's held-out windows.

Standard zero-shot tasks download their data from a hub; this one is built at run time from
text the study already holds and never searched on (the held-out split), so a fresh offline
machine can measure accuracy. Each document is a passage of held-out text ending in a word that
also occurs earlier in the passage: as in LAMBADA, predicting it rewards using the context (a
name, a place, a topic word mentioned before), which plain next-word accuracy, a restatement of
held-out perplexity, would not. The model sees the passage without that word and is scored
exactly as lm-evaluation-harness scores `lambada_openai` (whose document format and prompt this
copies): whether greedy decoding produces the word (`acc`), and the word's perplexity.

Passages come from one window each (never across the calibration boundary); passages of one
window overlap, but every document has its own target. The documents are shuffled with a fixed
seed so that `--limit N` (the harness takes the first N) samples every window.
"""

from __future__ import annotations

import random
import re

import torch

VERSION = 2  # the harness's task version: stored with every result; a change of the rules below raises it
# A target is a whole word: letters and digits with at least one letter, trailing punctuation dropped.
_TARGET = re.compile(r"((?=[^\W_]*[^\W\d_])[^\W_]+)[.,;:!?\"')]*")
_WORD = re.compile(r"[^\W_]+")


def cloze_documents(
    tokenizer, windows: torch.Tensor, context_words: int = 48, min_chars: int = 4, seed: int = 0
) -> list[dict]:
    """`{"text": passage}` documents whose last space-separated word is the target, in a seeded order.

    `context_words`: how many words precede each target (fewer at a window's start, never fewer than
    half). Words are split on single spaces as the harness's prompt splits them; a window's first
    and last words are dropped because the window boundary may cut them. A target has at least
    `min_chars` characters (most function words have fewer) and occurs in its context, in any case.
    """
    docs = []
    minimum = max(1, context_words // 2)
    for window in windows:
        words = tokenizer.decode(window.tolist()).split(" ")[1:-1]
        for i in range(minimum, len(words)):
            match = _TARGET.fullmatch(words[i])
            if match is None or len(match.group(1)) < min_chars:
                continue
            context = words[max(0, i - context_words) : i]
            seen = {word.lower() for text in context for word in _WORD.findall(text)}
            if match.group(1).lower() not in seen:
                continue
            docs.append({"text": " ".join([*context, match.group(1)])})
    random.Random(seed).shuffle(docs)
    return docs


def cloze_task(name: str, data_file: str) -> dict:
    """The harness task config: `lambada_openai`'s prompt and metrics over a local JSON-lines file."""
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": data_file}},
        "output_type": "loglikelihood",
        "test_split": "test",
        "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}",
        "doc_to_target": "{{' '+text.split(' ')[-1]}}",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
        ],
        "metadata": {"version": VERSION},
    }
