"""User-facing errors.

Every error a user can cause (unknown model, untraceable model, infeasible budget, corrupt workspace,
wrong data path, ...) is raised as a :class:`SurgeryError`, :class:`zoo.errors.ZooError` or
:class:`solvers.errors.SolverError` subclass. The CLI prints its message on one
line and exits with code 2; the Python API lets it propagate. Internal bugs stay ordinary exceptions.
"""

from __future__ import annotations

from solvers.errors import InfeasibleError, SolverError
from zoo.errors import DataError, ZooError

__all__ = [
    "SurgeryError", "TraceError", "WorkspaceError", "ZooError", "DataError", "SolverError",
    "InfeasibleError", "USER_ERRORS",
]


class SurgeryError(Exception):
    """Base class of errors caused by bad input; the CLI turns them into one line and exit code 2."""

    exit_code = 2


class TraceError(SurgeryError):
    """A model cannot be traced or cut into blocks."""


class WorkspaceError(SurgeryError):
    """A workspace folder is missing, corrupt, or from an incompatible schema."""


# Everything a user can cause; the CLI catches exactly these and prints one line (exit code 2).
USER_ERRORS = (SurgeryError, ZooError, SolverError)
