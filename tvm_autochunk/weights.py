"""Weights outside the library: the parameters an artifact takes at load time.

A module imported with ``keep_params_as_input=True`` has its weights as the trailing parameters
of ``main`` (after ``num_input`` activations) and their values in ``main``'s ``"params"``
attribute. ``build`` detaches them (``detach``) so they are never compiled into the library;
the artifact names them (``meta["params"]``: name, shape, dtype) and keeps the values, and
``export(path, params=FILE)`` writes them to a file of their own (``save``). ``load(path,
params=FILE)`` reads and checks them (``read``, ``check``); a call passes them after the inputs.

File format: TVM's own parameter file (``tvm.runtime.save_param_dict_to_file``), keyed by
parameter name. Reading it needs only the TVM runtime (``runtime.LoadParamsFromFile`` is in
libtvm_runtime.so), so a deploy host needs nothing new; see docs/design.md "Weights".

This module imports only the TVM runtime, and only inside functions, except ``detach``, which
the compiler side calls.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from relay_passes.errors import ArtifactError

REMEDY = (
    "Remedy: ac.load(path, params='model.params') (CLI: run --params FILE), or "
    "art.load_params(FILE or {name: array}) on a built artifact"
)


def detach(mod, entry: str = "main"):
    """(``mod`` without any ``"params"`` attribute, the weight tensors of ``entry`` in the order
    of its trailing parameters, or None when the module carries no values for them)."""
    from tvm.relax.frontend import detach_params

    detached, values = detach_params(mod)
    for key in mod.attrs.keys() if mod.attrs is not None else ():
        # TVM's detach_params drops every module attribute; only "params" is meant to go
        if key != "params" and (detached.attrs is None or key not in detached.attrs):
            detached = detached.with_attr(key, mod.attrs[key])
    weights = values.get(entry)
    return detached, (list(weights) if weights is not None else None)


def specs_of(func, num_input: int) -> list[dict]:
    """Name, shape and dtype of each weight parameter of ``func`` (those past ``num_input``)."""
    from relay_passes import _compat as C

    out = []
    for p in func.params[num_input:]:
        shape = C.tensor_shape(p.ty)
        dims = [] if shape is None else [d if isinstance(d, int) else str(d) for d in shape]
        out.append({"name": str(p.name), "shape": dims, "dtype": C.tensor_dtype(p.ty)})
    names = [s["name"] for s in out]
    if len(set(names)) != len(names):  # the weights file is keyed by name
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ArtifactError(
            f"the weight parameters of the model are not uniquely named ({', '.join(dup)}), so "
            "they cannot be written to or read from a weights file. Remedy: rename them."
        )
    return out


def _desc(shape, dtype) -> str:
    return f"{'x'.join(str(d) for d in shape) or 'scalar'} {dtype}"


def _fits(want, got: tuple) -> bool:
    if len(want) != len(got):
        return False
    return all(not isinstance(w, int) or w == g for w, g in zip(want, got))


def check(specs, found: Mapping, source: str) -> list:
    """The values in ``found`` (name -> tensor or array) in the order of ``specs`` (TensorSpec),
    or ``ArtifactError`` naming every missing, extra, mis-shaped or mis-typed weight."""
    problems = []
    for s in specs:
        if s.name not in found:
            problems.append(f"missing '{s.name}' (expected {_desc(s.shape, s.dtype)})")
            continue
        v = found[s.name]
        shape, dtype = tuple(int(d) for d in v.shape), str(v.dtype)
        if not _fits(s.shape, shape) or dtype != s.dtype:
            problems.append(
                f"'{s.name}' is {_desc(shape, dtype)}, expected {_desc(s.shape, s.dtype)}"
            )
    names = {s.name for s in specs}
    for k in sorted(set(found) - names):
        v = found[k]
        problems.append(f"extra '{k}' ({_desc(tuple(v.shape), v.dtype)}): no such parameter")
    if problems:
        want = f"the artifact takes {len(specs)} weight(s)" if specs else "the artifact takes none"
        raise ArtifactError(
            f"the weights in {source} do not match the artifact ({want}): "
            + "; ".join(problems)
            + ". Remedy: pass the weights file exported with this artifact "
            "(art.export(path, params=FILE)) or rebuild the artifact from this model."
        )
    return [found[s.name] for s in specs]


def read(source, specs) -> list:
    """The weights for ``specs`` from a TVM parameter file or a mapping name -> array."""
    if isinstance(source, Mapping):
        found = {str(k): v if hasattr(v, "shape") else np.asarray(v) for k, v in source.items()}
        return check(specs, found, "the given mapping")
    p = Path(os.fspath(source))
    if not p.is_file():
        raise ArtifactError(
            f"no weights file at {str(p)!r} (file not found). Remedy: export it with "
            "art.export('model.so', params='model.params') and pass that path."
        )
    import tvm

    try:
        found = dict(tvm.runtime.load_param_dict_from_file(str(p)).items())
    except Exception as e:  # TVM reports a bad magic or a short read as an InternalError
        why = " ".join(str(e).split())[-200:]
        raise ArtifactError(
            f"{p} is not a readable TVM parameter file ({why}): it is truncated, corrupted or "
            "in another format. Remedy: re-export it with art.export(path, params=FILE)."
        ) from e
    return check(specs, {str(k): v for k, v in found.items()}, str(p))


def save(path, specs, values) -> Path:
    """Write ``values`` (in the order of ``specs``) as a TVM parameter file, atomically."""
    import tvm

    dst = Path(os.fspath(path))
    if not dst.parent.is_dir():
        raise ArtifactError(f"cannot write the weights to {str(dst)!r}: no folder {dst.parent}")
    arrays = {
        s.name: v if isinstance(v, tvm.runtime.Tensor) else tvm.runtime.tensor(np.asarray(v))
        for s, v in zip(specs, values)
    }
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    try:
        tvm.runtime.save_param_dict_to_file(arrays, str(tmp))
        os.replace(tmp, dst)
    except Exception as e:  # disk full, read-only folder: nothing is left behind
        raise ArtifactError(
            f"cannot write the weights to {str(dst)!r}: {e}. Remedy: free space or choose a "
            "writable folder."
        ) from e
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def on_device(values, dev) -> list:
    """``values`` as TVM tensors on ``dev`` (copied once; the caller keeps the result)."""
    import tvm

    out = []
    for v in values:
        if isinstance(v, tvm.runtime.Tensor):
            out.append(v if v.device == dev else v.copyto(dev))
        else:
            out.append(tvm.runtime.tensor(np.ascontiguousarray(v), dev))
    return out


def require(specs, values) -> None:
    """Refuse to call an artifact that takes weights before they were given."""
    if specs and values is None:
        names = ", ".join(s.name for s in specs[:4]) + (", ..." if len(specs) > 4 else "")
        raise ArtifactError(
            f"this artifact takes its {len(specs)} weight(s) ({names}) at load time and none "
            f"were loaded. {REMEDY}."
        )


def can_save(path, specs, values) -> None:
    """Refuse to export weights an artifact does not take, or whose values it does not hold."""
    if specs and values is not None:
        return
    why = (
        "holds no weight values. Remedy: build from a module imported with "
        "keep_params_as_input=True, or call art.load_params(...) first"
        if specs
        else "takes no weights (they are built into the library). Remedy: drop params=, or "
        "import the model with keep_params_as_input=True"
    )
    raise ArtifactError(f"cannot write weights to {str(path)!r}: this artifact {why}.")
