"""Import layer: turn a PyTorch model, a ``.pt2`` / ``.onnx`` file or an IRModule into Relax.

Every public function returns a ``tvm.IRModule`` whose ``"main"`` is a Relax function (for torch
imports ``main`` returns a tuple, even for one output). Weights become constants unless
``keep_params_as_input=True`` (then use ``tvm.relax.frontend.detach_params``).

torch and onnx are optional: they are imported lazily inside the functions, so this module (and
``tvm_autochunk``) imports without them. A missing package raises :class:`FrontendError` naming the
pip extra to install.

Errors: a missing or malformed file, a failing ``torch.export`` and an operator TVM's importer
cannot convert all become :class:`FrontendError` (or its subclass :class:`UnsupportedOpError`)
with a message naming the file or op, the frontend and a remedy. The original exception is kept as
``__cause__``; TVM's own traceback is never the user-facing error.

Dynamic shapes: a ``torch.export.Dim("S", min=a, max=b)`` becomes a symbolic ``tirx.Var`` in
``main``'s signature, with ``tir_var_lower_bound`` / ``tir_var_upper_bound`` function attributes.
A Dim without ``max`` imports with only a lower bound; bounding memory is then left to the
estimator, which reports unbounded dims.
"""

from __future__ import annotations

import ast
import contextlib
import io
import logging
import os
import re
import sys
import traceback
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tvm
from tvm import relax

from relay_passes.errors import AutochunkError, FrontendError, UnsupportedOpError

from .torch_decomp import decomposition_table
from .torch_masks import constant_masks_read

if TYPE_CHECKING:  # pragma: no cover - typing only
    import onnx
    import torch

logger = logging.getLogger(__name__)

__all__ = [
    "ACCEPTED_SUFFIXES",
    "from_exported_program",
    "from_onnx",
    "from_pt2",
    "from_torch",
    "load_model",
]

#: File suffixes :func:`load_model` dispatches on (compared case-insensitively).
ACCEPTED_SUFFIXES: tuple[str, ...] = (".onnx", ".pt2")

PathLike = str | os.PathLike[str]

_TORCH_UNSUPPORTED_RE = re.compile(r"Unsupported function types (\[.*?\])")
_ONNX_UNSUPPORTED_RE = re.compile(r"not supported for frontend ONNX:\s*(.+)$")
_ONNX_NOT_IMPLEMENTED_RE = re.compile(r"Operator (\S+) not implemented")
_FRAME_RE = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')
_ONNX_OPSET_RE = re.compile(r"opset version (\d+) of (\S+) not implemented")


# --------------------------------------------------------------------------------------------
# Optional dependencies
# --------------------------------------------------------------------------------------------


def _import_torch() -> Any:
    try:
        import torch
        import torch.export
    except ImportError as e:
        raise FrontendError(
            f"importing a PyTorch model needs torch, which could not be imported ({e}). "
            "Remedy: pip install 'tvm_autochunk[torch]'."
        ) from e
    return torch


def _import_onnx() -> Any:
    try:
        import onnx
    except ImportError as e:
        raise FrontendError(
            f"importing an ONNX model needs onnx, which could not be imported ({e}). "
            "Remedy: pip install 'tvm_autochunk[onnx]'."
        ) from e
    return onnx


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _check_file(path: PathLike, frontend: str) -> Path:
    p = Path(os.fspath(path))
    if not p.exists():
        raise FrontendError(
            f"the {frontend} frontend cannot read '{p}': no such file. "
            "Remedy: check the path (relative paths are resolved against "
            f"'{Path.cwd()}')."
        )
    if not p.is_file():
        raise FrontendError(
            f"the {frontend} frontend cannot read '{p}': it is not a regular file. "
            "Remedy: pass the path of the model file itself."
        )
    if p.stat().st_size == 0:
        raise FrontendError(
            f"the {frontend} frontend cannot read '{p}': the file is empty (0 bytes), so it was "
            "not written completely. Remedy: export or save the model again."
        )
    return p


def _innermost_local(exc: BaseException, func_name: str, var: str) -> Any:
    """The value of local ``var`` in the innermost traceback frame of function ``func_name``."""
    found = None
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        if frame.f_code.co_name == func_name and var in frame.f_locals:
            found = frame.f_locals[var]
    return found


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()).rstrip(".") or type(exc).__name__
    text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _as_args(example_args: Any, torch: Any) -> tuple[Any, ...]:
    if isinstance(example_args, torch.Tensor):
        return (example_args,)
    if isinstance(example_args, (tuple, list)):
        return tuple(example_args)
    raise FrontendError(
        f"example_args must be a tensor or a tuple of tensors, got {type(example_args).__name__}. "
        "Remedy: pass example inputs as a tuple, e.g. example_args=(x,)."
    )


