"""Chunking a module whose inputs have symbolic dims (a sequence length up to a bound).

The dim-flow rules and the search read static shapes, and TVM's planner sizes storage at
``tir_var_upper_bound``, so the plan is searched on the module with every symbolic dim bound
to its upper bound (``specialize``) and applied to the symbolic module (``apply_plan``):
each region is analysed on the specialisation, and a region whose extent is symbolic becomes
one call of a run-time loop (``chunk_loop``) with a static chunk size.

A region is applied only where its analysis holds at every length: it is analysed again at a
second length (``_PROBE``), and must chunk the same tensors along the same dims there.

Lengths well under the bound may fit the budget unchunked: ``short_bound`` finds the largest
that does, and ``add_short_entry`` adds the entry's unchunked copy bounded by it
(``<entry>_short``), which callers that know the length take (``Artifact`` does).
"""

from __future__ import annotations

import tvm
from tvm import relax

from . import _compat as C
from .chunk_region import analyze_region
from .errors import PassContractError, SymbolicShapeError
from .plan import ChunkPlan
from .rewrite import apply_region, check_well_formed

__all__ = [
    "SHORT",
    "add_short_entry",
    "apply_plan",
    "is_symbolic",
    "short_bound",
    "specialize",
    "symbolic_bounds",
    "with_bound",
]

SHORT = "_short"  # suffix of the entry's unchunked copy for the lengths that fit unchunked


def symbolic_bounds(mod: tvm.IRModule, entry: str = "main") -> dict[str, int]:
    """{name: upper bound} of the symbolic dims of ``entry``'s parameters ({} when static).
    An unbounded dim raises ``SymbolicShapeError``."""
    func = mod[entry]
    bounds = C.upper_bounds_of(func)
    out: dict[str, int] = {}
    for p in func.params:
        shape = C.tensor_shape(p.ty) if isinstance(p.ty, C.TensorType) else None
        for v in C.free_tir_vars(shape or ()):
            name = str(v.name)
            if name not in bounds:
                raise SymbolicShapeError(
                    f"dimension '{name}' of input '{p.name}' has no upper bound, so memory "
                    "cannot be bounded. Remedy: export with torch.export.Dim(..., max=N), or "
                    f"bound it with tvm_autochunk.bound_dims(mod, {{'{name}': N}}) (CLI: "
                    f"--bound {name}=N)."
                )
            out[name] = int(bounds[name])
    return out


def is_symbolic(mod: tvm.IRModule, entry: str = "main") -> bool:
    return bool(symbolic_bounds(mod, entry))


def specialize(mod: tvm.IRModule, values: dict[str, int] | None = None, entry: str = "main"):
    """``mod`` with its symbolic dims bound to ``values`` (default: their upper bounds) in every
    function."""
    values = symbolic_bounds(mod, entry) if values is None else values
    present = _present_names(mod)
    return relax.transform.BindSymbolicVars({k: v for k, v in values.items() if k in present})(
        mod
    )


def _present_names(mod) -> set[str]:
    names: set[str] = set()
    for _gv, f in mod.functions_items():
        if isinstance(f, relax.Function):
            names |= {str(v.name) for v in relax.analysis.defined_symbolic_vars(f)}
    return names


_PROBE = 0.5  # the second length a region is analysed at, as a share of the bound


def _probe_values(bounds: dict[str, int], lower: dict[str, int]) -> dict[str, int]:
    # odd, and unlike the bound, so that a shape equal to another dim at the bound by chance
    # does not pass for the chunked one
    return {k: max(lower.get(k, 1), int(b * _PROBE) | 1) for k, b in bounds.items()}


def _signature(ra):
    return (ra.legal, ra.body, ra.hoisted, tuple((s.name, s.dim, s.scale) for s in ra.specs),
            tuple((s.binding, s.arg, s.dim, s.scale) for s in ra.slices))


