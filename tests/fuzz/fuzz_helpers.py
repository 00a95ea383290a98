"""Guards and byte-level helpers shared by the fuzz tests (not a test module)."""

from __future__ import annotations

import builtins
import contextlib
import io
import os
from collections.abc import Iterator
from typing import Any
from unittest import mock

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_FORBIDDEN_OS = ("mkdir", "makedirs", "symlink", "link", "mknod", "mkfifo", "rename", "replace", "chmod", "remove")


@contextlib.contextmanager
def no_file_writes() -> Iterator[None]:
    """Fail (AssertionError) on any write-mode open or file-system change inside the block."""
    real_open, real_os_open = builtins.open, os.open

    def guarded_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        assert not set(mode) & set("wax+"), f"parser opened {file!r} for writing (mode {mode!r})"
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        assert not flags & _WRITE_FLAGS, f"parser opened {path!r} for writing (flags {flags:#o})"
        return real_os_open(path, flags, *args, **kwargs)

    def forbidden(name: str) -> Any:
        def fail(*args: Any, **kwargs: Any) -> None:
            raise AssertionError(f"parser called os.{name}{args!r}")

        return fail

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(builtins, "open", guarded_open))
        stack.enter_context(mock.patch.object(io, "open", guarded_open))
        stack.enter_context(mock.patch.object(os, "open", guarded_os_open))
        for name in _FORBIDDEN_OS:
            stack.enter_context(mock.patch.object(os, name, forbidden(name)))
        yield


class CountingStream(io.RawIOBase):
    """A read-only, non-seekable stream over ``data`` that records the size of every ``read(n)``."""

    def __init__(self, data: bytes) -> None:
        self._buf = io.BytesIO(data)
        self.requests: list[int] = []

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:  # type: ignore[override]
        assert n is not None and n >= 0, f"unbounded read({n!r}): the reader must always ask for a size"
        self.requests.append(n)
        return self._buf.read(n)

    def readinto(self, b: Any) -> int:
        raise AssertionError("readinto is not used by the tar reader")


def flip_bits(data: bytes, positions: list[int]) -> bytes:
    """``data`` with one bit flipped per entry of ``positions`` (bit index, wrapped to the data)."""
    if not data:
        return data
    buf = bytearray(data)
    for p in positions:
        p %= len(buf) * 8
        buf[p // 8] ^= 1 << (p % 8)
    return bytes(buf)
