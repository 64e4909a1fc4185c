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

    mod = _import(model, example_args)
    tgt = resolve_target(target, arch)
    return MemoryReport(estimate_memory(mod, tgt, entry=entry))


def signature(mod, entry: str = "main") -> dict:
    """Inputs, outputs and symbolic bounds of ``mod[entry]`` as JSON-able data."""
    from relay_passes import _compat as C
    from relay_passes.estimate_memory import num_inputs

    func = mod[entry]

    def spec(name, ty):
        shape = C.tensor_shape(ty)
        dims = [] if shape is None else [d if isinstance(d, int) else str(d) for d in shape]
        return {"name": name, "shape": dims, "dtype": C.tensor_dtype(ty)}

    inputs = [spec(str(p.name), p.ty) for p in func.params[: num_inputs(func)]]
    outs = []

    def walk(ty, prefix):
        if isinstance(ty, C.TensorType):
            outs.append(spec(prefix, ty))
        elif isinstance(ty, C.TupleType):
            for i, f in enumerate(ty.fields):
                walk(f, f"{prefix}[{i}]")

    walk(func.ret_ty, "output")
    return {"inputs": inputs, "outputs": outs, "bounds": C.upper_bounds_of(func)}


MAX_BUILD_ATTEMPTS = 3


def _tvm_ffi_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("apache-tvm-ffi")
    except Exception:  # not installed as a distribution (a source tree on sys.path)
        return None


def _over_budget(report: MemoryReport, budget_bytes: int | None) -> bool:
    return budget_bytes is not None and report.peak_bytes > budget_bytes


def _compile(mod, tgt, prof, budget_bytes, chunking, progress):
    """tvm.compile with our pipeline; returns (executable, report with TVM's plan, device-code
    info: for CUDA, the embedded fatbin's arch and compiler, see ``targets.cuda_device_code``)."""
    import tvm

    from relay_passes.pipeline import autochunk_pipeline

    captured: dict = {}
    # the plan is read inside TVM's pipeline; the budget is checked by the caller, in Python,
    # so errors keep their type (exceptions raised inside a TVM pass come back as RuntimeError)
    pipeline = autochunk_pipeline(
        tgt, budget_bytes=None, on_plan=lambda p: captured.setdefault("plan", p)
    )
    _progress(progress, f"building with TVM for {tgt.kind.name}")
    t1 = time.perf_counter()
    try:
        with cuda_device_code(tgt, lambda m: _progress(progress, m)) as device_code:
            ex = tvm.compile(mod, target=tgt, relax_pipeline=pipeline)
    except AutochunkError:
        raise
    except Exception as e:
        raise BuildError(f"TVM failed to build the module for {tgt.kind.name}: {e}") from e
    report = MemoryReport(
        prof,
        captured.get("plan"),
        budget_bytes,
        chunking=chunking,
        extra={"build_seconds": round(time.perf_counter() - t1, 3)},
    )
    return ex, report, device_code


MIN_BUDGET_CHECKS = 2


def search_chunks(
    mod, tgt, budget_bytes: int, entry: str = "main", profile=None, options=None
):
    """``relay_passes.auto_chunk``, whose refusals carry a ``min_budget`` that really works.

    The search is greedy and its path depends on the budget: a search aiming at the
    ``min_budget`` that a lower budget's refusal suggests can take another path and miss it
    (found by fuzzing). So a refusal's suggestion is checked by searching at it (at most
    ``MIN_BUDGET_CHECKS`` times, each time adopting the new refusal's suggestion); failing
    that, the suggestion becomes the unchunked peak, which needs no chunking at all.
    """
    from relay_passes.auto_chunk import auto_chunk

    try:
        return auto_chunk(
            mod, tgt, budget_bytes, function=entry, profile=profile, options=options
        )
    except BudgetInfeasibleError as first:
        suggest, top = first.min_budget, first.unchunked_peak
        if suggest is None or top is None or suggest >= top:
            raise  # the unchunked module fits the suggestion: nothing to check
        reached = None  # what a search aiming at the first suggestion reaches
        for _ in range(MIN_BUDGET_CHECKS):
            try:
                auto_chunk(mod, tgt, suggest, function=entry, profile=profile, options=options)
                break
            except BudgetInfeasibleError as again:
                reached = again.best_peak if reached is None else reached
                suggest = again.min_budget
                if suggest is None or suggest >= top:
                    suggest = top
                    break
        else:
            suggest = top  # not confirmed: only the unchunked peak is sure to work
        if reached is None:
            raise
        old = f"at least {first.min_budget} bytes"
        new = (
            f"at least {suggest} bytes (the search is greedy and its path depends on the "
            f"budget: aiming at {first.min_budget} bytes it reaches only {reached} bytes)"
        )
        msg = str(first)
        msg = msg.replace(old, new) if old in msg else f"{msg} Remedy: a budget of {new}."
        raise BudgetInfeasibleError(
            msg, unchunked_peak=top, best_peak=first.best_peak, min_budget=suggest
        ) from None


