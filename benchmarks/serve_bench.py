"""Serving benchmark: ``vllm serve`` with the plugin, driven by the ``openai`` client.

For each mode one server is started on the same checkpoint (default: the trained demo model
``assets/sdar-stdlib-10m``, so acceptance is real):

* ``ar``         AR mode: ``--speculative-config '{"method": "s2d2", "verify": false, "block_size": 1}'``
* ``threshold``  the threshold baseline: ``'{"method": "s2d2", "verify": false}'`` (dynamic, tau 0.85)
* ``s2d2``       S2D2 Config-A: ``--speculative-config s2d2``
* ``vllm-ar``    the baseline: vLLM's own AR decode of the same weights -- ``vllm serve`` of the checkpoint as its
                 plain AR architecture (SDAR -> ``Qwen3ForCausalLM`` / ``Qwen3MoeForCausalLM``, Fast-dLLM v2 ->
                 ``Qwen2ForCausalLM``: a temporary directory with the config rewritten and the other files linked,
                 :func:`serve_target`), no speculative config, ``--generation-config vllm`` as the plugin

and driven at each concurrency (default 1, 16, 64) with streaming completions of the held-out prompts.  Per run:
requests/s, output tokens/s, TTFT (time to the first streamed token) and TPOT (time per output token after the
first) as mean and p50/p90, and the run's S2D2 counters from ``/metrics`` (``vllm:s2d2_*``: verify rate,
acceptance; none for ``vllm-ar``), and ``vs_vllm_ar``: each mode's output tokens/s over the baseline's at the
same concurrency (same call only, ``bench_records.ratios_vs_baseline``).  All modes run in one call; the JSON record starts with the call's id, commit, device and vLLM /
torch / transformers versions (``bench_records.run_metadata``; ``$COMMIT`` on the GPU host, which has no
``.git``) and a PNG is written next to it (if matplotlib is installed).

    COMMIT=<hash> python benchmarks/serve_bench.py --out $OUT/serve_bench.json     # GPU host
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_records  # noqa: E402

from vllm_s2d2.log import ArgumentParser, int_arg, int_list_arg  # noqa: E402 - stdlib only

MODES = {
    "ar": '{"method": "s2d2", "verify": false, "block_size": 1}',
    "threshold": '{"method": "s2d2", "verify": false}',
    "s2d2": "s2d2",
}
# The baseline: the same weights on vLLM's own AR path (serve_target); not a speculative config.
BASELINE = "vllm-ar"
BASELINE_ARGS = ["--generation-config", "vllm"]  # no checkpoint sampling defaults (the plugin drops them too)


def serve_target(mode: str, model: str, workdir: Path) -> tuple[str, str | None, list[str]]:
    """``(model directory, speculative config or None, extra vllm serve arguments)`` of one mode.  ``vllm-ar``:
    ``workdir/<checkpoint>-ar``, the checkpoint as its plain AR architecture (config.json rewritten by
    ``vllm_s2d2.testing.checkpoints``, every other file a symlink to the original: nothing copied)."""
    if mode != BASELINE:
        return model, MODES[mode], []
    from vllm_s2d2.testing.checkpoints import _rewrite_plain

    src = Path(model).resolve()
    cfg = json.loads((src / "config.json").read_text(encoding="utf-8"))
    plain = _rewrite_plain(cfg)  # ValueError for a family without an AR twin (LLaDA2)
    out = Path(workdir) / f"{src.name}-ar"
    out.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.is_file() and p.name != "config.json":
            link = out / p.name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(p)
    (out / "config.json").write_text(json.dumps(plain, indent=2), encoding="utf-8")
    return str(out), None, list(BASELINE_ARGS)


def vs_baseline(results: dict[str, list[dict]]) -> dict[str, dict[str, dict]]:
    """``{mode: {concurrency: {"output_tokens_per_s_ratio": ...}}}`` against ``vllm-ar`` at the same concurrency
    (rows of one call only; empty without a baseline run)."""
    rows = [{"mode": mode, "batch": r["concurrency"], "call_id": r.get("call_id"),
             "output_tokens_per_s": r["output_tokens_per_s"]} for mode, runs in results.items() for r in runs]
    if not any(r["mode"] == BASELINE for r in rows):
        return {}
    ratios = bench_records.ratios_vs_baseline(rows, baseline=BASELINE)
    return {m: {c: {"output_tokens_per_s_ratio": v["output_tokens_per_s_ratio"]} for c, v in per.items()}
            for m, per in ratios.items()}


def start_server(model: str, spec: str | None, port: int, log_path: Path, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model,
           *(["--speculative-config", spec] if spec is not None else []),
           "--port", str(port), "--served-model-name", "bench", *extra]
    log = open(log_path, "w")
    env = dict(os.environ, VLLM_LOG_STATS_INTERVAL="1")  # vllm:s2d2_* counters current within ~1 s
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    t0 = time.time()
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None or time.time() - t0 > 400:
                stop_server(proc)
                raise RuntimeError(f"server did not start: {log_path.read_text()[-3000:]}")
            time.sleep(2)


def stop_server(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def s2d2_counters(port: int) -> dict[str, int]:
    """The server's ``vllm:s2d2_*`` totals from ``/metrics`` (empty for a server without them)."""
    from vllm_s2d2.engine.metrics import read_s2d2_metrics

    return read_s2d2_metrics(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode())


