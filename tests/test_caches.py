"""relay_passes.caches: a build's memo tables live in one object that the build drops."""

from __future__ import annotations

import importlib
import pkgutil

import relay_passes
import tvm_autochunk as ac
from benchmarks.models import FAMILIES
from relay_passes import caches

# module-level containers that are registries or constant tables, not caches
REGISTRIES = {
    "relay_passes.dimflow": {"_BUILTIN", "_USER"},
    "relay_passes.dimflow_rules.common": {"DELIBERATE_BARRIERS"},
    "relay_passes.legalize_cache": {"DISPATCHED_OPS"},
    "relay_passes.liveness": {"_KEPT"},
    "relay_passes.search": {"CUDA_COSTS", "GPU_OPTIONS"},
    "relay_passes": {"_LAZY"},
    "relay_passes.dimflow_rules": {"DELIBERATE_BARRIERS"},  # re-exported from common
}


def _module_containers():
    names = ["relay_passes"] + [
        m.name for m in pkgutil.walk_packages(relay_passes.__path__, "relay_passes.")
    ]
    for name in names:
        mod = importlib.import_module(name)
        for attr, value in vars(mod).items():
            if isinstance(value, (dict, list, set)) and not attr.startswith("__"):
                yield name, attr, value


def test_a_build_leaves_no_module_level_cache_behind():
    w = FAMILIES["gpt"](512, layers=1)
    mod = ac.from_torch(w.module, w.inputs)
    ac.build(mod, "llvm", budget=int(ac.estimate(mod).peak_bytes * 0.8))  # searched, chunked
    assert caches.active() is None  # the build's caches were dropped
    found = [
        f"{name}.{attr} ({len(value)} entries)"
        for name, attr, value in _module_containers()
        if attr not in REGISTRIES.get(name, ()) and value
    ]
    assert found == []


def test_scopes_nest_and_drop():
    assert caches.active() is None
    with caches.scope() as outer:
        outer.index["k"] = 1
        with caches.scope() as inner:
            assert inner is outer and caches.current() is outer
        assert caches.active() is outer
    assert caches.active() is None
    assert caches.current() is not outer and caches.current().index == {}


def test_scoped_functions_share_the_callers_scope():
    seen = []

    @caches.scoped
    def f():
        seen.append(caches.current())

    f()
    f()
    assert seen[0] is not seen[1]  # each call outside a scope: its own, dropped
    with caches.scope() as c:
        f()
    assert seen[2] is c
