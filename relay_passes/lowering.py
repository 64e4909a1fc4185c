"""The TVM pipelines we lower with, as lists of passes per target.

``llvm`` follows what ``tvm.compile(mod, target)`` runs for CPU targets (TVM's
``default_build_pipeline``: LegalizeOps without FuseOps/FuseTIR), then our ``cpu_schedules``.
``cuda`` (and other GPU targets) follow TVM's target pipeline: LegalizeOps, FuseOps, FuseTIR
and dlight scheduling, with ``gpu_schedules``' rules before dlight's Fallback. The memory
estimator and the ground-truth planner both use these lists, so what we estimate is built.
"""

from __future__ import annotations

import tvm
from tvm import relax

from . import cpu_schedules, gpu_schedules
from .attention import FuseAttention
from .chunk_calls import PlanChunkCalls, RestoreChunkCalls
from .cpu_schedules.fast_math import fast_math_pass
from .errors import AutochunkError, BuildError, UnsupportedTargetError
from .legalize_cache import CachedFoldConstant, CachedLegalizeOps, cpu_lowering


def as_target(target) -> tvm.target.Target:
    """A ``tvm.target.Target`` from a Target, a TVM target dict, or a bare kind name."""
    if isinstance(target, tvm.target.Target):
        return target
    if isinstance(target, dict):
        return tvm.target.Target(target)
    if isinstance(target, str):
        try:
            return tvm.target.Target(target)
        except Exception as e:  # TVM raises its own error type for bad strings
            raise UnsupportedTargetError(
                f"cannot make a TVM target from {target!r} ({e}). Use 'llvm', 'cuda', a tag such "
                "as 'nvidia/nvidia-h100', or a dict like {'kind': 'llvm', 'mcpu': 'skylake'}."
            ) from e
    raise UnsupportedTargetError(
        f"target must be a tvm.target.Target, a dict or a string, got {type(target).__name__}"
    )


def is_gpu(target: tvm.target.Target) -> bool:
    return "gpu" in target.keys


def _backend(target: tvm.target.Target):
    kind = target.kind.name
    if kind == "llvm":
        return None  # tvm.compile's default_build_pipeline
    if kind == "cuda":
        import tvm.relax.backend.cuda.pipeline as be

        return be
    if is_gpu(target):
        import tvm.relax.backend.gpu_generic.pipeline as be

        return be
    raise UnsupportedTargetError(
        f"target kind {kind!r} is not supported: use an 'llvm' (CPU, incl. cross-compiled "
        "aarch64) or 'cuda' target"
    )


def legalize_passes(target: tvm.target.Target) -> list:
    """Library dispatch and legalization: high-level Relax ops become call_tir of PrimFuncs
    (on GPUs also fused and scheduled, as TVM's target pipeline does)."""
    be = _backend(target)
    if be is None:
        return [
            relax.backend.DispatchSampling(),
            relax.backend.DispatchSortScan(),
            FuseAttention,  # softmax attention as one flash-style kernel: no Sq x Sk tensor
            relax.transform.LegalizeOps(),
        ]
    # TVM's GPU pipeline ends with dlight's rules; ours add a tree reduction for max/min rows
    passes = [p for p in be.legalize_passes(target) if p.info.name != "ApplyDefaultSchedule"]
    return [*be.library_dispatch_passes(target), *passes, gpu_schedules.schedule_pass()]


def lowering_passes(target: tvm.target.Target) -> list:
    """``legalize_passes``, then on CPUs our schedule rules (``cpu_schedules``): TVM's default
    CPU pipeline leaves every kernel a serial naive loop. Scheduling changes no tensor of the
    Relax program, only loops and a kernel's internal buffers (``prim_func_workspace``
    schedules a PrimFunc the same way before it measures them)."""
    if _backend(target) is None:
        # libm's exp/tanh/erf are scalar calls: polynomials let the kernels vectorize
        return [*legalize_passes(target), cpu_schedules.schedule_pass(), fast_math_pass()]
    return legalize_passes(target)


def estimate_passes(target: tvm.target.Target, *, rewrite_reshape: bool = True) -> list:
    """The part of the pipeline the memory estimator models the module after.

    Same as ``lowering_passes`` but without GPU scheduling (dlight only changes loop structure,
    never which tensors exist), plus ``RewriteDataflowReshape`` which decides which reshapes
    become free views (``rewrite_reshape=False`` leaves it out: the CPU estimator makes its
    rewrites itself while it walks, ``liveness.FrameWalker(dataflow_reshape=True)``).
    LegalizeOps and FoldConstant are ``legalize_cache``'s memoised wrappers: the same lowering
    and folding (the search estimates many near-identical modules); on CPU a dispatch pass is
    skipped when the module has none of its ops (``cpu_lowering``).
    """
    be = _backend(target)
    if be is None:
        # without RewriteDataflowReshape the walk decides which kernels are views: the ops it
        # models as TVM lowers them are left unlowered for it (cpu_lowering, keep_ops)
        passes = [cpu_lowering(legalize_passes(target), keep_ops=not rewrite_reshape)]
    else:
        passes = [
            *be.library_dispatch_passes(target),
            CachedLegalizeOps,
            relax.transform.AnnotateTIROpPattern(),
            CachedFoldConstant,
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
        ]
    return [*passes, relax.transform.RewriteDataflowReshape()] if rewrite_reshape else passes


