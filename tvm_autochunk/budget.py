"""Parse user-supplied memory budgets and format byte counts.

This is the boundary where a budget is validated (style.md §9.8): everything past
``parse_budget`` deals in integer bytes only. Pure Python; imports nothing from TVM.

Accepted forms
--------------
* ``None`` -- no budget (passed through unchanged).
* a positive ``int`` number of bytes (``bool`` is rejected, ``float`` is rejected).
* a string: a non-negative decimal number, optionally followed by a unit, optionally
  separated by whitespace, e.g. ``"1024"``, ``"512MiB"``, ``"64 KiB"``, ``"1.5GiB"``, ``"2gb"``.
  Units are case-insensitive: ``B``, ``KB``/``MB``/``GB``/``TB`` (powers of 1000) and
  ``KiB``/``MiB``/``GiB``/``TiB`` (powers of 1024). A fractional number needs a unit.
  The exact product is rounded *down* to whole bytes (a budget is an upper bound); the
  result must be at least 1 byte.
"""

from __future__ import annotations

import math
import numbers
import re
import reprlib
from fractions import Fraction

from relay_passes.errors import BudgetError
from relay_passes.plan import format_bytes

__all__ = ["UNITS", "format_bytes", "parse_budget"]

#: Unit name (canonical spelling) -> bytes.
UNITS: dict[str, int] = {
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "TiB": 1024**4,
}
_UNITS_LOWER = {name.lower(): factor for name, factor in UNITS.items()}

_ACCEPTED_FORMS = (
    "expected a positive number of bytes (int) or a string like '512MiB', '2GB', '1.5GiB' "
    f"(units: {', '.join(UNITS)})"
)

_BUDGET_RE = re.compile(
    r"""
    \s*
    (?P<number> [0-9]+ (?:\.[0-9]+)? | \.[0-9]+ )
    \s*
    (?P<unit> [A-Za-z]+ )?
    \s*
    """,
    re.VERBOSE,
)

_repr = reprlib.Repr()
_repr.maxstring = 80
_repr.maxother = 80


def _invalid(value: object, reason: str = "") -> BudgetError:
    # The reason goes last so the message always starts "invalid budget <repr>: expected ...".
    detail = f"; {reason}" if reason else ""
    return BudgetError(f"invalid budget {_repr.repr(value)}: {_ACCEPTED_FORMS}{detail}")


def parse_budget(value: object) -> int | None:
    """Return ``value`` as a positive integer number of bytes, or ``None`` for "no budget".

    Raises :class:`relay_passes.errors.BudgetError` (a ``ValueError``) for anything else; the
    message echoes the received value and lists the accepted forms.

    >>> parse_budget("1.5GiB")
    1610612736
    >>> parse_budget("2GB")
    2000000000
    >>> parse_budget(4096)
    4096
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise _invalid(value, "a bool is not a number of bytes")
    if isinstance(value, numbers.Integral):
        n = int(value)
        if n < 1:
            raise _invalid(value, "must be at least 1 byte")
        return n
    if isinstance(value, numbers.Real):
        reason = "not finite" if not math.isfinite(value) else "a float needs a unit, as a string"
        raise _invalid(value, reason)
    if not isinstance(value, str):
        raise _invalid(value, f"unsupported type {type(value).__name__}")

    match = _BUDGET_RE.fullmatch(value)
    if match is None:
        raise _invalid(value)
    number, unit = match.group("number"), match.group("unit")
    if unit is None:
        if "." in number:
            raise _invalid(value, "a fractional number needs a unit")
        factor = 1
    else:
        factor = _UNITS_LOWER.get(unit.lower(), 0)
        if factor == 0:
            raise _invalid(value, f"unknown unit {unit!r}")
    n = math.floor(Fraction(number) * factor)
    if n < 1:
        raise _invalid(value, "must be at least 1 byte")
    return n

