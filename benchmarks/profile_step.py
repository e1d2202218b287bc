"""Where one engine step's time goes (GPU host): median step time against vLLM's AR decode, GPU-busy fraction,
kernel launches per step, and a per-phase attribution.

Random-weight checkpoints of :mod:`offline_throughput` (``--family``, default SDAR-1.7B shapes).  **Every mode
gets its own engine** in its own process (a fresh ``LLM`` with that mode's ``speculative_config``; the process
exits before the next mode starts, which frees its GPU memory and vLLM's engine core), and **vLLM's AR decode of
the same weights (mode ``a``) always runs in the same call**, so the step-time ratios compare engines measured
on one card by one tree.  Per (mode, batch size), decoding ``--new-tokens`` tokens per request:

1. *plain*: every ``LLMEngine.step`` timed (engine core in-process, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so one
   step = one model forward): ``step_ms_median``, and ``step_time_ratio`` = that / mode ``a``'s median;
2. *profile*: ``torch.profiler`` over ``--profile-steps`` decode steps (after ``--skip-steps``), measured from
   outside the engine: ``gpu_busy_fraction`` (union of GPU activity / the window's wall time),
   ``gpu_busy_ms_per_step``, ``launch_calls_per_step`` (host kernel- and graph-launch calls),
   ``graph_launches_per_step``, ``device_kernels_per_step`` (kernels the GPU ran), top host and device ops;
3. *attribution* (``--attribution``, plugin modes): the runner's ``prepare_inputs`` / ``prepare_attn`` /
   ``execute_model`` / ``sample`` / ``sample_tokens`` and the plugin's ``S2D2Sampler.__call__`` and
   ``S2D2Stepper.step`` wrapped in ``torch.cuda.synchronize()`` timers (serialises the step: what each phase
   costs, host + device).  A phase whose name is missing in this vLLM / plugin is reported under
   ``attribution_missing`` instead of failing the run.

Usage (GPU host; each engine takes ~1.5-2 min to start, a device call may run 10 minutes: ``a`` plus two modes
per call)::

    COMMIT=<hash> python benchmarks/profile_step.py --modes a,c,s --batches 1,16,64,256 --out $OUT/profile.json
    python benchmarks/profile_step.py --replot RECORD.json

Writes the JSON record (after every mode) and a PNG beside it (median step ms, step-time ratio, GPU-busy
fraction and launches per step against batch size; only if matplotlib is installed).
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
import bench_records as rec  # noqa: E402
from offline_throughput import FAMILIES, mode_env, modes_of, replot, require_gpu, write_checkpoints  # noqa: E402

from vllm_s2d2.log import ArgumentParser, int_arg, int_list_arg  # noqa: E402 - stdlib only

TIMED: dict[str, float] = collections.defaultdict(float)
COUNTS: dict[str, int] = collections.defaultdict(int)
ENABLED = [False]
RUNNER_PHASES = ("prepare_inputs", "prepare_attn", "sample", "execute_model", "sample_tokens")


def build_parser() -> argparse.ArgumentParser:
    # one-line errors (exit 2) naming the argument, the value and what is allowed (vllm_s2d2/log.py)
    ap = ArgumentParser(prog="benchmarks/profile_step.py", description=__doc__.split("\n")[0])
    ap.add_argument("--modes", default="a,c,s", help="comma-separated modes (one engine each); a always runs")
    ap.add_argument("--family", default="sdar-1.7b", choices=sorted(FAMILIES))
    ap.add_argument("--batches", default="1,64", type=int_list_arg(1, as_text=True),
                    help="comma-separated batch sizes (>= 1)")
    ap.add_argument("--prompt-len", type=int_arg(1), default=128)
    ap.add_argument("--new-tokens", type=int_arg(1), default=64)
    ap.add_argument("--skip-steps", type=int_arg(0), default=4, help="steps before the profiled window (prefill ...)")
    ap.add_argument("--profile-steps", type=int_arg(1), default=32, help="engine steps inside the profiled window")
    ap.add_argument("--attribution", action=argparse.BooleanOptionalAction, default=True,
                    help="the synchronised per-phase timers (plugin modes)")
    ap.add_argument("--eager", action="store_true", help="enforce_eager (no CUDA graphs) for every mode")
    ap.add_argument("--capture-sizes", default="1,2,4,8,16,32,64,128,256,512,1024,2048",
                    type=int_list_arg(1, as_text=True))
    ap.add_argument("--timeout", type=int_arg(1), default=420, help="per-engine timeout (s)")
    ap.add_argument("--out", default="profile_step.json")
    ap.add_argument("--replot", metavar="JSON", help="only redraw the PNG of an existing record")
    ap.add_argument("--_worker", nargs=3, metavar=("MODEL", "MODE", "CALL_ID"), help=argparse.SUPPRESS)
    return ap


def modes_list(modes_arg: str, family: str) -> list[str]:
    """The modes of one call, ``a`` first, each once; unknown modes are refused."""
    table = modes_of(family)
    modes = [m for m in "".join(modes_arg.replace(" ", "").split(",")) if m]
    unknown = [m for m in modes if m not in table]
    if unknown:
        raise ValueError(f"unknown mode(s) {unknown} for family {family}; valid: {sorted(table)}")
    out = [rec.BASELINE_MODE]
    for m in modes:
        if m not in out:
            out.append(m)
    return out


# -- worker --------------------------------------------------------------------------------------------------
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


def patch_phases() -> list[str]:
    """Wrap the phases in timers (inactive until ``ENABLED``); returns the phases that could not be found.
    Plugin internals touched: only ``S2D2Sampler`` (``vllm_s2d2.engine.sampler``) and ``S2D2Stepper.step``
    (``vllm_s2d2.engine.stepper``)."""
    import importlib

    missing = []
    targets = [("vllm.v1.worker.gpu.model_runner", "GPUModelRunner", p, "runner." + p) for p in RUNNER_PHASES]
    targets += [("vllm_s2d2.engine.sampler", "S2D2Sampler", "__call__", "s2d2.sampler"),
                ("vllm_s2d2.engine.stepper", "S2D2Stepper", "step", "s2d2.stepper_step")]
    for module, cls_name, attr, label in targets:
        try:
            cls = getattr(importlib.import_module(module), cls_name)
            setattr(cls, attr, _timed(label, getattr(cls, attr)))
        except (ImportError, AttributeError):
            missing.append(label)
    return missing


def decode(engine, tag, prompts, sp, on_step=None):
    """Run the prompts to completion; returns the per-step wall times (s).  ``on_step(i)`` runs before step
    ``i`` (the profiler window)."""
    import torch

    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", {"prompt_token_ids": p}, sp)
    times = []
    while engine.has_unfinished_requests():
        if on_step is not None:
            on_step(len(times))
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    if on_step is not None:
        on_step(len(times))
    # (untimed) one more step hands the finished ids to the worker (vLLM sends them with the next scheduler
    # output; an in-process engine core steps only when asked), so the next run's first step does not do it
    engine.step()
    torch.cuda.synchronize()
    return times


def profile_window(engine, tag, prompts, sp, skip: int, n: int) -> dict:
    """torch.profiler over steps ``[skip, skip + n)`` of one decode; per-step summary + top ops."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    window = {"t0": None, "t1": None, "steps": 0}

    def on_step(i):
        if i == skip and window["t0"] is None:
            torch.cuda.synchronize()
            prof.start()
            window["t0"] = time.perf_counter()
        elif window["t0"] is not None and window["t1"] is None and (i == skip + n or
                                                                     not engine.has_unfinished_requests()):
            torch.cuda.synchronize()
            window["t1"] = time.perf_counter()
            window["steps"] = i - skip
            prof.stop()

    decode(engine, tag, prompts, sp, on_step)
    if window["t0"] is None or window["t1"] is None:
        return {"error": f"the decode ended before step {skip}: nothing profiled"}
    device_events, api_counts = [], collections.Counter()
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            device_events.append((e.name, e.time_range.start, e.time_range.end))
        else:
            api_counts[e.name] += 1
    out = rec.profile_summary(device_events, dict(api_counts), window["steps"], window["t1"] - window["t0"])
    ka = prof.key_averages()
    out["top_host_ms"] = [(e.key[:80], e.count, round(e.self_cpu_time_total / 1e3, 2))
                          for e in sorted(ka, key=lambda e: -e.self_cpu_time_total)[:25]]
    out["top_device_ms"] = [(e.key[:80], e.count, round(e.self_device_time_total / 1e3, 2))
                            for e in sorted(ka, key=lambda e: -e.self_device_time_total)[:20]
                            if e.self_device_time_total > 0]
    return out


