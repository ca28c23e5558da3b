"""File-system helpers shared by every atomic writer (``zoo.entries`` and ``surgery.workspace``).

Atomic writes go through ``tempfile.mkstemp``, which creates files with mode 0600; renamed over the
destination, that would make every manifest and weights file private to its writer. The mode a plain
``open(path, "w")`` would leave is computed here once.
"""

from __future__ import annotations

import os

__all__ = ["new_file_mode"]


def _current_umask() -> int:
    """The process umask (read from ``/proc`` where it can be, else set-and-restored)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode(path: str | os.PathLike) -> int:
    """The permission bits a plain ``open(path, "w")`` would leave: an existing file's own, else 0666 & ~umask."""
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        return 0o666 & ~_current_umask()
