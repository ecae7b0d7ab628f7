import random

import torch

from evaluators.cloze import VERSION, cloze_documents, cloze_task
from tests.conftest import tiny_tokenizer


def _windows(tokenizer, texts: list[str]) -> torch.Tensor:
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = min(map(len, ids))
    return torch.tensor([row[:width] for row in ids])


class Fixed:
    """Decodes any window as one fixed text (a stand-in tokenizer for the word rules)."""

    def __init__(self, text: str):
        self.text = text

    def decode(self, ids):
        return self.text


def test_each_document_ends_in_a_word_of_its_context_within_one_window():
    tokenizer = tiny_tokenizer()
    rng = random.Random(0)
    texts = [" ".join(f"word{rng.randrange(10, 40)}" for _ in range(40)) for _ in range(3)]
    windows = _windows(tokenizer, texts)
    docs = cloze_documents(tokenizer, windows, context_words=8)
    decoded = [tokenizer.decode(w.tolist()) for w in windows]
    assert docs and len({d["text"] for d in docs}) == len(docs)
    for doc in docs:
        *context, target = doc["text"].split(" ")
        assert 4 <= len(context) <= 8  # at least half the context, at most all of it
        assert target in context  # named earlier in the passage
        assert any(doc["text"] in text for text in decoded)  # never spans two windows
        # A window's first and last words may be cut by its boundaries: never used.
        assert not any(text.startswith(doc["text"]) or text.endswith(doc["text"]) for text in decoded)


def test_targets_are_whole_words_named_before_punctuation_dropped():
    text = "cut The storm hit Sydney, homes near Sydney. Storm damage: the storm, 2002 homes and 2002 fires\n\nhit ends"
    docs = cloze_documents(Fixed(text), torch.zeros(1, 1, dtype=torch.long), context_words=8)
    targets = sorted(d["text"].split(" ")[-1] for d in docs)
    # "Sydney" and "storm" (any case) and "homes" recur; "the"/"hit" are too short, "2002" has no letter,
    # "fires\n\nhit" is not one word, and "ends" (the window's last word) is never a target.
    assert targets == ["Storm", "Sydney", "homes", "storm"]
    assert any(d["text"].endswith("near Sydney") for d in docs)  # "Sydney." scored as "Sydney"


def test_order_is_seeded_and_the_task_is_lambada_openai_format(tmp_path):
    tokenizer = tiny_tokenizer()
    windows = _windows(tokenizer, [" ".join(f"word{10 + j % 7}" for j in range(60))] * 2)
    first = cloze_documents(tokenizer, windows, context_words=8, seed=1)
    assert first == cloze_documents(tokenizer, windows, context_words=8, seed=1)
    assert first != cloze_documents(tokenizer, windows, context_words=8, seed=2)
    assert sorted(map(str, first)) == sorted(map(str, cloze_documents(tokenizer, windows, context_words=8, seed=2)))
    config = cloze_task("heldout_cloze", str(tmp_path / "docs.jsonl"))
    assert config["doc_to_text"] == "{{text.split(' ')[:-1]|join(' ')}}"
    assert config["doc_to_target"] == "{{' '+text.split(' ')[-1]}}"
    assert [m["metric"] for m in config["metric_list"]] == ["acc", "perplexity"]
    assert config["metadata"]["version"] == VERSION
