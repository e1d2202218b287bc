"""Speed-quality harness: AR mode, static / dynamic block-diffusion baselines and S2D2 on held-out code.

The model is the trained demo checkpoint (``assets/sdar-stdlib-10m``, a 10.5 M-parameter SDAR-format model
trained on the Python stdlib); the prompts are function headers + docstrings from stdlib modules it never saw
(``heldout_prompts.jsonl`` next to the checkpoint).  For every decoding configuration it reports

* **tokens per forward**, every forward counted (prefill, draft, verify, commit) -- the reference decoder's
  accounting -- and ``tpf_fused``: the same with each block's commit forward fused into the next block's
  first draft, which is what the vLLM engine's 2B canvas does;
* **verify rate** (verify steps / denoising steps) and **acceptance rate** (accepted / proposed draft tokens);
* **quality**: exact match of the first (``em1``) and of the first two (``em2``) non-blank generated lines with
  the source that follows the docstring, ``sim1`` (difflib ratio of the first lines), and the **AR-mode NLL**
  of the generated tokens under the model itself (nats / token, block size 1 = the verifier's distribution).

Backends: ``reference`` (the eager reference decoder, CPU by default; slow but exact) and ``vllm`` (the plugin's
engine on a GPU host: per configuration all prompts in one batch, forwards and acceptance from each request's
S2D2 counters, ``vllm_s2d2.request_stats``; seconds are the batch's wall time shared out per prompt).

    python benchmarks/quality.py --num-prompts 8 --max-tokens 32            # a few minutes on 2 CPU cores
    python benchmarks/quality.py --num-prompts 256 --workers 8 --threads 2  # every prompt (16 cores)
    python benchmarks/quality.py --backend vllm --num-prompts 256           # GPU host with vLLM

Writes ``benchmarks/results/quality_<backend>_<date>.json`` and the frontier ``.png`` (tokens per forward vs
quality, one marker per configuration).
"""

from __future__ import annotations

import argparse
import datetime
import difflib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_records  # noqa: E402

from vllm_s2d2.log import ArgumentParser, float_arg, int_arg, logs_off_stdout  # noqa: E402 - stdlib only

DEFAULT_MODEL = REPO / "assets" / "sdar-stdlib-10m"

# name -> (kind, S2D2Config dict).  Kinds: ar, static, dynamic, s2d2.  S2D2 configurations use the paper's SDAR
# setup (dynamic drafter 0.85, cache_ver + draft_ver, soft_entropy_negexp) with each routing policy; the
# thresholds are the paper's (ln V is 9.0 here instead of ~12, so alpha = exp(-H / ln V) is a little lower).
_STATIC = dict(remasking="low_confidence_static", verify=False)
_DYN = dict(remasking="low_confidence_dynamic", verify=False)
_S2D2 = dict(remasking="low_confidence_dynamic", confidence_threshold=0.85, verify=True, cache_ver=True, draft_ver=True,
             token_acceptance_estimator="soft_entropy_negexp")
