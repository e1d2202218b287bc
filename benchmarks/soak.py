"""Soak run (#17): a bounded, seeded load generator against an OpenAI-compatible ``/v1/completions`` server.

Sends N mixed requests at a fixed concurrency: greedy and seeded sampling, streaming and not, one S2D2 policy
per request through ``vllm_xargs`` (the spellings of ``tests/gpu/test_serve.py``), stop strings, ``max_tokens``
drawn from 1..512; a fraction is aborted mid-stream (the client disconnects) and a fraction comes from the
project's bad-input matrix (each must give a 4xx whose message names the problem).  Every request has a
deadline; one that passes it counts as hung.  After the load every completed request is sent again -- alone
(concurrency 1), or for those beyond ``--alone`` at ``--rerun-concurrency`` -- and its token ids
(``return_token_ids``, vLLM's completions extension; text when the server has none) must equal the ones under
load.  ``/metrics`` is read before, after the load and after the re-runs (``vllm:s2d2_*``, ``vllm:spec_decode_*``,
``vllm:num_preemptions``, ``vllm:request_success``, ``vllm:kv_cache_usage_perc``, ``vllm:num_requests_*``: the
names of vLLM 0.26's ``v1/metrics/loggers.py`` and ``vllm_s2d2/engine/metrics.py``) and sampled during the run,
with the server's RSS (``--server-pid``) and GPU memory (``--gpu-memory``, nvidia-smi).

``--diagnose N`` sends up to N mismatching requests once more alone, after emptying the server's prefix cache and
right after (vLLM's dev endpoint ``/reset_prefix_cache``: ``VLLM_SERVER_DEV_MODE=1``), and records what each
pair points to (:func:`diagnosis_kind`); with ``--enable-prompt-tokens-details`` on the server every outcome also
carries the prompt tokens the prefix cache served.

Writes one JSON record (run metadata of ``bench_records.run_metadata`` first) and prints ``SOAK PASS`` or
``SOAK FAIL: <reasons>``; exit code 0 / 1, 2 for bad arguments.

    python benchmarks/soak.py --base-url http://127.0.0.1:8000 --model demo --requests 2000 --concurrency 64 \\
        --out soak.json [--seed 0]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import hashlib
import json
import math
import os
import random
import re
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_records  # noqa: E402

from vllm_s2d2.log import ArgumentParser, float_arg, int_arg  # noqa: E402 - stdlib only

SCHEMA = 1
# Per-request S2D2 options (vllm_xargs), both spellings of tests/gpu/test_serve.py: a JSON string under "s2d2"
# and flat "s2d2.<option>" keys.  None = the server's configuration.  Every verify policy is here.
POLICIES: dict[str, dict[str, Any] | None] = {
    "server_default": None,
    "threshold_no_verify": {"s2d2.verify": "false"},
    "mask_span_length": {"s2d2": json.dumps({"verify_policy": "mask_span_length", "min_span_length": 1})},
    "score_threshold": {"s2d2.verify_policy": "score_threshold"},
    "score_hysteresis": {"s2d2.verify_policy": "score_hysteresis", "s2d2.score_type": "difference_dynamic"},
    "contextual_bandit_ucb": {"s2d2": json.dumps({"verify_policy": "contextual_bandit_ucb"})},
    "greedy_acceptance": {"s2d2": json.dumps({"acceptance": "greedy"})},
    "preset_sdar_a": {"s2d2.preset": "sdar-a"},
}
# policies a family's server refuses with a 400, left out of that family's soak (tests/test_soak_families.py
# checks both ways: every other policy resolves for the family's engine, each of these does not)
NOT_FOR = {"preset_sdar_a": {"fast_dllm_v2", "llada2", "d2f_dream", "d2f_llada"},  # SDAR's preset (its block size)
           "contextual_bandit_ucb": {"llada2"}}  # LLaDA2's paper configurations define no bandit


def policies_for(family: str) -> list[str]:
    """The soak's policies that a server of ``family`` accepts."""
    return [p for p in POLICIES if family not in NOT_FOR.get(p, ())]


# The bad-input matrix of tests/gpu/test_serve.py (BAD; tests/test_soak_generator.py keeps the two equal):
# name -> (fields added to the base request, text the 4xx message must contain).
BAD_INPUTS: dict[str, tuple[dict[str, Any], str]] = {
    "n=2": ({"n": 2, "temperature": 1.0}, "n=2"),
    "logprobs": ({"logprobs": 2}, "logprobs"),
    "unknown policy": ({"vllm_xargs": {"s2d2.verify_policy": "sometimes"}}, "verify_policy"),
    "threshold out of range": ({"vllm_xargs": {"s2d2.confidence_threshold": 2.0}}, "confidence_threshold"),
    "block size vs engine": ({"vllm_xargs": {"s2d2.block_size": 8}}, "block_size"),
    "malformed xargs": ({"vllm_xargs": {"s2d2": "{not json"}}, "JSON"),
    "unknown option": ({"vllm_xargs": {"s2d2.blok_size": 4}}, "blok_size"),
    "prompt > max_model_len": ({"prompt": "x " * 2000}, "context length"),
    "max_tokens=0": ({"max_tokens": 0}, "max_tokens"),
}
SERVE_TEST_BLOCK_SIZE = 4  # the block size of the server tests/gpu/test_serve.py starts (the demo checkpoint)


def bad_inputs(engine_block_size: int = SERVE_TEST_BLOCK_SIZE) -> dict[str, tuple[dict[str, Any], str]]:
    """The bad-input matrix for a server whose engine decodes blocks of ``engine_block_size``: the per-request
    block size it must refuse is twice that (8 for the demo checkpoint's 4, but 16 for a block-8 Fast-dLLM v2)."""
    matrix = copy.deepcopy(BAD_INPUTS)
    matrix["block size vs engine"][0]["vllm_xargs"]["s2d2.block_size"] = 2 * engine_block_size
    return matrix


BAD_BASE = {"prompt": 'def read_config(path):\n    """Read a JSON config file."""\n', "max_tokens": 24,
            "temperature": 0.0, "seed": 0}  # test_serve.py's _complete
