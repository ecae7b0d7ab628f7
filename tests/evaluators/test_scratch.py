"""Scratch files: tensors come back as written, batch by batch, and the files go when closed."""

import gc

import torch

from evaluators.scratch import Scratch


def test_tensors_come_back_as_written_in_every_dtype_and_shape():
    scratch = Scratch()
    written = {
        ("s3", 0): torch.randn(4, 9, 8),
        ("s3", 1): torch.randn(2, 9, 8),  # a short last batch
        ("m3", 0): torch.randn(4, 9, 8).bfloat16(),
        ("m3", 1): torch.randn(2, 9, 8, dtype=torch.float64),
    }
    for (key, index), tensor in written.items():
        scratch.put(key, index, tensor)
    for (key, index), tensor in written.items():
        back = scratch.get(key, index)
        assert back.dtype == tensor.dtype and torch.equal(back, tensor)
    assert scratch.bytes() == sum(t.numel() * t.element_size() for t in written.values())
    scratch.put("s3", 0, torch.zeros(4, 9, 8))  # written again: the new one is read
    assert torch.equal(scratch.get("s3", 0), torch.zeros(4, 9, 8))
    directory = scratch.directory
    assert (directory / "s3").exists()
    scratch.close()
    assert not directory.exists()


def test_the_files_go_when_the_scratch_is_collected():
    scratch = Scratch()
    scratch.put("x", 0, torch.ones(3))
    directory = scratch.directory
    del scratch
    gc.collect()
    assert not directory.exists()