CONFIGS: dict[str, tuple[str, dict]] = {
    "ar": ("ar", dict(block_size=1, denoising_steps=1, verify=False)),
    "static-b4-s4": ("static", dict(_STATIC, block_size=4, denoising_steps=4)),
    "static-b4-s2": ("static", dict(_STATIC, block_size=4, denoising_steps=2)),
    "static-b16-s16": ("static", dict(_STATIC, block_size=16, denoising_steps=16)),
    "static-b16-s8": ("static", dict(_STATIC, block_size=16, denoising_steps=8)),
    "static-b16-s4": ("static", dict(_STATIC, block_size=16, denoising_steps=4)),
    **{f"dyn-b{b}-{t}": ("dynamic", dict(_DYN, block_size=b, denoising_steps=b, confidence_threshold=t))
       for b in (4, 16) for t in (0.95, 0.85, 0.7, 0.5, 0.3)},
    # Config-A (paper): score_threshold tau 0, difference_static, c = 1  (~ verify iff span >= 2)
    "s2d2-b4-score": ("s2d2", dict(_S2D2, block_size=4, denoising_steps=4, verify_policy="score_threshold",
                                   score_type="difference_static", score_penalty_coef=1.0, score_threshold=0.0)),
    "s2d2-b4-span2": ("s2d2", dict(_S2D2, block_size=4, denoising_steps=4, verify_policy="mask_span_length",
                                   min_span_length=2)),
    # Fast-dLLM v2 Config-A's policy: hysteresis on 1 / off -5, difference_dynamic, c = 1
    "s2d2-b4-hyst": ("s2d2", dict(_S2D2, block_size=4, denoising_steps=4, verify_policy="score_hysteresis",
                                  hysteresis_on=1.0, hysteresis_off=-5.0, score_type="difference_dynamic",
                                  score_penalty_coef=1.0)),
    "s2d2-b4-ucb": ("s2d2", dict(_S2D2, block_size=4, denoising_steps=4, verify_policy="contextual_bandit_ucb")),
    # Config-B (paper): c = 0, tau 0 -> always verify
    "s2d2-b16-always": ("s2d2", dict(_S2D2, block_size=16, denoising_steps=16, verify_policy="score_threshold",
                                     score_type="difference_static", score_penalty_coef=0.0,
                                     score_threshold=0.0)),
    "s2d2-b16-score": ("s2d2", dict(_S2D2, block_size=16, denoising_steps=16, verify_policy="score_threshold",
                                    score_type="difference_static", score_penalty_coef=1.0,
                                    score_threshold=0.0)),
    "s2d2-b16-span4": ("s2d2", dict(_S2D2, block_size=16, denoising_steps=16, verify_policy="mask_span_length",
                                    min_span_length=4)),
    "s2d2-b16-hyst": ("s2d2", dict(_S2D2, block_size=16, denoising_steps=16, verify_policy="score_hysteresis",
                                   hysteresis_on=1.0, hysteresis_off=-5.0, score_type="difference_dynamic",
                                   score_penalty_coef=1.0)),
    "s2d2-b16-ucb": ("s2d2", dict(_S2D2, block_size=16, denoising_steps=16,
                                  verify_policy="contextual_bandit_ucb")),
    # Greedy acceptance (accept iff draft == argmax q; the correction is argmax q): the natural rule for greedy
    # decoding -- stochastic acceptance of greedy drafts resamples rejections from (q - p)+ (docs/algorithm.md).
    "s2d2-b4-score-greedy": ("s2d2", dict(_S2D2, block_size=4, denoising_steps=4, verify_policy="score_threshold",
                                          score_type="difference_static", score_penalty_coef=1.0,
                                          score_threshold=0.0, acceptance="greedy")),
    "s2d2-b16-always-greedy": ("s2d2", dict(_S2D2, block_size=16, denoising_steps=16,
                                            verify_policy="score_threshold", score_type="difference_static",
                                            score_penalty_coef=0.0, score_threshold=0.0, acceptance="greedy")),
}
CONFIG_SETS = {
    "all": list(CONFIGS),
    "quick": ["ar", "dyn-b4-0.85", "s2d2-b4-score"],
    "b4": [n for n in CONFIGS if n == "ar" or "-b4-" in n],
    "b16": [n for n in CONFIGS if n == "ar" or "-b16-" in n],
}


# -- prompts and scoring ------------------------------------------------------------------------------------
def load_prompts(path: Path, n: int | None) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:n] if n else rows


def nonblank_lines(text: str, k: int) -> list[str]:
    return [ln.rstrip() for ln in text.splitlines() if ln.strip()][:k]


def score_text(generated: str, target: str) -> dict:
    g2, t2 = nonblank_lines(generated, 2), nonblank_lines(target, 2)
    g1 = g2[0] if g2 else ""
    t1 = t2[0] if t2 else ""
    return {"em1": float(bool(t1) and g1 == t1), "em2": float(len(t2) == 2 and g2 == t2),
            "sim1": difflib.SequenceMatcher(None, g1, t1).ratio()}


