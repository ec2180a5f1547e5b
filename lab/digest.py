"""Digests of what a run reads from disk, for its identity: other files under the same name are another run."""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

READ_WHOLE = 64 << 20  # files up to this size are digested by their bytes; larger ones (weights) by size and time


def folder_digest(folder: Path) -> str:
    """A folder as it is now: its absolute path and each file's path inside it with its bytes (or, over READ_WHOLE,
    its size and modification time: cheap for gigabytes of weights, and a file written again changes it);
    "unreadable" where it cannot be read."""
    try:
        folder = folder.expanduser().resolve()
        entries = [str(folder)]
        for root, dirs, files in os.walk(folder, onerror=_raise):
            dirs.sort()
            for name in sorted(files):
                path = Path(root, name)
                stat = path.stat()
                entries.append(f"{path.relative_to(folder)}:{_file_digest(path, stat.st_size, stat.st_mtime_ns)}")
    except OSError:
        return "unreadable"
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1024)
def _file_digest(path: Path, size: int, mtime_ns: int) -> str:
    if size > READ_WHOLE:
        return f"{size}:{mtime_ns}"
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _raise(error: OSError) -> None:
    raise error