def run_worker(model: str, mode: str, args, call_id: str) -> dict:
    """Inside the worker process: one fresh engine for ``mode``, every batch size."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import numpy as np
    import torch
    from vllm import LLM, SamplingParams

    table = modes_of(args.family)
    plugin = table[mode]["arch"] == "bd"
    missing = patch_phases() if (args.attribution and plugin) else []
    batches = rec.parse_int_list(args.batches)
    t0 = time.time()
    llm = LLM(model=model, skip_tokenizer_init=True, load_format="dummy", dtype="bfloat16",
              speculative_config=table[mode]["spec"], max_model_len=args.prompt_len + args.new_tokens + 64,
              max_num_seqs=max(batches), gpu_memory_utilization=0.85, seed=0, enforce_eager=args.eager,
              compilation_config={"cudagraph_capture_sizes": rec.parse_int_list(args.capture_sizes)})
    engine = llm.llm_engine
    info = {"startup_s": time.time() - t0, "device": torch.cuda.get_device_name(), "call_id": call_id,
            "cudagraph_mode": str(engine.vllm_config.compilation_config.cudagraph_mode),
            "attribution_missing": missing}
    rng = np.random.default_rng(0)
    kw = dict(max_tokens=args.new_tokens, ignore_eos=True, temperature=0.0)
    if table[mode]["extra"]:
        kw["extra_args"] = table[mode]["extra"]
    sp = SamplingParams(**kw)
    rows = []
    for bs in batches:
        prompts = [rng.integers(0, 150000, args.prompt_len).tolist() for _ in range(bs)]
        decode(engine, f"warm-{mode}-{bs}", prompts, sp)
        times = decode(engine, f"plain-{mode}-{bs}", prompts, sp)
        row = {"mode": mode, "label": table[mode]["label"], "batch": bs, "call_id": call_id, "steps": len(times),
               "step_ms_median": 1e3 * float(np.median(times)), "step_ms_mean": 1e3 * float(np.mean(times)),
               "step_ms_p90": 1e3 * float(np.percentile(times, 90))}
        row.update(profile_window(engine, f"prof-{mode}-{bs}", prompts, sp, args.skip_steps, args.profile_steps))
        if args.attribution and plugin:
            TIMED.clear()
            COUNTS.clear()
            ENABLED[0] = True
            t_times = decode(engine, f"timed-{mode}-{bs}", prompts, sp)
            ENABLED[0] = False
            row["attribution"] = {
                "timed_step_ms_median": 1e3 * float(np.median(t_times)),
                "phases": {k: {"ms_per_call": 1e3 * v / max(1, COUNTS[k]), "calls": COUNTS[k]}
                           for k, v in sorted(TIMED.items())}}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.startswith("top")}), flush=True)
    return {"engine": info, "rows": rows}


# -- driver --------------------------------------------------------------------------------------------------
SUMMARY_FIELDS = ("step_ms_median", "gpu_busy_fraction", "gpu_busy_ms_per_step", "launch_calls_per_step",
                  "graph_launches_per_step", "device_kernels_per_step")


def finish(record: dict) -> dict:
    """``ratios_vs_baseline`` (step time only: ``output_tokens_per_s_ratio`` is None here) and ``per_batch``."""
    rows = list(record["runs"].values())
    ratios = rec.ratios_vs_baseline(rows, record["baseline"])
    record["ratios_vs_baseline"] = {m: {b: {"step_time_ratio": v["step_time_ratio"]} for b, v in per.items()}
                                    for m, per in ratios.items()}
    record["per_batch"] = rec.per_batch_table(rows, record["ratios_vs_baseline"], SUMMARY_FIELDS)
    return record


def plot(record: dict, path) -> bool:
    series = rec.mode_series(record, record["runs"].values(),
                             ("step_ms_median", "gpu_busy_fraction", "launch_calls_per_step"))
    return rec.plot_modes(path, rec.record_title(record),
                          [("median step time (ms)", series["step_ms_median"]),
                           ("median step time / vLLM AR's (same call)", series["step_time_ratio"]),
                           ("GPU-busy fraction of a step", series["gpu_busy_fraction"]),
                           ("launch calls per step", series["launch_calls_per_step"])], hline={1: 1.0})


def main(argv: list[str] | None = None) -> None:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.replot:
        return replot(ap, args.replot, plot)
    if args._worker:
        model, mode, call_id = args._worker
        rec.emit_result(run_worker(model, mode, args, call_id))
        return
    try:
        modes = modes_list(args.modes, args.family)
    except ValueError as e:
        ap.error(f"argument --modes: {e}")
    batches = rec.parse_int_list(args.batches)
    require_gpu(ap.prog)
    table = modes_of(args.family)
    record = {"benchmark": "profile_step", "schema": 2, "call": rec.run_metadata(),
              "model": f"random weights, {FAMILIES[args.family]['model']} (bf16, load_format=dummy)",
              "family": args.family, "baseline": rec.BASELINE_MODE, "batches": batches,
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "skip_steps": args.skip_steps,
              "profile_steps": args.profile_steps, "eager": args.eager,
              "modes": {m: {k: table[m].get(k) for k in ("label", "spec", "extra", "env")} for m in modes},
              "engines": {}, "runs": {}, "ratios_vs_baseline": {}, "per_batch": {}, "errors": {}}
    call_id = record["call"]["call_id"]
    paths = write_checkpoints(tempfile.mkdtemp(prefix="s2d2_profile_"), args.family)
    passthrough = ["--family", args.family, "--batches", args.batches, "--prompt-len", str(args.prompt_len),
                   "--new-tokens", str(args.new_tokens), "--skip-steps", str(args.skip_steps),
                   "--profile-steps", str(args.profile_steps), "--capture-sizes", args.capture_sizes,
                   "--attribution" if args.attribution else "--no-attribution"] + (["--eager"] if args.eager else [])
    for mode in modes:  # one fresh engine per mode, in its own process
        cmd = [sys.executable, os.path.abspath(__file__), *passthrough,
               "--_worker", paths[table[mode]["arch"]], mode, call_id]
        res, err = rec.run_worker_process(cmd, args.timeout, mode_env(table[mode]))
        if res is None:
            record["errors"][mode] = err
        else:
            record["engines"][mode] = res["engine"]
            for row in res["rows"]:
                record["runs"][f"{mode}/{row['batch']}"] = row
        rec.write_json(args.out, finish(record))
    png = os.path.splitext(args.out)[0] + ".png"
    record["png"] = os.path.basename(png) if plot(record, png) else None
    rec.write_json(args.out, record)
    print(json.dumps({"call": record["call"], "per_batch": record["per_batch"], "errors": list(record["errors"])},
                     indent=1), flush=True)


if __name__ == "__main__":
    main()
