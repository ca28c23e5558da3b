"""Keep native solver libraries from writing to standard output.

HiGHS (through highspy) prints a licence banner from C++ the first time a solver object is made in
a process, whatever PuLP's ``msg=0`` says. On standard output it corrupts machine-readable output
such as ``surgery reassemble --json``; redirected at the file-descriptor level it goes to standard
error instead, where progress messages belong.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator

__all__ = ["stdout_to_stderr"]


def _flush_c_stdio() -> None:
    # C stdio buffers stdout when it is a pipe; flush it while fd 1 still points at stderr.
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError, TypeError):  # no libc handle (Windows): nothing buffered to flush
        pass


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Within the block, anything written to file descriptor 1 (Python or native code) goes to fd 2."""
    try:
        stdout_fd = sys.stdout.fileno()
        stderr_fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # replaced streams (pytest capture, notebooks)
        yield
        return
    sys.stdout.flush()
    saved = os.dup(stdout_fd)
    try:
        os.dup2(stderr_fd, stdout_fd)
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        _flush_c_stdio()
        os.dup2(saved, stdout_fd)
        os.close(saved)
