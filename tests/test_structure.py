"""The shape of the packages: no import circles, no private names across modules, small files,
and every public name that the package and the README promise resolves.

Reads the sources with ``ast`` (imports inside functions count: a lazy import is still a
dependency); the last test imports the package.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("relay_passes", "tvm_autochunk")
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    """{dotted module name: path} of every module of the packages."""
    out = {}
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(p.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = p
    return out


MODULES = _modules()


def _resolve(mod: str, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` names (relative levels resolved)."""
    if not node.level:
        return node.module or ""
    is_pkg = MODULES[mod].name == "__init__.py"
    base = mod.split(".")
    base = base[: len(base) - node.level + (1 if is_pkg else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(mod: str) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every import in ``mod``."""
    tree = ast.parse(MODULES[mod].read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(mod, node)
            for a in node.names:
                sub = f"{target}.{a.name}"
                if sub in MODULES:  # ``from . import x``: the submodule x
                    out.append((sub, None, node.lineno))
                else:
                    out.append((target, a.name, node.lineno))
    return out


def _graph() -> dict[str, set[str]]:
    return {
        m: {t for t, _, _ in _imports(m) if t in MODULES and t != m} for m in MODULES
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_checker_sees_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    assert _cycles(_graph()) == []


def test_relay_passes_never_imports_tvm_autochunk():
    bad = [
        (m, t, line)
        for m in MODULES
        if m.startswith("relay_passes")
        for t, _, line in _imports(m)
        if t.split(".")[0] == "tvm_autochunk"
    ]
    assert bad == []


def _private(name: str | None) -> bool:
    return bool(name) and name.startswith("_") and not name.startswith("__")


def _module_aliases(mod: str) -> set[str]:
    """Local names bound to one of our modules (``from . import x as X``)."""
    tree = ast.parse(MODULES[mod].read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = _resolve(mod, node)
            out |= {a.asname or a.name for a in node.names if f"{target}.{a.name}" in MODULES}
    return out


def test_no_module_imports_another_modules_private_names():
    bad = []
    for m in MODULES:
        where = MODULES[m].relative_to(ROOT)
        for t, name, line in _imports(m):
            if t in MODULES and _private(name):
                bad.append(f"{where}:{line} imports {t}.{name}")
        aliases = _module_aliases(m)
        for node in ast.walk(ast.parse(MODULES[m].read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and _private(node.attr)
            ):
                bad.append(f"{where}:{node.lineno} reads {node.value.id}.{node.attr}")
    assert bad == []


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_no_package_file_over_the_limit(mod):
    n = len(MODULES[mod].read_text(encoding="utf-8").splitlines())
    assert n <= MAX_LINES, f"{MODULES[mod].relative_to(ROOT)} has {n} lines (> {MAX_LINES})"


def test_search_modules_import_nothing_from_tvm():
    for m in ("relay_passes.search", "relay_passes.stage_search", "relay_passes.caches"):
        roots = {t.split(".")[0] for t, _, _ in _imports(m)}
        assert not roots & {"tvm", "tvm_ffi"}, (m, roots)


def test_public_names_and_readme_calls_resolve():
    import tvm_autochunk as ac

    missing = [n for n in ac.__all__ if not hasattr(ac, n)]
    assert missing == []
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    called = set(re.findall(r"\bac\.([A-Za-z_]\w*)\(", readme))
    assert called, "the README shows no ac.<name>( call"
    assert sorted(n for n in called if not hasattr(ac, n)) == []
    assert sorted(n for n in called if n not in ac.__all__) == []


def test_relay_passes_public_names_resolve():
    import relay_passes

    assert [n for n in relay_passes.__all__ if not hasattr(relay_passes, n)] == []
