"""Command line: ``tvm-autochunk`` (or ``python -m tvm_autochunk``).

Subcommands::

    estimate MODEL [--target T] [--arch A] [--json]
    build    MODEL -o OUT.so [--params OUT.params] [--target T] [--arch A] [--budget B]
             [--json-report FILE] [-q]
    inspect  ART.so [--json]
    run      ART.so --inputs FILE.npz [--params FILE] [-o OUT.npz] [--threads N]

``MODEL`` is a ``.onnx`` or ``.pt2`` (``torch.export.save``) file. ``main(argv)`` returns the exit
status: 0 on success; 2 when argparse rejects the command line or a tvm_autochunk error
(``AutochunkError``) is raised, after printing ``error: <message>`` on stderr. Any other exception
is a bug and propagates with its traceback (exit status 1 from the interpreter).

``inspect`` and ``run`` stay on the runtime side: ``inspect`` reads the metadata record in the
library's ELF section without importing TVM; ``run`` goes through ``tvm_autochunk.load`` and never
imports the compiler-side modules (``api``, ``frontends``, the passes). Note that a *full* TVM
wheel's ``import tvm`` imports ``tvm.relax`` by itself; a runtime-only TVM build does not.

This is the only module that configures logging (``--verbose``: INFO, ``-vv``: DEBUG).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
import time
import warnings
from pathlib import Path

from relay_passes.errors import AutochunkError, InputError

from .budget import format_bytes, parse_budget

__all__ = ["CLIError", "main"]

PROG = "tvm-autochunk"
log = logging.getLogger(__name__)
_LOGGERS = ("tvm_autochunk", "relay_passes")
_POSITIONAL_KEY = re.compile(r"^(?:arg|arr_)(\d+)$")


class CLIError(AutochunkError):
    """A command-line level problem: an unreadable input file, an unwritable output path."""


# ------------------------------------------------------------------------------------ logging
class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (pytest's capsys swaps it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:  # StreamHandler.__init__ assigns it; ignore
        pass


@contextlib.contextmanager
def _logging(verbosity: int):
    """Route our packages' log records to stderr for the duration of one ``main`` call.

    Without ``--verbose`` only warnings are shown. The loggers' previous state is restored on
    exit, so calling ``main`` from Python (or tests) leaves the caller's logging as it was.
    """
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    saved = []
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, logger.propagate))
        logger.setLevel(level)
        logger.addHandler(handler)
        logger.propagate = False  # printed once, here, not again by the root logger's handlers
    try:
        yield
    finally:
        for logger, lvl, prop in saved:
            logger.removeHandler(handler)
            logger.setLevel(lvl)
            logger.propagate = prop


# ------------------------------------------------------------------------------------ helpers
def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _check_writable_parent(path: str, what: str) -> Path:
    """Fail before a long build when the output folder does not exist."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise CLIError(
            f"cannot write the {what} to '{path}': folder '{parent}' does not exist. "
            "Remedy: create it first (mkdir -p) or choose another path."
        )
    if p.is_dir():
        raise CLIError(f"cannot write the {what} to '{path}': it is a folder; give a file name")
    return p


def _write_text(path: str, text: str, what: str) -> None:
    try:
        Path(path).write_text(text)
    except OSError as e:
        raise CLIError(f"cannot write the {what} to '{path}': {e.strerror or e}") from e


def _shape(shape) -> str:
    return "x".join(str(d) for d in shape) if shape else "scalar"


def _fmt_bytes(n) -> str:
    return "-" if n is None else format_bytes(int(n))


def _target_text(t: dict) -> str:
    extra = [f"{k}={v}" for k, v in t.items() if k not in ("kind", "mattr")]
    if t.get("mattr"):
        extra.append("mattr=" + ",".join(t["mattr"]))
    return t.get("kind", "?") + (f" ({', '.join(extra)})" if extra else "")


# ------------------------------------------------------------------------------------ commands
def _bounded(model, args):
    """``model`` with the ``--bound NAME=VALUE`` upper bounds set (a path is loaded first)."""
    if not args.bound:
        return model
    from .api import bound_dims
    from .frontends import load_model

    bounds = {}
    for item in args.bound:
        name, _, value = item.partition("=")
        if not name or not value.isdigit() or int(value) < 1:
            raise CLIError(
                f"--bound {item!r}: expected NAME=VALUE with a positive int, e.g. s27=4096"
            )
        bounds[name] = int(value)
    return bound_dims(load_model(model) if isinstance(model, str) else model, bounds)


