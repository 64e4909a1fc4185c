"""Tests for ``tvm_autochunk.frontends`` and the ``benchmarks.models`` families.

Layer (b) of the test conventions: every import path (torch, dynamic Dim, .pt2, ONNX) is compiled
for llvm and compared with torch; plus the error paths of the import layer (``match=`` on every
error). Shapes are tiny so the file runs in well under a minute on 2 cores.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import tvm
import tvm.testing
from _helpers import op_names
from onnx import TensorProto, helper
from torch.export import Dim
from tvm import relax

import tvm_autochunk as ac
from benchmarks.models import FAMILIES, SIZES, SMALL_SIZES, Workload, gpt, vit
from relay_passes.errors import FrontendError, UnsupportedOpError
from tvm_autochunk import frontends as fe

# torch.export's own pytree deprecation noise, not ours
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")

REPO = Path(__file__).resolve().parents[1]
TARGET = tvm.target.Target("llvm")
RTOL, ATOL = 1e-5, 1e-4

# Ops each family must import to (the chunking passes rely on these being present).
EXPECTED_OPS = {
    "gpt": {"relax.nn.layer_norm", "relax.matmul", "relax.nn.softmax", "relax.nn.gelu_tanh"},
    "vit": {"relax.nn.conv2d", "relax.concat", "relax.nn.softmax", "relax.nn.gelu"},
    "evoformer": {"relax.nn.layer_norm", "relax.sigmoid", "relax.matmul", "relax.nn.relu"},
    "unet": {"relax.nn.group_norm", "relax.nn.conv2d", "relax.image.resize2d", "relax.concat"},
}


def _compile(mod: tvm.IRModule) -> relax.VirtualMachine:
    return relax.VirtualMachine(tvm.compile(mod, target=TARGET), tvm.cpu())


def _first_output(vm: relax.VirtualMachine, *inputs: torch.Tensor) -> np.ndarray:
    out = vm["main"](*[tvm.runtime.tensor(x.detach().numpy()) for x in inputs])
    return (out if hasattr(out, "numpy") else out[0]).numpy()


def _torch_ref(module: torch.nn.Module, *inputs: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return module(*inputs).numpy()


@pytest.fixture(scope="module")
def tiny_gpt() -> Workload:
    return gpt(16, d=32, heads=2, layers=1)


def _celu_model() -> onnx.ModelProto:
    """A valid ONNX graph using Celu, an ONNX op that TVM's onnx frontend has no converter for."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    graph = helper.make_graph([helper.make_node("Celu", ["x"], ["y"])], "celu", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


# ------------------------------------------------------------------------------------------
# Numerics: torch -> Relax -> llvm == torch
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_imports_and_matches_torch(family: str) -> None:
    w = FAMILIES[family](SMALL_SIZES[family])
    assert w.family == family and w.size == SMALL_SIZES[family]
    assert not w.module.training
    mod = fe.from_torch(w.module, w.inputs)
    ops = op_names(mod)
    assert EXPECTED_OPS[family] <= ops, f"{family} lacks {EXPECTED_OPS[family] - ops}"
    # ops that TVM lowers to gathers would be chunking barriers; the models avoid them
    assert not ops & {"relax.take", "relax.scatter_elements", "relax.gather_elements"}
    got = _first_output(_compile(mod), *w.inputs)
    np.testing.assert_allclose(got, _torch_ref(w.module, *w.inputs), rtol=RTOL, atol=ATOL)


def test_families_metadata() -> None:
    assert set(SMALL_SIZES) == set(SIZES) == set(FAMILIES)
    for family, sizes in SIZES.items():
        assert sizes == sorted(sizes) and SMALL_SIZES[family] < sizes[0]
    a, b = gpt(8, d=16, heads=2, layers=1), gpt(8, d=16, heads=2, layers=1)
    for (na, pa), (nb, pb) in zip(
        a.module.named_parameters(), b.module.named_parameters(), strict=True
    ):
        assert na == nb and torch.equal(pa, pb)
    assert torch.equal(a.inputs[0], b.inputs[0])
    assert not torch.equal(a.inputs[0], gpt(8, d=16, heads=2, layers=1, seed=1).inputs[0])
    assert vit(16, d=12, heads=3, layers=1).inputs[0].shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match=r"tokens=50 is not a positive perfect square"):
        vit(50)