def ar_nll(model, prompt_ids: list[int], gen_ids: list[int], mask_id: int) -> list[float]:
    """Per-token NLL (nats) of ``gen_ids`` after ``prompt_ids`` in AR mode (block size 1): one forward over
    ``[tokens | MASK x n]`` with the 2L verifier mask, mask row i predicting token i from tokens < i."""
    import torch

    from vllm_s2d2.core import masks

    if not gen_ids:
        return []
    ids = list(prompt_ids) + list(gen_ids)
    n, p = len(ids), len(prompt_ids)
    x = torch.tensor(ids, dtype=torch.long)
    inp = torch.cat([x, torch.full((n,), mask_id, dtype=torch.long)])
    pos = torch.arange(n).repeat(2)
    logits = model.logits(inp, pos, masks.verifier_2l(0, n), rows=torch.arange(n + p, 2 * n))
    lp = torch.log_softmax(logits.float(), dim=-1)
    return (-lp[torch.arange(n - p), x[p:]]).tolist()


# -- reference backend --------------------------------------------------------------------------------------
_W: dict = {}


def _worker_init(model_path: str, threads: int, dtype: str) -> None:
    import torch

    from vllm_s2d2 import register
    from vllm_s2d2.configs import load_family_info
    from vllm_s2d2.reference.models import ReferenceModel

    torch.set_num_threads(threads)
    register()
    _W["model"] = ReferenceModel.load(model_path, dtype=getattr(torch, dtype))
    _W["info"] = load_family_info(model_path)
    _W["tok"] = _tokenizer(model_path)


def _tokenizer(model_path: str):
    from transformers import AutoTokenizer

    from vllm_s2d2 import register

    register()  # the sdar config class, so AutoTokenizer's config lookup knows the model type

    return AutoTokenizer.from_pretrained(model_path)


def _run_task(task: tuple) -> list[dict]:
    """Decode prompts ``idx`` with configuration ``name``; one record per prompt."""
    from vllm_s2d2.core.params import SamplingSpec
    from vllm_s2d2.reference import generate
    from vllm_s2d2.s2d2_config import S2D2Config

    name, cfg_dict, items, max_tokens, temperature, seed = task
    model, info, tok = _W["model"], _W["info"], _W["tok"]
    cfg = S2D2Config.from_dict(cfg_dict)
    out = []
    for i, prompt_ids, target in items:
        t0 = time.perf_counter()
        o = generate(model, info, [prompt_ids], cfg, SamplingSpec(temperature=temperature, seed=seed + i),
                     max_tokens=max_tokens)[0]
        secs = time.perf_counter() - t0
        text = tok.decode(o.token_ids, skip_special_tokens=True)
        nll = ar_nll(model, prompt_ids, o.token_ids, info.mask_token_id)
        st = o.stats
        out.append({"config": name, "prompt": i, "tokens": len(o.token_ids), "finish": o.finish_reason,
                    "prefill": st.prefill_forwards, "draft": st.draft_forwards, "verify": st.verify_forwards,
                    "commit": st.commit_forwards, "steps": st.steps, "verify_steps": st.verify_steps,
                    "proposed": st.proposed_tokens, "accepted": st.accepted_tokens,
                    "nll_sum": float(sum(nll)), "nll_count": len(nll), "seconds": secs,
                    **score_text(text, target), "text": text[:160]})
    return out