STOP_CHOICES: list[list[str] | None] = [None, None, ["\n\n"], ["\ndef "], ["return", "\n\n\n"]]
BUILTIN_PROMPTS = [
    "import os\n\ndef list_files(path):\n",
    'def read_config(path):\n    """Read a JSON config file."""\n',
    "class Stack:\n    def __init__(self):\n",
    "def fibonacci(n):\n",
    "import re\n\ndef split_words(text):\n",
    "def merge_dicts(a, b):\n    \"\"\"Return a new dict with the keys of a and b.\"\"\"\n",
    "import json\n\n\ndef load(path):\n    with open(path) as f:\n",
    "def parse_args(argv=None):\n",
]
# /metrics families kept in every snapshot (Prometheus text names; counters carry vLLM's `_total`).
METRIC_PREFIXES = ("vllm:s2d2_", "vllm:spec_decode_", "vllm:diffusion_", "vllm:num_preemptions",
                   "vllm:request_success", "vllm:generation_tokens", "vllm:prompt_tokens_total",
                   "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                   "process_resident_memory_bytes")
S2D2_TO_SPEC = {"verify_steps": "vllm:spec_decode_num_drafts_total",
                "proposed_tokens": "vllm:spec_decode_num_draft_tokens_total",
                "accepted_tokens": "vllm:spec_decode_num_accepted_tokens_total"}
KV_IDLE_MAX = 0.02  # kv_cache_usage_perc (a fraction) at rest: only vLLM's reserved null block may be in use
MEMORY_GROWTH = {"rss_bytes": (0.10, 256 << 20), "gpu_used_mib": (0.0, 256)}  # (fraction, absolute) allowed


class SoakSetupError(RuntimeError):
    """The server could not be used at all (unreachable, wrong model name): no run."""


# -- the plan ------------------------------------------------------------------------------------------------
@dataclass
class PlannedRequest:
    index: int
    kind: str  # "ok" | "abort" | "bad"
    body: dict[str, Any]
    policy: str | None = None
    sampling: str | None = None  # "greedy" | "seeded"
    abort_after_chunks: int | None = None  # disconnect after this many streamed chunks with tokens
    bad_name: str | None = None
    needle: str | None = None

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))


def build_plan(n: int, model: str, seed: int, prompts: list[str], policies: list[str], abort_fraction: float,
               bad_fraction: float, max_tokens: int, token_ids: bool = True,
               engine_block_size: int = SERVE_TEST_BLOCK_SIZE) -> list[PlannedRequest]:
    """The N requests of a run, a function of the arguments only: exactly round(N * fraction) aborts and bad
    inputs (bad inputs cycle through the matrix, :func:`bad_inputs`), the rest ok, shuffled with ``seed``."""
    rng = random.Random(seed)
    n_bad = round(n * bad_fraction)
    n_abort = min(round(n * abort_fraction), n - n_bad)
    kinds = ["bad"] * n_bad + ["abort"] * n_abort + ["ok"] * (n - n_bad - n_abort)
    rng.shuffle(kinds)
    matrix = bad_inputs(engine_block_size)
    bad_names = list(matrix)
    plan: list[PlannedRequest] = []
    bad_seen = 0
    for i, kind in enumerate(kinds):
        if kind == "bad":
            name = bad_names[bad_seen % len(bad_names)]
            bad_seen += 1
            extra, needle = matrix[name]
            body = {"model": model, **BAD_BASE, **json.loads(json.dumps(extra))}
            plan.append(PlannedRequest(i, kind, body, bad_name=name, needle=needle))
            continue
        policy = policies[rng.randrange(len(policies))]
        body: dict[str, Any] = {"model": model, "prompt": prompts[rng.randrange(len(prompts))]}
        if rng.random() < 0.5:
            sampling = "greedy"
            body["temperature"] = 0.0
            if rng.random() < 0.5:
                body["seed"] = rng.randrange(2 ** 31)
        else:
            sampling = "seeded"
            body["temperature"] = rng.choice([0.7, 1.0])
            body["seed"] = rng.randrange(2 ** 31)
            top_p = rng.choice([1.0, 0.9])
            top_k = rng.choice([None, 20])
            if top_p < 1.0:
                body["top_p"] = top_p
            if top_k is not None:
                body["top_k"] = top_k
        stop = rng.choice(STOP_CHOICES)
        abort_after = None
        if kind == "abort":  # long enough to be cut mid-stream
            body["max_tokens"] = rng.randint(min(64, max_tokens), max_tokens)
            body["ignore_eos"] = True
            stream = True
            abort_after = rng.randint(1, 3)
        else:
            body["max_tokens"] = rng.randint(1, max_tokens)
            if stop is not None:
                body["stop"] = stop
            if rng.random() < 0.25:
                body["ignore_eos"] = True  # long sequences: KV-cache pressure
            stream = rng.random() < 0.5
        if POLICIES[policy] is not None:
            body["vllm_xargs"] = dict(POLICIES[policy])
        if token_ids:
            body["return_token_ids"] = True
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        plan.append(PlannedRequest(i, kind, body, policy=policy, sampling=sampling, abort_after_chunks=abort_after))
    return plan


def plan_digest(plan: list[PlannedRequest]) -> str:
    """sha256 of the plan's request bodies (same arguments, same digest)."""
    h = hashlib.sha256()
    for p in plan:
        h.update(json.dumps([p.kind, p.body, p.abort_after_chunks], sort_keys=True).encode())
    return h.hexdigest()[:16]


def plan_composition(plan: list[PlannedRequest]) -> dict[str, Any]:
    def count(key):
        out: dict[str, int] = {}
        for p in plan:
            k = key(p)
            if k is not None:
                out[str(k)] = out.get(str(k), 0) + 1
        return dict(sorted(out.items()))

    normal = [p for p in plan if p.kind != "bad"]
    return {"kinds": count(lambda p: p.kind), "policies": count(lambda p: p.policy),
            "sampling": count(lambda p: p.sampling),
            "stream": count(lambda p: None if p.kind == "bad" else p.stream),
            "with_stop": sum("stop" in p.body for p in normal),
            "ignore_eos": sum(bool(p.body.get("ignore_eos")) for p in normal),
            "max_tokens_range": [min((p.body["max_tokens"] for p in normal), default=None),
                                 max((p.body["max_tokens"] for p in normal), default=None)],
            "bad_inputs": count(lambda p: p.bad_name)}


# -- one request ---------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    index: int
    category: str  # completed | aborted | abort_missed | bad_ok | bad_wrong | client_4xx | server_5xx | hung |
    #                connection_error | stream_error
    latency_s: float
    status: int | None = None
    ttft_s: float | None = None
    token_ids: list[int] | None = None
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None  # prompt tokens served from the prefix cache (``usage.prompt_tokens_details``;
    #                                   the server needs --enable-prompt-tokens-details)
    message: str | None = None


def _cached_tokens(usage: dict) -> int | None:
    details = usage.get("prompt_tokens_details") or {}
    return details.get("cached_tokens") if isinstance(details, dict) else None


def _error_message(raw: bytes) -> str:
    try:
        obj = json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")
    err = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(err, dict):
        return str(err.get("message", err))
    if isinstance(obj, dict) and "message" in obj:
        return str(obj["message"])
    if isinstance(obj, dict) and "detail" in obj:
        return str(obj["detail"])
    return raw.decode(errors="replace")


