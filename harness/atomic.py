"""Files replaced in one rename: a reader (another job of a sweep, a report being rebuilt) sees the old content or
the new, never half of it. The temporary file sits in the same directory, because a rename is atomic only within
one file system."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path next to `path` for the caller to write: renamed onto `path` when the block ends, removed
    if it raises. (Named by process and thread, so concurrent writers of one path never share a temporary file.)"""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_atomic(path: Path, data: bytes | str) -> Path:
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
    return Path(path)