def test_dynamic_dim_round_trip(tiny_gpt: Workload) -> None:
    mod = fe.from_torch(
        tiny_gpt.module, tiny_gpt.inputs, dynamic_shapes=({1: Dim("S", min=2, max=128)},)
    )
    main = mod["main"]
    (s_var,) = [d for d in main.params[0].ty.shape.values if not isinstance(d, tvm.tirx.IntImm)]
    assert {k: int(v) for k, v in main.attrs["tir_var_upper_bound"].items()} == {s_var.name: 128}
    assert {k: int(v) for k, v in main.attrs["tir_var_lower_bound"].items()} == {s_var.name: 2}
    vm = _compile(mod)
    for s in (5, 48):
        x = torch.randn(1, s, 32, generator=torch.Generator().manual_seed(s))
        got = _first_output(vm, x)
        assert got.shape == (1, s, 32)
        np.testing.assert_allclose(got, _torch_ref(tiny_gpt.module, x), rtol=RTOL, atol=ATOL)


def test_dynamic_dim_without_max_has_no_upper_bound(tiny_gpt: Workload) -> None:
    mod = fe.from_torch(tiny_gpt.module, tiny_gpt.inputs, dynamic_shapes=({1: Dim("S")},))
    attrs = mod["main"].attrs
    assert "tir_var_lower_bound" in attrs and "tir_var_upper_bound" not in attrs


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_onnx_round_trip(tiny_gpt: Workload, tmp_path: Path) -> None:
    path = tmp_path / "gpt.onnx"
    torch.onnx.export(
        tiny_gpt.module, tiny_gpt.inputs, str(path), dynamo=False, opset_version=17,
        input_names=["x"], output_names=["y"],
    )  # fmt: skip
    mod = fe.load_model(path)
    assert isinstance(mod["main"], relax.Function)
    got = _first_output(_compile(mod), *tiny_gpt.inputs)
    np.testing.assert_allclose(got, _torch_ref(tiny_gpt.module, *tiny_gpt.inputs), rtol=RTOL,
                               atol=ATOL)  # fmt: skip


def test_onnx_keep_params_as_input() -> None:
    """An initializer becomes a trailing parameter of main (values in its "params" attribute),
    as with from_torch; build() takes it out of the library and the artifact runs with it."""
    w = np.arange(32, dtype="float32").reshape(4, 8) / 32
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 8])],
        initializer=[onnx.numpy_helper.from_array(w, "w")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert [str(p.name) for p in fe.from_onnx(model)["main"].params] == ["x"]
    main = fe.from_onnx(model, keep_params_as_input=True)["main"]
    assert [str(p.name) for p in main.params] == ["x", "w"] and int(main.attrs["num_input"]) == 1
    np.testing.assert_array_equal(main.attrs["params"][0].numpy(), w)
    art = ac.build(fe.load_model(model, keep_params_as_input=True))
    assert [s.name for s in art.params] == ["w"]
    x = np.ones((8, 4), "float32")
    np.testing.assert_allclose(art(x), x @ w, rtol=1e-6)


def test_pt2_round_trip(tiny_gpt: Workload, tmp_path: Path) -> None:
    # Structural equality with the direct import (numerically checked in the family and dynamic
    # tests) is stronger than comparing outputs, and needs no compile.
    ep = torch.export.export(tiny_gpt.module, tiny_gpt.inputs)
    path = tmp_path / "gpt.pt2"
    torch.export.save(ep, str(path))
    mod = fe.load_model(str(path))
    tvm.ir.assert_structural_equal(mod, fe.from_exported_program(ep))


def test_load_model_dispatch(tiny_gpt: Workload) -> None:
    ep = torch.export.export(tiny_gpt.module, tiny_gpt.inputs)
    mod = fe.load_model(ep)
    assert fe.load_model(mod) is mod
    assert mod["main"].params[0].ty.shape.values[1] == 16
    relu = _celu_model()
    relu.graph.node[0].op_type = "Relu"
    assert "relax.nn.relu" in op_names(fe.load_model(relu))
    with pytest.raises(FrontendError, match=r"onnx\.checker says .*ir_version"):
        fe.load_model(onnx.ModelProto())


# ------------------------------------------------------------------------------------------
# Error paths
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["missing.onnx", "missing.pt2"])
def test_nonexistent_path(tmp_path: Path, name: str) -> None:
    with pytest.raises(FrontendError, match=rf"cannot read '.*{name}': no such file"):
        fe.load_model(tmp_path / name)


