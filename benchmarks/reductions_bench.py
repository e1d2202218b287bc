"""The step's vocabulary reductions on a GPU: how often PyTorch's change a row's bits with the batch, and what the
fixed-order kernels cost (``vllm_s2d2.core.reductions``, docs/architecture.md "Batch-invariant step math").

For rows of V = 151,936 fp32 logits, batches of 1 .. 1,024 rows:

* ``variant``: for each operation, how many of the first rows differ to the bit between the row computed alone
  and inside the batch -- ``torch.softmax`` (vLLM's default-kernel path), vLLM's batch-invariant softmax recipe
  (``amax`` / ``exp`` / ``torch.sum``, what ``VLLM_BATCH_INVARIANT=1`` installs), ``torch.sum``,
  ``torch.cumsum``, and the fixed-order versions (the Triton kernels, the integer prefix sum), which must show 0;
* ``ms``: median time per call (CUDA events, after warm-up) of each.

Needs torch and Triton only (no vLLM): ``python benchmarks/reductions_bench.py --out r.json``.  The record starts
with the call's metadata (commit, device, torch).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench_records  # noqa: E402

from vllm_s2d2.core import reductions  # noqa: E402
from vllm_s2d2.kernels import row_reductions  # noqa: E402

os.environ[reductions.FIXED_ORDER_ENV] = "1"  # reductions.cumsum: the fixed-order (integer) prefix sum

V = 151_936


def bi_softmax(x: torch.Tensor) -> torch.Tensor:
    """vLLM 0.26's batch-invariant softmax recipe (model_executor/layers/batch_invariant.py)."""
    x = x - torch.amax(x, dim=-1, keepdim=True)
    e = torch.exp(x)
    return e / torch.sum(e, dim=-1, keepdim=True)


OPS = {
    "torch.softmax": lambda x: torch.softmax(x, dim=-1),
    "vllm_bi_softmax": bi_softmax,
    "torch.sum": lambda x: x.sum(dim=-1),
    "torch.cumsum": lambda x: torch.cumsum(x, dim=-1),
    "fixed.softmax": row_reductions.softmax,
    "fixed.row_sum": row_reductions.row_sum,
    "fixed.cumsum": reductions.cumsum,
}


def time_ms(fn, x: torch.Tensor, reps: int) -> float:
    for _ in range(3):
        fn(x)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(x)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,4,16,64,256,1024")
    ap.add_argument("--check-rows", type=int, default=4, help="rows compared alone vs in the batch")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs a CUDA device")
    g = torch.Generator(device="cuda").manual_seed(0)
    batches = bench_records.parse_int_list(args.batches)
    big = torch.randn(max(batches), V, device="cuda", generator=g) * 4
    probs = torch.softmax(big, dim=-1)
    record = {**bench_records.run_metadata(), "vocab": V, "check_rows": args.check_rows, "results": []}
    for n in batches:
        row = {"rows": n, "variant": {}, "ms": {}}
        for name, fn in OPS.items():
            x = probs[:n] if ("sum" in name) else big[:n]  # sums and scans over probabilities, softmax over logits
            batch_out = fn(x)
            k = min(args.check_rows, n)
            row["variant"][name] = sum(int(not torch.equal(fn(x[r:r + 1])[0], batch_out[r])) for r in range(k))
            row["ms"][name] = round(time_ms(fn, x, args.reps), 4)
        record["results"].append(row)
        print(n, row["variant"], row["ms"], flush=True)
    print("wrote", bench_records.write_json(args.out, record))


if __name__ == "__main__":
    main()
