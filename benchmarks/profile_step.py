"""Where one engine step's time goes (GPU host): per-phase wall times and a torch.profiler summary.

Runs one in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) on the random-weight SDAR-1.7B-shape checkpoint
of :mod:`offline_throughput` and, for each (mode, batch), decodes with

1. *attribution*: the runner's ``prepare_inputs`` / ``prepare_attn`` / forward / ``sample`` (logits + sampler) and the
   plugin's sampler and stepper wrapped in ``torch.cuda.synchronize()`` timers (serialises the step: shows what
   each phase costs, host + device);
2. *profile*: ``torch.profiler`` over a window of steps without the timers: kernels launched per step, GPU busy time
   per step, and the top host-side ops.

Usage: ``python benchmarks/profile_step.py --modes c,s --batches 1,64 --out $OUT/profile.json``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from offline_throughput import MODES, write_checkpoints  # noqa: E402

TIMED: dict[str, float] = collections.defaultdict(float)
COUNTS: dict[str, int] = collections.defaultdict(int)
ENABLED = [False]


def _timed(name, fn):
    import torch

    def wrapper(*a, **kw):
        if not ENABLED[0]:
            return fn(*a, **kw)
        torch.cuda.synchronize()
        t = time.perf_counter()
        r = fn(*a, **kw)
        torch.cuda.synchronize()
        TIMED[name] += time.perf_counter() - t
        COUNTS[name] += 1
        return r
    return wrapper


def patch() -> None:
    from vllm.v1.worker.gpu import model_runner as mr
    from vllm_s2d2.engine import sampler as smp, stepper as stp

    R = mr.GPUModelRunner
    for name in ("prepare_inputs", "prepare_attn", "sample", "execute_model", "sample_tokens"):
        setattr(R, name, _timed("runner." + name, getattr(R, name)))
    smp.S2D2Sampler.__call__ = _timed("s2d2.sampler", smp.S2D2Sampler.__call__)
    stp.S2D2Stepper.step = _timed("s2d2.stepper_step", stp.S2D2Stepper.step)


def decode(engine, tag, prompts, sp):
    import torch
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", {"prompt_token_ids": p}, sp)
    steps = 0
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    torch.cuda.synchronize()
    return steps, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", default="c,s")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", default="profile.json")
    ap.add_argument("--eager", action="store_true")
    args = ap.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile
    from vllm import LLM, SamplingParams

    patch()
    paths = write_checkpoints(tempfile.mkdtemp())
    modes = args.modes.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    arch = MODES[modes[0]]["arch"]
    llm = LLM(model=paths[arch], skip_tokenizer_init=True, load_format="dummy", dtype="bfloat16",
              speculative_config=MODES[modes[0]]["spec"], max_model_len=512, max_num_seqs=max(batches),
              gpu_memory_utilization=0.85, seed=0, enforce_eager=args.eager,
              compilation_config={"cudagraph_capture_sizes": [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]})
    engine = llm.llm_engine
    rng = np.random.default_rng(0)
    report = {"device": torch.cuda.get_device_name(), "commit": os.environ.get("COMMIT", "unknown"), "runs": {}}
    for mode in modes:
        kw = dict(max_tokens=args.new_tokens, ignore_eos=True, temperature=0.0)
        if MODES[mode]["extra"]:
            kw["extra_args"] = MODES[mode]["extra"]
        sp = SamplingParams(**kw)
        for bs in batches:
            prompts = [rng.integers(0, 150000, 128).tolist() for _ in range(bs)]
            decode(engine, f"warm-{mode}-{bs}", prompts, sp)
            steps, el = decode(engine, f"plain-{mode}-{bs}", prompts, sp)
            TIMED.clear(); COUNTS.clear()
            ENABLED[0] = True
            steps_t, el_t = decode(engine, f"timed-{mode}-{bs}", prompts, sp)
            ENABLED[0] = False
            timed = {k: {"ms_per_call": 1e3 * v / max(1, COUNTS[k]), "calls": COUNTS[k]} for k, v in TIMED.items()}
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                steps_p, _ = decode(engine, f"prof-{mode}-{bs}", prompts, sp)
            ka = prof.key_averages()
            launches = sum(e.count for e in ka if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx",
                                                             "cudaLaunchKernelExC", "cudaGraphLaunch"))
            graph_launches = sum(e.count for e in ka if e.key == "cudaGraphLaunch")
            gpu_us = sum(e.self_device_time_total for e in ka if e.device_type.name == "CUDA")
            top_cpu = [(e.key, e.count, round(e.self_cpu_time_total / 1e3, 2)) for e in
                       sorted(ka, key=lambda e: -e.self_cpu_time_total)[:30]]
            top_gpu = [(e.key[:80], e.count, round(e.self_device_time_total / 1e3, 2)) for e in
                       sorted(ka, key=lambda e: -e.self_device_time_total)[:20]]
            rec = {"steps": steps, "step_ms": 1e3 * el / steps, "timed_step_ms": 1e3 * el_t / steps_t,
                   "timed": timed, "launches_per_step": launches / steps_p,
                   "graph_launches_per_step": graph_launches / steps_p,
                   "gpu_busy_ms_per_step": gpu_us / 1e3 / steps_p, "top_cpu_ms": top_cpu, "top_gpu_ms": top_gpu}
            report["runs"][f"{mode}/{bs}"] = rec
            print(json.dumps({k: v for k, v in rec.items() if not k.startswith("top")}), flush=True)
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