async def _read_stream(resp, req: PlannedRequest, out: Outcome, t0: float) -> None:
    """Read SSE ``data:`` lines; disconnect after ``abort_after_chunks`` chunks with tokens (abort)."""
    ids: list[int] = []
    text: list[str] = []
    chunks_with_tokens = 0
    done = False
    buf = b""
    async for piece in resp.content.iter_any():
        buf += piece
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                continue
            try:
                obj = json.loads(data)
            except ValueError:
                out.category, out.message = "stream_error", f"unparseable chunk {data[:200]!r}"
                return
            if "error" in obj:
                out.category, out.message = "stream_error", _error_message(data)
                return
            for ch in obj.get("choices") or []:
                got = ch.get("token_ids") or []
                if ch.get("text") or got:
                    if out.ttft_s is None:
                        out.ttft_s = time.perf_counter() - t0
                    chunks_with_tokens += 1
                text.append(ch.get("text") or "")
                ids.extend(got)
                if ch.get("finish_reason") is not None:
                    out.finish_reason = ch["finish_reason"]
            if obj.get("usage"):
                out.completion_tokens = obj["usage"].get("completion_tokens")
                out.cached_tokens = _cached_tokens(obj["usage"])
            if (req.abort_after_chunks is not None and not done and out.finish_reason is None
                    and chunks_with_tokens >= req.abort_after_chunks):
                resp.close()  # the client disconnects mid-stream
                out.category = "aborted"
                return
    out.text, out.token_ids = "".join(text), ids if "return_token_ids" in req.body else None
    if not done:
        out.category, out.message = "stream_error", "stream ended without [DONE]"
    else:
        out.category = "abort_missed" if req.kind == "abort" else "completed"


async def send_request(session, url: str, req: PlannedRequest, deadline_s: float, tag: str | None = None) -> Outcome:
    """One request with its deadline; the outcome's category says how it ended.  ``tag``: the request goes out with
    ``X-Request-Id: soak-<tag>-<index>`` (vLLM then names it ``cmpl-soak-<tag>-<index>-0``)."""
    import aiohttp

    t0 = time.perf_counter()
    out = Outcome(req.index, "connection_error", 0.0)

    async def go():
        headers = {"X-Request-Id": f"soak-{tag}-{req.index}"} if tag else None
        async with session.post(url, json=req.body, headers=headers) as resp:
            out.status = resp.status
            if resp.status >= 500:
                out.category, out.message = "server_5xx", _error_message(await resp.read())[:500]
            elif resp.status >= 400:
                msg = _error_message(await resp.read())
                out.message = msg[:500]
                if req.kind == "bad":
                    out.category = "bad_ok" if req.needle.lower() in msg.lower() else "bad_wrong"
                else:
                    out.category = "client_4xx"
            elif req.kind == "bad":
                out.category, out.message = "bad_wrong", f"accepted with HTTP {resp.status}"
                await resp.read()
            elif req.stream:
                await _read_stream(resp, req, out, t0)
            else:
                obj = json.loads(await resp.read())
                ch = (obj.get("choices") or [{}])[0]
                out.text, out.finish_reason = ch.get("text") or "", ch.get("finish_reason")
                out.token_ids = ch.get("token_ids") if "return_token_ids" in req.body else None
                out.completion_tokens = (obj.get("usage") or {}).get("completion_tokens")
                out.cached_tokens = _cached_tokens(obj.get("usage") or {})
                out.category = "completed"

    try:
        await asyncio.wait_for(go(), deadline_s)
    except asyncio.TimeoutError:
        out.category, out.message = "hung", f"no end within {deadline_s:g} s"
    except (aiohttp.ClientError, ConnectionError, ValueError) as e:
        out.category, out.message = "connection_error", f"{type(e).__name__}: {e}"[:500]
    out.latency_s = time.perf_counter() - t0
    return out


async def run_phase(session, url: str, requests: list[PlannedRequest], concurrency: int, deadline_s: float,
                    stop_at: float | None, tag: str | None = None) -> dict[int, Outcome]:
    """Send ``requests`` in order with ``concurrency`` workers; none is started after ``stop_at``
    (time.monotonic) -- those are missing from the result.  ``tag``: see :func:`send_request`."""
    results: dict[int, Outcome] = {}
    pending = iter(requests)

    async def worker():
        for req in pending:
            if stop_at is not None and time.monotonic() > stop_at:
                return
            results[req.index] = await send_request(session, url, req, deadline_s, tag)

    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, len(requests))))))
    return results


# -- /metrics and memory -------------------------------------------------------------------------------------
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """``(name, labels, value)`` of every sample line of a Prometheus text page."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if "{" in line:
            name, rest = line.split("{", 1)
            labels_text, _, value_text = rest.rpartition("}")
            labels = dict(_LABEL.findall(labels_text))
        else:
            name, _, value_text = line.partition(" ")
            labels = {}
        try:
            value = float(value_text.strip().split(" ")[0])
        except ValueError:
            continue
        out.append((name.strip(), labels, value))
    return out


def metric_snapshot(text: str) -> dict[str, Any]:
    """Totals (summed over label sets) of the watched families, ``request_success`` by finish reason and
    ``vllm:cache_config_info``'s labels (the KV cache the server runs with)."""
    totals: dict[str, float] = {}
    success: dict[str, float] = {}
    cache_info: dict[str, str] | None = None
    for name, labels, value in parse_metrics(text):
        if name == "vllm:cache_config_info":
            cache_info = labels
            continue
        if name.endswith("_bucket") or not name.startswith(METRIC_PREFIXES):
            continue
        totals[name] = totals.get(name, 0.0) + value
        if name == "vllm:request_success_total":
            reason = labels.get("finished_reason", "?")
            success[reason] = success.get(reason, 0.0) + value
    return {"totals": totals, "request_success": success, "cache_config": cache_info}


def counter_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """Change of every counter-like total (``_total``, ``_sum``, ``_count``) between two snapshots."""
    b, a = before.get("totals", {}), after.get("totals", {})
    return {k: a[k] - b.get(k, 0.0) for k in sorted(a) if k.endswith(("_total", "_sum", "_count"))}


async def fetch_metrics(session, base: str) -> dict[str, Any] | None:
    import aiohttp

    try:
        async with session.get(f"{base}/metrics", timeout=aiohttp.ClientTimeout(total=10)) as r:
            if r.status != 200:
                return None
            return metric_snapshot(await r.text())
    except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError):
        return None


async def settled_metrics(session, base: str, settle_s: float) -> dict[str, Any] | None:
    """A snapshot once the counters stop moving (vLLM's stats interval; the S2D2 poll trails by one): two equal
    readings ``settle_s`` apart, at most 10 tries."""
    last = None
    for _ in range(10):
        await asyncio.sleep(settle_s)
        cur = await fetch_metrics(session, base)
        if cur is None:
            return last
        if last is not None and not any(counter_delta(last, cur).values()):
            return cur
        last = cur
    return last


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (Linux /proc); empty if it is gone."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    if not Path(f"/proc/{pid}").exists():
        return []
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def tree_rss(pids: Iterable[int]) -> int | None:
    """Resident bytes of the processes ``pids`` (a :func:`process_tree`), None if none of them is left."""
    total, found = 0, False
    page = os.sysconf("SC_PAGE_SIZE")
    for p in pids:
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * page
            found = True
        except (OSError, IndexError, ValueError):
            continue
    return total if found else None


