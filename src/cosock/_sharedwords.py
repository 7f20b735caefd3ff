"""A few 64-bit words shared by the processes of one ``fork()`` family.

A memfd, mapped, locked with ``lockf`` (a POSIX record lock: it excludes other processes,
not other threads of this one). Used for the per-channel ownership cell after a fork
(``_forkshare``) and the holders count of a VM slot mapping (``_vmchannel``).
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
from collections.abc import Iterator


class SharedWords:
    __slots__ = ("fd", "mm", "words")

    def __init__(self, name: str, size: int) -> None:
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self.mm = mmap.mmap(self.fd, size)
        except OSError:
            os.close(self.fd)
            raise
        self.words = memoryview(self.mm).cast("Q")

    @contextlib.contextmanager
    def locked(self) -> Iterator[memoryview]:
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        try:
            yield self.words
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def close(self) -> None:
        self.words.release()
        self.mm.close()
        os.close(self.fd)
