"""Offline throughput of block-diffusion decoding in vLLM 0.26, against vLLM's own AR decode of the same weights.

A random-weight checkpoint (vLLM ``load_format="dummy"``, bf16) with a real model's shapes (``--family``):

* ``sdar-1.7b`` (default): SDAR-1.7B -- hidden 2048, 28 layers, 16 / 8 heads, head_dim 128, intermediate 6144,
  vocab 151936, untied head (docs/families.md); modes

  * ``a``  vLLM's own AR decode of the same shapes as a ``Qwen3ForCausalLM`` (stock config: FULL+PIECEWISE CUDA
    graphs, async scheduling) -- the **baseline**;
  * ``b``  the plugin in AR mode (``block_size=1``: canvas 2, one token per forward);
  * ``c``  the plugin, static remasking, block 4 / 4 steps;
  * ``d``  the plugin, dynamic remasking, threshold 0.85 (same engine as ``c``, per-request ``extra_args``);
  * ``s h u m v``  S2D2 on the same engine as ``c`` (dynamic 0.85 + verification, per request): Config-A
    (``score_threshold``), ``score_hysteresis``, ``contextual_bandit_ucb``, ``mask_span_length`` (min span 2)
    and always-verify (min span 1);
  * ``C D V``  ``c``, ``d`` and ``v`` with the plain decode step (``VLLM_S2D2_COMPILE_STEP=0``; by default the
    step's integer stages are compiled, ``vllm_s2d2/engine/compiled_step.py``): group them as ``CDV`` (one engine
    of their own).  Records before that default (df7db22) have ``C D V`` the other way round, compiled with ``=1``
    against a plain default; every record lists each mode's ``env``;
  * ``x y z``  ``c``, ``d`` and ``v`` with the step's floating-point middle compiled too
    (``VLLM_S2D2_COMPILE_CORE=1``, experimental): group them as ``xyz``;

* ``fast-1.5b`` / ``fast-7b`` / ``llada2-mini``: Fast-dLLM v2 1.5B / 7B and LLaDA2-mini shapes, modes ``a`` (vLLM
  AR of the base architecture: ``Qwen2ForCausalLM`` / ``BailingMoeV2ForCausalLM``), ``t`` (threshold baseline =
  the family default without verification), ``s`` (S2D2, family default policy), ``v`` (always verify).

Prompts of 128 random tokens, 256 new tokens (``ignore_eos``), greedy.  ``--modes`` lists *engine groups*: the
modes of one group share one engine (they differ per request); every group runs in its own process (one fresh
engine each, its GPU memory released when the process exits).  **The baseline ``a`` always runs in the same call**
(added as the first group when ``--modes`` lacks it): ratios are computed only between rows of one call, never
across calls (``bench_records.ratios_vs_baseline`` refuses rows of different calls), and the record carries the
call's id, commit, device and versions (``bench_records.run_metadata``); every row names its call.

Requests are driven through ``LLMEngine.step`` (engine core in this process, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``)
so every step is one scheduler step = one model forward and is timed.  Per (mode, batch size):
``output_tokens_per_s``, ``step_ms_median`` (decode steps dominate), ``tokens_per_forward`` = output tokens /
the forwards the plugin's S2D2 counters give (per request: draft + verify steps; ``vllm_s2d2.request_stats``;
1 for vLLM's AR decode), and against the baseline of the same batch size ``step_time_ratio`` (median step time
/ the baseline's) and ``output_tokens_per_s_ratio``.  With random weights the distributions are flat, so the
tokens per forward of block diffusion need a trained checkpoint; the step-cost comparison does not.

Usage (GPU host; an engine of these sizes takes ~1.5-2 min to start, and a device call may run 10 minutes, so
run the baseline plus one or two groups per call, each call to its own file)::

    COMMIT=<hash> python benchmarks/offline_throughput.py --modes a,cd --out $OUT/offline_sdar_cd.json
    COMMIT=<hash> python benchmarks/offline_throughput.py --family fast-1.5b --modes a,tsv --batches 1,16,64 \
        --out $OUT/offline_fast-1.5b.json
    python benchmarks/offline_throughput.py --replot RECORD.json        # redraw the PNG of a record

Writes the JSON record (``--out``) after every group and a PNG beside it (output tokens/s, step-time ratio and
tokens per forward against batch size; only if matplotlib is installed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_records as rec  # noqa: E402

from vllm_s2d2.log import ArgumentParser, int_arg, int_list_arg  # noqa: E402 - stdlib only

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
# S2D2: the same engine as c/d, verification switched on per request.
_S2D2 = {"remasking": "low_confidence_dynamic", "confidence_threshold": 0.85, "verify": True}
for _key, _label, _opts in (
        ("s", "S2D2 Config-A (score_threshold)", {"preset": "sdar-a"}),
        ("h", "S2D2 score_hysteresis", {"verify_policy": "score_hysteresis", "score_type": "difference_dynamic"}),
        ("u", "S2D2 contextual_bandit_ucb", {"verify_policy": "contextual_bandit_ucb"}),
        ("m", "S2D2 mask_span_length (min 2)", {"verify_policy": "mask_span_length", "min_span_length": 2}),
        ("v", "S2D2 always verify (min span 1)", {"verify_policy": "mask_span_length", "min_span_length": 1})):
    MODES[_key] = {"arch": "bd", "spec": MODES["c"]["spec"], "extra": {"s2d2": {**_S2D2, **_opts}},
                   "label": _label}
# The same engines with the plain step: its integer stages not compiled (vllm_s2d2/engine/compiled_step.py).
for _key in "cdv":
    MODES[_key.upper()] = {**MODES[_key], "env": {"VLLM_S2D2_COMPILE_STEP": "0"},
                           "label": MODES[_key]["label"] + ", plain step (not compiled)"}
# ... and with the step's floating-point middle compiled too (VLLM_S2D2_COMPILE_CORE=1, experimental).
for _key, _new in zip("cdv", "xyz"):
    MODES[_new] = {**MODES[_key], "env": {"VLLM_S2D2_COMPILE_CORE": "1"},
                   "label": MODES[_key]["label"] + ", model math compiled too"}


# The other families at their real shapes (docs/families.md), next to vLLM's AR decode of the base
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
    # LLaDA2.0/2.1-mini (docs/families.md): 16B MoE, 1.4B active
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


def mode_env(mode: dict) -> dict | None:
    """The environment of a mode's engine process: this one's plus the mode's ``env`` (None: inherit as is)."""
    return {**os.environ, **mode["env"]} if mode.get("env") else None


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


