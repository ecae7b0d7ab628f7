import pytest
import torch

from evaluators.data import bos_to_prepend, make_splits
from search.errors import SearchError
from tests.conftest import tiny_tokenizer, write_corpus


def test_splits_are_sized_and_disjoint(corpus):
    splits = make_splits(tiny_tokenizer(), str(corpus), calib_tokens=256, test_tokens=128, seq_len=64)
    assert splits.calib.shape == (4, 64) and splits.test.shape == (2, 64)
    # Consecutive, non-overlapping slices of one token stream: no token is in both splits.
    stream = torch.cat([splits.calib.reshape(-1), splits.test.reshape(-1)])
    assert stream.numel() == 384
    again = make_splits(tiny_tokenizer(), str(corpus), calib_tokens=640, test_tokens=64, seq_len=64)
    assert torch.equal(again.calib.reshape(-1)[:384], stream)  # deterministic, calibration first
    assert splits.fingerprint() != again.fingerprint()


def test_data_seeds_draw_calibration_windows_and_never_move_the_held_out_split(corpus):
    def rows(windows):
        return {tuple(w.tolist()) for w in windows}

    first = make_splits(tiny_tokenizer(), str(corpus), 256, 128, 64, fit_tokens=256)
    drawn = [make_splits(tiny_tokenizer(), str(corpus), 256, 128, 64, fit_tokens=256, data_seed=s) for s in (1, 2)]
    for splits in drawn:
        assert torch.equal(splits.test, first.test)  # figures on held-out tokens mean the same under every seed
        assert splits.calib.shape == first.calib.shape and splits.fit.shape == first.fit.shape
        assert not rows(splits.calib) & rows(splits.test) and not rows(splits.fit) & (
            rows(splits.calib) | rows(splits.test)
        )
    assert not torch.equal(drawn[0].calib, drawn[1].calib) and not torch.equal(drawn[0].calib, first.calib)
    again = make_splits(tiny_tokenizer(), str(corpus), 256, 128, 64, data_seed=1)
    assert torch.equal(again.calib, drawn[0].calib)  # reproducible, and with or without fitting windows
    with pytest.raises(SearchError, match="--data-seed 1: the dataset has .* windows of 64 tokens outside"):
        make_splits(tiny_tokenizer(), str(corpus), 64 * 10_000, 128, 64, data_seed=1)


def test_confirmation_windows_follow_every_other_split_and_change_none(corpus):
    def rows(windows):
        return {tuple(w.tolist()) for w in windows}

    for seed in (0, 1):
        plain = make_splits(tiny_tokenizer(), str(corpus), 256, 128, 64, fit_tokens=256, data_seed=seed)
        more = make_splits(tiny_tokenizer(), str(corpus), 256, 128, 64, 256, seed, confirm_tokens=640)
        for split in ("calib", "test", "fit"):
            assert torch.equal(more.windows(split), plain.windows(split))  # adding them moves nothing
        assert more.more.shape == (6, 64) and plain.more is None  # 640 tokens: 4 calibration windows and 6 more
        assert not rows(more.more) & (rows(more.calib) | rows(more.test) | rows(more.fit))
        assert more.scored == ("calib", "test", "more") and more.fingerprint() == plain.fingerprint()
    with pytest.raises(SearchError, match="adds no window to --calib-tokens 256"):
        make_splits(tiny_tokenizer(), str(corpus), 256, 128, 64, confirm_tokens=300)
    with pytest.raises(SearchError, match="fewer than the .* --confirm-tokens 6400000"):
        make_splits(tiny_tokenizer(), str(corpus), 256, 128, 64, confirm_tokens=6_400_000)


def test_folder_of_text_files(tmp_path):
    write_corpus(tmp_path / "a.txt", lines=50, seed=1)
    write_corpus(tmp_path / "b.txt", lines=50, seed=2)
    splits = make_splits(tiny_tokenizer(), str(tmp_path), calib_tokens=64, test_tokens=64, seq_len=32)
    assert splits.calib.shape == (2, 32)


def test_too_small_dataset_is_a_clear_error(tmp_path):
    small = write_corpus(tmp_path / "small.txt", lines=3)
    with pytest.raises(SearchError, match="fewer than the"):
        make_splits(tiny_tokenizer(), str(small), calib_tokens=4096, test_tokens=4096, seq_len=64)


def test_unknown_hub_dataset_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SearchError, match="cannot load --dataset"):
        make_splits(tiny_tokenizer(), "no-such-org/no-such-dataset", 64, 64, 32)


def test_bos_only_when_tokenizer_adds_it():
    tok = tiny_tokenizer()
    assert bos_to_prepend(tok) is None  # this tokenizer has a BOS token but does not add it