def apply_plan(mod: tvm.IRModule, plan: ChunkPlan, *, entry: str = "main") -> tvm.IRModule:
    """Apply ``plan`` (searched on ``specialize(mod)``) to the symbolic ``mod``."""
    bounds = symbolic_bounds(mod, entry)
    probe = _probe_values(bounds, C.lower_bounds_of(mod[entry]))
    for region in plan.regions:
        at_bound = specialize(mod, bounds, entry)
        ra = analyze_region(at_bound, region.start, region.end, region.seed, region.dim,
                            function=region.function)
        other = analyze_region(specialize(mod, probe, entry), region.start, region.end,
                               region.seed, region.dim, function=region.function)
        if _signature(ra) != _signature(other):
            raise PassContractError(
                f"region {region.start}..{region.end} chunks '{region.seed}' dim {region.dim} "
                f"differently at {bounds} and at {probe}, so no one chunking holds at every "
                "length. Remedy: build for a static length (export without a Dim), or "
                "report the model"
            )
        mod = apply_region(mod, region, analysis_mod=at_bound, check=False)
    mod = _with_bounds(mod, bounds)
    check_well_formed(mod, "chunking a module with symbolic dims")
    return mod


def _with_bounds(mod: tvm.IRModule, bounds: dict[str, int]) -> tvm.IRModule:
    """A copy of ``mod`` whose chunk, tail and loop functions have the entry's upper bounds
    (by name; a tail's row count has its own), so TVM plans their storage statically."""
    funcs = {}
    for gv, f in mod.functions_items():
        if isinstance(f, relax.Function):
            names = {str(v.name) for v in relax.analysis.defined_symbolic_vars(f)}
            ub = C.upper_bounds_of(f)
            add = {k: int(v) for k, v in bounds.items() if k in names and k not in ub}
            if add:
                f = f.with_attr("tir_var_upper_bound", {**ub, **add})
        funcs[gv] = f
    return tvm.IRModule(funcs, attrs=mod.attrs, global_infos=mod.global_infos)


def with_bound(mod: tvm.IRModule, name: str, value: int, entry: str = "main") -> tvm.IRModule:
    """``mod`` with the upper bound of ``entry``'s symbolic dim ``name`` set to ``value``."""
    func = mod[entry]
    func = func.with_attr("tir_var_upper_bound", {**C.upper_bounds_of(func), name: int(value)})
    funcs = {gv: (func if gv.name_hint == entry else f) for gv, f in mod.functions_items()}
    return tvm.IRModule(funcs, attrs=mod.attrs, global_infos=mod.global_infos)


def short_bound(mod: tvm.IRModule, fits, entry: str = "main", steps: int = 64):
    """(name, L): the largest bound L of ``entry``'s one symbolic dim at which the module
    unchunked ``fits`` (a predicate on ``with_bound(mod, name, L)``), to 1/``steps`` of the
    bound (bisection: the peak grows with the length); None when there are several symbolic
    dims, or not even the minimum length fits."""
    bounds = symbolic_bounds(mod, entry)
    if len(bounds) != 1:
        return None
    (name, hi), = bounds.items()
    lo = max(1, C.lower_bounds_of(mod[entry]).get(name, 1))
    if lo >= hi or not fits(with_bound(mod, name, lo, entry)):
        return None
    step = max(1, hi // steps)
    while hi - lo > step:  # lo fits; hi does not (the entry is chunked because it does not)
        mid = (lo + hi) // 2
        if fits(with_bound(mod, name, mid, entry)):
            lo = mid
        else:
            hi = mid
    return name, lo


def add_short_entry(chunked: tvm.IRModule, unchunked: tvm.IRModule, name: str, value: int,
                    entry: str = "main") -> tvm.IRModule:
    """``chunked`` with ``<entry>_short``: ``unchunked[entry]`` with the symbolic dim ``name``
    bounded by ``value`` (its own symbolic vars: one var is defined in one function only)."""
    func = relax.utils.copy_with_new_vars(with_bound(unchunked, name, value, entry)[entry])
    short = entry + SHORT
    func = func.with_attr("global_symbol", short)
    funcs = dict(chunked.functions_items())
    funcs[tvm.ir.GlobalVar(short)] = func
    return tvm.IRModule(funcs, attrs=chunked.attrs, global_infos=chunked.global_infos)