ROW_FIELDS = ("output_tokens_per_s", "tokens_per_forward", "step_ms_median", "verify_rate", "acceptance_rate")
TARGET_STEP_TIME_RATIO = 1.15  # goal for mode c (SDAR static B = S = 4) against a: a step within 15% of vLLM's


def groups_of(modes_arg: str | None, family: str) -> list[str]:
    """The engine groups of one call (``--modes``), the baseline group ``a`` first; unknown modes and groups that
    mix the two architectures are refused."""
    table = modes_of(family)
    default = "a,b,cd" if family == "sdar-1.7b" else "a,tsv"
    groups = [g.strip() for g in (modes_arg or default).split(",") if g.strip()]
    for g in groups:
        unknown = [m for m in g if m not in table]
        if unknown:
            raise ValueError(f"unknown mode(s) {unknown} for family {family}; valid: {sorted(table)}")
    groups = rec.with_baseline(groups)
    for g in groups:
        archs = {table[m]["arch"] for m in g}
        if len(archs) != 1:
            raise ValueError(f"group {g!r} mixes architectures {sorted(archs)}: modes of one group share an engine")
        specs = {json.dumps([table[m]["spec"], table[m].get("env")], sort_keys=True) for m in g}
        if len(specs) != 1:
            raise ValueError(f"group {g!r} mixes engine configurations: its modes must share one engine")
    return groups


