"""The user API: ``estimate``, ``build``, ``bound_dims``. Validates input, never edits IR itself
(IR changes are ``relay_passes`` passes), picks the pipeline, and wraps results.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from relay_passes.errors import AutochunkError, BudgetInfeasibleError, BuildError
from relay_passes.plan import ChunkPlan, ChunkRegion  # noqa: F401 (re-exported)

from .budget import format_bytes, parse_budget
from .report import MemoryReport
from .targets import cuda_device_code, is_cross, resolve_target, target_summary

log = logging.getLogger(__name__)

CROSS_COMPILERS = {"aarch64": "aarch64-linux-gnu-gcc"}


def _import(model, example_args):
    from .frontends import load_model

    return load_model(model, example_args)


def _progress(cb: Callable[[str], None] | None, msg: str) -> None:
    log.info(msg)
    if cb is not None:
        cb(msg)


def bound_dims(mod, bounds: dict[str, int], entry: str = "main"):
    """Return a copy of ``mod`` whose symbolic input dims have the given upper bounds."""
    from relay_passes.bound_symbolic_dims import BoundSymbolicDims

    return BoundSymbolicDims(bounds, entry)(mod)


def estimate(
    model, target="llvm", *, example_args=None, arch: str | None = None, entry: str = "main"
) -> MemoryReport:
    """Estimate the memory one call of ``model`` allocates when built for ``target``.

    ``model``: a Relax IRModule, a torch.nn.Module (with ``example_args``), an
    ExportedProgram, or a path to a ``.onnx`` / ``.pt2`` file.
    """
    from relay_passes.estimate_memory import estimate_memory
    from relay_passes.fold_weight_layouts import fold_weight_layouts

    mod = fold_weight_layouts(_import(model, example_args))  # as build() does
    tgt = resolve_target(target, arch)
    return MemoryReport(estimate_memory(mod, tgt, entry=entry))


def signature(mod, entry: str = "main") -> dict:
    """Inputs, outputs and symbolic bounds of ``mod[entry]`` as JSON-able data."""
    from relay_passes import _compat as C
    from relay_passes.estimate_memory import num_inputs

    from .weights import specs_of

    func = mod[entry]

    def spec(name, ty):
        shape = C.tensor_shape(ty)
        dims = [] if shape is None else [d if isinstance(d, int) else str(d) for d in shape]
        return {"name": name, "shape": dims, "dtype": C.tensor_dtype(ty)}

    inputs = [spec(str(p.name), p.ty) for p in func.params[: num_inputs(func)]]
    params = specs_of(func, num_inputs(func))  # weights taken at load time, after the inputs
    outs = []

    def walk(ty, prefix):
        if isinstance(ty, C.TensorType):
            outs.append(spec(prefix, ty))
        elif isinstance(ty, C.TupleType):
            for i, f in enumerate(ty.fields):
                walk(f, f"{prefix}[{i}]")

    walk(func.ret_ty, "output")
    return {"inputs": inputs, "params": params, "outputs": outs,
            "bounds": C.upper_bounds_of(func), "lower_bounds": C.lower_bounds_of(func)}


def _tvm_ffi_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("apache-tvm-ffi")
    except Exception:  # not installed as a distribution (a source tree on sys.path)
        return None


def legal_dims(mod, start: str, end: str, *, entry: str = "main") -> list:
    """Every (region input, dim) seed of the region ``[start..end]`` of ``mod[entry]``, legal
    or not (with the reason): ``relay_passes.chunk_region.RegionAnalysis`` records."""
    from relay_passes.chunk_region import legal_dims as analyze

    return analyze(_import(mod, None), start, end, function=entry)


def build(
    model,
    target="llvm",
    budget=None,
    *,
    example_args=None,
    arch: str | None = None,
    entry: str = "main",
    progress: Callable[[str], None] | None = None,
    chunk_plan: ChunkPlan | None = None,
):
    """Build ``model`` for ``target`` so that one call stays within ``budget``.

    Returns an ``Artifact``: call it on numpy arrays, read ``.report``, ``.export(path)``.
    ``budget``: bytes (int) or a string like ``"512MiB"``; None builds without a limit.
    The budget covers what one call allocates (intermediates, outputs, kernel workspace);
    it is checked on TVM's own memory plan, never only on our estimate. ``chunk_plan`` (a
    ``ChunkPlan``) is applied first. The build runs ``relax.get_pipeline("autochunk")``'s
    pass, so ``tvm.compile`` with that pipeline picks the same plan.
    """
    import tvm

    from relay_passes.estimate_memory import num_inputs
    from relay_passes.pipeline import autochunk_pipeline
    from relay_passes.search import SearchOptions

    from . import __version__
    from .artifact import Artifact, TensorSpec
    from .weights import check as check_weights
    from .weights import detach as detach_weights

    budget_bytes = parse_budget(budget)
    tgt = resolve_target(target, arch)
    t0 = time.perf_counter()
    _progress(progress, "importing model")
    mod = _import(model, example_args)
    # keep_params_as_input: the weights leave the module (never compiled into the library)
    # and travel with the artifact, which export(..., params=FILE) writes next to it
    mod, weights = detach_weights(mod, entry)

    def compile_with(options):
        """(driver, executable, device code, seconds), or (driver, the codegen error)."""
        drv = autochunk_pipeline(
            tgt, budget_bytes, entry=entry, chunk_plan=chunk_plan, options=options,
            progress=lambda m: _progress(progress, m),
        )
        t1 = time.perf_counter()
        try:
            with cuda_device_code(tgt, lambda m: _progress(progress, m)) as device_code:
                ex = tvm.compile(mod, target=tgt, relax_pipeline=drv)
        except AutochunkError as e:
            # raised by the driver: the same error, with its fields (the FFI keeps only text)
            raise (drv.error if isinstance(drv.error, AutochunkError) else e) from None
        except Exception as e:
            return drv, BuildError(f"TVM failed to build the module for {tgt.kind.name}: {e}")
        return drv, ex, device_code, time.perf_counter() - t1

    got, fallback = compile_with(None), None
    if isinstance(got[1], BuildError):
        drv, err = got
        if drv.result is None or not drv.result.stages:
            raise err
        # TVM could not compile a kernel of the chunked module: a TVM bug at one of the new
        # shapes (fuzzing found LLVM's verifier rejecting silu on a 14-row last chunk).
        # Balanced chunks make other shapes. Only a build owns the kernel compile, so this
        # one retry is here, not in the pipeline.
        first = " ".join(str(err).split())[:300]
        _progress(progress, "TVM could not build a kernel of the chunked module; searching "
                            "again with balanced chunks (other kernel shapes)")
        log.warning("TVM failed to build the chunked module (%s); retrying with balanced "
                    "chunks", first)
        try:
            got = compile_with(SearchOptions(last_chunk="balanced"))
        except BudgetInfeasibleError as e2:
            raise BuildError(
                f"TVM could not build the chunked module ({first}), and with balanced chunks "
                f"(other kernel shapes) the budget cannot be met: {e2}"
            ) from e2
        if isinstance(got[1], BuildError):
            raise BuildError(f"{got[1]} (the first plan failed too: {first})")
        fallback = f"balanced chunks: TVM could not build the first plan ({first})"
    drv, ex, device_code, seconds = got
    chunking = drv.chunking
    if chunking is not None and fallback:
        chunking["fallback"] = fallback
    report = MemoryReport(
        drv.profile,
        drv.plan,
        budget_bytes,
        chunking=chunking,
        extra={"build_seconds": round(seconds, 3),
               **({"short_entry": drv.short} if drv.short else {}),
               **({"lengths": drv.lengths} if drv.lengths else {})},
    )
    cross = is_cross(tgt)
    meta = {
        "format": 1,
        "tvm_autochunk_version": __version__,
        "tvm_version": tvm.__version__,
        "tvm_ffi_version": _tvm_ffi_version(),
        "target": target_summary(tgt),
        "cross": cross,
        "cross_compiler": CROSS_COMPILERS.get(str(tgt.attrs.get("mtriple", "")).split("-")[0])
        if cross
        else None,
        "budget_bytes": budget_bytes,
        "device_code": device_code if tgt.kind.name == "cuda" else None,
        **signature(drv.module, entry),
        # lengths up to its bound run the entry unchunked (Artifact.entry_for)
        "short_entry": drv.short,
        "report": report.to_dict(),
    }
    _progress(
        progress,
        f"built in {time.perf_counter() - t0:.1f}s; planned peak {format_bytes(report.peak_bytes)}",
    )
    if weights is not None:
        names = [str(p.name) for p in mod[entry].params[num_inputs(mod[entry]) :]]
        specs = [TensorSpec.from_dict(d) for d in meta["params"]]
        weights = check_weights(specs, dict(zip(names, weights)), "the module's 'params'")
    return Artifact(ex, meta, report=report, weights=weights)