def counter_delta(before: dict[str, int], after: dict[str, int]) -> dict:
    """Counters of one run, with verify rate (verify / draft steps) and acceptance (accepted / proposed)."""
    from vllm_s2d2.engine import stats

    return stats.derived(stats.counter_delta(before, after)) if after else {}


def one_request(client, prompt: str, max_tokens: int, seed: int) -> dict:
    t0 = time.perf_counter()
    first = None
    tokens = 0
    for chunk in client.completions.create(model="bench", prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                                           seed=seed, stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].text and first is None:
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    first = first or end
    return {"ttft": first - t0, "latency": end - t0, "tokens": tokens,
            "tpot": (end - first) / (tokens - 1) if tokens > 1 else None}


def run_load(client, prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        res = list(ex.map(lambda a: one_request(client, a[1], max_tokens, a[0]), enumerate(prompts)))
    wall = time.perf_counter() - t0

    def stats(xs):
        xs = sorted(x for x in xs if x is not None)
        if not xs:
            return None
        return {"mean": statistics.fmean(xs), "p50": xs[len(xs) // 2], "p90": xs[min(len(xs) - 1, int(0.9 * len(xs)))]}

    tokens = sum(r["tokens"] for r in res)
    return {"concurrency": concurrency, "requests": len(res), "wall_s": wall, "requests_per_s": len(res) / wall,
            "output_tokens": tokens, "output_tokens_per_s": tokens / wall,
            "ttft_s": stats([r["ttft"] for r in res]), "tpot_s": stats([r["tpot"] for r in res])}


def plot(record: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, runs in record["results"].items():
        cs = [r["concurrency"] for r in runs]
        a.plot(cs, [r["output_tokens_per_s"] for r in runs], "o-", label=mode)
        b.plot(cs, [1e3 * r["tpot_s"]["mean"] if r["tpot_s"] else float("nan") for r in runs], "o-", label=mode)
    for ax, ylabel in ((a, "output tokens / s"), (b, "TPOT (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(bench_records.record_title(record), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def build_parser() -> argparse.ArgumentParser:
    # one-line errors (exit 2) naming the argument, the value and what is allowed (vllm_s2d2/log.py)
    ap = ArgumentParser(prog="benchmarks/serve_bench.py", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(REPO / "assets" / "sdar-stdlib-10m"),
                    help="local checkpoint directory (config.json)")
    ap.add_argument("--modes", default=f"{BASELINE},ar,threshold,s2d2",
                    help=f"comma-separated, from {list(MODES)} and {BASELINE!r} (vLLM AR baseline)")
    ap.add_argument("--concurrency", default="1,16,64", type=int_list_arg(1),
                    help="comma-separated concurrency levels (>= 1)")
    ap.add_argument("--requests", type=int_arg(1), default=64, help="requests per concurrency level")
    ap.add_argument("--max-tokens", type=int_arg(1), default=64)
    ap.add_argument("--port", type=int_arg(1, 65535), default=8021)
    ap.add_argument("--server-args", default="--max-model-len 1024 --gpu-memory-utilization 0.3 --max-num-seqs 64",
                    help="extra vllm serve arguments, one string (write --server-args='--flag value ...')")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "serve_bench.json"))
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = build_parser()
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES and m != BASELINE]
    if bad or not modes or len(set(modes)) != len(modes):
        ap.error(f"argument --modes: must be comma-separated modes from {list(MODES)}, each once; got {args.modes!r} "
                 f"(and {BASELINE!r}, the vLLM AR baseline)")
    if not (Path(args.model) / "config.json").is_file():
        ap.error(f"argument --model: {args.model!r} is no local checkpoint directory (no config.json)")
    try:
        server_args = shlex.split(args.server_args)
    except ValueError as e:
        ap.error(f"argument --server-args: {e} in {args.server_args!r}")
    import importlib.util

    missing = [m for m in ("vllm", "openai") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"{ap.prog}: error: {' and '.join(missing)} not installed (pip install -e \".[vllm,test]\" openai); "
              f"the benchmark starts vLLM servers on a CUDA GPU and drives them with the openai client",
              file=sys.stderr)
        sys.exit(2)
    import torch

    if not torch.cuda.is_available():
        print(f"{ap.prog}: error: no CUDA GPU is visible; vLLM serves the plugin's models on a CUDA GPU only",
              file=sys.stderr)
        sys.exit(2)
    if BASELINE in modes:  # a family without a plain AR twin (LLaDA2): say so now, not as a recorded error later
        from vllm_s2d2.testing.checkpoints import _rewrite_plain

        try:
            _rewrite_plain(json.loads((Path(args.model) / "config.json").read_text(encoding="utf-8")))
        except ValueError as e:
            ap.error(f"argument --modes: {BASELINE} does not apply to {args.model!r} ({e}); leave it out")
    # servers run in their own process group: a SIGTERM (e.g. from `timeout`) must still stop them (finally:)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    import openai

    prompts_file = Path(args.model) / "heldout_prompts.jsonl"
    if prompts_file.exists():
        try:
            prompts = [json.loads(ln)["prompt"] for ln in prompts_file.read_text().splitlines() if ln.strip()]
        except (ValueError, KeyError, TypeError) as e:
            ap.error(f"argument --model: {str(prompts_file)!r} must hold JSON objects with a prompt field, one a "
                     f"line ({type(e).__name__}: {e})")
    else:
        prompts = [f"def function_{i}(x):\n" for i in range(args.requests)]
    prompts = (prompts * (args.requests // max(1, len(prompts)) + 1))[:args.requests]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": "serve_bench", "schema": 2, "call": bench_records.run_metadata(),
              "model": args.model, "max_tokens": args.max_tokens,
              "requests_per_level": args.requests, "server_args": args.server_args, "modes": {}, "results": {},
              "errors": {}}
    workdir = Path(tempfile.mkdtemp(prefix="serve_bench_"))  # the vllm-ar view of the checkpoint
    # the baseline first: a call cut short by its time limit still has what the other modes are compared with
    # (the record is rewritten after every mode)
    for mode in sorted(modes, key=lambda m: m != BASELINE):
        proc = None
        try:
            model, spec, mode_args = serve_target(mode, args.model, workdir)
            record["modes"][mode] = spec if spec is not None else f"{model} (vLLM AR, {' '.join(mode_args)})"
            proc = start_server(model, spec, args.port, out.with_name(f"{out.stem}_{mode}.log"),
                                server_args + mode_args)
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{args.port}/v1", api_key="none", max_retries=0)
            run_load(client, prompts[:4], 4, 8)  # warm-up
            record["results"][mode] = []
            for c in args.concurrency:
                time.sleep(1.5)  # the counters trail by one stats interval (1 s)
                before = s2d2_counters(args.port)
                r = run_load(client, prompts, c, args.max_tokens)
                time.sleep(1.5)
                r["s2d2"] = counter_delta(before, s2d2_counters(args.port))
                r["call_id"] = record["call"]["call_id"]
                record["results"][mode].append(r)
                print(mode, json.dumps(r), flush=True)
        except Exception as e:  # noqa: BLE001 (recorded, the next mode still runs)
            record["errors"][mode] = repr(e)[-2000:]
        finally:
            if proc is not None:
                stop_server(proc)
        record["vs_vllm_ar"] = vs_baseline(record["results"])
        out.write_text(json.dumps(record, indent=1))
    shutil.rmtree(workdir, ignore_errors=True)
    plot(record, out.with_suffix(".png"))
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
