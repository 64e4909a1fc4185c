"""Tests for the command line (``tvm_autochunk.cli`` / ``python -m tvm_autochunk``).

A tiny two-input, two-output torch model is exported once to ONNX and to ``.pt2``; the CLI
estimates it, builds it (two builds in the whole file), inspects and runs the artifact, and the
outputs are compared with the Python API and torch. Error paths check exit status 2 and the
``error:`` line on stderr. The whole file runs in about 30 s on 2 cores, most of it imports.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm
from _helpers import onnx_model as _onnx_model

import tvm_autochunk as ac
from tvm_autochunk import cli

REPO = Path(__file__).resolve().parents[1]


class Tiny(torch.nn.Module):
    """Two inputs, two outputs; the transposed fc weight (2 KiB) makes a 1 KiB budget infeasible."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(16, 32)

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        return torch.relu(self.fc(x)) + y, (x * 2.0).sum(dim=-1)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("cli_model")
    torch.manual_seed(0)
    m = Tiny().eval()
    x, y = torch.randn(4, 16), torch.randn(4, 32)
    onnx_path, pt2_path = d / "tiny.onnx", d / "tiny.pt2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            m, (x, y), str(onnx_path), dynamo=False, opset_version=17,
            input_names=["x", "y"], output_names=["z", "s"],
        )
    torch.export.save(torch.export.export(m, (x, y)), str(pt2_path))
    with torch.no_grad():
        ref = tuple(t.numpy() for t in m(x, y))
    return {"onnx": onnx_path, "pt2": pt2_path, "inputs": (x.numpy(), y.numpy()), "ref": ref,
            "dir": d}


def _main(argv: list[str]) -> tuple[int, str, str]:
    """``cli.main(argv)`` with stdout and stderr captured (usable from module fixtures)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def built(model) -> dict:
    """``build tiny.pt2 -o tiny.so --json-report tiny.json`` (no budget, default output)."""
    so, rep = model["dir"] / "tiny.so", model["dir"] / "tiny.json"
    rc, out, err = _main(["build", model["pt2"], "-o", so, "--json-report", rep])
    assert rc == 0, err
    return {"so": so, "json": rep, "out": out, "err": err}


def _error(capsys) -> str:
    """The captured stderr, asserting it carries exactly one ``error:`` line."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------------------------ estimate