def build_parser() -> argparse.ArgumentParser:
    # one-line errors (exit 2) naming the argument, the value and what is allowed (vllm_s2d2/log.py)
    ap = ArgumentParser(prog="benchmarks/offline_throughput.py", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/offline_throughput.json")
    ap.add_argument("--batches", default="1,16,64,256", type=int_list_arg(1, as_text=True),
                    help="comma-separated batch sizes (>= 1)")
    ap.add_argument("--prompt-len", type=int_arg(1), default=128)
    ap.add_argument("--new-tokens", type=int_arg(1), default=256)
    ap.add_argument("--family", default="sdar-1.7b", choices=sorted(FAMILIES),
                    help="model shapes; the non-SDAR families have modes a (vLLM AR), t, s, v")
    ap.add_argument("--modes", default=None, help="comma-separated engine groups (the modes of a group share one "
                    "engine); the baseline a is always run first; default a,b,cd (SDAR) or a,tsv (others)")
    ap.add_argument("--timeout", type=int_arg(1), default=420, help="per-engine timeout (s)")
    ap.add_argument("--capture-sizes", default="1,2,4,8,16,32,64,128,256,512,1024,2048",
                    type=int_list_arg(1, as_text=True),
                    help="CUDA-graph capture sizes (tokens) for every mode: the decode shapes of all batches")
    ap.add_argument("--replot", metavar="JSON", help="only redraw the PNG of an existing record")
    ap.add_argument("--merge", action="store_true", help=argparse.SUPPRESS)  # removed: see main()
    ap.add_argument("--_worker", nargs=3, metavar=("MODEL", "GROUP", "CALL_ID"), help=argparse.SUPPRESS)
    return ap


def require_gpu(prog: str) -> None:
    """One line and exit code 2, before any engine starts, where this host cannot run vLLM engines."""
    import importlib.util

    why = None
    if importlib.util.find_spec("vllm") is None:
        why = "vLLM is not installed (pip install -e \".[vllm,test]\")"
    else:
        import torch

        if not torch.cuda.is_available():
            why = "no CUDA GPU is visible (the engines run on a GPU host)"
    if why:
        print(f"{prog}: error: {why}; --replot RECORD.json works anywhere", file=sys.stderr)
        sys.exit(2)


def read_record(ap: argparse.ArgumentParser, path: str) -> dict:
    """The JSON record ``--replot`` names, or a one-line argument error."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        ap.error(f"argument --replot: cannot read a JSON record from {path!r} ({e})")
    if not isinstance(record, dict):
        ap.error(f"argument --replot: {path!r} holds no JSON object (a record written by this benchmark)")
    return record


def replot(ap: argparse.ArgumentParser, path: str, plot_fn) -> None:
    """``--replot``: redraw the PNG beside the record ``path`` with ``plot_fn(record, png_path)``."""
    record = read_record(ap, path)
    print("wrote" if plot_fn(record, os.path.splitext(path)[0] + ".png") else "no plot", flush=True)


# -- worker (one engine, one process) -----------------------------------------------------------------------
def run_worker(model: str, modes: list[str], batches: list[int], prompt_len: int, new_tokens: int,
               capture_sizes: list[int], family: str, call_id: str) -> dict:
    """Inside the worker process: one engine, the given modes (sharing it), every batch size.

    The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so that one ``LLMEngine.step``
    is exactly one scheduler step = one model forward (with the default multiprocess core, ``step`` returns
    per *output batch*, and block-diffusion draft steps emit nothing, so forwards would be undercounted)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import numpy as np
    import torch
    from vllm import LLM, SamplingParams

    table = modes_of(family)
    spec = table[modes[0]]["spec"]
    plugin = table[modes[0]]["arch"] == "bd"
    t0 = time.time()
    llm = LLM(model=model, skip_tokenizer_init=True, load_format="dummy", dtype="bfloat16",
              speculative_config=spec, max_model_len=prompt_len + new_tokens + 64, max_num_seqs=max(batches),
              gpu_memory_utilization=0.85, seed=0,
              compilation_config={"cudagraph_capture_sizes": capture_sizes})
    engine_info = {"startup_s": time.time() - t0, "device": torch.cuda.get_device_name(),
                   "cudagraph_mode": str(llm.llm_engine.vllm_config.compilation_config.cudagraph_mode),
                   "call_id": call_id, "modes": list(modes)}
    engine = llm.llm_engine
    rng = np.random.default_rng(0)
    rows = []
    for mode in modes:
        extra = table[mode]["extra"]
        kw = dict(max_tokens=new_tokens, ignore_eos=True, temperature=0.0)
        if extra:
            kw["extra_args"] = extra
        sp = SamplingParams(**kw)
        # warm-up (compiles Triton variants for this mode's shapes)
        llm.generate([{"prompt_token_ids": rng.integers(0, 150000, prompt_len).tolist()}],
                     SamplingParams(**{**kw, "max_tokens": 16}), use_tqdm=False)
        _flush(engine)
        if plugin:
            _pop_counters(llm, None)  # drop the warm-up request's counters
        for bs in batches:
            ids = [f"{mode}-{bs}-{i}" for i in range(bs)]
            for rid in ids:
                engine.add_request(rid, {"prompt_token_ids": rng.integers(0, 150000, prompt_len).tolist()}, sp)
            steps, times, per_request = 0, [], {}
            t_start = time.perf_counter()
            while engine.has_unfinished_requests():
                t = time.perf_counter()
                for o in engine.step():
                    if o.finished:
                        per_request[o.request_id] = len(o.outputs[0].token_ids)
                times.append(time.perf_counter() - t)
                steps += 1
            elapsed = time.perf_counter() - t_start
            tokens = sum(per_request.values())
            _flush(engine)  # (untimed) the worker records a finished request's counters when it drops it
            row = {"mode": mode, "label": table[mode]["label"], "batch": bs, "call_id": call_id,
                   "elapsed_s": elapsed, "steps": steps, "output_tokens": tokens,
                   "output_tokens_per_s": tokens / elapsed, "engine_steps_per_s": steps / elapsed,
                   "step_ms_median": 1e3 * float(np.median(times)), "step_ms_mean": 1e3 * elapsed / steps,
                   "step_ms_p90": 1e3 * float(np.percentile(times, 90))}
            row.update(forward_stats(per_request, _pop_counters(llm, ids) if plugin else None, plugin))
            rows.append(row)
            print(json.dumps(row), flush=True)
    return {"engine": engine_info, "rows": rows}


def _flush(engine) -> None:
    """One more (empty) engine step after a run: vLLM sends the ids of finished requests to the worker with the
    *next* scheduler output, and an in-process engine core steps only when asked, so without it the worker
    would drop (and the plugin record the counters of) the last requests only during the next run."""
    engine.step()


def _pop_counters(llm, request_ids: list[str] | None) -> dict[str, dict] | str:
    """The S2D2 counters of the given finished requests (all, for None), cleared in the worker; or the error text
    when the plugin's worker extension did not answer."""
    from vllm_s2d2 import request_stats

    try:
        return request_stats(llm, request_ids)
    except Exception as e:  # noqa: BLE001 - recorded in the row
        return f"{type(e).__name__}: {e}"[:500]


COUNTER_NAMES = ("draft_steps", "verify_steps", "proposed_tokens", "accepted_tokens", "committed_blocks",
                 "verify_restarts")


def forward_stats(tokens: dict[str, int], counters: dict[str, dict] | str | None, plugin: bool) -> dict:
    """Tokens per forward and the S2D2 rates of one run, from each request's output length (``tokens``) and its
    S2D2 counters (``counters``, by request id).  Plugin modes: forwards = the requests' draft + verify steps
    (a block's commit is fused into the next draft), over the requests that returned counters; vLLM's AR decode
    makes one token per request per forward, so 1."""
    if not plugin:
        return {"tokens_per_forward": 1.0, "tokens_per_forward_source": "vLLM AR: one token per forward"}
    if not isinstance(counters, dict):
        return {"tokens_per_forward": None, "tokens_per_forward_source": None, "s2d2_error": counters}
    found = [r for r in tokens if r in counters]
    total = {n: sum(int(counters[r].get(n, 0)) for r in found) for n in COUNTER_NAMES}
    forwards = total["draft_steps"] + total["verify_steps"]
    return {"tokens_per_forward": sum(tokens[r] for r in found) / forwards if forwards else None,
            "tokens_per_forward_source": "output tokens / (draft + verify steps), S2D2 counters per request",
            "requests_with_counters": len(found), "s2d2_counters": total,
            "verify_rate": total["verify_steps"] / max(1, total["draft_steps"]),
            "acceptance_rate": total["accepted_tokens"] / max(1, total["proposed_tokens"])}


# -- driver --------------------------------------------------------------------------------------------------
def new_record(args, groups: list[str], call: dict) -> dict:
    table = modes_of(args.family)
    return {
        "benchmark": "offline_throughput", "schema": 2, "call": call,
        "model": f"random weights, {FAMILIES[args.family]['model']} (bf16, load_format=dummy)",
        "family": args.family, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "batches": rec.parse_int_list(args.batches), "groups": groups, "baseline": rec.BASELINE_MODE,
        "modes": {m: {k: table[m].get(k) for k in ("label", "spec", "extra", "env")} for g in groups for m in g},
        "capture_sizes": rec.parse_int_list(args.capture_sizes),
        "target_step_time_ratio": {"mode": "c", "max": TARGET_STEP_TIME_RATIO} if args.family == "sdar-1.7b"
        else None,
        "engines": {}, "results": {}, "ratios_vs_baseline": {}, "per_batch": {}, "errors": {},
    }


def finish(record: dict) -> dict:
    """Fill ``ratios_vs_baseline`` and ``per_batch`` from the rows (one call: see ``ratios_vs_baseline``)."""
    rows = list(record["results"].values())
    record["ratios_vs_baseline"] = rec.ratios_vs_baseline(rows, record["baseline"])
    record["per_batch"] = rec.per_batch_table(rows, record["ratios_vs_baseline"], ROW_FIELDS)
    return record


def plot(record: dict, path) -> bool:
    series = rec.mode_series(record, record["results"].values(), ("output_tokens_per_s", "tokens_per_forward"))
    return rec.plot_modes(path, rec.record_title(record),
                          [("output tokens / s", series["output_tokens_per_s"]),
                           ("median step time / vLLM AR's (same call)", series["step_time_ratio"]),
                           ("tokens per forward", series["tokens_per_forward"])], hline={1: 1.0})


def main(argv: list[str] | None = None) -> None:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.merge:
        ap.error("--merge was removed: ratios against vLLM AR are computed only within one call.  Each call runs "
                 "the baseline (mode a) itself; write each call to its own --out")
    if args.replot:
        return replot(ap, args.replot, plot)
    batches = rec.parse_int_list(args.batches)
    capture = rec.parse_int_list(args.capture_sizes)
    if args._worker:
        model, group, call_id = args._worker
        rec.emit_result(run_worker(model, list(group), batches, args.prompt_len, args.new_tokens, capture,
                                   args.family, call_id))
        return
    try:
        groups = groups_of(args.modes, args.family)
    except ValueError as e:
        ap.error(f"argument --modes: {e}")
    require_gpu(ap.prog)
    record = new_record(args, groups, rec.run_metadata())
    call_id = record["call"]["call_id"]
    paths = write_checkpoints(tempfile.mkdtemp(prefix="s2d2_bench_"), args.family)
    for group in groups:
        model = paths[modes_of(args.family)[group[0]]["arch"]]
        cmd = [sys.executable, os.path.abspath(__file__), "--family", args.family, "--batches", args.batches,
               "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
               "--capture-sizes", args.capture_sizes, "--_worker", model, group, call_id]
        res, err = rec.run_worker_process(cmd, args.timeout, mode_env(modes_of(args.family)[group[0]]))
        if res is None:
            record["errors"][group] = err
        else:
            record["engines"][group] = res["engine"]
            for row in res["rows"]:
                record["results"][f"{row['mode']}/{row['batch']}"] = row
        rec.write_json(args.out, finish(record))  # after every group: a killed call keeps what it measured
    png = os.path.splitext(args.out)[0] + ".png"
    record["png"] = os.path.basename(png) if plot(record, png) else None
    rec.write_json(args.out, record)
    print(json.dumps({"call": record["call"], "per_batch": record["per_batch"], "errors": list(record["errors"])},
                     indent=1), flush=True)


if __name__ == "__main__":
    main()