# --------------------------------------------------------------------------------------------
# PyTorch
# --------------------------------------------------------------------------------------------


def _torch_node_site(ep: Any, op: str, source: str) -> str:
    """Where the first graph node calling ``op`` comes from, or just ``source``."""
    for node in ep.graph.nodes:
        if node.op == "call_function" and getattr(node.target, "__name__", None) == op:
            return _describe_fx_node(node, source)
    return source


def _describe_fx_node(node: Any, source: str) -> str:
    """Describe ``node`` as "node 'x' of <source> (from file.py:12 in forward: <code>)"."""
    site = f"node '{node.name}' of {source}"
    trace = (node.meta.get("stack_trace") or "").strip().splitlines()
    if len(trace) >= 2:
        m = _FRAME_RE.search(trace[-2])
        loc = f"{m.group(1)}:{m.group(2)} in {m.group(3)}" if m else trace[-2].strip()
        site += f" (from {loc}: {trace[-1].strip()})"
    return site


def _translate_torch_error(e: Exception, ep: Any, source: str) -> AutochunkError:
    msg = str(e)
    m = _TORCH_UNSUPPORTED_RE.search(msg)
    if m:
        try:
            ops = sorted(str(o) for o in ast.literal_eval(m.group(1)))
        except (ValueError, SyntaxError):
            ops = [m.group(1)]
        if ops:
            others = f"; the model also uses {', '.join(ops[1:])}" if len(ops) > 1 else ""
            detail = f"aten op used by {_torch_node_site(ep, ops[0], source)}{others}"
            return UnsupportedOpError(ops[0], "torch", detail)
    node = _innermost_local(e, "_translate_fx_graph", "node")
    target = getattr(node, "target", None)
    if node is not None and getattr(node, "op", None) == "call_function" and target is not None:
        op = getattr(target, "__name__", str(target))
        detail = f"converting {_describe_fx_node(node, source)} failed with {_one_line(e)}"
        return UnsupportedOpError(op, "torch", detail)
    return FrontendError(
        f"the torch frontend (tvm.relax.frontend.torch.from_exported_program) failed on "
        f"{source}: {_one_line(e)}. Remedy: simplify the model around the failing op, or export "
        "it to ONNX and use from_onnx."
    )


def from_exported_program(
    ep: torch.export.ExportedProgram,
    *,
    keep_params_as_input: bool = False,
    source: str | None = None,
) -> tvm.IRModule:
    """Import a ``torch.export.ExportedProgram`` into a Relax IRModule.

    ``source`` only names the program in error messages (defaults to "the exported program").
    """
    torch = _import_torch()
    if not isinstance(ep, torch.export.ExportedProgram):
        raise FrontendError(
            f"from_exported_program expects a torch.export.ExportedProgram, got "
            f"{type(ep).__name__}. Remedy: call torch.export.export(model, args) first, or use "
            "from_torch(model, example_args)."
        )
    from tvm.relax.frontend.torch import from_exported_program as _tvm_import

    source = source or "the exported program"
    try:
        # torch's decompositions but for unmasked SDPA's safe-softmax check (torch_decomp);
        # constant masks that mask nothing or are causal read as such (torch_masks)
        with constant_masks_read(ep, torch):
            ep = ep.run_decompositions(decomposition_table(torch))
        mod = _tvm_import(ep, keep_params_as_input=keep_params_as_input, run_ep_decomposition=False)
        # the importer keeps bindings nothing reads (a mask torch_masks dropped): each would
        # still be built, run and planned
        mod = relax.transform.DeadCodeElimination()(mod)
    except Exception as e:
        raise _translate_torch_error(e, ep, source) from e
    logger.debug("imported %s through the torch frontend", source)
    return mod


def from_torch(
    model: torch.nn.Module,
    example_args: Any,
    *,
    dynamic_shapes: Any = None,
    keep_params_as_input: bool = False,
) -> tvm.IRModule:
    """``torch.export.export(model, example_args, dynamic_shapes=...)`` and import it to Relax.

    ``dynamic_shapes`` takes ``torch.export.Dim`` objects exactly as ``torch.export.export``
    does; each dynamic dim becomes a symbolic var with ``tir_var_lower_bound`` and (if the Dim
    has ``max``) ``tir_var_upper_bound`` attributes on ``main``.
    """
    torch = _import_torch()
    if not isinstance(model, torch.nn.Module):
        raise FrontendError(
            f"from_torch expects a torch.nn.Module, got {type(model).__name__}. "
            "Remedy: wrap the callable in an nn.Module whose forward() calls it."
        )
    args = _as_args(example_args, torch)
    name = type(model).__name__
    if model.training:
        logger.warning(
            "%s is in training mode; exporting as is (call model.eval() for inference)", name
        )
    try:
        with torch.no_grad():
            ep = torch.export.export(model, args, dynamic_shapes=dynamic_shapes)
    except Exception as e:
        raise FrontendError(
            f"torch.export.export failed for {name}: {_one_line(e, 500)}. Remedy: make the model "
            "exportable (no data-dependent Python control flow; dynamic_shapes consistent with the "
            "example inputs), see https://pytorch.org/docs/stable/export.html."
        ) from e
    return from_exported_program(
        ep, keep_params_as_input=keep_params_as_input, source=f"model {name}"
    )