def _cmd_estimate(args) -> int:
    from .api import estimate

    report = estimate(_bounded(args.model, args), args.target, arch=args.arch)
    print(report.to_json(indent=2) if args.json else str(report))
    return 0


def _cmd_build(args) -> int:
    from .api import build

    # Everything we can check cheaply is checked before the (slow) import and build.
    budget = parse_budget(args.budget)
    out = _check_writable_parent(args.output, "artifact")
    model = args.model
    if args.params:  # weights as parameters, written to their own file (not into the .so)
        from .frontends import load_model

        _check_writable_parent(args.params, "weights")
        model = load_model(args.model, keep_params_as_input=True)
    model = _bounded(model, args)
    if args.json_report:
        _check_writable_parent(args.json_report, "JSON report")

    t0 = time.perf_counter()
    # Progress lines with elapsed seconds on stderr. With --verbose the log records (which carry
    # the same messages) replace them; -q drops them and the report (log records still show).
    show = not args.quiet and not args.verbose

    def progress(msg: str) -> None:
        _err(f"[{time.perf_counter() - t0:6.1f}s] {msg}")

    def note(msg: str) -> None:
        log.info(msg)
        if show:
            progress(msg)

    art = build(model, args.target, budget, arch=args.arch, progress=progress if show else None)
    note(f"exporting to {out}")
    art.export(out, params=args.params)
    note(f"wrote {out} ({format_bytes(out.stat().st_size)})")
    if args.params:
        note(f"wrote its weights to {args.params}")
    if args.json_report:
        _write_text(args.json_report, art.report.to_json(indent=2) + "\n", "JSON report")
        note(f"wrote the memory report to {args.json_report}")
    if not args.quiet:
        print(str(art.report))
    return 0


def _device_code_text(meta: dict, path: str | None) -> str | None:
    """CUDA device code: what the build recorded, and what the file's bytes hold."""
    rec = meta.get("device_code")
    if not rec and (meta.get("target") or {}).get("kind") != "cuda":
        return None
    rec = rec or {}
    fmt = rec.get("format", "?")
    text = fmt + (f" for {rec['arch']}" if rec.get("arch") else "")
    if rec.get("compiler"):
        text += f" ({rec['compiler']})"
    if fmt == "cuda-source":
        text += "; compiled on the deploy host at load"
        if rec.get("reason"):
            text += f" [{rec['reason']}]"
    if path is not None and Path(path).is_file():
        from .artifact import device_code  # pure Python

        found = device_code(path)
        parts = [
            f"{e['arch']} {'SASS' if e['kind'] == 'elf' else e['kind'].upper()}"
            for f in found["fatbins"] for e in f["entries"]
        ]
        if parts:
            size = sum(f["size"] for f in found["fatbins"])
            text += f"; embedded: {' + '.join(parts)} ({format_bytes(size)})"
        elif found["cuda_source"]:
            text += "; embedded: CUDA source"
    return text


