"""Attention alone on CPU, side by side in one process (issue 20 item 5): torch SDPA, torch
eager's decomposed attention, our build with the fused kernel (``relay_passes.attention``), and
our build without it (``leave_unfused``: scheduled matmuls and softmax over a materialized
Sq x Sk). Interleaved rounds, medians, every contender at the same thread count. Also TVM's
planned peak of both builds. Rows go to
``benchmarks/results/attention_kernel.jsonl``.

    .venv/bin/python benchmarks/attention_kernel.py                  # the default cases
    .venv/bin/python benchmarks/attention_kernel.py --case 4:4096:64:causal --repeats 5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = ["4:1024:64:causal", "4:4096:64:causal", "3:1025:64:full"]


def run(case: str, threads: int, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F

    import tvm_autochunk as ac
    from benchmarks.env import env_info
    from benchmarks.timing import interleaved_medians
    from relay_passes.attention import leave_unfused

    heads, s, hd, kind = case.split(":")
    heads, s, hd, causal = int(heads), int(s), int(hd), kind == "causal"

    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    gen = torch.Generator().manual_seed(0)
    qkv = tuple(torch.randn(1, heads, s, hd, generator=gen) for _ in range(3))
    mod = ac.from_torch(Attn(), qkv)
    tgt = ac.resolve_target("llvm")
    fused = ac.build(mod, tgt)
    unfused = ac.build(leave_unfused(mod), tgt)
    used = ac.set_threads(threads)
    torch.set_num_threads(used)
    x = [t.numpy() for t in qkv]

    def decomposed(q, k, v):
        a = (q @ k.transpose(-1, -2)) / hd**0.5
        if causal:
            a = a.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
        return a.softmax(-1) @ v

    with torch.no_grad():
        ref = F.scaled_dot_product_attention(*qkv, is_causal=causal).numpy()
    errs = {
        "ours_fused": float(np.abs(fused(*x) - ref).max()),
        "ours_unfused": float(np.abs(unfused(*x) - ref).max()),
    }
    with torch.no_grad():
        medians = interleaved_medians(
            {
                "torch_sdpa": lambda: F.scaled_dot_product_attention(*qkv, is_causal=causal),
                "torch_eager": lambda: decomposed(*qkv),
                "ours_fused": lambda: fused(*x),
                "ours_unfused": lambda: unfused(*x),
            },
            (),
            repeats,
        )
    return {
        "case": case, "heads": heads, "S": s, "head_dim": hd, "causal": causal, "threads": used,
        "repeats": repeats,
        **{f"{k}_ms": round(v * 1e3, 2) for k, v in medians.items()},
        "fused_vs_sdpa": round(medians["ours_fused"] / medians["torch_sdpa"], 3),
        "unfused_vs_sdpa": round(medians["ours_unfused"] / medians["torch_sdpa"], 3),
        "fused_peak_bytes": int(fused.report.peak_bytes),
        "unfused_peak_bytes": int(unfused.report.peak_bytes),
        "max_abs_err_vs_sdpa": {k: float(f"{v:.2e}") for k, v in errs.items()},
        "env": env_info(),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", action="append", help="heads:S:head_dim:causal|full (repeatable)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="default: every core")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/attention_kernel.jsonl"))
    ap.add_argument("--quick", action="store_true", help="one tiny case, 2 repeats: smoke test")
    args = ap.parse_args(argv)
    import tvm_autochunk as ac

    threads = ac.set_threads(args.threads)
    if args.quick:
        args.case, args.repeats = ["2:96:16:causal"], 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for case in args.case or CASES:
            row = run(case, threads, args.repeats)
            f.write(json.dumps(row) + "\n")
            f.flush()
            print(
                f"{case}: sdpa {row['torch_sdpa_ms']} ms, torch eager {row['torch_eager_ms']} ms,"
                f" ours fused {row['ours_fused_ms']} ms ({row['fused_vs_sdpa']}x sdpa), unfused "
                f"{row['ours_unfused_ms']} ms ({row['unfused_vs_sdpa']}x); planned peak "
                f"{row['fused_peak_bytes'] / 2**20:.2f} vs {row['unfused_peak_bytes'] / 2**20:.2f}"
                f" MiB; errors "
                f"{row['max_abs_err_vs_sdpa']}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
