"""Packaging consistency: pyproject pins, Makefile, Dockerfile, .ci/run and README agree.

Static checks only (no install, no docker): they read the files at the repository root.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tvm_autochunk", "relay_passes")
PINS = {
    "apache-tvm": "==0.27.0.post1",
    "apache-tvm-ffi": "==0.1.14.post0",  # 0.1.15 segfaults in save_json
    "torch": "==2.13.0",
}


# ------------------------------------------------------------------------------------ helpers


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.fixture(scope="module")
def pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _requirements(reqs: list[str]) -> dict[str, Requirement]:
    out = {}
    for text in reqs:
        req = Requirement(text)
        out[_canon(req.name)] = req
    return out


def _all_pins(pyproject: dict) -> dict[str, str]:
    """name -> specifier for every requirement in dependencies and all extras."""
    project = pyproject["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    return {name: str(req.specifier) for name, req in _requirements(reqs).items()}


def _logical_lines(text: str) -> list[str]:
    """Join backslash continuations; drop comment-only lines."""
    lines, buf = [], ""
    for raw in text.splitlines():
        if not buf and raw.lstrip().startswith("#"):
            continue
        if raw.rstrip().endswith("\\"):
            buf += raw.rstrip()[:-1] + " "
            continue
        lines.append(buf + raw)
        buf = ""
    if buf:
        lines.append(buf)
    return lines


def _parse_makefile() -> tuple[dict[str, str], dict[str, tuple[list[str], list[str]]]]:
    """Return (variables, {target: (prerequisites, recipe lines with variables expanded)})."""
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    variables: dict[str, str] = {}
    rules: dict[str, tuple[list[str], list[str]]] = {}
    current: list[str] | None = None
    for line in _logical_lines(text):
        if line.startswith("\t"):
            if current is not None:
                current.append(line.strip())
            continue
        current = None
        if not line.strip():
            continue
        var = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)\s*(?::=|\?=|=)\s*(.*)$", line)
        if var:
            variables[var.group(1)] = var.group(2).strip()
            continue
        rule = re.match(r"^([^:#=]+?)\s*:(?!=)\s*(.*)$", line)
        if rule and not line.startswith("."):
            recipe: list[str] = []
            for target in rule.group(1).split():
                rules[_expand(target, variables)] = (
                    [_expand(p, variables) for p in rule.group(2).split()],
                    recipe,
                )
            current = recipe

    expanded = {
        target: (prereqs, [_expand(r, variables) for r in recipe])
        for target, (prereqs, recipe) in rules.items()
    }
    return variables, expanded


def _expand(text: str, variables: dict[str, str]) -> str:
    for _ in range(10):
        new = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: variables.get(m[1], m[0]), text)
        if new == text:
            break
        text = new
    return text


def _recipe(target: str) -> list[str]:
    _, rules = _parse_makefile()
    assert target in rules, f"Makefile has no '{target}' target"
    return rules[target][1]


def _pip_install_args(command: str) -> list[str]:
    """The arguments after `pip install`, without options that only pick an index."""
    tokens = shlex.split(command)
    for i in range(len(tokens) - 1):
        if tokens[i].endswith("pip") and tokens[i + 1] == "install":
            args = tokens[i + 2 :]
            break
    else:
        raise AssertionError(f"no pip install in {command!r}")
    end = args.index("&&") if "&&" in args else len(args)
    out, skip = [], False
    for tok in args[:end]:
        if skip:
            skip = False
        elif tok in ("--extra-index-url", "--index-url", "--find-links", "-f"):
            skip = True
        elif tok.startswith("--") and tok not in ("--editable",):
            continue  # behaviour-neutral flags such as --no-input
        else:
            out.append(tok)
    return out


def _venv_install_command() -> str:
    variables, rules = _parse_makefile()
    stamp = _expand("$(STAMP)", variables)
    assert rules.get("venv", ([], []))[0] == [stamp], "`venv` must depend on the stamp file"
    prereqs, recipe = rules[stamp]
    assert prereqs == ["pyproject.toml"], "the stamp must be rebuilt when pyproject.toml changes"
    installs = [line for line in recipe if re.search(r"\bpip install\b", line)]
    assert len(installs) == 1, recipe
    assert recipe[-1] == f"touch {stamp}", "the stamp must be touched last, after a good install"
    return installs[0]


def _dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """{stage name: [(INSTRUCTION, arguments), ...]}"""
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    stages: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in _logical_lines(text):
        if not line.strip():
            continue
        instr, _, args = line.strip().partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            m = re.search(r"\bAS\s+(\S+)\s*$", args, re.IGNORECASE)
            current = stages.setdefault(m.group(1) if m else f"stage{len(stages)}", [])
        if current is not None:
            current.append((instr, args.strip()))
    return stages


def _readme_quick_start_commands() -> list[str]:
    readme = ROOT / "README.md"
    if not readme.exists():
        pytest.skip("README.md does not exist yet; nothing to compare the Makefile against")
    text = readme.read_text(encoding="utf-8")
    section = re.search(r"^##\s+Quick start\s*$(.*?)(?=^##\s)", text, re.M | re.S | re.I)
    assert section, "README.md has no '## Quick start' section"
    block = re.search(r"```[a-z]*\n(.*?)```", section.group(1), re.S)
    assert block, "README.md Quick start has no code block"
    return [ln.strip() for ln in block.group(1).splitlines() if ln.strip()]


# --------------------------------------------------------------------------------- pyproject


@pytest.mark.parametrize(("name", "spec"), PINS.items())
def test_pyproject_pins(pyproject, name, spec):
    assert _all_pins(pyproject).get(name) == spec


def test_runtime_dependencies(pyproject):
    deps = _requirements(pyproject["project"]["dependencies"])
    assert set(deps) == {"apache-tvm", "apache-tvm-ffi", "numpy"}
    assert str(deps["apache-tvm"].specifier) == PINS["apache-tvm"]
    assert str(deps["apache-tvm-ffi"].specifier) == PINS["apache-tvm-ffi"]


def test_extras(pyproject):
    extras = pyproject["project"]["optional-dependencies"]
    assert extras["torch"] == ["torch==2.13.0"]
    assert set(extras["onnx"]) == {"onnx", "onnxscript"}
    assert set(extras["dev"]) >= {"pytest", "hypothesis", "ruff", "psutil", "matplotlib"}
    assert {r.split("==")[0] for r in extras["bench"]} == {"transformers", "diffusers"}
    assert all("==" in r for r in extras["bench"]), "library models change between releases"
    union = {r for name, reqs in extras.items() if name != "all" for r in reqs}
    assert set(extras["all"]) == union, "extra 'all' must be the union of the other extras"


def test_metadata(pyproject):
    project = pyproject["project"]
    assert project["name"] == "tvm-autochunk"
    assert project["version"] == "0.1.0"
    assert project["requires-python"] == ">=3.10"


def test_console_script(pyproject):
    assert pyproject["project"]["scripts"]["tvm-autochunk"] == "tvm_autochunk.cli:main"


def test_packages_list_matches_the_tree(pyproject):
    listed = set(pyproject["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in PACKAGES
        for init in (ROOT / top).rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert set(PACKAGES) <= listed
    missing = sorted(on_disk - listed)
    assert not missing, f"add these subpackages to [tool.setuptools].packages: {missing}"
    for pkg in listed:
        assert (ROOT / Path(*pkg.split("."))).is_dir(), f"listed package {pkg} has no directory"


def test_pytest_config(pyproject):
    ini = pyproject["tool"]["pytest"]["ini_options"]
    assert ini["testpaths"] == ["tests"]
    declared = {m.split(":")[0].strip() for m in ini["markers"]}
    assert declared >= {"slow", "gpu", "cuda_build"}
    addopts = shlex.split(ini["addopts"])
    assert "-ra" in addopts
    assert addopts[addopts.index("-m") + 1] == "not slow and not gpu"


def test_ruff_config(pyproject):
    ruff = pyproject["tool"]["ruff"]
    assert ruff["line-length"] == 100
    assert set(ruff["lint"]["select"]) == {"E", "F", "I", "UP", "RUF"}


# ---------------------------------------------------------------------------------- Makefile


def test_makefile_targets():
    _, rules = _parse_makefile()
    for target in ("venv", "demo", "test", "bench", "lint", "clean"):
        assert target in rules, f"Makefile has no '{target}' target"
    for target in ("demo", "test", "bench", "lint"):
        assert "venv" in rules[target][0], f"'{target}' must depend on venv"


def test_makefile_installs_the_pinned_extras(pyproject):
    command = _venv_install_command()
    assert command.startswith(".venv/bin/python -m pip install"), command
    args = _pip_install_args(command)
    assert args[0] in ("-e", "--editable") and len(args) == 2, args
    extras = re.fullmatch(r"\.\[([a-z,]+)\]", args[1]).group(1).split(",")
    assert set(extras) == {"torch", "onnx", "dev", "bench"}
    assert set(extras) <= set(pyproject["project"]["optional-dependencies"])


def test_makefile_uses_no_torch_index():
    """The CPU torch index is for Docker only; here the find-links wheel is used."""
    for line in _logical_lines((ROOT / "Makefile").read_text(encoding="utf-8")):
        assert "download.pytorch.org" not in line, line


def test_makefile_recipes():
    assert _recipe("test") == [".venv/bin/python -m pytest -q"]
    assert _recipe("demo") == [".venv/bin/python examples/demo.py"]
    bench = _recipe("bench")
    assert bench[0] == ".venv/bin/python benchmarks/estimator_accuracy.py"
    assert ".venv/bin/python benchmarks/max_length.py" in bench
    assert bench[-1] == ".venv/bin/python benchmarks/report.py"
    assert _recipe("bench-report") == [".venv/bin/python benchmarks/report.py"]


# -------------------------------------------------------------------------------- Dockerfile


def test_dockerfile_stages():
    stages = _dockerfile_stages()
    assert {"build", "runtime"} <= set(stages)
    assert ("CMD", '["make", "demo"]') in stages["build"]
    assert any(i == "CMD" for i, _ in stages["runtime"])


def test_dockerfile_build_stage_installs_like_the_makefile():
    """The build stage runs `make venv`, so it executes the Makefile's install verbatim."""
    runs = [args for instr, args in _dockerfile_stages()["build"] if instr == "RUN"]
    venv_runs = [r for r in runs if re.search(r"\bmake venv\b", r)]
    assert len(venv_runs) == 1, runs
    # torch comes from the CPU index inside Docker only
    assert "PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu make venv" in venv_runs[0]
    assert _pip_install_args(_venv_install_command()) == ["-e", ".[torch,onnx,dev,bench]"]