def test_estimate_text(model, capsys):
    assert cli.main(["estimate", str(model["onnx"])]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Memory report (llvm")
    assert "peak (one call)" in out and "weights (not counted)" in out


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.export.load chatter
def test_estimate_json_matches_python_api(model, capsys):
    assert cli.main(["estimate", str(model["pt2"]), "--target", "cpu", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["peak_bytes"] == ac.estimate(model["pt2"]).peak_bytes > 0
    assert data["planned_peak_bytes"] is None  # nothing built yet
    assert [t["shape"] for t in data["estimate"]["inputs"]] == [[4, 16], [4, 32]]


# ------------------------------------------------------------------------------------ build
def test_build_writes_artifact_progress_and_report(built):
    assert built["so"].read_bytes()[:4] == b"\x7fELF"
    assert not list(built["so"].parent.glob(".tiny.so.tmp*"))  # atomic export left no temp file
    assert built["out"].startswith("Memory report (llvm")
    assert "peak (one call)" in built["out"]
    progress = built["err"].splitlines()
    assert progress[0].startswith("[") and progress[0].endswith("s] importing model")
    assert any(f"wrote {built['so']}" in ln for ln in progress)
    rep = json.loads(built["json"].read_text())
    assert 0 < rep["planned_peak_bytes"] <= rep["peak_bytes"]  # peak: max(plan, VM pools)
    assert rep["budget_bytes"] is None


def test_build_quiet_verbose_with_budget(model, tmp_path, capsys):
    so = tmp_path / "budget.so"
    rc = cli.main(["build", str(model["onnx"]), "-o", str(so), "--budget", "1MiB", "-q", "-v"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out == ""  # -q: no report
    assert "INFO tvm_autochunk.api: importing model" in err  # -v: log records, ...
    assert "s] importing model" not in err  # ... instead of the progress lines
    meta = ac.read_metadata(so)
    assert meta["budget_bytes"] == 1024**2
    assert [s["name"] for s in meta["inputs"]] == ["x", "y"]  # ONNX input names
    # main() restores the logging state it changed
    import logging

    assert logging.getLogger("tvm_autochunk").propagate
    assert not logging.getLogger("tvm_autochunk").handlers


@pytest.mark.cuda_build
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) not installed")
def test_build_cuda_arch_progress_and_fatbin(model, tmp_path):
    """``build --target cuda --arch sm_90``: progress names the arch; the .so holds its SASS."""
    so = tmp_path / "tiny_cuda.so"
    rc, out, err = _main(["build", model["pt2"], "--target", "cuda", "--arch", "sm_90",
                          "--budget", "1MiB", "-o", so])
    assert rc == 0, err
    progress = [ln for ln in err.splitlines() if re.match(r"^\[\s*\d+\.\ds\] ", ln)]
    assert progress and progress[0].endswith("s] importing model"), err
    assert any("compiling CUDA kernels for sm_90 with nvcc" in ln for ln in progress), err
    assert any(f"wrote {so}" in ln for ln in progress), err
    assert out.startswith("Memory report (cuda")
    meta = ac.read_metadata(so)
    assert meta["target"] == {"kind": "cuda", "arch": "sm_90"}
    assert meta["device_code"]["format"] == "fatbin"
    assert ac.artifact.device_code(so)["archs"] == ["sm_90"]
    rc, out, err = _main(["inspect", so])
    assert rc == 0 and "device code   fatbin for sm_90" in out, err


@pytest.mark.parametrize(("arch", "match"), [("90", "invalid CUDA arch '90'"),
                                             ("compute_90", "invalid CUDA arch")])
def test_build_bad_cuda_arch_fails_before_importing(model, tmp_path, capsys, arch, match):
    so = tmp_path / "never.so"
    argv = ["build", str(model["pt2"]), "--target", "cuda", "--arch", arch, "-o", str(so)]
    assert cli.main(argv) == 2
    assert match in _error(capsys)
    assert not so.exists()


# ------------------------------------------------------------------------------------ inspect
def test_inspect_text(built, capsys):
    assert cli.main(["inspect", str(built["so"])]) == 0
    out = capsys.readouterr().out
    rows = {ln.split()[0]: ln for ln in out.splitlines() if ln.strip()}
    assert rows["target"].split()[1] == "llvm"
    assert rows["x"].split()[1:] == ["4x16", "float32"]
    assert rows["y"].split()[1:] == ["4x32", "float32"]
    assert rows["output[1]"].split()[1:] == ["4", "float32"]
    assert rows["budget"].split()[1] == "none"
    assert rows["peak"].endswith("(one call)")  # no budget: no within/over remark
    assert {"TVM", "estimate", "weights", "chunking"} <= rows.keys() and "TVM 0.27" in out


def test_inspect_json_is_the_metadata_record(built, capsys):
    assert cli.main(["inspect", str(built["so"]), "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta == json.loads(json.dumps(ac.read_metadata(built["so"])))
    assert meta["target"]["kind"] == "llvm"
    assert [(s["name"], s["shape"]) for s in meta["inputs"]] == [("x", [4, 16]), ("y", [4, 32])]
    assert meta["report"]["planned_peak_bytes"] > 0


# ------------------------------------------------------------------------------------ run
@pytest.mark.parametrize("keys", [("arg0", "arg1"), ("x", "y")], ids=["positional", "named"])
def test_run_matches_python_api_and_torch(built, model, tmp_path, capsys, keys):
    inp, outp = tmp_path / "in.npz", tmp_path / "out.npz"
    np.savez(inp, **dict(zip(keys, model["inputs"])))
    assert cli.main(["run", str(built["so"]), "--inputs", str(inp), "-o", str(outp)]) == 0
    out = capsys.readouterr().out
    assert "2 output(s)" in out and "out1 (output[1]) 4 float32" in out
    with np.load(outp) as got:
        assert got.files == ["out0", "out1"]
        cli_outs = (got["out0"], got["out1"])
    api_outs = ac.load(built["so"])(*model["inputs"])
    for c, a, r in zip(cli_outs, api_outs, model["ref"]):
        np.testing.assert_array_equal(c, a)
        np.testing.assert_allclose(c, r, rtol=1e-5, atol=1e-5)


def test_inspect_and_run_stay_on_the_runtime_side(built, model, tmp_path):
    """inspect imports no TVM at all; run imports no compiler-side tvm_autochunk module."""
    inp = tmp_path / "in.npz"
    np.savez(inp, *model["inputs"])  # arr_0, arr_1: np.savez's positional names
    code = textwrap.dedent(f"""
        import sys
        from tvm_autochunk import cli
        assert cli.main(["inspect", {str(built["so"])!r}]) == 0
        assert "tvm" not in sys.modules, "inspect imported tvm"
        assert cli.main(["run", {str(built["so"])!r}, "--inputs", {str(inp)!r}]) == 0
        heavy = ["tvm_autochunk.api", "tvm_autochunk.frontends", "tvm_autochunk.report",
                 "relay_passes.pipeline", "relay_passes.estimate_memory", "onnx"]
        loaded = [m for m in heavy if m in sys.modules]
        assert not loaded, f"run imported {{loaded}}"
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


# ------------------------------------------------------------------------------------ errors
def test_missing_model_file(tmp_path, capsys):
    missing = tmp_path / "missing.onnx"
    assert cli.main(["estimate", str(missing)]) == 2
    assert str(missing) in _error(capsys)


def test_bad_budget_string_fails_before_importing(model, tmp_path, capsys):
    so = tmp_path / "x.so"
    assert cli.main(["build", str(model["onnx"]), "-o", str(so), "--budget", "2 parsecs"]) == 2
    line = _error(capsys)
    assert "invalid budget '2 parsecs'" in line and "MiB" in line
    assert not so.exists()


def test_impossible_budget_is_budget_infeasible(model, tmp_path, capsys, monkeypatch):
    import tvm_autochunk.api as api

    raised = []
    real_build = api.build

    def spy(*a, **kw):
        try:
            return real_build(*a, **kw)
        except ac.AutochunkError as e:
            raised.append(e)
            raise

    monkeypatch.setattr(api, "build", spy)
    so = tmp_path / "x.so"
    assert cli.main(["build", str(model["pt2"]), "-o", str(so), "--budget", "1KiB"]) == 2
    err = _error(capsys)
    assert "cannot fit the budget of 1.00 KiB (1024 bytes)" in err and "Remedy" in err
    assert [type(e) for e in raised] == [ac.BudgetInfeasibleError]
    assert not so.exists()


def test_build_into_missing_folder_fails_before_building(model, tmp_path, capsys):
    out = tmp_path / "no" / "such" / "dir" / "x.so"
    assert cli.main(["build", str(model["onnx"]), "-o", str(out)]) == 2
    assert "does not exist" in _error(capsys)


def test_inspect_non_elf_file(tmp_path, capsys):
    bogus = tmp_path / "bogus.so"
    bogus.write_text("this is not a shared library\n" * 4)
    assert cli.main(["inspect", str(bogus)]) == 2
    assert "not an ELF shared library" in _error(capsys)


def test_inspect_missing_file(tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path / "nope.so")]) == 2
    assert "file not found" in _error(capsys)


_X, _Z = np.zeros((4, 16), "float32"), np.zeros(3, "float32")


@pytest.mark.parametrize(
    "arrays, match",
    [
        ({"arg0": _X}, "has 1 array(s) (arg0) but the artifact expects 2"),
        ({"x": _X, "z": _Z}, "expects 2 input(s): x, y"),
        ({"arg0": _X, "arg1": np.zeros((4, 31), "float32")},
         "input 1 'y': shape (4, 31), expected (4, 32)"),
    ],
    ids=["too-few", "wrong-names", "wrong-shape"],
)
def test_run_with_wrong_inputs(built, tmp_path, capsys, arrays, match):
    inp = tmp_path / "in.npz"
    np.savez(inp, **arrays)
    assert cli.main(["run", str(built["so"]), "--inputs", str(inp)]) == 2
    assert match in _error(capsys)


def test_run_with_missing_inputs_file(built, tmp_path, capsys):
    assert cli.main(["run", str(built["so"]), "--inputs", str(tmp_path / "none.npz")]) == 2
    assert "no inputs file" in _error(capsys)


@pytest.mark.parametrize(
    "argv, match",
    [
        ([], "required: COMMAND"),
        (["build", "m.onnx"], "required: -o"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_argparse_misuse_exits_2(argv, match, capsys):
    assert cli.main(argv) == 2
    assert match in capsys.readouterr().err


def test_unexpected_exceptions_propagate(monkeypatch, tmp_path):
    def boom(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "_cmd_inspect", boom)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["inspect", str(tmp_path / "x.so")])


def test_python_m_help():
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "tvm_autochunk", "--help"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m tvm_autochunk")
    for command in ("estimate", "build", "inspect", "run"):
        assert command in proc.stdout


@pytest.mark.parametrize(
    "name, match",
    [
        ("empty.onnx", "the file is empty (0 bytes)"),
        ("garbage.onnx", "cannot parse"),
        ("weights.pt2", "not a torch.export archive"),
        ("celu.onnx", "cannot import operator 'Celu'"),
        ("missing.onnx", "no such file"),
    ],
)
def test_cli_bad_model_exits_2_and_writes_nothing(bad_files, capsys, name, match):
    out = bad_files / "out" / "m.so"
    out.parent.mkdir()
    before = set(os.listdir(bad_files))
    assert cli.main(["build", str(bad_files / name), "-o", str(out), "--budget", "1MiB"]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and name in lines[0] and match in lines[0], err
    assert "Traceback" not in err
    assert os.listdir(out.parent) == [] and set(os.listdir(bad_files)) == before | {"out"}


def test_cli_failed_export_exits_2_and_writes_nothing(bad_files, capsys, monkeypatch):
    import onnx

    model = bad_files / "softmax.onnx"
    onnx.save(_onnx_model("Softmax"), str(model))
    out = bad_files / "o" / "m.so"
    out.parent.mkdir()

    def broken(self, path, *a, **kw):
        with open(path, "wb") as f:
            f.write(b"\x7fELF partial")
        raise RuntimeError("the linker was killed")

    monkeypatch.setattr(tvm.runtime.Executable, "export_library", broken)
    assert cli.main(["build", str(model), "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert "error: exporting the library failed: the linker was killed" in err
    assert "Traceback" not in err and os.listdir(out.parent) == []


# ------------------------------------------------------------------ weights outside the library
def test_build_and_run_with_weights_outside_the_library(model, tmp_path, capsys):
    """build --params: the weights go to their own file; run --params loads and checks them."""
    so, params, inp, outp = (tmp_path / n for n in ("w.so", "w.params", "in.npz", "out.npz"))
    assert (
        cli.main(["build", str(model["onnx"]), "-o", str(so), "--params", str(params), "-q"]) == 0
    )
    meta = ac.read_metadata(so)
    assert sorted((p["name"], p["shape"]) for p in meta["params"]) == [
        ("fc.bias", [32]),
        ("fc.weight", [32, 16]),
    ]
    assert [s["name"] for s in meta["inputs"]] == ["x", "y"]
    assert cli.main(["inspect", str(so)]) == 0
    assert "params        2 weight tensor(s) in a separate file" in capsys.readouterr().out
    np.savez(inp, x=model["inputs"][0], y=model["inputs"][1])
    argv = ["run", str(so), "--inputs", str(inp), "-o", str(outp)]
    assert cli.main([*argv, "--params", str(params)]) == 0
    with np.load(outp) as got:
        for k, r in zip(("out0", "out1"), model["ref"]):
            np.testing.assert_allclose(got[k], r, rtol=1e-5, atol=1e-5)
    capsys.readouterr()
    assert cli.main(argv) == 2  # without its weights: a clear error naming the remedy
    assert "takes its 2 weight(s)" in (e := _error(capsys)) and "run --params FILE" in e
    assert cli.main([*argv, "--params", str(model["dir"] / "tiny.onnx")]) == 2
    assert "not a readable TVM parameter file" in _error(capsys)