def _explain_floor(e, mod, prof, budget: int, entry: str):
    """``e`` with a note when no chunking can help: the smallest peak is mostly the outputs
    (one call must allocate them whole) or tensors computed from constant weights alone (they
    depend on no parameter, so there is no dim a region could be chunked along)."""
    from tvm import relax

    func = mod[entry]
    # what depends on a parameter; weights passed as parameters (relax.frontend.nn) count too,
    # since a region can be chunked along a weight parameter's dims
    dep = set(func.params)
    from_weights: set[str] = set()  # computed from constants alone
    for block in func.body.blocks:
        for b in block.bindings:
            if set(relax.analysis.free_vars(b.value)) & dep:
                dep.add(b.var)
            else:
                from_weights.add(str(b.var.name))
    outs = [o for o in prof.outputs if o.nbytes]
    const = [
        r for r in prof.live_at_peak if r.kind != "output" and r.name in from_weights and r.nbytes
    ]
    out_bytes = sum(o.nbytes for o in outs)
    const_bytes = sum(r.nbytes for r in const)
    best = e.best_peak or 0
    if not best or 2 * (out_bytes + const_bytes) < best:
        return e

    def desc(rs):
        shown = ", ".join(
            f"'{r.name}' {'x'.join(map(str, r.shape)) or 'scalar'} {r.dtype}" for r in rs[:4]
        )
        return shown + (f" and {len(rs) - 4} more" if len(rs) > 4 else "")

    parts = []
    if out_bytes:
        parts.append(
            f"{format_bytes(out_bytes)} are the module's outputs ({desc(outs)}), "
            "which one call must allocate whole"
        )
    if const_bytes:
        parts.append(
            f"{format_bytes(const_bytes)} are tensors computed from weights alone "
            f"({desc(const)}), which depend on no input dim that could be chunked"
        )
    below = budget < out_bytes + const_bytes
    head = (
        "No chunking can help here"
        if e.unchunked_peak is not None and best >= e.unchunked_peak
        else "Chunking cannot go lower"
    )
    note = f"{head}: of the smallest peak, {'; and '.join(parts)}" + (
        ", and the budget is below them alone. " if below else ". "
    )
    fixes = ["return smaller outputs"] if out_bytes else []
    if const_bytes:
        fixes.append("precompute the weight-only tensors offline (e.g. store a weight transposed)")
    fix = "".join(f", or {f}" for f in fixes)
    msg = str(e)
    i = msg.find("Remedy:")
    msg = msg[:i] + note + msg[i:] if i >= 0 else f"{msg} {note}"
    tail = ", or shorten the input."
    msg = msg[: -len(tail)] + fix + "." if msg.endswith(tail) else msg + f" Also{fix[1:]}."
    return BudgetInfeasibleError(
        msg, unchunked_peak=e.unchunked_peak, best_peak=e.best_peak, min_budget=e.min_budget
    )


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

    ``chunk_plan`` (a ``ChunkPlan``) is applied first with ``relay_passes.ApplyChunkPlan``.

    Returns an ``Artifact``: call it on numpy arrays, read ``.report``, ``.export(path)``.
    ``budget``: bytes (int) or a string like ``"512MiB"``; None builds without a limit.
    The budget covers what one call allocates (intermediates, outputs, kernel workspace);
    it is checked on TVM's own memory plan after the build, never only on our estimate.
    """
    import tvm

    from relay_passes.estimate_memory import estimate_memory

    from . import __version__
    from .artifact import Artifact

    budget_bytes = parse_budget(budget)
    tgt = resolve_target(target, arch)
    t0 = time.perf_counter()
    _progress(progress, "importing model")
    mod = _import(model, example_args)
    if chunk_plan is not None and chunk_plan.regions:
        from relay_passes.rewrite import apply_chunk_plan

        _progress(progress, f"applying a chunk plan of {len(chunk_plan.regions)} region(s)")
        mod = apply_chunk_plan(mod, chunk_plan)
    _progress(progress, f"estimating memory for {tgt.kind.name}")
    prof = estimate_memory(mod, tgt, entry=entry)
    chunking = chunk_plan.to_dict() if chunk_plan is not None and chunk_plan.regions else None
    base_mod, base_prof, target_bytes = mod, prof, budget_bytes
    options = None  # the search's defaults; balanced chunks after a kernel TVM cannot build
    first_failure = None
    for attempt in range(MAX_BUILD_ATTEMPTS):
        mod, prof = base_mod, base_prof
        searched = False
        if target_bytes is not None and MemoryReport(prof).peak_bytes > target_bytes:
            _progress(
                progress,
                f"peak {format_bytes(MemoryReport(prof).peak_bytes)} is over the budget "
                f"{format_bytes(target_bytes)}: searching chunk regions",
            )
            # raises BudgetInfeasibleError (peak, best reached, where, what blocks) if impossible
            try:
                mod, search = search_chunks(
                    mod, tgt, target_bytes, entry, profile=prof, options=options
                )
            except BudgetInfeasibleError as e:
                if first_failure is not None:
                    raise BuildError(
                        f"TVM could not build the chunked module ({first_failure}), and with "
                        f"balanced chunks (other kernel shapes) the budget cannot be met: {e}"
                    ) from e
                raise _explain_floor(e, base_mod, base_prof, budget_bytes, entry) from None
            chunking = search.to_dict()
            if options is not None:
                chunking["fallback"] = (
                    f"balanced chunks: TVM could not build the first plan ({first_failure})"
                )
            _progress(
                progress,
                f"chunked {len(search.stages)} region(s) in {search.search_seconds:.1f}s: "
                f"estimated peak {format_bytes(search.final_peak)}",
            )
            prof = search.profile or estimate_memory(mod, tgt, entry=entry)
            searched = bool(search.stages)
        try:
            ex, report, device_code = _compile(mod, tgt, prof, budget_bytes, chunking, progress)
        except BuildError as e:
            # TVM could not compile a kernel of the chunked module: a TVM bug at one of the new
            # shapes (fuzzing found LLVM's verifier rejecting TVM's code for silu on a
            # (4, 14) tensor, a 14-row last chunk). Balanced chunks make other shapes.
            if not searched or options is not None or attempt == MAX_BUILD_ATTEMPTS - 1:
                if first_failure is not None:
                    raise BuildError(
                        f"{e} (the first plan failed too: {first_failure})"
                    ) from e
                raise
            from relay_passes.search import SearchOptions

            first_failure = " ".join(str(e).split())[:300]
            options = SearchOptions(last_chunk="balanced")
            _progress(
                progress,
                "TVM could not build a kernel of the chunked module; searching again with "
                "balanced chunks (other kernel shapes)",
            )
            log.warning("TVM failed to build the chunked module (%s); retrying with "
                        "balanced chunks", first_failure)
            continue
        if not _over_budget(report, budget_bytes):
            break
        if chunking is None or attempt == MAX_BUILD_ATTEMPTS - 1:
            raise BudgetInfeasibleError(
                f"after the build, one call needs {format_bytes(report.peak_bytes)} "
                f"({report.peak_bytes} bytes; TVM plan {report.planned_peak_bytes}, run-time "
                f"high-water {report.runtime_peak_bytes}), over the budget of "
                f"{format_bytes(budget_bytes)} ({budget_bytes} bytes). Remedy: raise the budget."
            )
        # the promise is checked on TVM's own plan: tighten the search target and rebuild
        target_bytes = int(target_bytes * 0.95)
        _progress(
            progress, f"built plan over budget; retrying with target {format_bytes(target_bytes)}"
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
        **signature(mod, entry),
        "report": report.to_dict(),
    }
    _progress(
        progress,
        f"built in {time.perf_counter() - t0:.1f}s; planned peak {format_bytes(report.peak_bytes)}",
    )
    return Artifact(ex, meta, report=report)
