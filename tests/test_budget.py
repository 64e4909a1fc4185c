"""parse_budget / format_bytes: the budget boundary (pure Python, no TVM needed)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from relay_passes.errors import AutochunkError, BudgetError
from tvm_autochunk.budget import UNITS, format_bytes, parse_budget

KiB, MiB, GiB, TiB = 1024, 1024**2, 1024**3, 1024**4

ACCEPT = [
    (None, None),
    (1, 1),
    (4096, 4096),
    (10**15, 10**15),
    ("1024", 1024),
    ("1", 1),
    ("  1024  ", 1024),
    ("12B", 12),
    ("12 b", 12),
    ("512MiB", 512 * MiB),
    ("512mib", 512 * MiB),
    ("64 KiB", 64 * KiB),
    ("64KIB", 64 * KiB),
    ("2GB", 2_000_000_000),
    ("2gb", 2_000_000_000),
    ("2Gb", 2_000_000_000),
    ("2gib", 2 * GiB),
    ("1.5GiB", 1_610_612_736),
    ("1.5 GiB", 1_610_612_736),
    (".5GiB", GiB // 2),
    ("0.5KB", 500),
    ("1.1KB", 1100),
    ("3KB", 3000),
    ("7MB", 7_000_000),
    ("1TB", 10**12),
    ("1TiB", TiB),
    ("2tib", 2 * TiB),
    # fractional bytes round down (a budget is an upper bound)
    ("1.3MiB", 1_363_148),  # exact: 1363148.8
    ("0.3KiB", 307),  # exact: 307.2
    ("1.9B", 1),
]


@pytest.mark.parametrize(("value", "expected"), ACCEPT, ids=[repr(v) for v, _ in ACCEPT])
def test_parse_budget_accepts(value, expected):
    result = parse_budget(value)
    assert result == expected
    assert result is None or type(result) is int


def test_parse_budget_accepts_numpy_integers():
    np = pytest.importorskip("numpy")
    result = parse_budget(np.int64(2048))
    assert result == 2048
    assert type(result) is int


REJECT = [
    # (value, text the message must echo, i.e. repr(value))
    ("2 parsecs", "'2 parsecs'"),
    ("", "''"),
    ("   ", "'   '"),
    ("GiB", "'GiB'"),
    ("-1GiB", "'-1GiB'"),
    ("+1GiB", "'+1GiB'"),
    ("0", "'0'"),
    ("0GiB", "'0GiB'"),
    ("0.0MiB", "'0.0MiB'"),
    ("0.4B", "'0.4B'"),
    ("1.5", "'1.5'"),
    ("1e9", "'1e9'"),
    ("1_000", "'1_000'"),
    ("1,000", "'1,000'"),
    ("1.5.2GiB", "'1.5.2GiB'"),
    ("1. GiB", "'1. GiB'"),
    ("2 GiB RAM", "'2 GiB RAM'"),
    ("2 PiB", "'2 PiB'"),
    ("2 kibibytes", "'2 kibibytes'"),
    ("nan", "'nan'"),
    ("inf", "'inf'"),
    ("NaNGiB", "'NaNGiB'"),
    ("١٢MiB", "'١٢MiB'"),  # non-ASCII digits
    (0, "0"),
    (-1, "-1"),
    (-(2**40), str(-(2**40))),
    (True, "True"),
    (False, "False"),
    (1.5, "1.5"),
    (1024.0, "1024.0"),
    (float("nan"), "nan"),
    (float("inf"), "inf"),
    (float("-inf"), "-inf"),
    (b"2GiB", "b'2GiB'"),
    ([1024], "[1024]"),
    ({"bytes": 1}, "{'bytes': 1}"),
    (object, "<class 'object'>"),
]

ACCEPTED_FORMS = (
    "expected a positive number of bytes (int) or a string like '512MiB', '2GB', '1.5GiB' "
    "(units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
)


@pytest.mark.parametrize(("value", "echo"), REJECT, ids=[repr(v) for v, _ in REJECT])
def test_parse_budget_rejects(value, echo):
    with pytest.raises(BudgetError, match=rf"^invalid budget {re.escape(echo)}: ") as info:
        parse_budget(value)
    assert ACCEPTED_FORMS in str(info.value)


def test_budget_error_message_example():
    with pytest.raises(BudgetError) as info:
        parse_budget("2 parsecs")
    assert str(info.value) == (
        f"invalid budget '2 parsecs': {ACCEPTED_FORMS}; unknown unit 'parsecs'"
    )


def test_budget_error_without_specific_reason_ends_with_accepted_forms():
    with pytest.raises(BudgetError) as info:
        parse_budget("two GB")
    assert str(info.value) == f"invalid budget 'two GB': {ACCEPTED_FORMS}"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (True, "a bool is not a number of bytes"),
        (0, "must be at least 1 byte"),
        ("0.4B", "must be at least 1 byte"),
        (1.5, "a float needs a unit, as a string"),
        (float("nan"), "not finite"),
        ("1.5", "a fractional number needs a unit"),
        ("2 parsecs", "unknown unit 'parsecs'"),
        ([1024], "unsupported type list"),
        (b"2GiB", "unsupported type bytes"),
    ],
)
def test_parse_budget_reject_reason(value, reason):
    with pytest.raises(BudgetError, match=re.escape(f"TiB); {reason}") + "$"):
        parse_budget(value)


def test_budget_error_is_a_value_error_and_an_autochunk_error():
    with pytest.raises(ValueError):
        parse_budget("nope")
    with pytest.raises(AutochunkError):
        parse_budget("nope")


def test_long_values_are_truncated_in_the_message():
    with pytest.raises(BudgetError) as info:
        parse_budget("x" * 10_000)
    assert len(str(info.value)) < 400
    assert "xxx" in str(info.value)


def test_units_table():
    assert UNITS == {
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KiB": KiB,
        "MiB": MiB,
        "GiB": GiB,
        "TiB": TiB,
    }


FORMAT = [
    (0, "0 B"),
    (12, "12 B"),
    (1023, "1023 B"),
    (1024, "1.00 KiB"),
    (1536, "1.50 KiB"),
    (512 * MiB, "512.00 MiB"),
    (3 * GiB // 2, "1.50 GiB"),
    (MiB - 1, "1.00 MiB"),  # 1023.999 KiB would print as "1024.00 KiB"
    (GiB - 1, "1.00 GiB"),
    (TiB, "1.00 TiB"),
    (5000 * TiB, "5000.00 TiB"),
    (-3 * MiB, "-3.00 MiB"),
    (-12, "-12 B"),
]


@pytest.mark.parametrize(("n", "expected"), FORMAT, ids=[str(n) for n, _ in FORMAT])
def test_format_bytes(n, expected):
    assert format_bytes(n) == expected


@pytest.mark.parametrize("n", [1, 999, 1024, 10**6, 512 * MiB, 3 * GiB // 2, 7 * TiB + 123])
def test_format_bytes_output_parses_back(n):
    parsed = parse_budget(format_bytes(n).replace(" ", ""))
    assert abs(parsed - n) <= n * 0.005 + 1


@pytest.mark.parametrize("bad", [1.5, True, "12", None])
def test_format_bytes_rejects_non_int(bad):
    with pytest.raises(TypeError, match="format_bytes expects an int"):
        format_bytes(bad)


def test_budget_module_does_not_import_tvm():
    """budget.py must stay importable on hosts without the TVM compiler (style.md §8)."""
    import tvm_autochunk.budget as budget

    tree = ast.parse(Path(budget.__file__).read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"tvm", "tvm_ffi"}, imported


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
