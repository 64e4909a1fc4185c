"""tvm_autochunk.threads: CPU kernels run on every core unless the caller says otherwise."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import tvm_autochunk as ac
from tvm_autochunk import threads as T


def test_resolve_prefers_the_argument_then_the_environment_then_every_core(monkeypatch):
    monkeypatch.delenv(T.ENV, raising=False)
    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    assert T.resolve() == T.available_cores()
    monkeypatch.setenv("TVM_NUM_THREADS", "1")
    assert T.resolve() == 1
    monkeypatch.setenv(T.ENV, "2")
    assert T.resolve() == 2 and T.resolve(1) == 1


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_bad_thread_counts_are_refused(bad):
    with pytest.raises(ac.InputError, match="threads must be a positive int"):
        T.resolve(bad)


def test_a_bad_environment_value_names_the_variable(monkeypatch):
    monkeypatch.setenv(T.ENV, "many")
    with pytest.raises(ac.InputError, match="TVM_AUTOCHUNK_THREADS='many' is not a number"):
        T.resolve()


def test_set_threads_changes_tvms_pool():
    import tvm

    assert ac.set_threads(1) == 1 == tvm.runtime.num_threads()
    n = T.available_cores()
    assert ac.set_threads(n) == min(n, int(os.environ.get("TVM_NUM_THREADS", n)))


def test_import_sizes_the_pool_for_every_core_in_a_fresh_process():
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    env[T.ENV] = "2"
    code = "import os, tvm_autochunk; print(os.environ['TVM_NUM_THREADS'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "2"


def test_a_loaded_artifact_runs_on_the_threads_asked_for(tmp_path):
    from tvm import relax
    from tvm.relax import op

    x = relax.Var("x", relax.TensorType((64, 32), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(op.matmul(x, op.permute_dims(x, [1, 0])))
        bb.emit_func_output(out)
    art = ac.build(bb.get(), "llvm")
    path = tmp_path / "m.so"
    art.export(path)
    a = np.random.default_rng(0).standard_normal((64, 32)).astype("float32")
    one = ac.load(path, threads=1)
    np.testing.assert_allclose(one(a), a @ a.T, rtol=1e-5, atol=1e-5)
    assert one.threads == 1
    with pytest.raises(ac.InputError, match="positive int"):
        ac.load(path, threads=0)
    ac.set_threads(None)  # the pool is per process: every core again for the tests after