def run_reference(model_path: Path, prompts: list[dict], names: list[str], max_tokens: int, temperature: float,
                  seed: int, workers: int, threads: int, dtype: str, progress: bool = True) -> list[dict]:
    tok = _tokenizer(str(model_path))
    items = [(i, tok(p["prompt"], add_special_tokens=False)["input_ids"], p["target"])
             for i, p in enumerate(prompts)]
    chunk = max(1, math.ceil(len(items) / max(1, workers)))
    tasks = [(n, CONFIGS[n][1], items[j:j + chunk], max_tokens, temperature, seed)
             for n in names for j in range(0, len(items), chunk)]
    records: list[dict] = []
    t0 = time.time()

    def note(done: int) -> None:
        if progress:
            print(f"  [{done}/{len(tasks)} tasks, {time.time() - t0:.0f}s]", file=sys.stderr, flush=True)

    if workers <= 1:
        _worker_init(str(model_path), threads, dtype)
        for k, task in enumerate(tasks):
            records.extend(_run_task(task))
            note(k + 1)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                 initargs=(str(model_path), threads, dtype)) as ex:
            futs = [ex.submit(_run_task, t) for t in tasks]
            for k, f in enumerate(as_completed(futs)):
                records.extend(f.result())
                note(k + 1)
    return sorted(records, key=lambda r: (names.index(r["config"]), r["prompt"]))


# -- vLLM backend -------------------------------------------------------------------------------------------


def _vllm_worker(model_path: str, block: int, jobs: list, max_tokens: int, temperature: float, seed: int,
                 dtype: str, memory: dict) -> list:
    """Inside a subprocess: one engine for block size ``block``; per configuration all prompts in one batch,
    each request's forwards from its S2D2 counters (``vllm_s2d2.request_stats``; a commit is fused into the
    next block's first draft, so ``commit`` forwards are reported as in the reference but cost nothing)."""
    import time

    if dtype == "float32":  # exact fp32 matmuls in Triton too, as the reference decoder computes
        os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")
    from vllm import LLM, SamplingParams

    from vllm_s2d2 import request_stats
    from vllm_s2d2.reference.accounting import reference_forwards

    llm = LLM(model=model_path, speculative_config={"method": "s2d2", "verify": False, "block_size": block},
              dtype=dtype, seed=seed, max_model_len=2048, max_num_seqs=256, **memory)
    out = []
    for name, cfg, items in jobs:
        # per request: everything but the engine-wide block size (verification included)
        extra = {k: v for k, v in cfg.items() if k != "block_size"}
        prompts = [{"prompt_token_ids": list(ids)} for _, ids, _ in items]
        sps = [SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + i,
                              extra_args={"s2d2": extra} if extra else None) for i, _, _ in items]
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sps, use_tqdm=False)
        secs = time.perf_counter() - t0
        stats = request_stats(llm, [o.request_id for o in outs])
        for (i, _, _), o in zip(items, outs):
            st = stats[o.request_id]
            out.append({"config": name, "prompt": i, "token_ids": list(o.outputs[0].token_ids),
                        **reference_forwards(st), "steps": st["draft_steps"], "verify_steps": st["verify_steps"],
                        "proposed": st["proposed_tokens"], "accepted": st["accepted_tokens"],
                        "seconds": secs / len(items), "finish": o.outputs[0].finish_reason})
    return out