def format_metadata(meta: dict, path: str | None = None) -> str:
    """The metadata record of an exported artifact, for people."""
    rep = meta.get("report") or {}
    lines = []
    if path is not None:
        size = Path(path).stat().st_size if Path(path).is_file() else None
        lines.append(f"artifact      {path}" + (f" ({format_bytes(size)})" if size else ""))
    ffi = f", tvm-ffi {meta['tvm_ffi_version']}" if meta.get("tvm_ffi_version") else ""
    lines.append(
        f"built by      tvm_autochunk {meta.get('tvm_autochunk_version', '?')}, "
        f"TVM {meta.get('tvm_version', '?')}{ffi} (metadata format {meta.get('format', '?')})"
    )
    tgt = _target_text(meta.get("target") or {})
    if meta.get("cross"):
        tgt += f"  [cross-compiled with {meta.get('cross_compiler') or 'a cross compiler'}]"
    lines.append(f"target        {tgt}")
    dev = _device_code_text(meta, path)
    if dev:
        lines.append(f"device code   {dev}")
    for title, key in (("inputs", "inputs"), ("outputs", "outputs")):
        specs = meta.get(key) or []
        lines.append(f"{title:<13} {len(specs)}")
        for s in specs:
            name, shape = s.get("name", "?"), _shape(s.get("shape"))
            lines.append(f"  {name:<16} {shape:<24} {s.get('dtype')}")
    if meta.get("params"):  # the weights are outside the library
        lines.append(
            f"params        {len(meta['params'])} weight tensor(s) in a separate file "
            "(load(..., params=FILE); run --params FILE)"
        )
    bounds = meta.get("bounds") or {}
    if bounds:
        lo = meta.get("lower_bounds") or {}
        lines.append("symbolic dims " + ", ".join(
            f"{lo[k]} <= {k} <= {v}" if k in lo else f"{k} <= {v}" for k, v in bounds.items()))
    if short := meta.get("short_entry"):
        lines.append(f"  {short['dim']} <= {short['bound']} runs '{short['function']}' unchunked")
    budget = meta.get("budget_bytes")
    lines.append(f"budget        {'none' if budget is None else format_bytes(int(budget))}")
    # peak_bytes: what one call allocates (max of the static plan and the run-time pools).
    peak = rep.get("peak_bytes")
    if peak is not None:
        line = f"peak          {format_bytes(int(peak))}   (one call)"
        if budget is not None:
            line += ", within budget" if int(peak) <= int(budget) else ", OVER budget"
        lines.append(line)
    for label, key, note in (
        ("  TVM plan  ", "planned_peak_bytes", "(TVM's static memory plan)"),
        ("  estimate  ", "estimated_peak_bytes", "(our replay of the static plan, pre-build)"),
        ("  run-time  ", "runtime_peak_bytes", "(simulated VM pool high-water)"),
    ):
        if rep.get(key) is not None:
            lines.append(f"{label}  {_fmt_bytes(rep[key])}   {note}")
    if rep.get("weight_bytes") is not None:
        lines.append(f"weights       {_fmt_bytes(rep.get('weight_bytes'))}   (not counted)")
    if rep.get("input_bytes") is not None:
        lines.append(f"inputs        {_fmt_bytes(rep.get('input_bytes'))}   (not counted)")
    chunking = rep.get("chunking") or meta.get("chunking")
    lines.append("chunking      " + (json.dumps(chunking, sort_keys=True) if chunking else "none"))
    if rep.get("build_seconds") is not None:
        lines.append(f"build time    {rep['build_seconds']:.1f}s")
    return "\n".join(lines)


def _cmd_inspect(args) -> int:
    from .artifact import read_metadata  # pure Python: no TVM import

    meta = read_metadata(args.artifact)
    if args.json:
        print(json.dumps(meta, indent=2, sort_keys=True))
    else:
        print(format_metadata(meta, args.artifact))
    return 0


