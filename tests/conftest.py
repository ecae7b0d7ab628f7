"""Tiny randomly initialised GPT-2 and Llama models built from config, a word-level tokenizer, and a
synthetic corpus: fast, offline stand-ins for the mechanics tests."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

# Tests never reach a hub: set before transformers/datasets read their configuration.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

WORDS = [f"word{i}" for i in range(90)]
VOCAB = 128

# `pytest -n auto` (pytest-xdist): one process per core, so each computes on one thread (two workers of
# two threads each on a 2-core machine would fight over the cores).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# The tests that start fleets of worker processes run one after another on one xdist worker
# (`--dist loadgroup`: the largest group is handed out first), so two fleets never share the cores
# and stretch each other's deadlines. The real-model tests, the longest single ones, are collected
# first of the rest, so the other worker starts on them instead of finishing the run with them.
FLEETS, REAL_MODEL = "test_store.py", "test_real_model.py"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name == FLEETS:
            item.add_marker(pytest.mark.xdist_group("fleets"))
    items.sort(key=lambda item: item.path.name not in (FLEETS, REAL_MODEL))  # stable: each part keeps its order


def _config(family: str, layers: int):
    import transformers as tf

    llama_like = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    # Interleaved sliding/full attention where a family has it, so `layer_types` is a real per-layer list.
    alternating = ["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"] * (layers % 2)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=256)
    if family == "llama":
        return tf.LlamaConfig(**llama_like)
    if family == "mistral":
        return tf.MistralConfig(**llama_like, sliding_window=16)
    if family == "qwen2":
        return tf.Qwen2Config(**llama_like, use_sliding_window=True, sliding_window=16, max_window_layers=layers // 2)
    if family == "qwen3":
        return tf.Qwen3Config(
            **llama_like, head_dim=8, use_sliding_window=True, sliding_window=16, layer_types=alternating
        )
    if family == "gemma3":
        return tf.Gemma3TextConfig(**llama_like, head_dim=8, sliding_window=8, layer_types=alternating)
    if family == "phi3":
        return tf.Phi3Config(**llama_like, pad_token_id=0)
    raise ValueError(family)


FAMILIES = ["gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3"]


def tiny_model(family: str, layers: int = 6, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(_config(family, layers)).eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")


def write_corpus(path: Path, lines: int = 400, seed: int = 0) -> Path:
    rng = random.Random(seed)
    # Repeating phrases give the random models something learnable-looking; content is irrelevant.
    text = "\n".join(
        " ".join(rng.choice(WORDS[: 10 + i % 80]) for _ in range(rng.randint(8, 40))) for i in range(lines)
    )
    path.write_text(text + "\n")
    return path


@pytest.fixture(params=["gpt2", "llama"])
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("data") / "corpus.txt")


def _saved(tmp_path_factory, family: str) -> Path:
    """A saved 6-layer model with its tokenizer: loads through the real `from_pretrained` path."""
    path = tmp_path_factory.mktemp(f"tiny-{family}")
    tiny_model(family).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return _saved(tmp_path_factory, "llama")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    return _saved(tmp_path_factory, "gpt2")


@pytest.fixture(scope="session")
def postgres_url():
    """A live PostgreSQL server for the session. Required in CI; skipped locally when not installed."""
    from tests.postgres import throwaway_cluster

    try:
        cluster = throwaway_cluster()
        url = cluster.__enter__()
    except (FileNotFoundError, subprocess.CalledProcessError) as exc:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required in CI and could not start: {exc}")
        pytest.skip(f"no PostgreSQL server available: {exc}")
    yield url
    cluster.__exit__(None, None, None)
