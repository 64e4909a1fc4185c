"""tvm_autochunk demo (``make demo``): estimate, build, check, export and measure a small GPT.

What it does, in order:

1. imports a bundled 2-layer GPT-2-style decoder (sequence length 1024) from PyTorch into Relax;
2. prints the memory report of one call, estimated before anything is built;
3. builds it for this CPU (``llvm``) within a memory budget and exports ``out/demo_gpt.so``;
4. runs it on the example input and checks the result against PyTorch (exit status 1 if
   max |error| > 1e-3);
5. loads the library in a *fresh* Python process and measures the peak memory (RSS) that one
   call really takes;
6. prints the estimate vs TVM's memory plan vs the measured peak, and a one-line summary.

``--cuda`` also compiles the model for CUDA (sm_80). That needs nvcc but no GPU; nothing runs.
Takes about a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package

import numpy as np  # noqa: E402
import torch  # noqa: E402

import tvm_autochunk as ac  # noqa: E402
from benchmarks.models import gpt  # noqa: E402
from tvm_autochunk.measure import allowance  # noqa: E402

MiB = 1024**2
TOLERANCE = 1e-3


def mib(n: int | None) -> str:
    return "      -" if n is None else f"{n / MiB:7.1f}"


def shown(p: Path) -> str:
    """``p`` relative to the current folder when it is below it (shorter to read)."""
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def section(title: str) -> None:
    print(f"\n== {title}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, default=1024, help="sequence length (default: 1024)")
    p.add_argument("--budget", default="10MiB",
                   help="memory budget per call (default: 10MiB, 83%% of the unchunked peak "
                        "with attention fused, so AutoChunk has to chunk)")
    p.add_argument("--cuda", action="store_true", help="also compile for CUDA sm_80 (needs nvcc)")
    p.add_argument("--out", default=str(ROOT / "out" / "demo_gpt.so"), help="artifact path")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.export chatter
    t_start = time.perf_counter()

    # 1. The model: a seeded PyTorch module and an example input x of shape (1, S, 256).
    wl = gpt(S=args.seq, layers=2)
    (x_torch,) = wl.inputs
    x = x_torch.numpy()
    section(f"model: {wl.description}")
    t = time.perf_counter()
    mod = ac.from_torch(wl.module, wl.inputs)  # torch.export -> Relax IRModule, imported once
    print(f"imported from PyTorch in {time.perf_counter() - t:.1f}s; input x {list(x.shape)}")

    # 2. Estimate: what one call will allocate, where the peak is, and what is live there.
    section("estimate (before building)")
    estimate = ac.estimate(mod, target="llvm")
    print(estimate)

    # 3. Build for this CPU within the budget; the budget is checked on TVM's own memory plan.
    section(f"build for llvm, budget {args.budget}")
    t = time.perf_counter()
    try:
        art = ac.build(mod, target="llvm", budget=args.budget,
                       progress=lambda m: print(f"  [{time.perf_counter() - t:5.1f}s] {m}"))
    except ac.BudgetInfeasibleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    plan = art.report.planned_peak_bytes  # TVM's own static memory plan of the built module

    # 4. Export the shared library (metadata embedded). Exported before the first call: TVM 0.27
    #    prints C++ 'Scope Saving' warnings when a VM executable is saved after it has run.
    section("export")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    art.export(out)
    print(f"wrote {shown(out)} ({out.stat().st_size / MiB:.1f} MiB); "
          f"to see its metadata: python -m tvm_autochunk inspect {shown(out)}")

    # 5. Run it here and compare with PyTorch.
    section("run and compare with PyTorch")
    t = time.perf_counter()
    y = art(x)
    run_s = time.perf_counter() - t
    with torch.no_grad():
        ref = wl.module(x_torch).numpy()
    err = float(np.max(np.abs(y - ref)))
    ok = err <= TOLERANCE
    print(f"one call took {run_s:.1f}s; output {list(y.shape)}; max |tvm - torch| = {err:.2e} "
          f"({'ok' if ok else 'FAIL'}, tolerance {TOLERANCE:g})")

    # 6. Load the library in a fresh process and measure the peak memory of one call.
    section("measure in a fresh process")
    measured = ac.measure_peak(out, [x])
    print(f"loaded {out.name} in a new Python process (TVM runtime) and ran one call "
          f"in {measured.seconds:.1f}s")

    # 7. The numbers side by side. "peak" is what one call allocates: the larger of the static
    #    memory plan and the VM's run-time pools (which also hold kernel workspace).
    section("peak memory of one call, MiB (weights and the input are not counted)")
    rep = art.report
    rows = [
        ("unchunked, estimated before building", estimate.peak_bytes),
        (f"built ({'chunked' if rep.chunking else 'unchunked'}), estimated", rep.peak_bytes),
        ("  TVM's static plan of the build", plan),
        ("  run-time estimate (VM pools)", rep.runtime_peak_bytes),
        ("measured peak RSS, fresh process", measured.peak_bytes),
        ("budget", ac.parse_budget(args.budget)),
    ]
    for name, n in rows:
        print(f"  {name:<40} {mib(n)}")
    for r in (rep.chunking or {}).get("regions", []):
        print(f"  chunked {r['start']}..{r['end']} along {r['seed']}[{r['dim']}]: "
              f"{r['n_chunks']} chunks of {r['chunk']}")
    print(f"  memory cut {100 * (1 - measured.peak_bytes / estimate.peak_bytes):.0f}% (measured "
          f"vs unchunked estimate); measured / built estimate = "
          f"{measured.peak_bytes / rep.peak_bytes:.3f}")
    within = measured.peak_bytes <= ac.parse_budget(args.budget) + allowance(plan)
    ok = ok and within

    cuda_note = ""
    if args.cuda:
        section("compile for CUDA sm_80 (compile only, nothing runs)")
        t = time.perf_counter()
        cuda_art = ac.build(mod, target="cuda", arch="sm_80")
        secs = time.perf_counter() - t
        rep = cuda_art.report
        print(f"compiled in {secs:.1f}s; peak {mib(rep.peak_bytes).strip()} MiB per call "
              f"(TVM's static plan {mib(rep.planned_peak_bytes).strip()} MiB; kernels are "
              "fused and scheduled for the GPU, so the peak differs from llvm's)")
        cuda_note = f"; cuda sm_80 peak {rep.peak_bytes / MiB:.1f} MiB"

    status = "OK" if ok else "FAILED"
    print(
        f"\ndemo {status}: GPT S={args.seq} on llvm: "
        f"unchunked {estimate.peak_bytes / MiB:.1f} MiB, "
        f"built {rep.peak_bytes / MiB:.1f} MiB (TVM plan {mib(plan).strip()}), measured "
        f"{measured.peak_bytes / MiB:.1f} MiB "
        f"(budget {args.budget}); max |err| {err:.1e}; {shown(out)}{cuda_note}; "
        f"{time.perf_counter() - t_start:.0f}s total"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