def test_truncated_onnx(tmp_path: Path) -> None:
    good = tmp_path / "good.onnx"
    onnx.save(_celu_model(), str(good))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(FrontendError, match=r"cannot parse '.*bad\.onnx'.*truncated") as ei:
        fe.load_model(bad)
    assert ei.value.__cause__ is not None


def test_truncated_pt2(tiny_gpt: Workload, tmp_path: Path) -> None:
    good = tmp_path / "good.pt2"
    torch.export.save(torch.export.export(tiny_gpt.module, tiny_gpt.inputs), str(good))
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(FrontendError, match=r"'.*bad\.pt2': it is not a \.pt2 archive"):
        fe.load_model(bad)


def test_wrong_suffix(tmp_path: Path) -> None:
    with pytest.raises(FrontendError, match=r"suffix '\.txt'; accepted suffixes: \.onnx, \.pt2"):
        fe.load_model(tmp_path / "model.txt")
    with pytest.raises(FrontendError, match=r"suffix '\(none\)'"):
        fe.load_model(str(tmp_path / "model"))


def test_unsupported_torch_op() -> None:
    class ScatterAdd(torch.nn.Module):
        def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            return torch.zeros(4, 3).scatter_add(0, idx, x)

    args = (torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(UnsupportedOpError, match=r"torch frontend.*'scatter_add\.default'") as ei:
        fe.from_torch(ScatterAdd().eval(), args)
    assert ei.value.op == "scatter_add.default" and ei.value.frontend == "torch"
    assert "ScatterAdd" in str(ei.value) and "Remedy" in str(ei.value)
    assert ei.value.__cause__ is not None


def test_unsupported_onnx_op(tmp_path: Path) -> None:
    path = tmp_path / "celu.onnx"
    onnx.save(_celu_model(), str(path))
    with pytest.raises(UnsupportedOpError, match=r"onnx frontend.*'Celu'.*celu\.onnx") as ei:
        fe.load_model(path)
    assert ei.value.op == "Celu" and ei.value.frontend == "onnx"
    assert ei.value.__cause__ is not None


@pytest.mark.filterwarnings("ignore:Op registered for Scatter is deprecated:UserWarning")
def test_onnx_converter_failure_names_op() -> None:
    # Scatter has a converter, but it raises for opset 11 (where Scatter is deprecated).
    ins = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
        helper.make_tensor_value_info("i", TensorProto.INT64, [1, 3]),
        helper.make_tensor_value_info("u", TensorProto.FLOAT, [1, 3]),
    ]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    node = helper.make_node("Scatter", ["x", "i", "u"], ["y"], name="sc0")
    model = helper.make_model(
        helper.make_graph([node], "g", ins, [y]), opset_imports=[helper.make_opsetid("", 11)]
    )
    with pytest.raises(FrontendError, match=r"onnx\.checker says .*Scatter is deprecated"):
        fe.from_onnx(model)
    with pytest.raises(UnsupportedOpError, match=r"'Scatter'.*'sc0'"):
        fe.from_onnx(model, check_model=False)


def test_irmodule_without_main() -> None:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2,), "float32"))
    with bb.function("other", [x]):
        bb.emit_func_output(x)
    with pytest.raises(FrontendError, match=r"no function 'main' \(it has \['other'\]\)"):
        fe.load_model(bb.get())


