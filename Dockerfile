# syntax=docker/dockerfile:1
#
# Images (CPU only):
#   docker build -t tvm-autochunk .                              # = target "demo" (last stage)
#   docker run --rm tvm-autochunk                                # make demo
#   docker run --rm tvm-autochunk make test                      # CPU test suite
#   docker build --target runtime -t tvm-autochunk:runtime .     # TVM runtime only
#   docker run --rm tvm-autochunk:runtime                        # runs the bundled sample artifact
#   docker run --rm -v $PWD:/work tvm-autochunk:runtime \
#       python -m tvm_autochunk run /work/model.so --inputs /work/inputs.npz
#
# The build stage installs exactly what `make venv` installs (same command, same pins from
# pyproject.toml) by running `make venv` itself, so `make demo` / `make test` in the container
# reuse that .venv and need no network.
# Keep .venv out of the build context (a host .venv has absolute paths that break here): the
# COPY lines below name the source directories explicitly for that reason.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --------------------------------------------------------------------------------------------
# build: compiler + full dev environment. build-essential provides make and the C++ toolchain
# TVM uses to link exported libraries (art.export("model.so")); gcc-aarch64-linux-gnu links
# --target aarch64 artifacts (the README's install notes name the same packages).
# --------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build

RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
        gcc-aarch64-linux-gnu libc6-dev-arm64-cross \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    PYTHONUNBUFFERED=1

WORKDIR /app
COPY pyproject.toml Makefile README.md ./
COPY tvm_autochunk/ tvm_autochunk/
COPY relay_passes/ relay_passes/
COPY examples/ examples/
COPY benchmarks/ benchmarks/
COPY tests/ tests/

# Same install as the Makefile: `make venv` runs
#   .venv/bin/python -m pip install -e '.[torch,onnx,dev,bench]'
# Docker only: the extra index supplies torch 2.13.0+cpu. pip ranks 2.13.0+cpu above the
# plain 2.13.0 on PyPI (a CUDA build), so the CPU wheel wins. Outside Docker we rely on a
# local find-links wheel and never add this index.
RUN PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu make venv \
    && .venv/bin/python -c "import torch, tvm; assert torch.version.cuda is None, torch.__version__" \
    && .venv/bin/python -m pip wheel --no-deps -w /dist .

# A sample artifact for the runtime stage: the small test GPT, built with the CLI.
RUN .venv/bin/python -c "import numpy as np, torch; from benchmarks.models import gpt; \
w = gpt(64); torch.export.save(torch.export.export(w.module, w.inputs), '/dist/gpt.pt2'); \
np.savez('/dist/gpt_inputs.npz', x=w.inputs[0].numpy())" \
    && .venv/bin/tvm-autochunk build /dist/gpt.pt2 -o /dist/gpt.so --budget 64MiB -q

CMD ["make", "demo"]

# --------------------------------------------------------------------------------------------
# runtime: load and run an exported artifact with the TVM runtime only. No compiler, no torch
# or onnx. The 250 MB libtvm_compiler.so is deleted, and TVM_USE_RUNTIME_LIB=1 tells
# tvm/base.py to load libtvm_runtime.so alone. In this mode `tvm.runtime` (load_module,
# vm.VirtualMachine) works, but `import tvm.relax` fails. So the `run` path must import only
# tvm.runtime.
# --------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    PYTHONUNBUFFERED=1 \
    TVM_USE_RUNTIME_LIB=1

# Same pins as pyproject.toml [project].dependencies (tests/test_packaging.py checks this).
RUN pip install apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post0 numpy \
    && rm "$(python -c 'import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec("tvm").origin).parent)')/lib/libtvm_compiler.so" \
    && python -c "import tvm, tvm.runtime; assert tvm.base._RUNTIME_ONLY"

COPY --from=build /dist/*.whl /tmp/dist/
RUN pip install --no-deps /tmp/dist/tvm_autochunk-*.whl && rm -rf /tmp/dist
COPY --from=build /dist/gpt.so /dist/gpt_inputs.npz /artifacts/

# Runs the sample artifact (`run` imports tvm.runtime only); mount your own and pass its path.
CMD ["python", "-m", "tvm_autochunk", "run", "/artifacts/gpt.so", "--inputs", "/artifacts/gpt_inputs.npz"]

# --------------------------------------------------------------------------------------------
# demo (last stage, so the default of a plain `docker build .`): the build stage, CMD make demo.
# --------------------------------------------------------------------------------------------
FROM build AS demo
CMD ["make", "demo"]
