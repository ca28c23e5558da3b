"""Errors raised by :mod:`solvers` (the CLI prints them on one line, exit code 2)."""


class SolverError(Exception):
    """An optimisation problem is malformed or the solver failed."""


class InfeasibleError(SolverError):
    """No feasible solution exists (e.g. a budget below the smallest possible model)."""