async def _nvidia_smi(*query: str) -> list[list[str]] | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        proc = await asyncio.create_subprocess_exec(exe, *query, "--format=csv,noheader,nounits",
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        out, _ = await asyncio.wait_for(proc.communicate(), 10)
    except (OSError, asyncio.TimeoutError):
        return None
    return [[f.strip() for f in line.split(",")] for line in out.decode().splitlines() if line.strip()]


async def gpu_used_mib(tree: set[int] | None = None) -> tuple[float, str] | None:
    """Device memory in use (MiB) and its scope: the server's own processes (``"server"``: nvidia-smi's compute
    apps whose pid is in ``tree``, the server's process tree), else every visible GPU's (``"gpu"``: shared with
    whatever else runs there, e.g. other test workers).  None without nvidia-smi."""
    if tree:
        apps = await _nvidia_smi("--query-compute-apps=pid,used_memory")
        try:
            mine = [float(mib) for pid, mib in (apps or []) if int(pid) in tree]
        except ValueError:
            mine = []
        if mine:
            return sum(mine), "server"
    rows = await _nvidia_smi("--query-gpu=memory.used")
    try:
        return (sum(float(r[0]) for r in rows), "gpu") if rows else None
    except ValueError:
        return None


async def sampler(session, base: str, interval: float, t_start: float, samples: list[dict], server_pid: int | None,
                  gpu: bool) -> None:
    """Every ``interval`` s: running / waiting requests, KV-cache usage, preemptions, server RSS, GPU memory."""
    while True:
        s: dict[str, Any] = {"t": round(time.monotonic() - t_start, 2)}
        snap = await fetch_metrics(session, base)
        if snap is not None:
            tot = snap["totals"]
            for key, name in (("running", "vllm:num_requests_running"), ("waiting", "vllm:num_requests_waiting"),
                              ("kv_cache_usage", "vllm:kv_cache_usage_perc"),
                              ("preemptions", "vllm:num_preemptions_total")):
                if name in tot:
                    s[key] = tot[name]
        tree = None if server_pid is None else set(await asyncio.to_thread(process_tree, server_pid))
        if tree is not None:
            s["rss_bytes"] = tree_rss(tree)
        if gpu:
            used = await gpu_used_mib(tree)
            if used is not None:
                s["gpu_used_mib"], s["gpu_scope"] = used
        samples.append(s)
        await asyncio.sleep(interval)


def memory_summary(samples: list[dict]) -> dict[str, Any]:
    """Per series: first / last / max and the growth from the start of the run (after the first fifth of the
    samples, the warm-up) to its end (medians of three); ``flat`` against MEMORY_GROWTH, None when too few
    samples.  GPU memory: one ``scope`` only, the one most samples have -- the server's own processes (where
    nvidia-smi names them) or the whole GPU's."""
    out: dict[str, Any] = {}
    for key, (frac, absolute) in MEMORY_GROWTH.items():
        rows = [s for s in samples if s.get(key) is not None]
        scope = None
        if key == "gpu_used_mib" and rows:
            n_server = sum(s.get("gpu_scope") == "server" for s in rows)
            scope = "server" if 2 * n_server >= len(rows) else "gpu"
            rows = [s for s in rows if s.get("gpu_scope", "gpu") == scope]
        xs = [s[key] for s in rows]
        if not xs:
            continue
        entry: dict[str, Any] = {"samples": len(xs), "first": xs[0], "last": xs[-1], "max": max(xs)}
        if scope is not None:
            entry["scope"] = scope
        if len(xs) >= 6:
            warm = xs[len(xs) // 5:]
            start, end = statistics.median(warm[:3]), statistics.median(warm[-3:])
            entry["growth"] = end - start
            entry["allowed_growth"] = max(frac * start, absolute)
            entry["flat"] = entry["growth"] <= entry["allowed_growth"]
        else:
            entry["flat"] = None
        out[key] = entry
    return out


# -- the comparison ------------------------------------------------------------------------------------------
def _tally(rows: list[dict[str, Any]], key: str) -> dict[str, int]:
    """How many ``rows`` have each value of ``key``."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[str(row[key])] = counts.get(str(row[key]), 0) + 1
    return dict(sorted(counts.items()))


def compare(load: Outcome, alone: Outcome, by_ids: bool) -> dict[str, Any] | None:
    """None when the two runs agree (token ids, or text without them), else what differs."""
    a = load.token_ids if by_ids else load.text
    b = alone.token_ids if by_ids else alone.text
    if a == b and (by_ids or load.finish_reason == alone.finish_reason):
        return None
    a, b = a or ([] if by_ids else ""), b or ([] if by_ids else "")
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    lo = max(0, first - 4)
    return {"first_difference": first, "load_len": len(a), "alone_len": len(b),
            "load_around": a[lo:first + 8], "alone_around": b[lo:first + 8],
            "load_text": load.text[:160], "alone_text": alone.text[:160],
            "load_finish": load.finish_reason, "alone_finish": alone.finish_reason}


def percentiles(xs: list[float]) -> dict[str, float] | None:
    xs = sorted(xs)
    if not xs:
        return None

    def q(p):
        return round(xs[min(len(xs) - 1, max(0, math.ceil(p * len(xs)) - 1))], 4)

    return {"n": len(xs), "mean": round(statistics.fmean(xs), 4), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99),
            "max": round(xs[-1], 4)}


def _categories(outcomes: dict[int, Outcome]) -> dict[str, int]:
    names = ("completed", "aborted", "abort_missed", "bad_ok", "bad_wrong", "client_4xx", "server_5xx", "hung",
             "connection_error", "stream_error")
    counts = {n: 0 for n in names}
    for o in outcomes.values():
        counts[o.category] = counts.get(o.category, 0) + 1
    return counts


def _examples(outcomes: dict[int, Outcome], plan: dict[int, PlannedRequest], cats: tuple[str, ...],
              limit: int = 10) -> list[dict]:
    out = []
    for o in sorted(outcomes.values(), key=lambda o: o.index):
        if o.category in cats and len(out) < limit:
            p = plan[o.index]
            out.append({"index": o.index, "category": o.category, "status": o.status, "message": o.message,
                        "kind": p.kind, "bad_input": p.bad_name, "policy": p.policy, "stream": p.stream,
                        "max_tokens": p.body.get("max_tokens"), "latency_s": round(o.latency_s, 3)})
    return out


def consistency_checks(delta: dict[str, float], after: dict[str, Any] | None, load: dict[int, Outcome],
                       counts: dict[str, int], probes: int, require_preemption: bool) -> list[dict]:
    """What /metrics says against what the client saw (only checks whose metrics the server exposes)."""
    checks: list[dict] = []

    def add(name, ok, detail):
        checks.append({"check": name, "ok": bool(ok), "detail": detail})

    s2d2 = {k[len("vllm:s2d2_"):-len("_total")]: v for k, v in delta.items()
            if k.startswith("vllm:s2d2_") and k.endswith("_total")}
    if s2d2:
        add("s2d2 counters moved", s2d2.get("draft_steps", 0) > 0 or counts["completed"] == 0,
            {"draft_steps": s2d2.get("draft_steps")})
        add("accepted <= proposed", s2d2.get("accepted_tokens", 0) <= s2d2.get("proposed_tokens", 0),
            {k: s2d2.get(k) for k in ("accepted_tokens", "proposed_tokens")})
        spec = {k: (s2d2.get(k), delta.get(v)) for k, v in S2D2_TO_SPEC.items() if v in delta}
        if spec:
            add("spec_decode counters = s2d2 counters", all(a == b for a, b in spec.values()),
                {k: {"s2d2": a, "spec_decode": b} for k, (a, b) in spec.items()})
    done = [o for o in load.values() if o.category in ("completed", "abort_missed")]
    if "vllm:generation_tokens_total" in delta:
        client_tokens = sum(o.completion_tokens or 0 for o in done)
        add("generation tokens >= completed requests' tokens", delta["vllm:generation_tokens_total"] >= client_tokens,
            {"server": delta["vllm:generation_tokens_total"], "completed_requests": client_tokens})
    if "vllm:request_success_total" in delta and after is not None:
        finished = delta["vllm:request_success_total"]
        lo = len(done) + probes
        hi = lo + sum(counts[k] for k in ("aborted", "hung", "connection_error", "server_5xx", "stream_error"))
        add("request_success within [completed, completed + cut short]", lo <= finished <= hi + 0.5,
            {"server_finished": finished, "low": lo, "high": hi})
    if after is not None:
        tot = after["totals"]
        left = {k: tot[k] for k in ("vllm:num_requests_running", "vllm:num_requests_waiting") if k in tot}
        if left:
            add("no request left running or waiting", all(v == 0 for v in left.values()), left)
        if "vllm:kv_cache_usage_perc" in tot:
            add("KV cache released", tot["vllm:kv_cache_usage_perc"] <= KV_IDLE_MAX,
                {"kv_cache_usage": tot["vllm:kv_cache_usage_perc"], "max": KV_IDLE_MAX})
    if require_preemption:
        pre = delta.get("vllm:num_preemptions_total")
        add("preemption happened", bool(pre), {"preemptions": pre})
    usage_bad = [o.index for o in done if o.token_ids is not None and o.completion_tokens is not None
                 and len(o.token_ids) != o.completion_tokens]
    add("usage.completion_tokens = returned token ids", not usage_bad, {"violations": usage_bad[:10]})
    return checks


# -- the run -------------------------------------------------------------------------------------------------
@dataclass
class SoakConfig:
    base_url: str
    model: str
    requests: int = 2000
    concurrency: int = 64
    seed: int = 0
    abort_fraction: float = 0.10
    bad_fraction: float = 0.05
    max_tokens: int = 512
    engine_block_size: int = SERVE_TEST_BLOCK_SIZE  # the server's block size (the bad input asks for twice it)
    deadline_s: float = 120.0
    policies: list[str] = field(default_factory=lambda: list(POLICIES))
    prompts: list[str] = field(default_factory=lambda: list(BUILTIN_PROMPTS))
    alone: int = 0  # completed requests re-run at concurrency 1 (0 = all)
    rerun_concurrency: int = 16  # the rest
    max_seconds: float = 0.0  # 0 = no bound on the whole run
    require_preemption: bool = False
    server_pid: int | None = None
    server_log: str | None = None  # the server's log, read after the run for the requests it resumed
    gpu_memory: bool = False
    sample_interval_s: float = 2.0
    settle_s: float = 1.5
    diagnose: int = 0  # mismatching requests sent again alone, with and without the prefix cache (0 = none)
    diagnose_seconds: float = 90.0  # no diagnosis request starts after this many seconds of that phase


_RESUMED = re.compile(r"S2D2 resume after preemption: request cmpl-soak-load-(\d+)-0\b")


def resumed_load_requests(log_text: str) -> set[int]:
    """Indices of the load requests the server resumed from a preemption snapshot, from the lines the plugin logs
    with ``VLLM_S2D2_LOG_RESUMES=1`` (``vllm_s2d2.engine.stats.resume_message``)."""
    return {int(m.group(1)) for m in _RESUMED.finditer(log_text)}


def server_root(base_url: str) -> str:
    root = base_url.rstrip("/")
    return root[:-3] if root.endswith("/v1") else root


async def _probe(session, url: str, model: str, deadline_s: float) -> dict:
    """A tiny greedy request: the server answers, the model name is right, and whether it returns token ids."""
    req = PlannedRequest(-1, "ok", {"model": model, "prompt": BUILTIN_PROMPTS[0], "max_tokens": 2,
                                    "temperature": 0.0, "return_token_ids": True})
    o = await send_request(session, url, req, deadline_s)
    if o.category == "client_4xx":  # a server without vLLM's return_token_ids: compare text
        del req.body["return_token_ids"]
        o = await send_request(session, url, req, deadline_s)
    if o.category != "completed":
        raise SoakSetupError(f"probe request failed ({o.category}, HTTP {o.status}): {o.message}")
    return {"token_ids": o.token_ids is not None, "latency_s": round(o.latency_s, 3)}


async def reset_prefix_cache(session, base: str) -> bool:
    """``POST /reset_prefix_cache`` (a vLLM dev endpoint: the server needs ``VLLM_SERVER_DEV_MODE=1``); True if the
    server emptied its prefix cache."""
    import aiohttp

    try:
        async with session.post(f"{base}/reset_prefix_cache", timeout=aiohttp.ClientTimeout(total=30)) as r:
            return r.status == 200 and bool((await r.json(content_type=None)).get("success"))
    except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError, ValueError):
        return False


def diagnosis_kind(cold_load: bool, cold_rerun: bool, warm_load: bool, warm_rerun: bool) -> str:
    """What a mismatching request's two diagnosis runs (alone; ``cold``: after the prefix cache was emptied,
    ``warm``: right after, its prompt blocks cached) point to:

    * ``prefix_cache``: cold = the run under load, warm = the re-run -- the output follows whether the prompt's
      KV came from the prefix cache;
    * ``load_path``: cold = warm = the re-run, not the run under load -- something of the run under load
      (preemption, batch, chunking) changed it;
    * ``not_reproducible``: neither run reproduces the re-run;
    * ``other``: any other pattern."""
    if cold_load and warm_rerun and not warm_load:
        return "prefix_cache"
    if cold_rerun and warm_rerun and not cold_load:
        return "load_path"
    if not (cold_rerun or warm_rerun):
        return "not_reproducible"
    return "other"


async def diagnose(session, base: str, url: str, requests: list[PlannedRequest], load: dict[int, Outcome],
                   reruns: dict[int, Outcome], by_ids: bool, cfg: SoakConfig) -> dict[str, Any]:
    """Each mismatching request once more alone after emptying the prefix cache (``cold``) and once right after
    (``warm``); :func:`diagnosis_kind` of each, tallied.  Bounded by ``cfg.diagnose_seconds``."""
    stop_at = time.monotonic() + cfg.diagnose_seconds
    rows = []
    for req in requests:
        if time.monotonic() > stop_at:
            break
        reset = await reset_prefix_cache(session, base)
        cold = await send_request(session, url, req, cfg.deadline_s, "cold")
        warm = await send_request(session, url, req, cfg.deadline_s, "warm")
        if cold.category != "completed" or warm.category != "completed":
            rows.append({"index": req.index, "reset": reset, "kind": "failed",
                         "categories": [cold.category, warm.category]})
            continue
        same = {f"{a}_{b}": compare(x, y, by_ids) is None
                for a, x in (("cold", cold), ("warm", warm)) for b, y in (("load", load[req.index]),
                                                                           ("rerun", reruns[req.index]))}
        kind = diagnosis_kind(same["cold_load"], same["cold_rerun"], same["warm_load"], same["warm_rerun"])
        rows.append({"index": req.index, "reset": reset, "kind": kind if reset else f"{kind} (no cache reset)",
                     **same, "cold_cached_tokens": cold.cached_tokens, "warm_cached_tokens": warm.cached_tokens})
    return {"requested": len(requests), "run": len(rows), "kinds": _tally(rows, "kind"), "requests": rows}


def compare_reruns(load: dict[int, Outcome], alone: dict[int, Outcome], batched: dict[int, Outcome],
                   by_index: dict[int, PlannedRequest], by_ids: bool) -> tuple[dict, list[dict], list[dict]]:
    """Each re-run against its run under load: ``(reruns, mismatches, failed)`` -- index -> (phase, outcome), the
    completed re-runs that differ (with the request's options and :func:`compare`'s detail), the ones that did not
    complete."""
    reruns = {**{i: ("alone", o) for i, o in alone.items()}, **{i: ("batched", o) for i, o in batched.items()}}
    mismatches, failed = [], []
    for i, (phase, o) in sorted(reruns.items()):
        p = by_index[i]
        if o.category != "completed":
            failed.append({"index": i, "phase": phase, "category": o.category, "message": o.message})
            continue
        diff = compare(load[i], o, by_ids)
        if diff is not None:
            mismatches.append({"index": i, "phase": phase, "policy": p.policy, "sampling": p.sampling,
                               "stream": p.stream, "max_tokens": p.body.get("max_tokens"),
                               "seed": p.body.get("seed"), "stop": p.body.get("stop"),
                               "cached_tokens": [load[i].cached_tokens, o.cached_tokens], **diff})
    return reruns, mismatches, failed


async def run_soak(cfg: SoakConfig) -> dict[str, Any]:
    """The whole run; returns the record (verdict included)."""
    import aiohttp

    t_start = time.monotonic()
    stop_at = t_start + cfg.max_seconds if cfg.max_seconds > 0 else None
    base = server_root(cfg.base_url)
    url = f"{base}/v1/completions"
    connector = aiohttp.TCPConnector(limit=max(cfg.concurrency, cfg.rerun_concurrency) + 8)  # + /metrics
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        probe = await _probe(session, url, cfg.model, cfg.deadline_s)
        record: dict[str, Any] = {"benchmark": "soak", "schema": SCHEMA, "call": bench_records.run_metadata(),
                                  "base_url": base, "model": cfg.model,
                                  "args": {k: v for k, v in vars(cfg).items() if k != "prompts"}}
        record["args"]["prompts"] = len(cfg.prompts)
        by_ids = probe["token_ids"]
        record["compare_by"] = "token_ids" if by_ids else "text"
        plan = build_plan(cfg.requests, cfg.model, cfg.seed, cfg.prompts, cfg.policies, cfg.abort_fraction,
                          cfg.bad_fraction, cfg.max_tokens, token_ids=by_ids,
                          engine_block_size=cfg.engine_block_size)
        by_index = {p.index: p for p in plan}
        record["plan"] = {"requests": len(plan), "digest": plan_digest(plan), "composition": plan_composition(plan)}
        samples: list[dict] = []
        sampler_task = asyncio.create_task(sampler(session, base, cfg.sample_interval_s, t_start, samples,
                                                   cfg.server_pid, cfg.gpu_memory))
        try:
            m_before = await settled_metrics(session, base, cfg.settle_s)
            t0 = time.monotonic()
            load = await run_phase(session, url, plan, cfg.concurrency, cfg.deadline_s, stop_at, "load")
            load_s = time.monotonic() - t0
            # one request after the load: the gauges (running / waiting / KV usage) are refreshed by a step
            probes = 1
            await send_request(session, url, PlannedRequest(-2, "ok", {"model": cfg.model, "prompt": "x",
                                                                        "max_tokens": 2, "temperature": 0.0}),
                               cfg.deadline_s)
            m_load = await settled_metrics(session, base, cfg.settle_s)

            eligible = [by_index[i] for i, o in sorted(load.items()) if o.category == "completed"
                        and by_index[i].kind == "ok"]
            order = list(eligible)
            random.Random(cfg.seed + 1).shuffle(order)
            n_alone = len(order) if cfg.alone == 0 else min(cfg.alone, len(order))
            t1 = time.monotonic()
            alone = await run_phase(session, url, order[:n_alone], 1, cfg.deadline_s, stop_at, "alone")
            alone_s = time.monotonic() - t1
            m_alone = await settled_metrics(session, base, cfg.settle_s)
            t2 = time.monotonic()
            batched = await run_phase(session, url, order[n_alone:], cfg.rerun_concurrency, cfg.deadline_s, stop_at,
                                      "rerun")
            batched_s = time.monotonic() - t2
            m_after = await settled_metrics(session, base, cfg.settle_s)
            reruns, mismatches, rerun_failed = compare_reruns(load, alone, batched, by_index, by_ids)
            diagnosis = await diagnose(session, base, url, [by_index[m["index"]] for m in mismatches[:cfg.diagnose]],
                                       load, {i: o for i, (_, o) in reruns.items()}, by_ids,
                                       cfg) if cfg.diagnose else None
            health = await _health(session, base)
        finally:
            sampler_task.cancel()
            try:
                await sampler_task
            except asyncio.CancelledError:
                pass

    counts = _categories(load)
    n_bad = sum(p.kind == "bad" for p in plan)
    counts = {"planned": len(plan), "sent": len(load), "not_sent": len(plan) - len(load), **counts,
              "bad_input_planned": n_bad, "bad_input_4xx": counts["bad_ok"],
              "aborts_planned": sum(p.kind == "abort" for p in plan)}
    record["counts"] = counts
    record["failures"] = _examples(load, by_index, ("bad_wrong", "client_4xx", "server_5xx", "hung",
                                                    "connection_error", "stream_error"))
    bad_msgs: dict[str, str] = {}
    for o in load.values():
        p = by_index[o.index]
        if p.kind == "bad" and o.category == "bad_ok" and p.bad_name not in bad_msgs:
            bad_msgs[p.bad_name] = o.message
    record["bad_input_messages"] = dict(sorted(bad_msgs.items()))

    compared = [{"policy": by_index[i].policy, "sampling": by_index[i].sampling, "phase": phase}
                for i, (phase, o) in reruns.items() if o.category == "completed"]
    resumed = None
    if cfg.server_log:  # which load requests were preempted after emitting tokens (and resumed)
        try:
            resumed = resumed_load_requests(Path(cfg.server_log).read_text(errors="replace"))
        except OSError:
            pass
    if resumed is not None:
        for m in mismatches:
            m["resumed"] = m["index"] in resumed
    rerun_cats = _categories({i: o for i, (_, o) in reruns.items()})
    record["rerun"] = {"eligible": len(eligible), "alone_sent": len(alone), "batched_sent": len(batched),
                       "rerun_concurrency": cfg.rerun_concurrency, "not_sent": len(eligible) - len(reruns),
                       "compared": len(reruns) - len(rerun_failed), "mismatches": len(mismatches),
                       "mismatches_by_policy": _tally(mismatches, "policy"),
                       "mismatches_by_sampling": _tally(mismatches, "sampling"),
                       "mismatches_by_phase": _tally(mismatches, "phase"),
                       "compared_by_policy": _tally(compared, "policy"),
                       "compared_by_sampling": _tally(compared, "sampling"),
                       "resumed_under_load": None if resumed is None else {
                           "requests": len(resumed),
                           "compared": sum(i in resumed for i, (_, o) in reruns.items() if o.category == "completed"),
                           "mismatches": sum(m["index"] in resumed for m in mismatches)},
                       "mismatch_examples": mismatches[:40],
                       "failed": len(rerun_failed), "failed_examples": rerun_failed[:10], "categories": rerun_cats}

    snaps = {"before": m_before, "after_load": m_load, "after_alone": m_alone, "after_rerun": m_after}
    have = all(s is not None for s in (m_before, m_load))
    d_load = counter_delta(m_before, m_load) if have else {}
    d_alone = counter_delta(m_load, m_alone) if m_load and m_alone else {}
    d_batched = counter_delta(m_alone, m_after) if m_alone and m_after else {}
    pre = "vllm:num_preemptions_total"
    record["preemptions"] = {
        "load": d_load.get(pre), "alone_reruns": d_alone.get(pre), "batched_reruns": d_batched.get(pre),
        "mid_verification": d_load.get("vllm:s2d2_verify_restarts_total"),
        "note": "vllm:num_preemptions (engine-wide; the server does not say which requests); mid_verification: "
                "vllm:s2d2_verify_restarts, verifications interrupted by a preemption and redone (null: the "
                "server does not export it)"}
    record["metrics"] = {"cache_config": (m_before or {}).get("cache_config"),
                         "delta_load": d_load, "delta_alone_reruns": d_alone, "delta_batched_reruns": d_batched,
                         "request_success_load": _success_delta(m_before, m_load),
                         "snapshots": {k: (v or {}).get("totals") for k, v in snaps.items()}}
    record["consistency"] = consistency_checks(d_load, m_load, load, counts, probes, cfg.require_preemption)
    record["memory"] = memory_summary(samples)
    step = max(1, len(samples) // 200)
    record["samples"] = samples[::step]
    done = [o for o in load.values() if o.category in ("completed", "abort_missed")]
    record["latency_s"] = {
        "completed": percentiles([o.latency_s for o in done]),
        "completed_stream": percentiles([o.latency_s for o in done if by_index[o.index].stream]),
        "completed_non_stream": percentiles([o.latency_s for o in done if not by_index[o.index].stream]),
        "ttft_stream": percentiles([o.ttft_s for o in done if o.ttft_s is not None]),
        "aborted": percentiles([o.latency_s for o in load.values() if o.category == "aborted"]),
        "bad_input": percentiles([o.latency_s for o in load.values() if by_index[o.index].kind == "bad"]),
        "alone_rerun": percentiles([o.latency_s for o in alone.values() if o.category == "completed"]),
    }
    record["completion_tokens"] = sum(o.completion_tokens or 0 for o in done)
    record["phases_s"] = {"load": round(load_s, 2), "alone_reruns": round(alone_s, 2),
                          "batched_reruns": round(batched_s, 2), "total": round(time.monotonic() - t_start, 2)}
    record["diagnosis"] = diagnosis
    record["server_alive"] = health
    record["probe"] = probe
    record["verdict"], record["reasons"] = verdict(record)
    return record


def _success_delta(before, after) -> dict[str, float] | None:
    if not before or not after:
        return None
    b = before["request_success"]
    return {k: v - b.get(k, 0.0) for k, v in sorted(after["request_success"].items())}


async def _health(session, base: str) -> bool:
    import aiohttp

    try:
        async with session.get(f"{base}/health", timeout=aiohttp.ClientTimeout(total=10)) as r:
            return r.status == 200
    except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError):
        return False


def verdict(record: dict) -> tuple[str, list[str]]:
    """#17's pass criteria: every request sent and ended within its deadline, no 5xx / broken stream / lost
    connection, every bad input a 4xx naming the problem (and no other 4xx), every completed request re-run and
    equal, the counters consistent, memory flat, the server alive."""
    c, r = record["counts"], record["rerun"]
    reasons = []
    for key, what in (("not_sent", "requests not sent (time budget)"), ("hung", "hung requests"),
                      ("server_5xx", "server errors (5xx)"), ("stream_error", "broken streams"),
                      ("connection_error", "lost connections"), ("client_4xx", "unexpected 4xx"),
                      ("bad_wrong", "bad inputs without a 4xx naming the problem")):
        if c[key]:
            reasons.append(f"{c[key]} {what}")
    if c["aborts_planned"] and c["aborted"] < c["aborts_planned"] / 2:
        reasons.append(f"only {c['aborted']} of {c['aborts_planned']} planned aborts cut a stream")
    if r["mismatches"]:
        reasons.append(f"{r['mismatches']} re-runs differ from the run under load")
    if r["failed"]:
        reasons.append(f"{r['failed']} re-runs did not complete")
    if r["not_sent"]:
        reasons.append(f"{r['not_sent']} of {r['eligible']} completed requests not re-run (time budget)")
    for chk in record["consistency"]:
        if not chk["ok"]:
            reasons.append(f"metrics: {chk['check']} fails ({chk['detail']})")
    for key, m in record["memory"].items():
        if m.get("flat") is False:
            reasons.append(f"memory not flat: {key} grew by {m['growth']:.0f} (allowed {m['allowed_growth']:.0f})")
    if not record["server_alive"]:
        reasons.append("server not healthy after the run")
    return ("FAIL" if reasons else "PASS"), reasons


def summary_line(record: dict) -> str:
    c, r = record["counts"], record["rerun"]
    head = "SOAK PASS" if record["verdict"] == "PASS" else "SOAK FAIL: " + "; ".join(record["reasons"])
    return (f"{head}\n  sent {c['sent']}/{c['planned']}, completed {c['completed']}, aborted {c['aborted']}, "
            f"bad-input 4xx {c['bad_input_4xx']}/{c['bad_input_planned']}, 5xx {c['server_5xx']}, hung {c['hung']}, "
            f"re-run {r['compared']}/{r['eligible']} ({r['alone_sent']} alone), mismatches {r['mismatches']}, "
            f"preemptions {record['preemptions']['load']}, {record['phases_s']['total']} s")


# -- command line ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(prog="benchmarks/soak.py", description=__doc__.split("\n")[0])
    ap.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000 (a /v1 suffix is ok)")
    ap.add_argument("--model", required=True, help="served model name")
    ap.add_argument("--requests", type=int_arg(1), default=2000)
    ap.add_argument("--concurrency", type=int_arg(1), default=64)
    ap.add_argument("--out", required=True, help="JSON record to write")
    ap.add_argument("--seed", type=int_arg(0), default=0)
    ap.add_argument("--abort-fraction", type=float_arg(0, 1), default=0.10, help="share cut mid-stream")
    ap.add_argument("--bad-fraction", type=float_arg(0, 1), default=0.05, help="share from the bad-input matrix")
    ap.add_argument("--max-tokens", type=int_arg(1), default=512, help="max_tokens is drawn from 1..this")
    ap.add_argument("--engine-block-size", type=int_arg(1), default=SERVE_TEST_BLOCK_SIZE,
                    help="the server's block size: the bad input 'block size vs engine' asks for twice it")
    ap.add_argument("--deadline", type=float_arg(0, lo_open=True), default=120.0,
                    help="seconds a request may take before it counts as hung")
    ap.add_argument("--policies", default=",".join(POLICIES), help=f"comma-separated, from {list(POLICIES)}")
    ap.add_argument("--prompts", default=None, help="JSONL file with a prompt field per line (default: built-in)")
    ap.add_argument("--alone", type=int_arg(0), default=0,
                    help="completed requests re-run alone (concurrency 1); 0 = all")
    ap.add_argument("--rerun-concurrency", type=int_arg(1), default=16,
                    help="concurrency of the re-runs beyond --alone")
    ap.add_argument("--max-seconds", type=float_arg(0), default=0.0,
                    help="no request is started after this many seconds (0 = no bound); what is left counts as "
                         "not sent and fails the run")
    ap.add_argument("--require-preemption", action="store_true", help="fail unless the server preempted")
    ap.add_argument("--server-pid", type=int_arg(1), default=None, help="sample this process tree's RSS")
    ap.add_argument("--server-log", default=None,
                    help="the server's log (run with VLLM_S2D2_LOG_RESUMES=1): which load requests were resumed after "
                         "a preemption, counted among the compared and the mismatching re-runs")
    ap.add_argument("--gpu-memory", action="store_true", help="sample GPU memory in use (nvidia-smi)")
    ap.add_argument("--diagnose", type=int_arg(0), default=0,
                    help="send up to this many mismatching requests again alone, after emptying the prefix cache "
                         "and right after (needs VLLM_SERVER_DEV_MODE=1 on the server); recorded, never a failure")
    ap.add_argument("--diagnose-seconds", type=float_arg(0, lo_open=True), default=90.0,
                    help="no diagnosis request starts after this many seconds of the diagnosis")
    ap.add_argument("--sample-interval", type=float_arg(0, lo_open=True), default=2.0)
    ap.add_argument("--settle", type=float_arg(0), default=1.5,
                    help="seconds between /metrics readings while waiting for the counters to settle")
    return ap


def config_from_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> SoakConfig:
    """Checks across arguments (one-line errors naming the argument, exit 2)."""
    if not re.match(r"^https?://[^/\s]+", args.base_url):
        ap.error(f"argument --base-url: must be an http(s) URL such as http://127.0.0.1:8000, got {args.base_url!r}")
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = [p for p in policies if p not in POLICIES]
    if not policies or unknown or len(set(policies)) != len(policies):
        ap.error(f"argument --policies: must be comma-separated names from {list(POLICIES)}, each once; "
                 f"got {args.policies!r}")
    if args.abort_fraction + args.bad_fraction > 1:
        ap.error(f"argument --abort-fraction: with --bad-fraction it must sum to at most 1, got "
                 f"{args.abort_fraction:g} + {args.bad_fraction:g}")
    prompts = list(BUILTIN_PROMPTS)
    if args.prompts is not None:
        try:
            lines = Path(args.prompts).read_text(encoding="utf-8").splitlines()
            prompts = [json.loads(ln)["prompt"] for ln in lines if ln.strip()]
        except (OSError, ValueError, KeyError, TypeError) as e:
            ap.error(f"argument --prompts: must be a JSONL file with a prompt field per line, got {args.prompts!r} "
                     f"({type(e).__name__}: {e})")
        if not prompts or not all(isinstance(p, str) and p for p in prompts):
            ap.error(f"argument --prompts: no non-empty prompt strings in {args.prompts!r}")
    if args.server_log is not None and not Path(args.server_log).is_file():
        ap.error(f"argument --server-log: no such file {args.server_log!r} (the server's log, written as it runs)")
    out = Path(args.out)
    if out.is_dir():
        ap.error(f"argument --out: {args.out!r} is a directory; give a file name")
    return SoakConfig(base_url=args.base_url, model=args.model, requests=args.requests, concurrency=args.concurrency,
                      seed=args.seed, abort_fraction=args.abort_fraction, bad_fraction=args.bad_fraction,
                      max_tokens=args.max_tokens, engine_block_size=args.engine_block_size,
                      deadline_s=args.deadline, policies=policies, prompts=prompts,
                      alone=args.alone, rerun_concurrency=args.rerun_concurrency, max_seconds=args.max_seconds,
                      require_preemption=args.require_preemption, server_pid=args.server_pid,
                      server_log=args.server_log,
                      gpu_memory=args.gpu_memory, sample_interval_s=args.sample_interval, settle_s=args.settle,
                      diagnose=args.diagnose, diagnose_seconds=args.diagnose_seconds)


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    cfg = config_from_args(ap, args)
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        print(f"{ap.prog}: error: aiohttp is not installed (pip install aiohttp)", file=sys.stderr)
        return 2
    try:
        record = asyncio.run(run_soak(cfg))
    except SoakSetupError as e:
        print(f"{ap.prog}: error: {e}", file=sys.stderr)
        return 1
    bench_records.write_json(args.out, record)
    print(summary_line(record))
    print(f"wrote {args.out}")
    return 0 if record["verdict"] == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
