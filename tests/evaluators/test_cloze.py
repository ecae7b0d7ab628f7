import random

import torch

from evaluators.cloze import cloze_documents, cloze_task
from tests.conftest import tiny_tokenizer


def _windows(tokenizer, texts: list[str]) -> torch.Tensor:
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = min(map(len, ids))
    return torch.tensor([row[:width] for row in ids])


def test_each_document_ends_in_a_whole_word_of_its_own_window():
    tokenizer = tiny_tokenizer()
    rng = random.Random(0)
    texts = [" ".join(f"w{rng.randrange(10, 90)}" for _ in range(40)) for _ in range(3)]
    windows = _windows(tokenizer, texts)
    docs = cloze_documents(tokenizer, windows, context_words=8)
    decoded = [tokenizer.decode(w.tolist()) for w in windows]
    assert docs and len({d["text"] for d in docs}) == len(docs)
    for doc in docs:
        words = doc["text"].split(" ")
        assert 4 <= len(words) - 1 <= 8  # at least half the context, at most all of it
        assert sum(doc["text"] in text for text in decoded) >= 1  # never spans two windows
        # The window's first word may be cut by the window boundary: never used.
        assert not any(text.startswith(doc["text"]) for text in decoded)


def test_targets_are_words_with_punctuation_dropped_and_short_words_skipped():
    class Spaces:  # decodes token ids as the words of one fixed text
        def decode(self, ids):
            return "cut The storm, it said; hit 42 homes near Sydney. A fire\n\nburnt"

    docs = cloze_documents(Spaces(), torch.zeros(1, 1, dtype=torch.long), context_words=2)
    targets = sorted(d["text"].split(" ")[-1] for d in docs)
    # "it"/"A" are too short, "42" has no letter, "fire\n\nburnt" is not one word
    assert targets == ["Sydney", "hit", "homes", "near", "said", "storm"]
    assert any(d["text"] == "The storm" for d in docs)  # "storm," scored as "storm"


def test_order_is_seeded_and_the_task_is_lambada_openai_format(tmp_path):
    tokenizer = tiny_tokenizer()
    windows = _windows(tokenizer, [" ".join(f"w{10 + j % 70}" for j in range(60))] * 2)
    first = cloze_documents(tokenizer, windows, context_words=8, seed=1)
    assert first == cloze_documents(tokenizer, windows, context_words=8, seed=1)
    assert first != cloze_documents(tokenizer, windows, context_words=8, seed=2)
    assert sorted(map(str, first)) == sorted(map(str, cloze_documents(tokenizer, windows, context_words=8, seed=2)))
    config = cloze_task("heldout_cloze", str(tmp_path / "docs.jsonl"))
    assert config["doc_to_text"] == "{{text.split(' ')[:-1]|join(' ')}}"
    assert config["doc_to_target"] == "{{' '+text.split(' ')[-1]}}"
    assert [m["metric"] for m in config["metric_list"]] == ["acc", "perplexity"]
