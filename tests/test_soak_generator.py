"""``benchmarks/soak.py`` (#17's load generator) against a fake OpenAI-compatible server, on CPU.

The fake server (aiohttp, in a thread) answers ``/v1/completions`` with deterministic tokens (streaming and not,
``return_token_ids``), the bad-input matrix with 400 + a message, ``/metrics`` with vLLM's names, and can be told
to hang one request, answer one with 500, return a different token for a repeated request (the "alone" re-run),
accept a bad input, or report spec-decode counters that disagree with ``vllm:s2d2_*``.  Each fault must turn the
verdict to FAIL and show in its count; a clean server must PASS."""

from __future__ import annotations

import ast
import asyncio
import hashlib
import json
import math
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

aiohttp = pytest.importorskip("aiohttp")
from aiohttp import web  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import soak  # noqa: E402

BLOCK = 4
KNOWN_OPTIONS = {"verify", "verify_policy", "min_span_length", "score_type", "acceptance", "preset",
                 "confidence_threshold", "block_size"}
VERIFY_POLICIES = ("mask_span_length", "score_threshold", "score_hysteresis", "contextual_bandit_ucb")


class FakeServer:
    """Deterministic completions; ``faults``: ``hang_nth`` / ``error_nth`` (n-th valid completion request, the
    start-up probe is the first), ``diverge_repeat`` (a body seen before gets one token changed, once),
    ``accept_bad`` (``logprobs`` accepted), ``spec_drift`` (spec-decode drafts run ahead of the verify steps,
    one per request), ``preempt_every`` (a preemption counted every n-th request; 0 = none), ``prefix_dependent``
    (a prompt seen before since the last ``/reset_prefix_cache`` -- "cached" -- gets its last token changed)."""

    def __init__(self, block: int = BLOCK, **faults):
        self.block = block  # the engine's block size: a request asking for another is refused
        self.faults = {"hang_nth": None, "error_nth": None, "diverge_repeat": False, "accept_bad": False,
                       "spec_drift": False, "preempt_every": 3, "prefix_dependent": False, **faults}
        self.cached_prompts: set[str] = set()
        self.resets = 0
        self.valid_seen = 0
        self.request_ids: list[str | None] = []
        self.bodies: dict[str, int] = {}
        self.diverged = 0
        self.disconnects = 0
        self.running = 0
        self.c = {"preemptions": 0, "generation_tokens": 0, "draft_steps": 0, "verify_steps": 0,
                  "proposed_tokens": 0, "accepted_tokens": 0, "committed_blocks": 0}
        self.success = {"stop": 0, "length": 0, "abort": 0}
        self.loop = asyncio.new_event_loop()
        self.release = None
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(sock, ready), daemon=True)
        self.thread.start()
        assert ready.wait(10)

    def _serve(self, sock, ready):
        asyncio.set_event_loop(self.loop)
        self.release = asyncio.Event()
        app = web.Application()
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/health", self.health)
        app.router.add_post("/reset_prefix_cache", self.reset_prefix_cache)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.SockSite(self.runner, sock).start())
        ready.set()
        self.loop.run_forever()

    def stop(self):
        async def shutdown():
            self.release.set()
            await self.runner.cleanup()

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(15)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    async def health(self, request):
        return web.Response(text="ok")

    async def reset_prefix_cache(self, request):
        self.cached_prompts.clear()
        self.resets += 1
        return web.json_response({"success": True})

    # -- request handling ------------------------------------------------------------------------------
    def _bad(self, body) -> str | None:
        """The 400 message of a bad request (the plugin's wording, shortened), None if it is fine."""
        if body.get("n") not in (None, 1):
            return f"does not support these sampling parameters: n={body['n']}"
        if body.get("logprobs") is not None:
            return "does not support these sampling parameters: logprobs"
        if len(str(body.get("prompt", "")).split()) > 1000:
            return "This model's maximum context length is 1024 tokens"
        if body.get("max_tokens", 1) < 1:
            return "max_tokens must be at least 1, got 0"
        opts = {}
        for k, v in (body.get("vllm_xargs") or {}).items():
            if k == "s2d2":
                try:
                    opts.update(json.loads(v))
                except ValueError:
                    return "extra_args['s2d2'] is not valid JSON"
            elif k.startswith("s2d2."):
                opts[k[5:]] = v
        unknown = sorted(set(opts) - KNOWN_OPTIONS)
        if unknown:
            return f"unknown S2D2 option(s) {unknown}"
        if opts.get("verify_policy", VERIFY_POLICIES[0]) not in VERIFY_POLICIES:
            return f"S2D2 option verify_policy={opts['verify_policy']!r} is invalid"
        if float(opts.get("confidence_threshold", 0.5)) > 1:
            return "S2D2 option confidence_threshold=2.0 must lie in [0.0, 1.0]"
        if int(opts.get("block_size", self.block)) != self.block:
            return f"per-request block_size={opts['block_size']} differs from the engine's block_size={self.block}"
        return None

    @staticmethod
    def _tokens(body) -> tuple[list[int], str]:
        """Token ids from a hash of what decides them (prompt, sampling, options); EOS early unless ignored."""
        key = json.dumps([body.get("prompt"), body.get("temperature"), body.get("seed"), body.get("top_p"),
                          body.get("top_k"), body.get("vllm_xargs")], sort_keys=True)
        h = int(hashlib.sha256(key.encode()).hexdigest(), 16)
        n = body["max_tokens"]
        if not body.get("ignore_eos"):
            n = min(n, 5 + h % 200)
        ids = [(h >> (i % 200)) % 1000 + i for i in range(n)]
        return ids, "length" if n == body["max_tokens"] else "stop"

    def _count(self, ids: list[int]) -> None:
        n = len(ids)
        self.c["generation_tokens"] += n
        self.c["draft_steps"] += math.ceil(n / BLOCK) + 1
        self.c["verify_steps"] += n // 8
        self.c["proposed_tokens"] += 2 * (n // 8)
        self.c["accepted_tokens"] += n // 8
        self.c["committed_blocks"] += n // BLOCK

    async def completions(self, request):
        body = await request.json()
        self.request_ids.append(request.headers.get("X-Request-Id"))
        msg = self._bad(body)
        if msg is not None and not (self.faults["accept_bad"] and "logprobs" in msg):
            return web.json_response({"error": {"message": msg, "type": "BadRequestError", "code": 400}}, status=400)
        self.valid_seen += 1
        nth = self.valid_seen
        every = self.faults["preempt_every"]
        if every and nth % every == 0:
            self.c["preemptions"] += 1
        if nth == self.faults["hang_nth"]:
            try:
                await asyncio.wait_for(self.release.wait(), 30)
            except asyncio.TimeoutError:
                pass
            return web.json_response({"error": {"message": "late"}}, status=500)
        if nth == self.faults["error_nth"]:
            return web.json_response({"error": {"message": "boom", "type": "InternalServerError"}}, status=500)
        key = json.dumps(body, sort_keys=True)
        self.bodies[key] = self.bodies.get(key, 0) + 1
        ids, finish = self._tokens(body)
        if self.faults["diverge_repeat"] and self.bodies[key] == 2 and not self.diverged and ids:
            self.diverged += 1
            ids = ids[:-1] + [ids[-1] + 1]
        text = "".join(f" t{i}" for i in ids)
        prompt = str(body.get("prompt"))
        cached = prompt in self.cached_prompts
        self.cached_prompts.add(prompt)
        if self.faults["prefix_dependent"] and cached and ids:
            ids = ids[:-1] + [ids[-1] + 1]
        usage = {"prompt_tokens": 7, "completion_tokens": len(ids), "total_tokens": 7 + len(ids),
                 "prompt_tokens_details": {"cached_tokens": 5 if cached else 0}}
        with_ids = bool(body.get("return_token_ids"))
        self.running += 1
        try:
            if not body.get("stream"):
                self._count(ids)
                self.success[finish] += 1
                choice = {"index": 0, "text": text, "finish_reason": finish}
                if with_ids:
                    choice["token_ids"] = ids
                return web.json_response({"id": "cmpl-x", "object": "text_completion", "choices": [choice],
                                          "usage": usage})
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            sent: list[int] = []
            try:
                for start in range(0, len(ids), BLOCK):
                    part = ids[start:start + BLOCK]
                    last = start + BLOCK >= len(ids)
                    choice = {"index": 0, "text": "".join(f" t{i}" for i in part),
                              "finish_reason": finish if last else None}
                    if with_ids:
                        choice["token_ids"] = part
                    await resp.write(b"data: " + json.dumps({"choices": [choice]}).encode() + b"\n\n")
                    sent += part
                    await asyncio.sleep(0.001)
                if (body.get("stream_options") or {}).get("include_usage"):
                    await resp.write(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n")
                await resp.write(b"data: [DONE]\n\n")
            except (ConnectionResetError, ConnectionError):
                self.disconnects += 1
                self._count(sent)
                self.success["abort"] += 1
                return resp
            self._count(ids)
            self.success[finish] += 1
            return resp
        finally:
            self.running -= 1

    async def metrics(self, request):
        lab = 'model_name="fake",engine="0"'
        c = self.c
        spec_drafts = c["verify_steps"] + (self.valid_seen if self.faults["spec_drift"] else 0)
        lines = [
            "# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.",
            "# TYPE vllm:num_preemptions_total counter",
            f"vllm:num_preemptions_total{{{lab}}} {float(c['preemptions'])}",
            f"vllm:generation_tokens_total{{{lab}}} {float(c['generation_tokens'])}",
            f"vllm:num_requests_running{{{lab}}} {float(self.running)}",
            f"vllm:num_requests_waiting{{{lab}}} 0.0",
            f"vllm:kv_cache_usage_perc{{{lab}}} {self.running / 64:.4f}",
            f'vllm:cache_config_info{{block_size="16",num_gpu_blocks="512",{lab}}} 1.0',
            f"vllm:spec_decode_num_drafts_total{{{lab}}} {float(spec_drafts)}",
            f"vllm:spec_decode_num_draft_tokens_total{{{lab}}} {float(c['proposed_tokens'])}",
            f"vllm:spec_decode_num_accepted_tokens_total{{{lab}}} {float(c['accepted_tokens'])}",
            f'vllm:diffusion_num_denoising_steps_bucket{{le="+Inf",{lab}}} 3.0',
        ]
        for k in ("draft_steps", "verify_steps", "proposed_tokens", "accepted_tokens", "committed_blocks"):
            lines.append(f"vllm:s2d2_{k}_total{{{lab}}} {float(c[k])}")
        for reason, v in self.success.items():
            lines.append(f'vllm:request_success_total{{{lab},finished_reason="{reason}"}} {float(v)}')
        return web.Response(text="\n".join(lines) + "\n")


@pytest.fixture
def fake_server(request):
    servers = []

    def make(**faults):
        s = FakeServer(**faults)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.stop()


def run(server, **kw) -> dict:
    args = dict(base_url=server.url, model="fake", requests=60, concurrency=8, seed=3, abort_fraction=0.1,
                bad_fraction=0.15, max_tokens=48, deadline_s=5.0, alone=8, rerun_concurrency=8, settle_s=0.05,
                sample_interval_s=0.1, require_preemption=True)
    args.update(kw)
    return asyncio.run(soak.run_soak(soak.SoakConfig(**args)))


# -- the plan ------------------------------------------------------------------------------------------------
def test_plan_is_seeded_and_mixed():
    def plan(seed, n=400):
        return soak.build_plan(n, "m", seed, soak.BUILTIN_PROMPTS, list(soak.POLICIES), 0.1, 0.05, 512)

    a, b, other = plan(0), plan(0), plan(1)
    assert soak.plan_digest(a) == soak.plan_digest(b) != soak.plan_digest(other)
    comp = soak.plan_composition(a)
    assert comp["kinds"] == {"abort": 40, "bad": 20, "ok": 340}
    assert set(comp["policies"]) == set(soak.POLICIES)
    assert set(comp["sampling"]) == {"greedy", "seeded"} and set(comp["stream"]) == {"True", "False"}
    assert set(comp["bad_inputs"]) == set(soak.BAD_INPUTS)  # the whole matrix is sent
    assert comp["with_stop"] > 0 and comp["ignore_eos"] > 0
    lo, hi = comp["max_tokens_range"]
    assert 1 <= lo < 20 and 490 < hi <= 512
    for p in a:
        if p.sampling == "seeded":
            assert p.body["temperature"] > 0 and "seed" in p.body
        if p.kind == "abort":
            assert p.stream and p.abort_after_chunks and p.body["ignore_eos"]
        if p.kind != "bad":
            assert p.body["return_token_ids"] is True


def test_policy_spellings_are_accepted_and_bad_xargs_refused_by_the_plugin():
    """Every per-request policy of the soak is valid for the demo checkpoint's family (SDAR, B = 4) under the
    plugin's own parser, and every bad ``vllm_xargs`` of the matrix is refused naming the problem."""
    from vllm_s2d2.engine.settings import request_config
    from vllm_s2d2.s2d2_config import S2D2Config

    engine = S2D2Config().resolve("sdar", 4)
    for name, xargs in soak.POLICIES.items():
        if xargs is not None:
            request_config(engine, xargs, "sdar", 4)  # raises if a spelling is wrong
    for name, (extra, needle) in soak.BAD_INPUTS.items():
        if "vllm_xargs" in extra:
            with pytest.raises(ValueError) as e:
                request_config(engine, extra["vllm_xargs"], "sdar", 4)
            assert needle.lower() in str(e.value).lower(), (name, str(e.value))


def test_bad_input_matrix_equals_test_serve():
    """soak.BAD_INPUTS / BAD_BASE are tests/gpu/test_serve.py's BAD / _complete, with extra_body flattened."""
    tree = ast.parse((REPO / "tests" / "gpu" / "test_serve.py").read_text())
    consts = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            consts[node.targets[0].id] = node.value
    bad = eval(compile(ast.Expression(consts["BAD"]), "test_serve.py", "eval"), {"dict": dict})  # noqa: S307
    assert list(bad) == list(soak.BAD_INPUTS)
    for name, (kw, needle) in bad.items():
        body = {k: v for k, v in kw.items() if k != "extra_body"}
        body.update(kw.get("extra_body", {}))
        assert (body, needle) == soak.BAD_INPUTS[name], name
    assert ast.literal_eval(consts["PROMPT"]) == soak.BAD_BASE["prompt"]


def test_metric_names_exist_in_vllm():
    """The /metrics names soak.py reads are the ones vLLM 0.26 registers (``_total`` added by the client)."""
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    if spec is None:
        pytest.skip("vllm not installed")
    src = (Path(spec.origin).parent / "v1" / "metrics" / "loggers.py").read_text()
    for name in ("vllm:num_preemptions", "vllm:kv_cache_usage_perc", "vllm:num_requests_running",
                 "vllm:num_requests_waiting", "vllm:request_success", "vllm:generation_tokens",
                 "vllm:cache_config_info"):
        assert f'"{name}"' in src, name
    from vllm_s2d2.engine.metrics import SPEC_DECODE

    assert {v for v in soak.S2D2_TO_SPEC.values()} == {f"{k}_total" for k in SPEC_DECODE}
    assert {k for k in soak.S2D2_TO_SPEC} == {v[0] for v in SPEC_DECODE.values()}


def test_parse_metrics_sums_label_sets():
    text = ('# HELP x y\nvllm:request_success_total{finished_reason="stop",model_name="m"} 3.0\n'
            'vllm:request_success_total{finished_reason="abort",model_name="m"} 2.0\n'
            'vllm:num_preemptions_total{model_name="m"} 7.0\nother_metric 1\n'
            'vllm:cache_config_info{block_size="16",num_gpu_blocks="512"} 1.0\n')
    snap = soak.metric_snapshot(text)
    assert snap["totals"] == {"vllm:request_success_total": 5.0, "vllm:num_preemptions_total": 7.0}
    assert snap["request_success"] == {"stop": 3.0, "abort": 2.0}
    assert snap["cache_config"] == {"block_size": "16", "num_gpu_blocks": "512"}


# -- runs against the fake server ------------------------------------------------------------------------------
def test_clean_server_passes(fake_server):
    import os

    srv = fake_server()
    rec = run(srv, server_pid=os.getpid())
    c, r = rec["counts"], rec["rerun"]
    assert rec["verdict"] == "PASS", rec["reasons"]
    assert c["sent"] == c["planned"] == 60 and c["not_sent"] == 0
    assert c["bad_input_4xx"] == c["bad_input_planned"] == 9
    assert set(rec["bad_input_messages"]) == set(soak.BAD_INPUTS)
    assert c["aborted"] == c["aborts_planned"] == 6 and srv.disconnects >= 1
    assert c["hung"] == c["server_5xx"] == c["client_4xx"] == c["bad_wrong"] == 0
    assert r["eligible"] == c["completed"] == 45 and r["compared"] == 45 and r["alone_sent"] == 8
    assert r["batched_sent"] == 37 and r["mismatches"] == 0
    assert sum(r["compared_by_sampling"].values()) == sum(r["compared_by_policy"].values()) == 45
    assert rec["compare_by"] == "token_ids"
    assert rec["preemptions"]["load"] > 0 and rec["preemptions"]["mid_verification"] is None  # (the fake server exports no verify_restarts)
    assert rec["metrics"]["cache_config"]["num_gpu_blocks"] == "512"
    checks = {ch["check"]: ch["ok"] for ch in rec["consistency"]}
    assert checks["spec_decode counters = s2d2 counters"] and checks["no request left running or waiting"]
    assert checks["request_success within [completed, completed + cut short]"], rec["consistency"]
    assert rec["memory"]["rss_bytes"]["flat"] is not False
    assert rec["latency_s"]["completed"]["p50"] > 0 and rec["latency_s"]["ttft_stream"]["n"] > 0
    assert set(rec["call"]) >= {"call_id", "commit", "device", "vllm", "torch"}
    assert soak.summary_line(rec).startswith("SOAK PASS")


def test_a_block_8_server_needs_the_engine_block_size(fake_server):
    """A Fast-dLLM v2 server decodes blocks of 8: with ``--engine-block-size 8`` the matrix asks it for 16 and the
    soak passes; with the demo's default the matrix's "wrong" block size is the server's own, it is accepted, and
    the soak fails on that bad input -- what the family soaks (tests/gpu/test_soak.py) avoid."""
    policies = soak.policies_for("fast_dllm_v2")
    rec = run(fake_server(block=8), engine_block_size=8, policies=policies)
    assert rec["verdict"] == "PASS", rec["reasons"]
    assert "16" in rec["bad_input_messages"]["block size vs engine"]
    rec = run(fake_server(block=8), policies=policies)
    assert rec["verdict"] == "FAIL" and rec["counts"]["bad_wrong"] >= 1, rec["counts"]


def test_hang_5xx_and_mismatch_are_caught(fake_server):
    srv = fake_server(hang_nth=5, error_nth=9, diverge_repeat=True)
    rec = run(srv, deadline_s=1.0)
    c, r = rec["counts"], rec["rerun"]
    assert rec["verdict"] == "FAIL"
    assert c["hung"] == 1 and c["server_5xx"] == 1
    assert r["mismatches"] == 1 and srv.diverged == 1
    ex = r["mismatch_examples"][0]
    assert ex["load_len"] == ex["alone_len"] and ex["first_difference"] == ex["load_len"] - 1
    assert ex["policy"] in soak.POLICIES and ex["phase"] in ("alone", "batched")
    assert r["mismatches_by_sampling"] == {ex["sampling"]: 1} and r["mismatches_by_phase"] == {ex["phase"]: 1}
    assert r["mismatches_by_policy"] == {ex["policy"]: 1}
    reasons = " ".join(rec["reasons"])
    assert "1 hung" in reasons and "1 server errors" in reasons and "1 re-runs differ" in reasons
    assert rec["failures"] and {f["category"] for f in rec["failures"]} == {"hung", "server_5xx"}


def test_each_fault_alone_fails_the_run(fake_server):
    for faults, count in (({"hang_nth": 4}, ("counts", "hung")), ({"error_nth": 4}, ("counts", "server_5xx")),
                          ({"diverge_repeat": True}, ("rerun", "mismatches"))):
        rec = run(fake_server(**faults), requests=30, deadline_s=1.0)
        assert rec["verdict"] == "FAIL" and rec[count[0]][count[1]] == 1, (faults, rec["reasons"])


def test_accepted_bad_input_and_inconsistent_counters_fail(fake_server):
    rec = run(fake_server(accept_bad=True, spec_drift=True), requests=40, bad_fraction=0.25)
    assert rec["verdict"] == "FAIL"
    assert rec["counts"]["bad_wrong"] >= 1
    assert any(f["bad_input"] == "logprobs" for f in rec["failures"])
    checks = {ch["check"]: ch["ok"] for ch in rec["consistency"]}
    assert checks["spec_decode counters = s2d2 counters"] is False


def test_no_preemption_fails_when_required_and_budget_cuts_are_reported(fake_server):
    rec = run(fake_server(preempt_every=0), requests=20)
    assert rec["verdict"] == "FAIL" and any("preemption happened" in x for x in rec["reasons"])
    rec = run(fake_server(), requests=40, max_seconds=1e-6, require_preemption=False)
    assert rec["counts"]["not_sent"] == 40 and rec["verdict"] == "FAIL"


def test_diagnosis_tells_prefix_cache_dependence_from_a_one_off(fake_server):
    rec = run(fake_server(prefix_dependent=True), requests=60, diagnose=4)
    r, d = rec["rerun"], rec["diagnosis"]
    assert r["mismatches"] > 0 and rec["verdict"] == "FAIL"
    assert {tuple(m["cached_tokens"]) for m in r["mismatch_examples"]} == {(0, 5)}  # load missed, re-run hit
    assert d["run"] == min(4, r["mismatches"]) and d["kinds"] == {"prefix_cache": d["run"]}, d
    assert all(x["reset"] and x["cold_load"] and x["warm_rerun"] for x in d["requests"])
    srv = fake_server(diverge_repeat=True)
    rec = run(srv, requests=30, diagnose=4)
    assert rec["diagnosis"]["kinds"] == {"not_reproducible": 1} and srv.resets == 1
    assert run(fake_server(), requests=30)["diagnosis"] is None  # off by default
    assert [soak.diagnosis_kind(*x) for x in ((True, False, False, True), (False, True, False, True),
                                              (True, False, True, False), (True, True, True, True))] == [
        "prefix_cache", "load_path", "not_reproducible", "other"]


# -- the command line --------------------------------------------------------------------------------------------
def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "soak.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def test_cli_end_to_end(fake_server, tmp_path):
    srv = fake_server()
    out = tmp_path / "soak.json"
    p = _cli("--base-url", srv.url + "/v1", "--model", "fake", "--requests", "30", "--concurrency", "4",
             "--out", str(out), "--seed", "5", "--max-tokens", "32", "--settle", "0.05", "--sample-interval", "0.2",
             "--alone", "5")
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.startswith("SOAK PASS")
    rec = json.loads(out.read_text())
    assert rec["verdict"] == "PASS" and rec["args"]["seed"] == 5 and rec["counts"]["sent"] == 30


@pytest.mark.parametrize("args, name", [
    (["--requests", "0"], "--requests"),
    (["--concurrency", "x"], "--concurrency"),
    (["--policies", "sometimes"], "--policies"),
    (["--abort-fraction", "0.7", "--bad-fraction", "0.5"], "--abort-fraction"),
    (["--base-url", "localhost:8000"], "--base-url"),
    (["--prompts", "/nonexistent/prompts.jsonl"], "--prompts"),
    (["--deadline", "0"], "--deadline"),
    (["--server-log", "/nonexistent/server.log"], "--server-log"),
])
def test_cli_bad_arguments(args, name, tmp_path):
    base = {"--base-url": "http://127.0.0.1:9", "--model": "m", "--out": str(tmp_path / "x.json")}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1]
    p = _cli(*[x for kv in base.items() for x in kv], timeout=30)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and name in lines[0], p.stderr
    assert not (tmp_path / "x.json").exists()


def test_cli_missing_argument_and_unreachable_server(tmp_path):
    p = _cli("--base-url", "http://127.0.0.1:9", "--out", str(tmp_path / "x.json"), timeout=30)
    assert p.returncode == 2 and "--model" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = _cli("--base-url", "http://127.0.0.1:9", "--model", "m", "--out", str(tmp_path / "x.json"),
             "--deadline", "2", timeout=60)
    assert p.returncode == 1 and "probe request failed" in p.stderr, p.stderr


def test_gpu_memory_is_judged_on_one_scope():
    """The server's own GPU memory where nvidia-smi names its processes (a shared GPU's total moves with other
    test workers), the whole GPU's otherwise; never a mix of the two."""
    server = [{"gpu_used_mib": 1000.0 + (400 if i >= 10 else 0), "gpu_scope": "server"} for i in range(20)]
    shared = [{"gpu_used_mib": 9000.0 - 50 * i, "gpu_scope": "gpu"} for i in range(4)]
    mem = soak.memory_summary(shared + server)["gpu_used_mib"]
    assert mem["scope"] == "server" and mem["samples"] == 20 and mem["growth"] == 400 and mem["flat"] is False
    mem = soak.memory_summary([dict(s, gpu_scope="gpu") for s in server[:8]])["gpu_used_mib"]
    assert mem["scope"] == "gpu" and mem["flat"] is True  # growth 0 over the samples after the warm-up
    assert "gpu_used_mib" not in soak.memory_summary([{"rss_bytes": 1}] * 8)


def test_process_tree_holds_the_children():
    import os

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        tree = soak.process_tree(os.getpid())
        assert os.getpid() in tree and child.pid in tree
        assert soak.process_tree(child.pid) == [child.pid]
        assert soak.tree_rss(tree) > soak.tree_rss(soak.process_tree(child.pid)) > 0
    finally:
        child.kill()
        child.wait()
    assert soak.process_tree(child.pid) == [] and soak.tree_rss(soak.process_tree(child.pid)) is None


def test_requests_are_named_and_resumed_ones_counted_from_the_server_log(fake_server, tmp_path):
    """Each request goes out as ``soak-<phase>-<index>``; with ``--server-log`` the run counts which load requests
    the server resumed after a preemption (the plugin's ``VLLM_S2D2_LOG_RESUMES`` lines) among the compared and the
    mismatching re-runs."""
    from vllm_s2d2.engine.stats import resume_message

    log = tmp_path / "server.log"
    log.write_text("".join(f"(EngineCore pid=1) INFO 12-07 [model_state.py:98] "
                           f"{resume_message(f'cmpl-soak-load-{i}-0', 40)}\n" for i in range(60))
                   + resume_message("cmpl-soak-rerun-3-0", 9) + "\n")  # a re-run's resume is not the load's
    srv = fake_server(diverge_repeat=True)
    rec = run(srv, server_log=str(log))
    r = rec["rerun"]
    assert r["mismatches"] == 1 and r["mismatch_examples"][0]["resumed"] is True
    assert r["resumed_under_load"] == {"requests": 60, "compared": r["compared"], "mismatches": 1}
    ids = [i for i in srv.request_ids if i is not None]
    assert {i.split("-")[1] for i in ids} == {"load", "alone", "rerun"} and None in srv.request_ids  # (the probe)
    assert sorted(int(i.split("-")[2]) for i in ids if i.startswith("soak-load-")) == list(range(60))

    log.write_text("no resumes\n")
    rec = run(fake_server(diverge_repeat=True), server_log=str(log))
    assert rec["rerun"]["resumed_under_load"] == {"requests": 0, "compared": 0, "mismatches": 0}
    assert rec["rerun"]["mismatch_examples"][0]["resumed"] is False
    assert run(fake_server())["rerun"]["resumed_under_load"] is None  # no --server-log


def test_resume_lines_are_parsed_exactly():
    from vllm_s2d2.engine.stats import resume_message

    text = "\n".join([resume_message("cmpl-soak-load-12-0", 3), resume_message("cmpl-soak-load-120-0", 3),
                      resume_message("cmpl-soak-alone-5-0", 3), resume_message("cmpl-other-7-0", 3),
                      "S2D2 resume after preemption: request cmpl-soak-load-8-1, 3 tokens re-prefilled"])
    assert soak.resumed_load_requests(text) == {12, 120}