def test_dockerfile_pins_match_pyproject(pyproject):
    pins = _all_pins(pyproject)
    stages = _dockerfile_stages()
    seen = {}
    for stage, instructions in stages.items():
        for instr, args in instructions:
            if instr != "RUN" or "pip install" not in args:
                continue
            for tok in _pip_install_args(args):
                if re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[.*\])?[=<>!~]", tok):
                    req = Requirement(tok)
                    name = _canon(req.name)
                    assert name in pins, f"{stage}: Dockerfile installs {tok}, not in pyproject"
                    assert str(req.specifier) == pins[name], f"{stage}: {tok} vs {pins[name]}"
                    seen[(stage, name)] = str(req.specifier)
    assert seen[("runtime", "apache-tvm")] == PINS["apache-tvm"]
    assert seen[("runtime", "apache-tvm-ffi")] == PINS["apache-tvm-ffi"]


def test_dockerfile_runtime_stage_is_runtime_only():
    runtime = _dockerfile_stages()["runtime"]
    text = "\n".join(args for _, args in runtime)
    assert "TVM_USE_RUNTIME_LIB=1" in text
    assert "libtvm_compiler.so" in text
    assert "torch" not in text and "onnx" not in text


def test_dockerfile_runtime_stage_runs_the_sample_artifact():
    """The runtime stage's default command runs an artifact that the build stage built."""
    stages = _dockerfile_stages()
    build_runs = " ".join(args for instr, args in stages["build"] if instr == "RUN")
    built = re.search(r"tvm-autochunk build (\S+) -o (\S+\.so)", build_runs)
    assert built, "the build stage builds no sample artifact with the CLI"
    so = built.group(2)
    inputs = re.search(r"np\.savez\('(\S+\.npz)'", build_runs)
    assert inputs, "the build stage writes no inputs for the sample artifact"
    copies = [args for instr, args in stages["runtime"] if instr == "COPY"]
    copy = next((c for c in copies if so in c), None)
    assert copy and copy.startswith("--from=build") and inputs.group(1) in copy, copies
    dest = copy.split()[-1]
    cmd = [json.loads(args) for instr, args in stages["runtime"] if instr == "CMD"][-1]
    assert cmd[:4] == ["python", "-m", "tvm_autochunk", "run"], cmd
    assert cmd[4] == dest + Path(so).name
    assert cmd[5:] == ["--inputs", dest + Path(inputs.group(1)).name]