def run_vllm(model_path: Path, prompts: list[dict], names: list[str], max_tokens: int, temperature: float,
             seed: int, dtype: str, memory: dict) -> tuple[list[dict], dict]:
    """Every configuration through the plugin's engine, one engine per block size in a subprocess; the
    quality metrics (and the AR NLL) are then computed with the reference model on the CPU."""
    try:
        import torch
        import vllm  # noqa: F401
    except ImportError as e:
        raise NotImplementedError(f"--backend vllm needs vLLM and a CUDA GPU ({e})") from None
    if not torch.cuda.is_available():
        raise NotImplementedError("--backend vllm needs a CUDA GPU (the engine does not run on CPU)")
    skipped = {}
    run = [n for n in names if n not in skipped]
    tok = _tokenizer(str(model_path))
    items = [(i, tok(p["prompt"], add_special_tokens=False)["input_ids"], p["target"])
             for i, p in enumerate(prompts)]
    by_block: dict[int, list] = {}
    for n in run:
        cfg = CONFIGS[n][1]
        by_block.setdefault(cfg["block_size"], []).append((n, cfg, items))
    raw: list[dict] = []
    for block, jobs in by_block.items():
        payload = json.dumps([str(model_path), block, jobs, max_tokens, temperature, seed, dtype, memory])
        code = ("import json,sys; sys.path.insert(0, %r); from benchmarks.quality import _vllm_worker; "
                "a = json.loads(sys.stdin.read()); print('QUALITY_JSON=' + json.dumps(_vllm_worker(*a)))"
                % str(REPO))
        proc = subprocess.run([sys.executable, "-c", code], input=payload, capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("QUALITY_JSON=")]
        if not line:
            raise RuntimeError(f"vLLM worker for block {block} failed:\n{proc.stderr[-4000:]}")
        raw.extend(json.loads(line[-1][len("QUALITY_JSON="):]))
    _worker_init(str(model_path), max(1, os.cpu_count() or 1), dtype)
    model, info = _W["model"], _W["info"]
    records = []
    for r in raw:
        i = r["prompt"]
        prompt_ids, target = items[i][1], items[i][2]
        text = tok.decode(r["token_ids"], skip_special_tokens=True)
        nll = ar_nll(model, prompt_ids, r["token_ids"], info.mask_token_id)
        kept = {k: v for k, v in r.items() if k != "token_ids"}
        records.append({**kept, "tokens": len(r["token_ids"]), "nll_sum": float(sum(nll)), "nll_count": len(nll),
                        **score_text(text, target), "text": text[:160]})
    return sorted(records, key=lambda r: (names.index(r["config"]), r["prompt"])), skipped


# -- summary, plot ------------------------------------------------------------------------------------------
def summarize(records: list[dict], names: list[str]) -> dict:
    out = {}
    for n in names:
        rs = [r for r in records if r["config"] == n]
        if not rs:
            continue
        kind, cfg = CONFIGS[n]
        tokens = sum(r["tokens"] for r in rs)
        s = {"kind": kind, "block_size": cfg["block_size"], "config": cfg, "prompts": len(rs), "tokens": tokens}
        if "draft" in rs[0]:
            fw = {k: sum(r[k] for r in rs) for k in ("prefill", "draft", "verify", "commit")}
            forwards = sum(fw.values())
            steps = sum(r["steps"] for r in rs)
            proposed = sum(r["proposed"] for r in rs)
            s.update(forwards=forwards, forwards_by_kind=fw, steps=steps,
                     tokens_per_forward=tokens / max(1, forwards),
                     tpf_fused=tokens / max(1, forwards - fw["commit"]),
                     verify_rate=sum(r["verify_steps"] for r in rs) / max(1, steps),
                     acceptance_rate=sum(r["accepted"] for r in rs) / proposed if proposed else None,
                     proposed=proposed, accepted=sum(r["accepted"] for r in rs))
        nll_n = sum(r["nll_count"] for r in rs)
        secs = sum(r["seconds"] for r in rs)
        s.update(em1=sum(r["em1"] for r in rs) / len(rs), em2=sum(r["em2"] for r in rs) / len(rs),
                 sim1=sum(r["sim1"] for r in rs) / len(rs),
                 ar_nll=sum(r["nll_sum"] for r in rs) / nll_n if nll_n else None,
                 seconds=secs, tokens_per_s=tokens / secs if secs else None)
        out[n] = s
    return out


def markdown_table(summary: dict) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = ["| configuration | B | tokens/fwd | fused | verify rate | acceptance | EM line 1 | EM 2 lines | "
             "sim line 1 | AR NLL |", "|---|---|---|---|---|---|---|---|---|---|"]
    for n, s in summary.items():
        lines.append(f"| {n} | {s['block_size']} | {f(s['tokens_per_forward'], '.2f')} | {f(s['tpf_fused'], '.2f')} "
                     f"| {f(s['verify_rate'], '.2f')} | {f(s['acceptance_rate'], '.2f')} | {100 * s['em1']:.1f}% "
                     f"| {100 * s['em2']:.1f}% | {s['sim1']:.3f} | {f(s['ar_nll'], '.3f')} |")
    return "\n".join(lines)