def _read_inputs(path: str, specs) -> list:
    """Arrays for ``specs`` from an npz: keyed by input name, or arg0..argN / arr_0..arr_N."""
    import zipfile

    import numpy as np

    p = Path(path)
    if not p.is_file():
        raise CLIError(f"no inputs file at '{path}' (file not found)")
    try:
        with np.load(p, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise CLIError(
                    f"'{path}' holds a single array, not an .npz archive. Remedy: save the inputs "
                    "with np.savez(path, arg0=..., arg1=...) or keyed by input name."
                )
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise CLIError(f"cannot read the inputs from '{path}': {e}") from e
    names = [s.name for s in specs]
    keys = sorted(arrays)
    expected = f"{len(names)} input(s): {', '.join(names) or '(none)'}"
    if set(keys) == set(names):  # keyed by input name (or no inputs at all)
        return [arrays[n] for n in names]
    positional = {int(m.group(1)): k for k in keys if (m := _POSITIONAL_KEY.match(k))}
    if positional and len(positional) == len(keys):
        if sorted(positional) != list(range(len(keys))):
            raise InputError(
                f"'{path}' has positional arrays {keys}, which are not numbered 0..{len(keys) - 1} "
                f"without gaps; the artifact expects {expected}"
            )
        if len(keys) != len(names):
            raise InputError(
                f"'{path}' has {len(keys)} array(s) ({', '.join(keys)}) but the artifact expects "
                f"{expected}. Remedy: save exactly one array per input."
            )
        return [arrays[positional[i]] for i in range(len(keys))]
    raise InputError(
        f"'{path}' has arrays {keys}; the artifact expects {expected}. Remedy: key the arrays "
        f"by input name ({', '.join(names)}) or as arg0..arg{max(len(names) - 1, 0)}."
    )


def _cmd_run(args) -> int:
    import numpy as np

    from .artifact import load  # runtime only

    if args.output:
        _check_writable_parent(args.output, "outputs")
    art = load(args.artifact, threads=args.threads, params=args.params)
    arrays = _read_inputs(args.inputs, art.inputs)
    t = time.perf_counter()
    res = art(*arrays)
    secs = time.perf_counter() - t
    outs = res if isinstance(res, tuple) else (res,)
    specs = art.outputs
    on = f" on {art.threads} CPU thread(s)" if art.threads else ""
    print(f"ran {args.artifact} in {secs * 1000:.1f} ms{on}; {len(outs)} output(s):")
    for i, o in enumerate(outs):
        o = np.asarray(o)
        name = specs[i].name if i < len(specs) else f"output[{i}]"
        stats = ""
        if o.size and np.issubdtype(o.dtype, np.number):
            stats = f"  min {o.min():.6g}  max {o.max():.6g}  mean {o.mean():.6g}"
        print(f"  out{i} ({name}) {_shape(o.shape)} {o.dtype}{stats}")
    if args.output:
        try:
            with open(args.output, "wb") as f:  # open() so np.savez keeps the exact name
                np.savez(f, **{f"out{i}": np.asarray(o) for i, o in enumerate(outs)})
        except OSError as e:
            raise CLIError(f"cannot write the outputs to '{args.output}': {e}") from e
        print(f"wrote {args.output} (keys " + ", ".join(f"out{i}" for i in range(len(outs))) + ")")
    return 0


# ------------------------------------------------------------------------------------ parser
def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    from . import __version__

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="count", default=argparse.SUPPRESS,
        help="log progress (-vv: debug logging)",
    )
    parser = argparse.ArgumentParser(
        prog=prog,
        parents=[common],
        description="Estimate, build, inspect and run memory-budgeted TVM models.",
        epilog="Exit status: 0 ok, 2 bad usage or a tvm_autochunk error (printed as 'error: ...').",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def target_opts(p):
        p.add_argument("--target", default="llvm",
                       help="'llvm' (or 'cpu'), 'cuda', 'aarch64' or a TVM tag (default: llvm)")
        p.add_argument("--arch", default=None,
                       help="CUDA arch such as sm_80 (cuda), or an LLVM -mcpu (llvm)")
        p.add_argument("--bound", action="append", default=[], metavar="NAME=VALUE",
                       help="upper bound of a symbolic dim exported without a max (repeatable)")

    p = sub.add_parser("estimate", parents=[common], help="print the memory report of a model",
                       description="Estimate the memory one call of MODEL allocates.")
    p.add_argument("model", metavar="MODEL", help="a .onnx or .pt2 file")
    target_opts(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_estimate)

    p = sub.add_parser("build", parents=[common], help="compile a model into a shared library",
                       description="Build MODEL so that one call fits the budget; export a .so.")
    p.add_argument("model", metavar="MODEL", help="a .onnx or .pt2 file")
    p.add_argument("-o", "--output", required=True, metavar="OUT.so",
                   help="where to write the library (written atomically)")
    target_opts(p)
    p.add_argument("--budget", default=None,
                   help="memory budget for one call, e.g. 512MiB, 2GB, 1.5GiB (default: none)")
    p.add_argument("--params", metavar="OUT.params", default=None,
                   help="keep the weights out of the library: write them to this file")
    p.add_argument("--json-report", metavar="FILE", default=None,
                   help="also write the memory report as JSON to FILE")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="print nothing on success (no progress, no report)")
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("inspect", parents=[common], help="show an artifact's embedded metadata",
                       description="Print the metadata embedded in ART.so (does not load it).")
    p.add_argument("artifact", metavar="ART.so")
    p.add_argument("--json", action="store_true", help="dump the metadata record as JSON")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("run", parents=[common], help="run an artifact on inputs from an .npz",
                       description="Load ART.so (TVM runtime only) and run it once.")
    p.add_argument("artifact", metavar="ART.so")
    p.add_argument("--inputs", required=True, metavar="FILE.npz",
                   help="arrays keyed by input name, or arg0..argN in input order")
    p.add_argument("--params", metavar="FILE", default=None,
                   help="the weights file of an artifact built with --params")
    p.add_argument("-o", "--output", metavar="OUT.npz", default=None,
                   help="write the outputs as out0..outN to this .npz")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads (default: $TVM_AUTOCHUNK_THREADS, else every core)")
    p.set_defaults(func=_cmd_run)
    return parser


def main(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    if argv is not None:
        argv = [os.fspath(a) if isinstance(a, os.PathLike) else a for a in argv]
    parser = build_parser(prog)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version (0) and usage errors (2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    verbosity = args.verbose = getattr(args, "verbose", 0)
    try:
        with _logging(verbosity), warnings.catch_warnings():
            if not verbosity:
                # torch / onnx deprecation chatter is not actionable for a CLI user.
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.simplefilter("ignore", FutureWarning)
            return args.func(args)
    except AutochunkError as e:
        _err(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except BrokenPipeError:
        # stdout was closed early (`... | head`): stop quietly, like other Unix tools.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush is silent
        except (OSError, ValueError, AttributeError):
            pass
        return 141