def _runtime_pip_install() -> list[str]:
    runs = [a for i, a in _dockerfile_stages()["runtime"] if i == "RUN" and "pip install" in a]
    return _pip_install_args(runs[0])


def _readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(rf"^##\s+{re.escape(title)}\s*$(.*?)(?=^##\s)", text, re.M | re.S)
    assert m, f"README.md has no '## {title}' section"
    return m.group(1)


def test_readme_runtime_install_is_the_dockerfile_runtime_install():
    section = _readme_section("Deploying artifacts")
    commands = re.findall(r"`(pip install [^`]+)`", section)
    assert commands, "the README's deployment section shows no pip install"
    assert _pip_install_args(commands[0]) == _runtime_pip_install()
    assert "libtvm_compiler.so" in section and "TVM_USE_RUNTIME_LIB=1" in section


# ---------------------------------------------------------------------------- README and CI


def test_readme_quick_start_is_make_demo_and_make_test():
    assert _readme_quick_start_commands() == ["make demo", "make test"]


def test_readme_commands_are_makefile_targets():
    _, rules = _parse_makefile()
    for command in _readme_quick_start_commands():
        tokens = command.split()
        assert tokens[0] == "make" and len(tokens) == 2, command
        assert tokens[1] in rules, f"README says `{command}` but the Makefile has no such target"
    assert _recipe("test") == [".venv/bin/python -m pytest -q"]