_MARK = {"ar": "o", "static": "v", "dynamic": "s", "s2d2": "*"}
_COLOR = {1: "black", 4: "tab:blue", 8: "tab:green", 16: "tab:red"}


def plot_frontier(summary: dict, path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
    except ImportError:
        print("matplotlib missing: no frontier plot", file=sys.stderr)
        return False
    panels = (("em1", "exact match, next line (%)", 100), ("sim1", "similarity of the next line (difflib)", 1),
              ("ar_nll", "AR-mode NLL of the output (nats/token)", 1))
    xs = (("tokens_per_forward", "tokens / forward (every forward counted)"),
          ("tpf_fused", "tokens / forward (commit fused into the next draft)"))
    xs = [x for x in xs if any(s.get(x[0]) is not None for s in summary.values())]
    fig, axes = plt.subplots(len(xs), 3, figsize=(17, 5 * len(xs)), squeeze=False)
    for row, (xkey, xlabel) in enumerate(xs):
        for col, (key, label, scale) in enumerate(panels):
            ax = axes[row][col]
            for n, s in summary.items():
                x, y = s.get(xkey), s.get(key)
                if x is None or y is None:
                    continue
                ax.scatter(x, scale * y, marker=_MARK[s["kind"]], c=_COLOR.get(s["block_size"], "gray"),
                           s=150 if s["kind"] == "s2d2" else 60, edgecolors="k", linewidths=0.4, zorder=3)
                ax.annotate(n.replace("s2d2-", "").replace("static-", "st-"), (x, scale * y), fontsize=6,
                            xytext=(4, 3), textcoords="offset points")
            for b in (4, 16):  # each block size's dynamic thresholds: the baseline frontier
                pts = sorted((s[xkey], scale * s[key]) for s in summary.values()
                             if s["kind"] == "dynamic" and s["block_size"] == b and s.get(xkey) is not None
                             and s.get(key) is not None)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], ":", color=_COLOR[b], lw=1, zorder=1)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    handles = [Line2D([], [], marker=m, ls="", color="gray", label=k) for k, m in _MARK.items()]
    handles += [Line2D([], [], marker="o", ls="", color=c, label=f"block {b}") for b, c in _COLOR.items() if b != 8]
    handles += [Line2D([], [], ls=":", color="gray", label="dynamic thresholds")]
    axes[0][2].legend(handles=handles, fontsize=8, loc="best")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def write_record(path: Path, record: dict) -> None:
    """The record as JSON: indented, except one compact line per per-prompt record."""
    head = json.dumps({k: v for k, v in record.items() if k != "records"}, indent=1)
    body = ",\n".join(json.dumps(r, separators=(",", ":"), ensure_ascii=False) for r in record["records"])
    with open(path, "w", encoding="utf-8") as f:
        f.write(head[:-2] + ',\n "records": [\n' + body + "\n ]\n}\n")


# -- main ---------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    # one-line errors (exit 2) naming the argument, the value and what is allowed (vllm_s2d2/log.py)
    ap = ArgumentParser(prog="benchmarks/quality.py", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["reference", "vllm"], default="reference")
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--prompts", default=None, help="JSONL of {prompt, target} (default: MODEL/heldout_prompts.jsonl)")
    ap.add_argument("--num-prompts", type=int_arg(0, note="0 = all"), default=8, help="first N prompts (0 = all)")
    ap.add_argument("--max-tokens", type=int_arg(1), default=32)
    ap.add_argument("--configs", default="all",
                    help=f"a set ({', '.join(CONFIG_SETS)}) or comma-separated names ({', '.join(CONFIGS)})")
    ap.add_argument("--temperature", type=float_arg(0, note="0 = greedy"), default=0.0,
                    help="0 = greedy drafts (the paper's code evals)")
    ap.add_argument("--seed", type=int_arg(-2**62, 2**62), default=0)
    ap.add_argument("--workers", type=int_arg(1), default=1, help="reference backend: processes")
    ap.add_argument("--threads", type=int_arg(1), default=None, help="reference backend: torch threads per process")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--gpu-memory-utilization", type=float_arg(0, 1, lo_open=True), default=0.5,
                    help="vllm backend")
    ap.add_argument("--kv-cache-gib", type=float_arg(0, lo_open=True), default=None,
                    help="vllm backend: a fixed KV cache (GiB) instead of profiling free memory (a shared GPU)")
    ap.add_argument("--compare", metavar="JSON", default=None,
                    help="a record of this harness (e.g. the reference decoder's): count prompts with equal text")
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--tag", default=None, help="file name suffix (default: the UTC date)")
    ap.add_argument("--replot", metavar="JSON", help="only redraw the PNG (and print the table) of a record")
    return ap


