"""Per-batch tensors kept on disk and read back one batch at a time: a process's memory stays at one
batch whatever the number of tokens.

Linear healing needs, for a later removed run, the fitting windows' activations at a few layers of
the model healed so far; holding every layer's activations for every fitting token is what does not
scale (depth x hidden x tokens). They are written to anonymous temporary files in the system's
temporary directory (`TMPDIR`) and read with plain reads, so what stays in RAM is the kernel's page
cache, which the kernel may evict under memory pressure, not this process's memory. The files have
no name on disk: the space goes back when they are closed or the process ends, even when it is
killed (SIGKILL included), so an interrupted study leaves nothing behind.
"""

from __future__ import annotations

import errno
import tempfile
import weakref
from dataclasses import dataclass, field
from io import BufferedRandom

import torch


@dataclass
class _Entry:
    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class Scratch:
    """Tensors by (key, batch index), each key one append-only anonymous file."""

    _entries: dict[tuple[str, int], _Entry] = field(default_factory=dict, repr=False)
    _files: dict[str, BufferedRandom] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        weakref.finalize(self, _close, self._files)

    def put(self, key: str, index: int, tensor: torch.Tensor) -> None:
        """Store `tensor` as batch `index` of `key` (a batch written again replaces the old one)."""
        handle = self._file(key)
        data = tensor.detach().contiguous().cpu()
        handle.seek(0, 2)
        offset = handle.tell()
        try:
            handle.write(data.view(torch.uint8).numpy().data if data.numel() else b"")
        except OSError as exc:
            if exc.errno == errno.ENOSPC:  # named, so the one-line error says where space is missing
                where = f"{tempfile.gettempdir()} (healing's scratch files; TMPDIR chooses the place)"
                raise OSError(errno.ENOSPC, "No space left on device", where) from exc
            raise
        self._entries[key, index] = _Entry(offset, tuple(data.shape), data.dtype)

    def get(self, key: str, index: int, device: torch.device | str = "cpu") -> torch.Tensor:
        entry = self._entries[key, index]
        handle = self._file(key)
        handle.flush()
        size = entry.dtype.itemsize * int(torch.Size(entry.shape).numel())
        buffer = bytearray(size)
        handle.seek(entry.offset)
        if handle.readinto(buffer) != size:
            raise OSError(f"scratch file for {key!r} is shorter than written")
        flat = torch.frombuffer(buffer, dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8)
        return flat.view(entry.dtype).reshape(entry.shape).to(device)

    def __contains__(self, item: tuple[str, int]) -> bool:
        return item in self._entries

    def bytes(self) -> int:
        return sum(e.dtype.itemsize * int(torch.Size(e.shape).numel()) for e in self._entries.values())

    def close(self) -> None:
        _close(self._files)
        self._entries.clear()

    @property
    def closed(self) -> bool:
        return not self._files

    def _file(self, key: str) -> BufferedRandom:
        if key not in self._files:
            # Unnamed (O_TMPFILE, or unlinked at once where that is missing): nothing to clean up after a kill.
            self._files[key] = tempfile.TemporaryFile(prefix="search-scratch-")
        return self._files[key]


def _close(files: dict[str, BufferedRandom]) -> None:
    for handle in files.values():
        handle.close()
    files.clear()
