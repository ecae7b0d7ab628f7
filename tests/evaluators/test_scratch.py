"""Scratch files: tensors come back as written, batch by batch, and nothing stays on disk."""

import errno
import os
import tempfile

import pytest
import torch

from evaluators.scratch import Scratch


def _named_files() -> set[str]:
    return {name for name in os.listdir(tempfile.gettempdir()) if name.startswith("search-scratch-")}


def test_tensors_come_back_as_written_in_every_dtype_and_shape():
    before = _named_files()
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
    assert _named_files() == before  # the files have no name: a killed process leaves nothing behind
    scratch.close()
    assert scratch.closed


class _FullDisk:
    """A file whose writes fail as on a full disk."""

    def seek(self, *args):
        return 0

    def tell(self):
        return 0

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self):
        pass


def test_a_full_disk_names_the_temporary_directory():
    scratch = Scratch()
    scratch._files["x"] = _FullDisk()
    with pytest.raises(OSError) as info:
        scratch.put("x", 0, torch.ones(3))
    assert info.value.errno == errno.ENOSPC and "TMPDIR" in info.value.filename
    assert ("x", 0) not in scratch  # nothing recorded for a batch that was not written
    scratch.close()