def dataflow_lower_passes(target: tvm.target.Target) -> list:
    """TVM's passes out of dataflow form, then ``PlanChunkCalls`` (right before the planner:
    the tensors our chunk loops read stay in its plan)."""
    be = _backend(target)
    if be is None:
        passes = [
            relax.transform.RewriteDataflowReshape(),
            relax.transform.ToNonDataflow(),
            relax.transform.RemovePurityChecking(),
            relax.transform.CallTIRRewrite(),
        ]
    else:
        passes = list(be.dataflow_lower_passes(target))
    return [*passes, PlanChunkCalls]


def planning_passes(target: tvm.target.Target) -> list:
    """Everything up to and including TVM's static memory planner (and ``RestoreChunkCalls``,
    which undoes ``PlanChunkCalls`` once the plan is made)."""
    return [
        *lowering_passes(target),
        *dataflow_lower_passes(target),
        relax.transform.StaticPlanBlockMemory(),
        RestoreChunkCalls,
    ]


def finalize_passes(target: tvm.target.Target) -> list:
    """TVM's passes from the planner to the VM code, with ``RestoreChunkCalls`` after the
    planner (``planning_passes`` ends with the same two passes)."""
    be = _backend(target)
    if be is None:
        passes = [
            relax.transform.StaticPlanBlockMemory(),
            relax.transform.RewriteCUDAGraph(),
            relax.transform.LowerAllocTensor(),
            relax.transform.KillAfterLastUse(),
            relax.transform.LowerRuntimeBuiltin(),
            relax.transform.ComputePrimValue(),
            relax.transform.VMShapeLower(),
            relax.transform.AttachGlobalSymbol(),
        ]
    else:
        passes = list(be.finalize_passes(target))
    assert passes[0].info.name == "StaticPlanBlockMemory"
    return [passes[0], RestoreChunkCalls, *passes[1:]]


def build_passes(target: tvm.target.Target) -> list:
    """The whole Relax pipeline, as ``tvm.compile`` would run it for this target."""
    return [*lowering_passes(target), *dataflow_lower_passes(target), *finalize_passes(target)]


def run_passes(mod: tvm.IRModule, passes: list, target: tvm.target.Target) -> tvm.IRModule:
    """Run ``passes``; a failure inside TVM becomes a ``BuildError`` naming the op TVM could
    not lower (TVM's own errors are not ours to show: they name C++ checks, not the model)."""
    with target:
        try:
            return tvm.transform.Sequential(passes)(mod)
        except AutochunkError:
            raise
        except Exception as e:
            raise BuildError(_lowering_failure(e, mod, target)) from e


def _lowering_failure(e: Exception, mod: tvm.IRModule, target: tvm.target.Target) -> str:
    import traceback

    what = " ".join(str(e).split()) or type(e).__name__
    what = f"{type(e).__name__}: {what[:300]}"
    kind = target.kind.name
    # TVM's traceback (synthetic frames) names the legalization function that failed, e.g.
    # legalize_ops/nn.py _nn_rms_norm for relax.nn.rms_norm: find that op's first binding
    legal = [
        f.f_code.co_name
        for f, _ in traceback.walk_tb(e.__traceback__)
        if "legalize_ops" in f.f_code.co_filename
    ]
    if legal:
        hits = []  # bindings of the op whose legalization failed
        for gv, func in mod.functions_items():
            if not isinstance(func, relax.Function) or not isinstance(func.body, relax.SeqExpr):
                continue
            for block in func.body.blocks:
                for b in block.bindings:
                    name = str(getattr(getattr(b.value, "op", None), "name", ""))
                    if name and "_" + name.removeprefix("relax.").replace(".", "_") == legal[-1]:
                        hits.append((gv.name_hint, b))
        if len(hits) > 1:  # legalize each alone to find the one that fails
            failing = [h for h in hits if not _legalizes(h[1].value, target)]
            hits = failing or hits
        if hits:
            fn, b = hits[0]
            args = ", ".join(str(getattr(a, "ty", "?")) for a in b.value.args)
            return (
                f"TVM cannot lower {b.value.op.name} (binding '{b.var.name}' of '{fn}', "
                f"arguments {args}) for {kind}: its legalization failed with {what}. Remedy: "
                "replace or reshape this op in the model; TVM's lowering does not support it "
                "with these arguments."
            )
        return (
            f"TVM cannot lower the module for {kind}: its legalization {legal[-1]} failed with "
            f"{what}. Remedy: replace that op in the model."
        )
    return (
        f"TVM's pipeline for {kind} failed on the module: {what}. Remedy: check that the model "
        "builds with tvm.compile, and report it with the model if it does."
    )


def _legalizes(call, target: tvm.target.Target) -> bool:
    """Whether TVM legalizes ``call`` on its own (its Var arguments become parameters)."""
    params, args = [], []
    for a in call.args:
        if isinstance(a, relax.Var):
            p = relax.Var(str(a.name), a.ty)
            params.append(p)
            args.append(p)
        else:
            args.append(a)
    try:
        bb = relax.BlockBuilder()
        with bb.function("main", params):
            bb.emit_func_output(bb.emit(relax.Call(call.op, args, call.attrs, call.ty_args)))
        with target:
            relax.transform.LegalizeOps()(bb.get())
    except Exception:
        return False
    return True
