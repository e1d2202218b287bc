"""Runs one vLLM engine (``LLM``) on a job spec and writes the generated token ids as JSON (GPU test helper).

Each engine runs in its own process (started by ``tests/gpu/test_engine_sdar.py``) so GPU memory and vLLM's
engine-core process are released between engines.  Usage: ``python engine_worker.py SPEC.json OUT.json``.

Spec: ``{"model", "speculative_config", "enforce_eager", "dtype", "max_model_len", "max_num_seqs",
"count_cudagraph_modes", "jobs": [{"name", "mode": "batch" | "single" | "abort" | "staggered", "prompts": [[ids]],
"sampling": [{SamplingParams kw}], "abort_after_steps", "abort": [indices], "arrive": [engine step per request]}]}``.
``staggered`` adds request i before engine step ``arrive[i]`` (so prefills join decoding batches);
``count_cudagraph_modes`` counts the CUDA-graph mode Model Runner V2 dispatches each step to (key: mode name,
``_uniform`` when every query of the step has the same length) into ``result["cudagraph_dispatch"]``.
"""

from __future__ import annotations

import json
import os
import sys
import time

# Full-fp32 dot products in Triton kernels (attention): Triton's fp32 default is TF32, whose ~1e-3 relative
# error can flip near-tied confidence rankings against the fp32 reference decoder.
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")

from gpu_env import llm_memory_kwargs  # noqa: E402  (this script's folder is on sys.path)


def _sp(kw):
    from vllm import SamplingParams

    return SamplingParams(**kw)


def _out(o):
    c = o.outputs[0]
    return {"token_ids": list(c.token_ids), "finish_reason": c.finish_reason}


def _count_dispatch(worker) -> bool:
    """(Runs in the worker, through ``collective_rpc``.)  Count the runner's CUDA-graph dispatch decisions."""
    runner = worker.model_runner
    manager = runner.cudagraph_manager
    counts: dict = {}
    inner = manager.dispatch

    def full_counts() -> set:
        """Query lengths that FULL graphs were captured for (W): a batch of one request is "uniform" for vLLM
        whatever its length, so only batches of these query lengths count as uniform here."""
        return {d.uniform_token_count for descs in manager._candidates.values() for d in descs
                if d.cg_mode.name == "FULL" and d.uniform_token_count is not None}

    def dispatch(num_reqs, num_tokens, uniform_token_count, *args, **kwargs):
        desc = inner(num_reqs, num_tokens, uniform_token_count, *args, **kwargs)
        key = desc.cg_mode.name + ("_uniform" if uniform_token_count in full_counts() else "")
        counts[key] = counts.get(key, 0) + 1
        return desc

    manager.dispatch = dispatch
    runner.s2d2_dispatch_counts = counts
    return True


def _read_dispatch(worker) -> dict:
    return dict(worker.model_runner.s2d2_dispatch_counts)


def run(spec: dict) -> dict:
    from vllm import LLM

    if spec.get("count_cudagraph_modes"):
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # (collective_rpc with a function)
    os.environ.update(spec.get("env", {}))  # e.g. VLLM_S2D2_COMPILE_STEP (the engine core inherits it)
    t0 = time.time()
    llm = LLM(model=spec["model"], skip_tokenizer_init=True, speculative_config=spec.get("speculative_config"),
              enforce_eager=spec.get("enforce_eager", True), dtype=spec.get("dtype", "float32"),
              max_model_len=spec.get("max_model_len", 512), max_num_seqs=spec.get("max_num_seqs", 64),
              **llm_memory_kwargs(spec.get("gpu_memory_utilization", 0.3)), seed=0,
              **spec.get("llm_kwargs", {}))
    result: dict = {"startup_s": time.time() - t0,
                    "cudagraph_mode": str(llm.llm_engine.vllm_config.compilation_config.cudagraph_mode)}
    if spec.get("count_cudagraph_modes"):
        llm.collective_rpc(_count_dispatch)
    for job in spec["jobs"]:
        t = time.time()
        prompts = [{"prompt_token_ids": p} for p in job["prompts"]]
        sps = [_sp(kw) for kw in job["sampling"]]
        if job["mode"] == "single":  # batch size 1: one request at a time
            outs = [_out(llm.generate([p], [s], use_tqdm=False)[0]) for p, s in zip(prompts, sps)]
        elif job["mode"] == "batch":
            raw = llm.generate(prompts, sps, use_tqdm=False)
            outs = [_out(o) for o in raw]
            if job.get("stats"):  # per-request S2D2 counters (vllm_s2d2.request_stats)
                from vllm_s2d2 import request_stats

                got = request_stats(llm, [o.request_id for o in raw])
                for o, d in zip(raw, outs):
                    d["s2d2_stats"] = got.get(o.request_id)
        elif job["mode"] == "abort":
            engine = llm.llm_engine
            ids = [f"{job['name']}-{i}" for i in range(len(prompts))]
            for rid, p, s in zip(ids, prompts, sps):
                engine.add_request(rid, p, s)
            done: dict = {}
            steps = 0
            while engine.has_unfinished_requests():
                for o in engine.step():
                    if o.finished:
                        done[o.request_id] = _out(o)
                steps += 1
                if steps == job["abort_after_steps"]:
                    engine.abort_request([ids[i] for i in job["abort"]])
            outs = [done.get(rid, {"token_ids": None, "finish_reason": "abort"}) for rid in ids]
        elif job["mode"] == "staggered":
            engine = llm.llm_engine
            ids = [f"{job['name']}-{i}" for i in range(len(prompts))]
            order = sorted(range(len(ids)), key=lambda i: job["arrive"][i])
            done = {}
            steps = 0
            while order or engine.has_unfinished_requests():
                while order and job["arrive"][order[0]] <= steps:
                    i = order.pop(0)
                    engine.add_request(ids[i], prompts[i], sps[i])
                for o in engine.step():
                    if o.finished:
                        done[o.request_id] = _out(o)
                steps += 1
            outs = [done[rid] for rid in ids]
        else:
            raise ValueError(job["mode"])
        result[job["name"]] = outs
        result[job["name"] + "_s"] = time.time() - t
    if spec.get("count_cudagraph_modes"):
        result["cudagraph_dispatch"] = llm.collective_rpc(_read_dispatch)[0]
    return result


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    res = run(spec)
    with open(sys.argv[2], "w") as f:
        json.dump(res, f)
