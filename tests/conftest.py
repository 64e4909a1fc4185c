"""Shared fixtures: the models that tests of several modules use, built once per session (no
test mutates them: the passes, the search and ``build`` never change a caller's module), and
the bad model files. The repo root goes on sys.path so tests can import ``benchmarks.models``;
``tests/_helpers.py`` holds the shared helper functions and hand-written modules."""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RNG = np.random.default_rng(0)


@pytest.fixture(scope="session")
def gpt512():
    """GPT, 1 layer, S=512: (module, input, the unchunked build's output)."""
    import tvm_autochunk as ac
    from benchmarks.models import FAMILIES

    w = FAMILIES["gpt"](512, layers=1)
    mod = ac.from_torch(w.module, w.inputs)
    x = w.inputs[0].numpy()
    return mod, x, ac.build(mod, "llvm")(x)


@pytest.fixture(scope="session")
def gpt(gpt512):
    """``gpt512`` by the name most tests use (test_pipeline.py has a ``gpt`` of its own, S=256,
    so the tests there that need this one take ``gpt512``)."""
    return gpt512


@pytest.fixture(scope="session")
def vit2():
    """Two identical encoder layers: the peak (attention scores) occurs once in each."""
    import tvm_autochunk as ac
    from benchmarks.models import FAMILIES

    w = FAMILIES["vit"](576, layers=2)
    return ac.from_torch(w.module, w.inputs), w.inputs[0].numpy()


@pytest.fixture
def bad_files(tmp_path):
    """Model files that cannot be imported: empty, garbage, a zip that is not an export
    archive, and an ONNX model with an op TVM has no converter for."""
    import onnx
    from _helpers import onnx_model as _onnx_model

    files = {
        "empty.onnx": b"",
        "empty.pt2": b"",
        "garbage.onnx": bytes(RNG.integers(0, 256, 300, dtype=np.uint8)),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    with zipfile.ZipFile(tmp_path / "weights.pt2", "w") as z:  # a zip, not an export archive
        z.writestr("hello.txt", "not an exported program")
    onnx.save(_onnx_model("Celu"), str(tmp_path / "celu.onnx"))  # TVM has no Celu converter
    return tmp_path