def from_pt2(path: PathLike, *, keep_params_as_input: bool = False) -> tvm.IRModule:
    """Load a ``.pt2`` file written by ``torch.export.save`` and import it to Relax."""
    p = _check_file(path, "torch (.pt2)")
    torch = _import_torch()
    if not zipfile.is_zipfile(p):
        raise FrontendError(
            f"the torch frontend cannot read '{p}': it is not a .pt2 archive (truncated, "
            "corrupted, or not written by torch.export.save). Remedy: re-save the program with "
            "torch.export.save(ep, path)."
        )
    try:
        with open(p, "rb") as f:
            ep = torch.export.load(f)
    except Exception as e:
        with zipfile.ZipFile(p) as z:
            names = z.namelist()
        what = ""
        if not any(n.endswith("archive_format") for n in names):  # torch.export.save writes it
            shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
            what = (
                f" (it is a zip file, but not a torch.export archive: it has no archive_format "
                f"entry; it holds {shown or 'nothing'})"
            )
        raise FrontendError(
            f"the torch frontend cannot load '{p}'{what}: {_one_line(e)}. Remedy: re-save the "
            f"program with torch.export.save(ep, path) (not torch.save) using the installed "
            f"torch {torch.__version__}."
        ) from e
    return from_exported_program(ep, keep_params_as_input=keep_params_as_input, source=f"'{p}'")


# --------------------------------------------------------------------------------------------
# ONNX
# --------------------------------------------------------------------------------------------


def _translate_onnx_error(e: Exception, source: str, captured: str) -> AutochunkError:
    msg = " ".join(str(e).split())
    m = _ONNX_UNSUPPORTED_RE.search(msg)
    if m:
        ops = sorted({o.strip() for o in m.group(1).split(",") if o.strip()})
        others = f"; the model also uses {', '.join(ops[1:])}" if len(ops) > 1 else ""
        return UnsupportedOpError(ops[0], "onnx", f"op type in {source}{others}")
    m = _ONNX_OPSET_RE.search(msg)
    if m:
        return UnsupportedOpError(
            m.group(2),
            "onnx",
            f"{source} uses opset {m.group(1)}, which TVM does not implement for this op; "
            "re-export with another opset_version",
        )
    m = _ONNX_NOT_IMPLEMENTED_RE.search(msg)
    if m:
        return UnsupportedOpError(m.group(1), "onnx", f"op type in {source}")
    op = _innermost_local(e, "_construct_nodes", "op_name")
    if op is not None:
        node = _innermost_local(e, "_construct_nodes", "node")
        where = f" node '{node.name}'" if getattr(node, "name", "") else ""
        return UnsupportedOpError(
            str(op), "onnx", f"converting{where} of {source} failed with {_one_line(e)}"
        )
    if captured.strip():
        logger.debug("TVM onnx frontend output before the failure:\n%s", captured)
    return FrontendError(
        f"the onnx frontend (tvm.relax.frontend.onnx.from_onnx) failed on {source}: "
        f"{_one_line(e)}. Remedy: re-export the model (e.g. another opset_version), or pass "
        "shape_dict for inputs with unknown shapes."
    )