def test_readme_lists_the_budget_units_and_pins():
    readme = ROOT / "README.md"
    if not readme.exists():
        pytest.skip("README.md does not exist yet")
    text = readme.read_text(encoding="utf-8")
    for unit in ("B", "KB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB"):
        assert f"`{unit}`" in text, f"README budget grammar does not list unit {unit}"
    for name, spec in PINS.items():
        assert f"{name}{spec}" in text, f"README does not state the pin {name}{spec}"


def test_ci_runs_the_readme_test_command():
    script = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    lines = _logical_lines(script)
    assert "set -euo pipefail" in lines
    commands = [ln.strip() for ln in lines if ln.strip()]
    assert any(re.fullmatch(r"make test(\s*</dev/null)?", c) for c in commands), commands
    if (ROOT / "README.md").exists():
        assert "make test" in _readme_quick_start_commands()


AARCH64_PACKAGES = ("gcc-aarch64-linux-gnu", "libc6-dev-arm64-cross", "qemu-user")


def test_ci_installs_the_aarch64_toolchain_only_when_missing():
    script = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    lines = _logical_lines(script)
    guard = next((i for i, ln in enumerate(lines)
                  if re.search(r"if ! command -v aarch64-linux-gnu-gcc\b", ln)), None)
    assert guard is not None, "the apt-get install must be guarded by a missing-compiler check"
    installs = [i for i, ln in enumerate(lines) if "apt-get install" in ln]
    assert len(installs) == 1 and installs[0] > guard
    install = lines[installs[0]]
    assert "command -v apt-get" in "\n".join(lines[guard:installs[0]])  # only where apt exists
    for pkg in AARCH64_PACKAGES:
        assert pkg in install, f".ci/run does not install {pkg}"
    make_test = next(i for i, ln in enumerate(lines) if re.fullmatch(r"make test.*", ln.strip()))
    assert installs[0] < make_test
    assert "||" in install, "a failed apt-get must not fail CI (the tests skip instead)"
    assert subprocess.run(["bash", "-n", str(ROOT / ".ci" / "run")]).returncode == 0


def test_readme_install_notes_name_the_ci_packages():
    section = _readme_section("Requirements")
    for pkg in AARCH64_PACKAGES:
        assert pkg in section, f"README Requirements does not mention {pkg}"


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
