"""Offline throughput of block-diffusion decoding in vLLM 0.26 (ISSUE 3 item 6).

A random-weight checkpoint with SDAR-1.7B's shapes (``MODELS.md`` §2.2: hidden 2048, 28 layers, 16 / 8 heads,
head_dim 128, intermediate 6144, vocab 151936, untied head; bf16; vLLM ``load_format="dummy"``), prompts of
128 random tokens, 256 new tokens (``ignore_eos``), greedy, batch 1 / 16 / 64 / 256, four modes:

* ``a``  vLLM's own AR decode of the same shapes as a ``Qwen3ForCausalLM`` (stock config: FULL+PIECEWISE
  CUDA graphs, async scheduling);  all modes capture graphs at the same token counts (``--capture-sizes``,
  covering every decode shape up to batch 256 x canvas 8);
* ``b``  the plugin in AR mode (``block_size=1``: canvas 2, one token per forward);
* ``c``  the plugin, static remasking, block 4 / 4 steps;
* ``d``  the plugin, dynamic remasking, threshold 0.85 (same engine as ``c``, per-request ``extra_args``);
* ``s h u m v``  S2D2 on the same engine (dynamic 0.85 + verification, per request): Config-A
  (``score_threshold``), ``score_hysteresis``, ``contextual_bandit_ucb``, ``mask_span_length`` (min span 2) and
  always-verify (min span 1).  Their rows add the plugin's counters: verify rate (verify / draft steps) and
  acceptance rate (accepted / proposed span tokens).

Each mode runs in its own process.  Requests are driven through ``LLMEngine.step`` so every engine step (= one
model forward) is timed: ``step_ms_median`` is the median step time over the run (decode steps dominate),
``forwards_per_s`` = steps / s, ``tokens_per_forward`` = output tokens / (steps x batch) (per request).  With
random weights the distributions are flat, so dynamic remasking rarely clears 0.85 (``d`` ~ ``c``): the
tokens-per-forward numbers of block diffusion need a trained checkpoint; the step-cost comparison does not.

Engine III families (``--family fast-1.5b | fast-7b | llada2-mini``): the same measurement at the real shapes of
Fast-dLLM v2 1.5B / 7B and LLaDA2-mini, modes ``a`` (vLLM AR of the base architecture: ``Qwen2ForCausalLM`` /
``BailingMoeV2ForCausalLM``), ``t`` (threshold baseline), ``s`` (S2D2, family default), ``v`` (always verify).

Usage (GPU host): ``python benchmarks/offline_throughput.py --out benchmarks/results/offline_throughput.json``.
An engine of this size takes ~1.5-2 min to start (torch.compile + graph capture), so under the device's 10-minute
call limit run the groups in separate calls: ``--modes a --merge``, ``--modes b --merge``, ``--modes cd --merge``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

SDAR_1P7B = {
    "architectures": ["SDARForCausalLM"], "model_type": "sdar", "vocab_size": 151936, "hidden_size": 2048,
    "intermediate_size": 6144, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
    "head_dim": 128, "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000, "rope_scaling": None, "attention_bias": False, "use_sliding_window": False,
    "max_window_layers": 28, "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151643,
    "block_size": 4, "mask_token_id": 151669, "torch_dtype": "bfloat16",
}
MODES = {
    "a": {"arch": "ar", "spec": None, "extra": None, "label": "vLLM AR (Qwen3ForCausalLM)"},
    "b": {"arch": "bd", "spec": {"method": "s2d2", "verify": False, "block_size": 1}, "extra": None,
          "label": "plugin AR mode (block 1)"},
    "c": {"arch": "bd", "spec": {"method": "s2d2", "verify": False, "block_size": 4, "denoising_steps": 4},
          "extra": {"s2d2": {"remasking": "low_confidence_static"}}, "label": "plugin static, block 4 / 4 steps"},
    "d": {"arch": "bd", "spec": {"method": "s2d2", "verify": False, "block_size": 4, "denoising_steps": 4},
          "extra": {"s2d2": {"remasking": "low_confidence_dynamic", "confidence_threshold": 0.85}},
          "label": "plugin dynamic, threshold 0.85"},
}
# S2D2 (Engine II): the same engine as c/d, verification switched on per request.
_S2D2 = {"remasking": "low_confidence_dynamic", "confidence_threshold": 0.85, "verify": True}
for _key, _label, _opts in (
        ("s", "S2D2 Config-A (score_threshold)", {"preset": "sdar-a"}),
        ("h", "S2D2 score_hysteresis", {"verify_policy": "score_hysteresis", "score_type": "difference_dynamic"}),
        ("u", "S2D2 contextual_bandit_ucb", {"verify_policy": "contextual_bandit_ucb"}),
        ("m", "S2D2 mask_span_length (min 2)", {"verify_policy": "mask_span_length", "min_span_length": 2}),
        ("v", "S2D2 always verify (min span 1)", {"verify_policy": "mask_span_length", "min_span_length": 1})):
    MODES[_key] = {"arch": "bd", "spec": MODES["c"]["spec"], "extra": {"s2d2": {**_S2D2, **_opts}},
                   "label": _label}


# Engine III families at their real shapes (MODELS.md §3.2, §4.2), next to vLLM's AR decode of the base
# architecture (same weights layout: Qwen2ForCausalLM / BailingMoeV2ForCausalLM).  Modes: a = vLLM AR,
# t = threshold baseline (the family's unmasking rule, no verification), s = S2D2 with the family's paper
# default (Fast-dLLM v2 Config-A / LLaDA2.1 conservative routing), v = always verify.
_FAST = {"architectures": ["Fast_dLLM_QwenForCausalLM"], "model_type": "Fast_dLLM_Qwen", "hidden_act": "silu",
         "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
         "use_sliding_window": False, "bd_size": 32, "mask_token_id": 151665, "bos_token_id": 151643,
         "eos_token_id": 151645, "torch_dtype": "bfloat16"}
FAMILIES = {
    "sdar-1.7b": {"bd": SDAR_1P7B, "ar": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"},
                  "drop": ("block_size", "mask_token_id"), "model": "SDAR-1.7B shapes"},
    "fast-1.5b": {"bd": dict(_FAST, vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                             num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                             max_window_layers=28, layer_types=["full_attention"] * 28, tie_word_embeddings=True),
                  "ar": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"},
                  "drop": ("bd_size", "mask_token_id"), "model": "Fast-dLLM v2 1.5B shapes (Qwen2.5-1.5B)"},
    "fast-7b": {"bd": dict(_FAST, vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                           num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                           max_window_layers=28, layer_types=["full_attention"] * 28, tie_word_embeddings=False),
                "ar": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"},
                "drop": ("bd_size", "mask_token_id"), "model": "Fast-dLLM v2 7B shapes (Qwen2.5-7B)"},
    # LLaDA2.0/2.1-mini (MODELS.md §4.2)
    "llada2-mini": {"bd": {"architectures": ["LLaDA2MoeModelLM"], "model_type": "llada2_moe", "vocab_size": 157184,
                           "hidden_size": 2048, "intermediate_size": 5120, "num_hidden_layers": 20,
                           "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 128,
                           "num_experts": 256, "num_experts_per_tok": 8, "num_shared_experts": 1, "n_group": 8,
                           "topk_group": 4, "routed_scaling_factor": 2.5, "moe_intermediate_size": 512,
                           "first_k_dense_replace": 1, "norm_topk_prob": True, "score_function": "sigmoid",
                           "moe_router_enable_expert_bias": True, "router_dtype": "fp32", "use_qk_norm": True,
                           "use_rmsnorm": True, "partial_rotary_factor": 0.5, "rotary_dim": 64,
                           "rope_theta": 600000, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
                           "tie_word_embeddings": False, "hidden_act": "silu", "block_size": 32,
                           "mask_token_id": 156895, "pad_token_id": 156892, "eos_token_id": 156892,
                           "torch_dtype": "bfloat16"},
                    "ar": {"architectures": ["BailingMoeV2ForCausalLM"]},
                    "drop": ("block_size", "mask_token_id"), "model": "LLaDA2-mini shapes (16B MoE, 1.4B active)"},
}
_FAMILY_MODES = {
    "a": {"arch": "ar", "spec": None, "extra": None, "label": "vLLM AR (base architecture)"},
    "t": {"arch": "bd", "spec": {"method": "s2d2"}, "extra": {"s2d2": {"verify": False}},
          "label": "plugin threshold baseline (family default, no verification)"},
    "s": {"arch": "bd", "spec": {"method": "s2d2"}, "extra": {"s2d2": {"verify": True}},
          "label": "S2D2, family default policy"},
    "v": {"arch": "bd", "spec": {"method": "s2d2"},
          "extra": {"s2d2": {"verify": True, "verify_policy": "mask_span_length", "min_span_length": 1}},
          "label": "S2D2 always verify (min span 1)"},
}


def modes_of(family: str) -> dict:
    return MODES if family == "sdar-1.7b" else _FAMILY_MODES


def write_checkpoints(root: str, family: str = "sdar-1.7b") -> dict[str, str]:
    fam = FAMILIES[family]
    paths = {}
    for arch in ("bd", "ar"):
        cfg = dict(fam["bd"])
        if arch == "ar":
            cfg.update(fam["ar"])
            for k in fam["drop"]:
                cfg.pop(k, None)
        d = os.path.join(root, arch)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(cfg, f)
        paths[arch] = d
    return paths


def run_worker(model: str, modes: list[str], batches: list[int], prompt_len: int, new_tokens: int,
               capture_sizes: list[int], family: str = "sdar-1.7b") -> dict:
    """Inside the worker process: one engine, the given modes (sharing it), every batch size.

    The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so that one ``LLMEngine.step``
    is exactly one scheduler step = one model forward (with the default multiprocess core, ``step`` returns
    per *output batch*, and block-diffusion draft steps emit nothing, so forwards would be undercounted)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import numpy as np
    from vllm import LLM, SamplingParams

    table = modes_of(family)
    spec = table[modes[0]]["spec"]
    t0 = time.time()
    llm = LLM(model=model, skip_tokenizer_init=True, load_format="dummy", dtype="bfloat16",
              speculative_config=spec, max_model_len=prompt_len + new_tokens + 64, max_num_seqs=max(batches),
              gpu_memory_utilization=0.85, seed=0,
              compilation_config={"cudagraph_capture_sizes": capture_sizes})
    startup = time.time() - t0
    engine = llm.llm_engine
    rng = np.random.default_rng(0)
    out = {}
    for mode in modes:
        extra = table[mode]["extra"]
        kw = dict(max_tokens=new_tokens, ignore_eos=True, temperature=0.0)
        if extra:
            kw["extra_args"] = extra
        sp = SamplingParams(**kw)
        # warm-up (compiles Triton variants for this mode's shapes)
        llm.generate([{"prompt_token_ids": rng.integers(0, 150000, prompt_len).tolist()}],
                     SamplingParams(**{**kw, "max_tokens": 16}), use_tqdm=False)
        for bs in batches:
            for i in range(bs):
                engine.add_request(f"{mode}-{bs}-{i}", {"prompt_token_ids": rng.integers(0, 150000, prompt_len)
                                                        .tolist()}, sp)
            steps, times, tokens = 0, [], 0
            before = _s2d2_totals(llm)
            t_start = time.perf_counter()
            while engine.has_unfinished_requests():
                t = time.perf_counter()
                for o in engine.step():
                    if o.finished:
                        tokens += len(o.outputs[0].token_ids)
                times.append(time.perf_counter() - t)
                steps += 1
            elapsed = time.perf_counter() - t_start
            s2d2 = _stats_delta(before, _s2d2_totals(llm))
            out[f"{mode}/{bs}"] = {
                "mode": mode, "label": table[mode]["label"], "batch": bs, "elapsed_s": elapsed,
                "steps": steps, "output_tokens": tokens, "output_tokens_per_s": tokens / elapsed,
                "forwards_per_s": steps / elapsed, "tokens_per_forward": tokens / max(1, steps * bs),
                "step_ms_median": 1e3 * float(np.median(times)), "step_ms_mean": 1e3 * elapsed / steps,
                **s2d2,
            }
            print(json.dumps(out[f"{mode}/{bs}"]), flush=True)
    out["_startup_s"] = startup
    out["_cudagraph_mode"] = str(engine.vllm_config.compilation_config.cudagraph_mode)
    return out