def from_onnx(
    model_or_path: onnx.ModelProto | PathLike,
    shape_dict: Mapping[str, Sequence[int | str]] | None = None,
    *,
    check_model: bool = True,
    keep_params_as_input: bool = False,
) -> tvm.IRModule:
    """Import an ONNX model (``onnx.ModelProto`` or path to a ``.onnx`` file) into Relax.

    ``shape_dict`` maps input names to shapes (used for inputs with unknown dims).
    ``check_model`` runs ``onnx.checker.check_model`` first and rejects invalid models.
    ``keep_params_as_input``: initializers become trailing parameters of ``main`` (values in
    its ``"params"`` attribute) instead of constants, as for :func:`from_torch`.
    """
    onnx = _import_onnx()
    from google.protobuf.message import DecodeError  # installed with onnx

    path: Path | None = None
    if isinstance(model_or_path, onnx.ModelProto):
        model, source = model_or_path, "the ONNX model"
    elif isinstance(model_or_path, (str, os.PathLike)):
        path = _check_file(model_or_path, "onnx")
        source = f"'{path}'"
        try:
            model = onnx.load(os.fspath(path))
        except (DecodeError, OSError, ValueError) as e:
            raise FrontendError(
                f"the onnx frontend cannot parse '{path}': {_one_line(e)} (the file is truncated, "
                "corrupted, or not an ONNX protobuf). Remedy: re-export the model, e.g. with "
                "torch.onnx.export(...)."
            ) from e
    else:
        raise FrontendError(
            f"from_onnx expects an onnx.ModelProto or a path to a .onnx file, got "
            f"{type(model_or_path).__name__}."
        )
    if check_model:
        try:
            onnx.checker.check_model(os.fspath(path) if path is not None else model)
        except Exception as e:
            raise FrontendError(
                f"the onnx frontend rejected {source}: onnx.checker says {_one_line(e)}. Remedy: "
                "re-export the model, or pass check_model=False to try importing it anyway."
            ) from e
    from tvm.relax.frontend.onnx import from_onnx as _tvm_import

    captured = io.StringIO()  # TVM's onnx importer print()s the failing op; keep it off stdout
    try:
        with contextlib.redirect_stdout(captured):
            mod = _tvm_import(
                model,
                shape_dict=dict(shape_dict) if shape_dict else None,
                keep_params_in_input=keep_params_as_input,
            )
    except Exception as e:
        raise _translate_onnx_error(e, source, captured.getvalue()) from e
    logger.debug("imported %s through the onnx frontend", source)
    return mod


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------


def _check_relax_main(mod: tvm.IRModule) -> tvm.IRModule:
    names = sorted(gv.name_hint for gv in mod.get_global_vars())
    if "main" not in names:
        raise FrontendError(
            f"the IRModule has no function 'main' (it has {names or 'no functions'}). "
            "Remedy: name the entry Relax function 'main'."
        )
    main = mod["main"]
    if not isinstance(main, relax.Function):
        raise FrontendError(
            f"the IRModule's 'main' is a {type(main).__name__}, not a Relax function. "
            "Remedy: pass a module whose 'main' is a relax.Function (e.g. from a frontend)."
        )
    return mod


def load_model(obj: Any, example_args: Any = None, **kw: Any) -> tvm.IRModule:
    """Import ``obj`` into a Relax IRModule, dispatching on its type.

    Accepted: ``tvm.IRModule`` (returned as is; must have a Relax ``main``),
    ``torch.nn.Module`` (needs ``example_args``; ``kw`` go to :func:`from_torch`),
    ``torch.export.ExportedProgram``, ``onnx.ModelProto``, and a path ending in ``.onnx`` or
    ``.pt2`` (``kw`` go to :func:`from_onnx` / :func:`from_pt2`).
    """
    if isinstance(obj, tvm.IRModule):
        return _check_relax_main(obj)
    torch = sys.modules.get("torch")  # an object can only be a torch type if torch is loaded
    if torch is not None and isinstance(obj, torch.nn.Module):
        if example_args is None:
            raise FrontendError(
                f"load_model needs example_args to export the torch.nn.Module "
                f"{type(obj).__name__}. Remedy: load_model(model, example_args=(x,))."
            )
        return from_torch(obj, example_args, **kw)
    if example_args is not None:
        raise FrontendError(
            f"example_args only applies to a torch.nn.Module, but got a {type(obj).__name__}. "
            "Remedy: drop example_args."
        )
    if torch is not None and isinstance(obj, torch.export.ExportedProgram):
        return from_exported_program(obj, **kw)
    onnx = sys.modules.get("onnx")
    if onnx is not None and isinstance(obj, onnx.ModelProto):
        return from_onnx(obj, **kw)
    if isinstance(obj, (str, os.PathLike)):
        suffix = Path(os.fspath(obj)).suffix.lower()
        if suffix == ".onnx":
            return from_onnx(obj, **kw)
        if suffix == ".pt2":
            return from_pt2(obj, **kw)
        raise FrontendError(
            f"cannot tell the format of '{os.fspath(obj)}' from its suffix "
            f"'{suffix or '(none)'}'; accepted suffixes: {', '.join(ACCEPTED_SUFFIXES)}. "
            "Remedy: rename the file, or call from_onnx / from_pt2 directly."
        )
    raise FrontendError(
        f"load_model cannot import a {type(obj).__module__}.{type(obj).__qualname__}; accepted: "
        "tvm.IRModule, torch.nn.Module (with example_args), torch.export.ExportedProgram, "
        f"onnx.ModelProto, or a path ending in {' / '.join(ACCEPTED_SUFFIXES)}."
    )
