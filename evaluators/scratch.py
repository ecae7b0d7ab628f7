"""Per-batch tensors kept on disk and read back one batch at a time: a process's memory stays at one
batch whatever the number of tokens.

Linear healing needs, for a later removed run, the fitting windows' activations at a few layers of
the model healed so far; holding every layer's activations for every fitting token is what does not
scale (depth x hidden x tokens). They are written to scratch files in the system's temporary
directory (`TMPDIR`) and read with plain reads, so what stays in RAM is the kernel's page cache,
which the kernel may evict under memory pressure, not this process's memory. The files are deleted
when the scratch is closed or collected, and at exit.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from io import BufferedRandom
from pathlib import Path

import torch


@dataclass
class _Entry:
    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class Scratch:
    """Tensors by (key, batch index), each key one append-only file."""

    directory: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="search-scratch-")))
    _entries: dict[tuple[str, int], _Entry] = field(default_factory=dict, repr=False)
    _files: dict[str, BufferedRandom] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        weakref.finalize(self, _remove, self._files, self.directory)

    def put(self, key: str, index: int, tensor: torch.Tensor) -> None:
        """Store `tensor` as batch `index` of `key` (a batch written again replaces the old one)."""
        handle = self._file(key)
        data = tensor.detach().contiguous().cpu()
        handle.seek(0, 2)
        offset = handle.tell()
        handle.write(data.view(torch.uint8).numpy().data if data.numel() else b"")
        self._entries[key, index] = _Entry(offset, tuple(data.shape), data.dtype)

    def get(self, key: str, index: int, device: torch.device | str = "cpu") -> torch.Tensor:
        entry = self._entries[key, index]
        handle = self._file(key)
        handle.flush()
        size = entry.dtype.itemsize * int(torch.Size(entry.shape).numel())
        buffer = bytearray(size)
        handle.seek(entry.offset)
        if handle.readinto(buffer) != size:
            raise OSError(f"scratch file {self.directory / key} is shorter than written")
        flat = torch.frombuffer(buffer, dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8)
        return flat.view(entry.dtype).reshape(entry.shape).to(device)

    def __contains__(self, item: tuple[str, int]) -> bool:
        return item in self._entries

    def bytes(self) -> int:
        return sum(e.dtype.itemsize * int(torch.Size(e.shape).numel()) for e in self._entries.values())

    def close(self) -> None:
        _remove(self._files, self.directory)
        self._entries.clear()

    def _file(self, key: str) -> BufferedRandom:
        if key not in self._files:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._files[key] = open(self.directory / key, "w+b")  # noqa: SIM115 (closed by close/finalize)
        return self._files[key]


def _remove(files: dict[str, BufferedRandom], directory: Path) -> None:
    for handle in files.values():
        handle.close()
    files.clear()
    shutil.rmtree(directory, ignore_errors=True)