def _s2d2_totals(llm) -> dict | None:
    """The plugin's engine-wide S2D2 counters (None for vLLM's own engine)."""
    def read(worker):
        # vLLM's own models may run on the V1 GPUModelRunner, which has no model_state
        st = getattr(getattr(worker.model_runner, "model_state", None), "stepper", None)
        return None if st is None else st.host_totals()
    return llm.collective_rpc(read)[0]


def _stats_delta(before: dict | None, after: dict | None) -> dict:
    """Counters of one run: verify rate = verify steps / draft steps, acceptance = accepted / proposed span
    tokens."""
    from vllm_s2d2.engine.stats import counter_delta, derived

    if before is None or after is None:
        return {}
    d = counter_delta(before, after)
    rates = derived(d)
    return {"s2d2_counters": d, "verify_rate": rates["verify_rate"], "acceptance_rate": rates["acceptance_rate"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/offline_throughput.json")
    ap.add_argument("--batches", default="1,16,64,256")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--family", default="sdar-1.7b", choices=sorted(FAMILIES),
                    help="model shapes; the non-SDAR families have modes a (vLLM AR), t, s, v")
    ap.add_argument("--modes", default=None, help="comma-separated engine groups (modes sharing an engine); "
                    "default a,b,cd (SDAR) or a,tsv (other families)")
    ap.add_argument("--commit", default=os.environ.get("COMMIT", "unknown"))
    ap.add_argument("--timeout", type=int, default=420, help="per-engine timeout (s)")
    ap.add_argument("--merge", action="store_true", help="update an existing --out file (run groups separately)")
    ap.add_argument("--capture-sizes", default="1,2,4,8,16,32,64,128,256,512,1024,2048",
                    help="CUDA-graph capture sizes (tokens) for every mode: the decode shapes of all batches")
    ap.add_argument("--_worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.modes is None:
        args.modes = "a,b,cd" if args.family == "sdar-1.7b" else "a,tsv"
    if args._worker:
        model, modes = args._worker
        res = run_worker(model, list(modes), batches, args.prompt_len, args.new_tokens,
                         [int(x) for x in args.capture_sizes.split(",")], args.family)
        print("BENCH_JSON=" + json.dumps(res), flush=True)
        return

    root = tempfile.mkdtemp(prefix="s2d2_bench_")
    paths = write_checkpoints(root, args.family)
    results: dict = {}
    errors: dict = {}
    if args.merge and os.path.exists(args.out):  # groups may run in separate calls (10-min device limit)
        with open(args.out) as f:
            old = json.load(f)
        results, errors = old.get("results", {}), old.get("errors", {})
        for key, engine in results.items():  # groups from an earlier call keep the commit they ran at
            if key.startswith("_engine_"):
                engine.setdefault("commit", old.get("commit", "unknown"))
    for group in args.modes.split(","):
        model = paths[modes_of(args.family)[group[0]]["arch"]]
        cmd = [sys.executable, os.path.abspath(__file__), "--family", args.family, "--batches", args.batches,
               "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
               "--capture-sizes", args.capture_sizes, "--_worker", model, group]
        with tempfile.TemporaryFile("w+") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
            try:
                stdout, _ = proc.communicate(timeout=args.timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the engine-core grandchild holds the GPU memory
                stdout, _ = proc.communicate()
                err.seek(0)
                errors[group] = f"timeout after {args.timeout}s: {err.read()[-3000:]}"
                _write(args, batches, results, errors)
                continue
            err.seek(0)
            line = [ln for ln in stdout.splitlines() if ln.startswith("BENCH_JSON=")]
            if not line:
                errors[group] = err.read()[-4000:]
            else:
                res = json.loads(line[-1][len("BENCH_JSON="):])
                results[f"_engine_{group}"] = {"startup_s": res.pop("_startup_s"),
                                               "cudagraph_mode": res.pop("_cudagraph_mode"), "commit": args.commit}
                results.update(res)
                errors.pop(group, None)
        _write(args, batches, results, errors)
    _write(args, batches, results, errors)


def _write(args, batches, results, errors) -> None:
    import torch
    import vllm

    ratios = {}
    base_mode = "c" if args.family == "sdar-1.7b" else "t"
    for bs in batches:
        a, c = results.get(f"a/{bs}"), results.get(f"{base_mode}/{bs}")
        if a and c:
            ratios[str(bs)] = c["step_ms_median"] / a["step_ms_median"]
    commits = sorted({e.get("commit", args.commit) for k, e in results.items() if k.startswith("_engine_")})
    record = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "no-cuda",
        "vllm": vllm.__version__, "torch": torch.__version__,
        "commit": ",".join(commits) if commits else args.commit,  # per group: results["_engine_<group>"]["commit"]
        "model": f"random weights, {FAMILIES[args.family]['model']} (bf16, load_format=dummy)",
        "family": args.family,
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "batches": batches,
        "results": results, f"step_cost_ratio_{base_mode}_over_a": ratios, "target_ratio": 1.15, "errors": errors,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    print(json.dumps({"ratios": ratios, "errors": list(errors)}, indent=1), flush=True)


if __name__ == "__main__":
    main()
