"""Library models (issue 22; ``benchmarks/real_models.py``): transformers and diffusers classes,
tiny random-init configs, imported as a user would (``from_torch``). Per model, in one process:

* torch eager, our unchunked build, and our unchunked build with the constant attention masks
  kept as masks (``torch_masks`` off: how these models imported before), timed interleaved at
  the same threads (median of ``--repeats``), with their planned peaks and errors against torch;
* the peak the search reaches at ``--shares`` of the unchunked peak (``floors.run``; a refused
  share records the smallest peak reached).

Rows go to ``benchmarks/results/library_models.jsonl``. Needs the ``bench`` extra.

    .venv/bin/python benchmarks/library_models.py
    .venv/bin/python benchmarks/library_models.py --case hf_bert:1024 --shares 0.5 0.2
    .venv/bin/python benchmarks/library_models.py --quick       # tiny, for the smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = ["hf_gpt2:1024", "hf_bert:1024", "hf_llama:1024", "hf_vit:224", "hf_unet:64",
         "hf_unet_cond:64"]
SHARES = (0.5, 0.2, 0.1)
MIB = 2**20


@contextlib.contextmanager
def _masks_kept():
    """Import with constant masks left as masks (the import before ``torch_masks``)."""
    from tvm_autochunk import frontends

    real = frontends.constant_masks_read
    frontends.constant_masks_read = lambda ep, torch: contextlib.nullcontext(0)
    try:
        yield
    finally:
        frontends.constant_masks_read = real


def run(case: str, threads: int, repeats: int, shares) -> dict:
    import torch

    import tvm_autochunk as ac
    from benchmarks import floors
    from benchmarks.env import env_info
    from benchmarks.models import workload
    from benchmarks.timing import interleaved_medians

    family, size = case.split(":")
    w = workload(family, int(size))
    x = [t.numpy() for t in w.inputs]
    ours = ac.build(ac.from_torch(w.module, w.inputs), "llvm")
    with _masks_kept():
        kept = ac.build(ac.from_torch(w.module, w.inputs), "llvm")
    torch.set_num_threads(threads)

    def eager(*args):
        with torch.no_grad():
            return w.module(*args)

    ref = eager(*w.inputs).numpy()
    builds = {"ours": ours, "ours_masks_kept": kept}
    errs = {k: float(np.abs(a(*x) - ref).max()) for k, a in builds.items()}
    timed = {k: (lambda *_, a=a: a(*x)) for k, a in builds.items()}
    for fn in (eager, *timed.values()):  # one more warm-up: torch's first calls in a process
        fn(*w.inputs)  # were up to 5x slower than later ones (GPT2: 111 against 21 ms)
    medians = interleaved_medians({"torch": eager, **timed}, w.inputs, repeats)
    floor = floors.run(case, shares)
    return {
        "family": family, "size": int(size), "description": w.description,
        "threads": threads, "repeats": repeats,
        **{f"{k}_ms": round(v * 1e3, 2) for k, v in medians.items()},
        **{f"{k}_vs_torch": round(v / medians["torch"], 3) for k, v in medians.items()
           if k != "torch"},
        "peak_bytes": {k: a.report.peak_bytes for k, a in builds.items()},
        "max_abs_err_vs_torch": errs,
        "floors": floor["points"],
        "lower_bound_bytes": floor["lower_bound_bytes"],
        "lower_bound": floor["lower_bound"],
        "env": env_info(),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", action="append", help="family:size (repeatable)")
    ap.add_argument("--shares", type=float, nargs="+", default=list(SHARES))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="default: every core")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/library_models.jsonl"))
    ap.add_argument("--quick", action="store_true", help="BERT S=64, 2 repeats: smoke test")
    args = ap.parse_args(argv)
    import tvm_autochunk as ac

    threads = ac.set_threads(args.threads)
    if args.quick:
        args.case, args.repeats, args.shares = ["hf_bert:64"], 2, [0.9]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print("| model | torch ms | ours ms (x torch) | masks kept ms (x torch) | peak MiB, ours / "
          "masks kept | " + " | ".join(f"{s:.0%}" for s in args.shares) + " | lower bound MiB |")
    print("|---|---|---|---|---|" + "---|" * (len(args.shares) + 1))
    with out.open("w") as f:
        for case in args.case or CASES:
            r = run(case, threads, args.repeats, args.shares)
            f.write(json.dumps(r) + "\n")
            f.flush()
            peaks = r["peak_bytes"]
            cells = [f"{p['peak_bytes'] / MIB:.1f}" if p["ok"] else
                     f"- ({p['peak_bytes'] / MIB:.1f})" for p in r["floors"]]
            print(f"| {case} | {r['torch_ms']} | {r['ours_ms']} ({r['ours_vs_torch']}) | "
                  f"{r['ours_masks_kept_ms']} ({r['ours_masks_kept_vs_torch']}) | "
                  f"{peaks['ours'] / MIB:.1f} / {peaks['ours_masks_kept'] / MIB:.1f} | "
                  + " | ".join(cells) + f" | {r['lower_bound_bytes'] / MIB:.1f} |", flush=True)
    print(f"\nJSON lines: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