def test_module_without_example_args(tiny_gpt: Workload) -> None:
    with pytest.raises(FrontendError, match=r"needs example_args .* GPT"):
        fe.load_model(tiny_gpt.module)
    with pytest.raises(FrontendError, match=r"example_args only applies to a torch\.nn\.Module"):
        fe.load_model("x.onnx", example_args=tiny_gpt.inputs)
    with pytest.raises(FrontendError, match=r"cannot import a builtins\.int; accepted"):
        fe.load_model(3)


def test_torch_export_failure() -> None:
    class DataDependent(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + 1 if x.sum() > 0 else x - 1

    with pytest.raises(FrontendError, match=r"torch\.export\.export failed for DataDependent"):
        fe.from_torch(DataDependent().eval(), (torch.randn(3),))


def test_missing_optional_packages(monkeypatch: pytest.MonkeyPatch, tiny_gpt: Workload) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(FrontendError, match=r"pip install 'tvm_autochunk\[onnx\]'"):
        fe.from_onnx("model.onnx")
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(FrontendError, match=r"pip install 'tvm_autochunk\[torch\]'"):
        fe.from_torch(tiny_gpt.module, tiny_gpt.inputs)


def test_package_imports_without_torch_and_onnx() -> None:
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['onnx'] = None\n"
        "import tvm_autochunk.frontends as fe, tvm\n"
        "assert fe.load_model(tvm.IRModule({'main': tvm.relax.Function([], tvm.relax.Tuple([]))}))"
        "\nassert 'torch' not in [m for m, v in sys.modules.items() if v is not None]\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr[-2000:]


if __name__ == "__main__":
    tvm.testing.main()


@pytest.mark.parametrize("name", ["empty.onnx", "empty.pt2"])
def test_empty_model_file_says_it_is_empty(bad_files, name):
    with pytest.raises(
        ac.FrontendError, match=rf"'.*{name}': the file is empty \(0 bytes\).*Remedy"
    ):
        ac.build(bad_files / name)


def test_garbage_onnx_is_a_clear_frontend_error(bad_files):
    with pytest.raises(
        ac.FrontendError, match=r"cannot parse '.*garbage\.onnx'.*not an ONNX protobuf.*Remedy"
    ):
        ac.estimate(bad_files / "garbage.onnx")


def test_zip_that_is_not_an_export_archive(bad_files):
    with pytest.raises(ac.FrontendError) as ei:
        ac.build(bad_files / "weights.pt2")
    msg = str(ei.value)
    assert "weights.pt2" in msg and "not a torch.export archive" in msg and "hello.txt" in msg
    assert "torch.export.save(ep, path) (not torch.save)" in msg


class _Attention(torch.nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, q, k, v, mask):
        sdpa = torch.nn.functional.scaled_dot_product_attention
        if self.kind == "masked":
            return sdpa(q, k, v, attn_mask=mask)
        return sdpa(q, k, v, is_causal=self.kind == "causal") + mask[0, 0]


@pytest.mark.parametrize("kind", ["none", "causal", "masked"])
def test_safe_softmax_check_only_where_a_mask_can_empty_a_row(kind: str) -> None:
    # torch's check (eq -inf, any, where) is a no-op unless a mask can leave a row all -inf
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 4, generator=gen) for _ in range(3))
    mask = torch.zeros(8, 8)
    if kind == "masked":
        mask[3] = float("-inf")  # row 3 fully masked: the check makes it zeros, as in torch
        mask[5, :4] = float("-inf")
    mod = fe.from_torch(_Attention(kind), (q, k, v, mask))
    check = {"relax.max", "relax.logical_not"}
    assert (check <= op_names(mod)) == (kind == "masked"), op_names(mod)
    got = _first_output(_compile(mod), q, k, v, mask)
    want = _torch_ref(_Attention(kind), q, k, v, mask)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    if kind == "masked":
        assert not np.isnan(got).any() and np.all(got[0, :, 3] == 0)