def compare_texts(records: list[dict], other_path: str) -> dict:
    """Per configuration, how many prompts decoded to the same text as in another record of this harness
    (e.g. the engine against the reference decoder): ``{config: [equal, prompts in both]}``."""
    other = json.loads(Path(other_path).read_text())
    theirs = {(r["config"], r["prompt"]): r["text"] for r in other["records"]}
    equal: dict[str, list[int]] = {}
    for r in records:
        key = (r["config"], r["prompt"])
        if key in theirs:
            counts = equal.setdefault(r["config"], [0, 0])
            counts[0] += r["text"] == theirs[key]
            counts[1] += 1
    return {"against": other_path, "commit": other.get("commit"), "backend": other.get("backend"),
            "max_tokens": other.get("max_tokens"), "equal": equal}


def _check_inputs(ap: argparse.ArgumentParser, args) -> list[dict]:
    """The checkpoint and the prompts, checked before anything is decoded; returns the prompts."""
    model = Path(args.model)
    if not (model / "config.json").is_file():
        ap.error(f"argument --model: {args.model!r} is no checkpoint directory (no config.json)")
    path = Path(args.prompts) if args.prompts else model / "heldout_prompts.jsonl"
    arg = "--prompts" if args.prompts else "--model"
    try:
        prompts = load_prompts(path, None)
    except (OSError, ValueError) as e:  # missing file, JSON or UTF-8 errors
        ap.error(f"argument {arg}: cannot read prompts from {str(path)!r} ({e})")
    bad = [i for i, p in enumerate(prompts)
           if not isinstance(p, dict) or not isinstance(p.get("prompt"), str) or not isinstance(p.get("target"), str)]
    if bad or not prompts:
        ap.error(f"argument {arg}: {str(path)!r} must hold JSON objects with string fields prompt and target, one "
                 f"a line" + (f" (line {bad[0] + 1} does not)" if bad else " (it holds none)"))
    if args.num_prompts > len(prompts):
        ap.error(f"argument --num-prompts: {args.num_prompts} is more than the {len(prompts)} prompts of "
                 f"{str(path)!r}; use 0 (all) .. {len(prompts)}")
    if args.compare:
        try:
            json.loads(Path(args.compare).read_text())["records"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            ap.error(f"argument --compare: {args.compare!r} is not a record of this harness ({type(e).__name__}: {e})")
    return prompts[:args.num_prompts or None]


def main(argv: list[str] | None = None) -> int:
    logs_off_stdout()  # stdout carries the table
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.replot:
        try:
            rec = json.loads(Path(args.replot).read_text())
            title = (f"{rec['model']}: {rec['num_prompts']} held-out stdlib prompts, {rec['max_tokens']} new "
                     f"tokens, T={rec['sampling']['temperature']}; backend {rec['backend']}")
            summary = rec["summary"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            ap.error(f"argument --replot: {args.replot!r} is not a record of this harness ({type(e).__name__}: {e})")
        plot_frontier(summary, Path(args.replot).with_suffix(".png"), title)
        print(markdown_table(summary))
        return 0

    names = CONFIG_SETS.get(args.configs) or [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or not names:
        ap.error(f"argument --configs: unknown configurations {unknown or [args.configs]}; valid: a set "
                 f"{list(CONFIG_SETS)} or names from {list(CONFIGS)}")
    model = Path(args.model)
    prompts = _check_inputs(ap, args)
    if args.backend == "vllm":  # before vLLM is imported (its start-up logs) or anything is decoded
        import importlib.util

        import torch

        if importlib.util.find_spec("vllm") is None or not torch.cuda.is_available():
            raise NotImplementedError("--backend vllm needs vLLM and a CUDA GPU (the engine does not run on CPU); "
                                      "--backend reference runs on the CPU")
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, args.workers))
    t0 = time.time()
    skipped: dict = {}
    print(f"{args.backend}: {len(prompts)} prompts x {len(names)} configurations, max_tokens {args.max_tokens}",
          file=sys.stderr, flush=True)
    if args.backend == "reference":
        records = run_reference(model, prompts, names, args.max_tokens, args.temperature, args.seed, args.workers,
                                threads, args.dtype)
    else:
        memory = {"gpu_memory_utilization": args.gpu_memory_utilization}
        if args.kv_cache_gib:  # a fixed KV cache: vLLM then skips its free-memory profile (a shared GPU)
            memory["kv_cache_memory_bytes"] = int(args.kv_cache_gib * (1 << 30))
        records, skipped = run_vllm(model, prompts, names, args.max_tokens, args.temperature, args.seed, args.dtype,
                                    memory)
    summary = summarize(records, names)
    wall = time.time() - t0

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    tag = args.tag or date
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"quality_{args.backend}_{tag}"
    # the call's id, commit ($COMMIT on the GPU host, which has no .git), device and versions
    call = bench_records.run_metadata(device=(
        "cpu (reference decoder, %s, %d worker(s) x %d thread(s))" % (args.dtype, args.workers, threads)
        if args.backend == "reference" else None))
    record = {
        "backend": args.backend, "call": call, "device": call["device"],
        "date": date, "commit": call["commit"], "model": str(model.resolve().relative_to(REPO)) if model.resolve()
        .is_relative_to(REPO) else str(model), "num_prompts": len(prompts), "max_tokens": args.max_tokens,
        "sampling": {"temperature": args.temperature, "seed": args.seed}, "wall_seconds": round(wall, 1),
        "python": call["python"], "torch": call["torch"], "vllm": call["vllm"],
        "metrics": {
            "tokens_per_forward": "generated tokens / all forwards (prefill + draft + verify + commit)",
            "tpf_fused": "generated tokens / (prefill + draft + verify): commit fused into the next draft",
            "verify_rate": "verify steps / denoising steps", "acceptance_rate": "accepted / proposed draft tokens",
            "em1": "first non-blank generated line == first non-blank line after the docstring",
            "em2": "first two non-blank lines equal", "sim1": "difflib ratio of the first non-blank lines",
            "ar_nll": "mean NLL (nats/token) of the generated tokens under the model in AR mode (block 1)",
        },
        "skipped": skipped, "summary": summary, "records": records,
    }
    if args.compare:
        record["compare"] = compare_texts(records, args.compare)
    write_record(Path(f"{stem}.json"), record)
    title = (f"{record['model']}: {len(prompts)} held-out stdlib prompts, {args.max_tokens} new tokens, "
             f"T={args.temperature}; backend {args.backend}")
    plot_frontier(summary, Path(f"{stem}.png"), title)
    print(markdown_table(summary))
    for n, why in skipped.items():
        print(f"skipped {n}: {why}")
    if args.compare:
        cmp = record["compare"]
        print(f"text equal to {cmp['against']} (commit {cmp['commit']}, backend {cmp['backend']}): " + ", ".join(
            f"{n} {e}/{c}" for n, (e, c) in cmp["equal"].items()))
    print(f"wrote {stem}.json, {stem}.png ({wall:.0f}s)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except NotImplementedError as e:  # --backend vllm on a host without vLLM / a CUDA GPU: one line, no traceback
        print(f"benchmarks/quality.py: error: {e}", file=sys.stderr)
        sys.exit(2)
