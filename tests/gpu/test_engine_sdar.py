"""GPU: SDAR / SDAR-MoE block-diffusion decoding inside vLLM 0.26 equals the reference decoder token for token.

Run on the GPU host (``pytest -m gpu tests``).  Tiny random checkpoints (``tests/engine_helpers.py``: real SDAR
tensor names, V = 512, a confident head so greedy decisions have clear margins) are decoded by
``LLM.generate`` (each engine in its own process, ``engine_worker.py``) and by ``vllm_s2d2.reference.generate``
(dense fp32 on the same GPU).  Engines run in fp32 so that the two implementations agree to rounding, and
``engine_worker.py`` sets ``TRITON_F32_DEFAULT=ieee``: Triton's default fp32 ``tl.dot`` is TF32, whose ~1e-3
relative error in the attention scores flipped 2 of 40 near-tied static-remasking confidence rankings in a first
H100 run (the outputs diverged from that token on); with IEEE fp32 dots every run matched exactly.

Covered: greedy; SDAR default (dynamic remasking 0.85, cache_ver + draft_ver) with CUDA graphs (the default
FULL_AND_PIECEWISE: decode steps replay one FULL graph each),
static remasking (per-request ``extra_args``), AR mode (block 1), block-causal caching; batch 1 and 40 concurrent
prompts of mixed lengths (< 1 block, exactly 1 block, several blocks) and mixed ``max_tokens``; stop tokens;
seeded sampling (temperature 1, top-k, top-p); an aborted request does not disturb the others; SDAR-MoE.
FULL graphs against eager (:func:`graphs_vs_eager`, also used by ``test_engine_families.py``): the same jobs --
decode-only batches, seeded sampling, staggered arrivals (prefills join decoding batches: mixed, PIECEWISE steps),
W-token prompts arriving together (uniform prefill steps: FULL graphs with prefill tables) -- give the same tokens
under FULL_AND_PIECEWISE and ``enforce_eager=True``, equal to the reference, and every uniform step got a FULL graph.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from gpu_records import write_record
from gpu_skip import require_cuda

pytestmark = pytest.mark.gpu
torch = require_cuda("vllm")

HERE = os.path.dirname(__file__)
sys.path.insert(0, os.path.dirname(HERE))
from engine_helpers import EOS_ID, build_tiny_checkpoint  # noqa: E402

from vllm_s2d2.configs import load_family_info  # noqa: E402
from vllm_s2d2.engine.compiled_step import ON_MESSAGE as COMPILED_LINE  # noqa: E402
from vllm_s2d2.core.params import SamplingSpec  # noqa: E402
from vllm_s2d2.reference import generate  # noqa: E402
from vllm_s2d2.reference.models import ReferenceModel  # noqa: E402
from vllm_s2d2.s2d2_config import S2D2Config  # noqa: E402

B = 4
# prompt lengths: shorter than a block, exactly one block, several blocks (and off-by-one around them)
LENS = [1, 2, 3, 4, 5, 7, 8, 9, 12, 13, 16, 17, 23, 30]
N_BATCH = 40
STATIC = {"s2d2": {"remasking": "low_confidence_static"}}


def _prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 500, (LENS[i % len(LENS)],), generator=g).tolist() for i in range(n)]


def _sp(max_tokens, temperature=0.0, seed=None, top_k=0, top_p=1.0, stop=None, extra=None):
    kw = dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    if seed is not None:
        kw["seed"] = seed
    if stop is not None:
        kw["stop_token_ids"] = stop
    else:
        kw["ignore_eos"] = True
    if extra:
        kw["extra_args"] = extra
    return kw


def _batch_job(name, seed, *, static_every=0, stop=None):
    prompts = _prompts(N_BATCH, seed)
    sps = [_sp(1 + (7 * i) % 24, stop=stop if (stop and i % 3 == 0) else None,
               extra=STATIC if static_every and i % static_every == 1 else None) for i in range(N_BATCH)]
    return {"name": name, "mode": "batch", "prompts": prompts, "sampling": sps}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_ckpts")
    return {"sdar": build_tiny_checkpoint(str(root / "sdar"), "sdar", seed=1),
            "sdar_moe": build_tiny_checkpoint(str(root / "sdar_moe"), "sdar_moe", seed=2)}


@pytest.fixture(scope="module")
def ref_models(ckpts):
    return {k: (ReferenceModel.load(p, device="cuda", dtype=torch.float32), load_family_info(p))
            for k, p in ckpts.items()}


def engine_log_path(tmp_path) -> str:
    """Where ``run_engine`` writes the log of the engine run in ``tmp_path``: ``$S2D2_GPU_LOG_DIR`` if set."""
    log_dir = os.environ.get("S2D2_GPU_LOG_DIR") or str(tmp_path)
    return os.path.join(log_dir, f"{tmp_path.name}.log")


def run_engine(spec: dict, tmp_path, timeout: int = 200) -> dict:
    """Run one engine in its own process; its log goes to ``engine_log_path(tmp_path)`` as it runs."""
    spec_path, out_path = tmp_path / "spec.json", tmp_path / "out.json"
    spec_path.write_text(json.dumps(spec))
    log_path = engine_log_path(tmp_path)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "engine_worker.py"), str(spec_path),
                                 str(out_path)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the engine-core grandchild too (GPU memory)
            proc.wait()
            pytest.fail(f"engine did not finish within {timeout}s (log: {log_path})")
    if proc.returncode != 0:
        with open(log_path) as f:
            pytest.fail(f"engine failed (rc {proc.returncode}):\n{f.read()[-6000:]}")
    return json.loads(out_path.read_text())


def reference(ref_models, variant, s2d2: dict, prompt, kw) -> list[int]:
    return reference_output(ref_models, variant, s2d2, prompt, kw).token_ids


def reference_output(ref_models, variant, s2d2: dict, prompt, kw):
    """The reference decoder's output (tokens and its ``DecodeStats``) for an engine request's sampling kwargs
    (``extra_args["s2d2"]`` merged into ``s2d2``)."""
    model, info = ref_models[variant]
    cfg = dict(s2d2)
    cfg.pop("method", None)
    if kw.get("extra_args"):
        cfg.update(kw["extra_args"]["s2d2"])
    stops = kw.get("stop_token_ids")
    out = generate(model, info, [prompt], S2D2Config.from_dict(cfg),
                   sampling=SamplingSpec(temperature=kw["temperature"], top_k=kw["top_k"], top_p=kw["top_p"],
                                         seed=kw.get("seed")),
                   max_tokens=kw["max_tokens"], ignore_eos=kw.get("ignore_eos", False),
                   stop_token_ids=stops, device="cuda")
    return out[0]


def compare(ref_models, variant, s2d2, job, outs) -> None:
    bad = []
    for i, (prompt, kw, o) in enumerate(zip(job["prompts"], job["sampling"], outs)):
        if o["finish_reason"] == "abort":
            continue
        want = reference(ref_models, variant, s2d2, prompt, kw)
        if o["token_ids"] != want:
            bad.append(f"#{i} len(prompt)={len(prompt)} {kw}\n  engine    {o['token_ids']}\n  reference {want}")
    assert not bad, f"{len(bad)}/{len(outs)} mismatches in {job['name']}:\n" + "\n".join(bad[:5])


def test_sdar_default_cuda_graphs(ckpts, ref_models, tmp_path):
    """SDAR default (dynamic 0.85, cache_ver, draft_ver) with CUDA graphs; static per request;
    batch 1; 40 concurrent mixed prompts; stop tokens; seeded sampling; abort."""
    s2d2 = {"method": "s2d2", "verify": False}
    single = {"name": "single", "mode": "single", "prompts": _prompts(4, 11),
              "sampling": [_sp(m) for m in (9, 16, 4, 21)]}
    batch = _batch_job("batch", 12, static_every=2, stop=[EOS_ID])
    sampled = {"name": "sampled", "mode": "batch", "prompts": _prompts(12, 13),
               "sampling": [_sp(12, temperature=1.0, top_k=20, top_p=0.9, seed=100 + i) for i in range(12)]}
    abort = {"name": "abort", "mode": "abort", "prompts": _prompts(8, 14), "sampling": [_sp(20) for _ in range(8)],
             "abort_after_steps": 4, "abort": [2, 5]}
    spec = {"model": ckpts["sdar"], "speculative_config": s2d2, "enforce_eager": False,
            "jobs": [single, batch, sampled, abort]}
    res = run_engine(spec, tmp_path)
    assert "FULL_AND_PIECEWISE" in res["cudagraph_mode"], res["cudagraph_mode"]
    for job in (single, batch, sampled, abort):
        compare(ref_models, "sdar", s2d2, job, res[job["name"]])
    assert [o["finish_reason"] for o in res["abort"]].count("abort") == 2
    # stop tokens were exercised: every request that listed the stop id and produced it ends on it
    assert all(o["token_ids"] for o in res["batch"])


@pytest.mark.parametrize("variant,s2d2", [
    ("sdar", {"method": "s2d2", "verify": False, "block_size": 1}),
    ("sdar", {"method": "s2d2", "verify": False, "cache_ver": False, "draft_ver": False,
              "remasking": "low_confidence_static", "denoising_steps": 2}),
    ("sdar_moe", {"method": "s2d2", "verify": False}),
], ids=["ar_block1", "blockcausal_static", "moe_default"])
def test_sdar_eager_variants(ckpts, ref_models, tmp_path, variant, s2d2):
    batch = _batch_job("batch", 21, static_every=3 if variant == "sdar_moe" else 0)
    single = {"name": "single", "mode": "single", "prompts": _prompts(2, 22), "sampling": [_sp(10), _sp(17)]}
    spec = {"model": ckpts[variant], "speculative_config": s2d2, "enforce_eager": True, "jobs": [single, batch]}
    res = run_engine(spec, tmp_path)
    for job in (single, batch):
        compare(ref_models, variant, s2d2, job, res[job["name"]])


# -- FULL CUDA graphs against eager ---------------------------------------------------------------------------
def graph_jobs(prompts, W: int, policies: list[dict], seed: int, vocab: int) -> list[dict]:
    """Decode-only batch (all prompts at once), seeded sampling, staggered arrivals (one request every 2 engine
    steps: prefills join decoding batches), and prompts of exactly W tokens (uniform prefill steps); policies
    cycled per request, every request seeded (stochastic acceptance)."""
    def pol(i):
        return {"s2d2": policies[i % len(policies)]}

    decode = {"name": "decode", "mode": "batch", "prompts": prompts(16, seed),
              "sampling": [_sp(1 + (7 * i) % 24, seed=seed * 100 + i, extra=pol(i)) for i in range(16)]}
    sampled = {"name": "sampled", "mode": "batch", "prompts": prompts(8, seed + 1),
               "sampling": [_sp(12, temperature=1.0, top_k=20, seed=seed * 100 + 30 + i, extra=pol(i))
                            for i in range(8)]}
    staggered = {"name": "staggered", "mode": "staggered", "prompts": prompts(12, seed + 2),
                 "arrive": [2 * i for i in range(12)],
                 "sampling": [_sp(8 + (5 * i) % 16, temperature=1.0 if i % 2 else 0.0, top_k=20 if i % 2 else 0,
                                  seed=seed * 100 + 50 + i, extra=pol(i)) for i in range(12)]}
    g = torch.Generator().manual_seed(seed + 3)
    uniform = {"name": "uniform_prefill", "mode": "batch",
               "prompts": [torch.randint(0, vocab, (W,), generator=g).tolist() for _ in range(6)],
               "sampling": [_sp(6 + 3 * i, seed=seed * 100 + 70 + i, extra=pol(i)) for i in range(6)]}
    return [decode, sampled, staggered, uniform]


def graphs_vs_eager(model: str, s2d2: dict, jobs: list[dict], tmp_path, record: str, test: str,
                    refs=None, variant: str | None = None, graph_env: dict | None = None) -> dict:
    """Run ``jobs`` on the default engine (FULL_AND_PIECEWISE) and with ``enforce_eager=True``: the same tokens
    per request; every uniform step (all queries W long) of the graph engine replayed a FULL graph, and mixed
    steps ran PIECEWISE.  With ``refs``, the graph engine's tokens also equal the reference decoder's.
    ``graph_env``: environment of the graph engine only (the eager one runs the plain step)."""
    res = {}
    for eager in (False, True):
        d = tmp_path / ("eager" if eager else "graphs")
        d.mkdir()
        res[eager] = run_engine({"model": model, "speculative_config": s2d2, "enforce_eager": eager, "jobs": jobs,
                                 "count_cudagraph_modes": True, "env": {} if eager else (graph_env or {})}, d,
                                timeout=400)
    g, e = res[False], res[True]
    write_record(record, test, {"s2d2": s2d2, "graph_env": graph_env or {},
                                "graphs": {k: v for k, v in g.items() if not isinstance(v, list)},
                                "eager": {k: v for k, v in e.items() if not isinstance(v, list)}})
    assert "FULL_AND_PIECEWISE" in g["cudagraph_mode"] and "NONE" in e["cudagraph_mode"], (g["cudagraph_mode"],
                                                                                          e["cudagraph_mode"])
    bad = []
    for job in jobs:
        for i, (a, b) in enumerate(zip(g[job["name"]], e[job["name"]])):
            if a["token_ids"] != b["token_ids"]:
                bad.append(f"{job['name']} #{i} {job['sampling'][i]}\n  graphs {a['token_ids']}\n"
                           f"  eager  {b['token_ids']}")
    assert not bad, f"{len(bad)} requests differ between FULL graphs and eager:\n" + "\n".join(bad[:5])
    counts = g["cudagraph_dispatch"]
    assert counts.get("FULL_uniform", 0) > 0 and counts.get("PIECEWISE", 0) > 0, counts
    assert not counts.get("NONE_uniform") and not counts.get("PIECEWISE_uniform"), counts  # all uniform: FULL
    assert all(k.startswith("NONE") for k in e["cudagraph_dispatch"]), e["cudagraph_dispatch"]
    if refs is not None:
        for job in jobs:
            compare(refs, variant, s2d2, job, g[job["name"]])
    return g


SDAR_POLICIES = [{}, {"verify": False}, {"verify_policy": "mask_span_length", "min_span_length": 2},
                 {"verify": False, "remasking": "low_confidence_static"}]


@pytest.mark.parametrize("variant,s2d2", [
    ("sdar", {"method": "s2d2"}),
    ("sdar", {"method": "s2d2", "verify": False, "cache_ver": False, "draft_ver": False}),
    ("sdar_moe", {"method": "s2d2"}),
], ids=["s2d2", "blockcausal", "moe"])
def test_full_graphs_equal_eager(ckpts, ref_models, tmp_path, request, variant, s2d2):
    policies = SDAR_POLICIES if s2d2.get("verify", True) else [{}, {"remasking": "low_confidence_static"}]
    jobs = graph_jobs(_prompts, 2 * B, policies, 61, 500)
    graphs_vs_eager(ckpts[variant], s2d2, jobs, tmp_path, f"full_graphs_{request.node.callspec.id}",
                    request.node.nodeid, refs=ref_models, variant=variant)


def test_compiled_step_equals_eager(ckpts, ref_models, tmp_path, request):
    """``VLLM_S2D2_COMPILE_STEP=1`` (the step's integer stages compiled by Inductor, inside FULL graphs) gives the
    tokens of the plain eager engine and of the reference decoder (``engine/compiled_step.py``); the record's
    ``graphs.startup_s`` includes the compile time."""
    jobs = graph_jobs(_prompts, 2 * B, SDAR_POLICIES, 62, 500)
    graphs_vs_eager(ckpts["sdar"], {"method": "s2d2"}, jobs, tmp_path, "compiled_step", request.node.nodeid,
                    refs=ref_models, variant="sdar", graph_env={"VLLM_S2D2_COMPILE_STEP": "1"})
    with open(engine_log_path(tmp_path / "graphs")) as f:
        assert COMPILED_LINE in f.read()  # the graph engine really ran the compiled stages


def test_exact_prefill_equals_eager(ckpts, ref_models, tmp_path, request):
    """``VLLM_S2D2_EXACT_PREFILL=1`` (what ``VLLM_BATCH_INVARIANT=1`` turns on: token-causal prefill rows through
    the canvas kernel in W-token chunks, ``engine/attention.py:plan_prefill_chunks``) gives the tokens of the plain
    eager engine and of the reference decoder; the staggered job puts prefill chunks beside decode rows."""
    jobs = graph_jobs(_prompts, 2 * B, SDAR_POLICIES, 63, 500)
    graphs_vs_eager(ckpts["sdar"], {"method": "s2d2"}, jobs, tmp_path, "exact_prefill", request.node.nodeid,
                    refs=ref_models, variant="sdar", graph_env={"VLLM_S2D2_EXACT_PREFILL": "1"})
    with open(engine_log_path(tmp_path / "graphs")) as f:
        assert "exact prefill" in f.read()  # the graph engine really sent its prefill rows through the canvas kernel
