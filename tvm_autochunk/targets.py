"""User-facing target names -> TVM targets.

Accepted: a ``tvm.target.Target``; a TVM target dict; ``"llvm"`` / ``"cpu"`` (this host);
``"cuda"`` (with ``arch``, default ``sm_80``); ``"aarch64"`` (64-bit Arm Linux with NEON,
cross-compiled); any tag TVM knows (``"nvidia/nvidia-h100"``).
"""

from __future__ import annotations

from relay_passes.errors import UnsupportedTargetError

DEFAULT_CUDA_ARCH = "sm_80"
ACCEPTED = "'llvm' (or 'cpu'), 'cuda', 'aarch64', a TVM tag, a target dict, or a tvm.target.Target"


def resolve_target(target="llvm", arch: str | None = None):
    """Return a ``tvm.target.Target`` for a user-facing target spec."""
    import tvm

    if isinstance(target, tvm.target.Target):
        if arch is not None:
            raise UnsupportedTargetError("pass arch= only with a target name, not a Target object")
        return target
    if isinstance(target, dict):
        return tvm.target.Target(dict(target))
    if not isinstance(target, str) or not target.strip():
        raise UnsupportedTargetError(f"invalid target {target!r}: expected {ACCEPTED}")
    name = target.strip().lower()
    if name in ("llvm", "cpu"):
        if arch is not None:
            return tvm.target.Target({"kind": "llvm", "mcpu": arch})
        return tvm.target.Target("llvm")
    if name == "cuda":
        a = arch or DEFAULT_CUDA_ARCH
        if not a.startswith("sm_") or not a[3:].rstrip("a").isdigit():
            raise UnsupportedTargetError(
                f"invalid CUDA arch {a!r}: expected a form like 'sm_80' or 'sm_90a'"
            )
        return tvm.target.Target({"kind": "cuda", "arch": a, "host": {"kind": "llvm"}})
    if name in ("aarch64", "arm64"):
        return tvm.target.Target(
            {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
        )
    if " -" in name or name.startswith("-"):
        raise UnsupportedTargetError(
            f"TVM 0.27 rejects target strings with options ({target!r}); pass a dict such as "
            "{'kind': 'llvm', 'mcpu': 'skylake'} or use arch=..."
        )
    try:
        return tvm.target.Target(target)
    except Exception as e:
        raise UnsupportedTargetError(f"unknown target {target!r}: expected {ACCEPTED}") from e


def is_cross(target) -> bool:
    """True when the target's code cannot run on this host (cross-compiled CPU code)."""
    import platform

    if target.kind.name != "llvm":
        return False
    triple = str(target.attrs.get("mtriple", "") or "")
    if not triple:
        return False
    return not triple.startswith(platform.machine())


def target_summary(target) -> dict:
    """A JSON-able description of a target."""
    d = {"kind": target.kind.name}
    for k in ("arch", "mtriple", "mcpu"):
        v = target.attrs.get(k)
        if v:
            d[k] = str(v)
    if target.kind.name == "llvm" and "mattr" in target.attrs:
        d["mattr"] = [str(x) for x in target.attrs["mattr"]]
    return d
