"""The settings of the OT token weights and their one check, :func:`checked_setting`: ``ot_token_weights`` applies
it to its arguments, ``OTPOConfig`` to its ``ot_*`` fields and the tools to their ``--ot_*`` options."""

import math
import numbers

from .costs import COST_SCALES, COSTS


NORMALIZATIONS = ("min", "mean", "max", "length", "none")
SOLVERS = ("batched", "online", "pot")
WEIGHTINGS = ("ot", "uniform", "sampo")
# The settings of `ot_token_weights` that `checked_setting` checks: the numbers, then the choices.
POSITIVE_SETTINGS = ("reg", "reg_m", "tol")
CHOICES = {
    "cost": COSTS,
    "cost_scale": COST_SCALES,
    "normalization": NORMALIZATIONS,
    "weighting": WEIGHTINGS,
    "solver": SOLVERS,
}
SETTINGS = (*POSITIVE_SETTINGS, "max_iter", *CHOICES, "memory_budget")


def positive_number(value, label: str) -> float:
    """``value`` as a float if it is a finite real number > 0 (Python's or NumPy's, not a bool); a ``ValueError``
    naming ``label`` otherwise."""
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{label} must be a finite number > 0, got {value!r}.")
    return float(value)


def _is_real(value) -> bool:
    """An int or a float, Python's or NumPy's (NumPy registers its scalars with `numbers`); not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def checked_setting(name: str, value, label: str | None = None):
    """``value`` of the keyword argument ``name`` of :func:`ot_token_weights` (one of :data:`SETTINGS`), as the
    solver takes it: a plain Python number for the numbers; a ``ValueError`` naming ``label`` (default: ``name`` in
    backticks) when it is not valid. ``OTPOConfig`` checks its ``ot_<name>`` fields with it."""
    label = label or f"`{name}`"
    if name in POSITIVE_SETTINGS:
        return positive_number(value, label)
    if name == "max_iter":
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise ValueError(f"{label} must be an int, got {value!r}.")
        if value < 1:
            raise ValueError(f"{label} must be >= 1, got {value!r}.")
        return int(value)
    if name == "memory_budget":
        if value == "auto":
            return value
        try:  # a number of GiB; from a command line, its text
            return positive_number(float(value) if isinstance(value, str) else value, label)
        except ValueError:
            raise ValueError(f"{label} must be 'auto' or a number of GiB > 0, got {value!r}.") from None
    if value not in CHOICES[name]:
        raise ValueError(f"{label} must be one of {list(CHOICES[name])}, got {value!r}.")
    return value
