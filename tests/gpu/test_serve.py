"""GPU: ``vllm serve MODEL --speculative-config s2d2`` as typed, driven with the ``openai`` client.

One server on the trained demo checkpoint (``assets/sdar-stdlib-10m``, S2D2 Config-A by the bare alias) serves:
completions and chat (the checkpoint's template), streaming (the streamed text equals the non-streamed text),
seeded sampling (reproducible),
per-request S2D2 options through ``vllm_xargs`` (JSON-string and flat ``s2d2.<option>`` spellings), 64 concurrent
requests with mixed parameters, a bad-input matrix that must give HTTP 400 naming the problem while the server
keeps serving, and the diffusion and ``vllm:s2d2_*`` counters on ``/metrics``.  A non-block-diffusion model with ``s2d2`` must fail at
start-up with a clear message.  What the tests saw goes to ``$S2D2_GPU_LOG_DIR/serve.json`` (through
``gpu_records.write_record``: device, versions and commit first).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from gpu_env import serve_memory_args, worker_port
from gpu_records import write_record
from gpu_skip import require_cuda

pytestmark = pytest.mark.gpu
torch = require_cuda("vllm")
openai = pytest.importorskip("openai")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(REPO, "assets", "sdar-stdlib-10m")
PORT = worker_port(8011)
NAME = "demo"
PROMPT = 'def read_config(path):\n    """Read a JSON config file."""\n'
LOG_DIR = os.environ.get("S2D2_GPU_LOG_DIR")
RECORD: dict = {}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", *args]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log_path = os.path.join(LOG_DIR or str(tmp_path_factory.mktemp("serve")), "serve_server.log")
    cmd = _cli(MODEL, "--speculative-config", "s2d2", "--port", str(PORT), "--served-model-name", NAME,
               "--max-model-len", "512", *serve_memory_args(0.3), "--max-num-seqs", "64")
    RECORD["command"] = " ".join(cmd[1:])
    log = open(log_path, "w")
    env = dict(os.environ, VLLM_LOG_STATS_INTERVAL="1")  # the vllm:s2d2_* counters follow within ~1 s
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO, env=env)
    t0 = time.time()
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{PORT}/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() - t0 > 300:
                os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail(f"server did not start (see {log_path}):\n" + open(log_path).read()[-3000:])
            time.sleep(2)
    RECORD["startup_s"] = round(time.time() - t0, 1)
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key="none", max_retries=0)
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()
    write_record("serve", "test_serve.py", RECORD)


def _complete(client, **kw):
    args = dict(model=NAME, prompt=PROMPT, max_tokens=24, temperature=0.0, seed=0)
    args.update(kw)
    return client.completions.create(**args)


def test_completion_streaming_and_seeds(server):
    r = _complete(server)
    text = r.choices[0].text
    assert text and 0 < r.usage.completion_tokens <= 24 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(_complete(server, stream=True))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == text, (streamed, text)
    a = _complete(server, temperature=1.0, top_p=0.9, seed=123, extra_body={"top_k": 20}).choices[0].text
    b = _complete(server, temperature=1.0, top_p=0.9, seed=123, extra_body={"top_k": 20}).choices[0].text
    assert a == b  # per-request seeds reproduce
    stop = _complete(server, stop=["\n"], max_tokens=48).choices[0]
    assert "\n" not in stop.text
    RECORD["completion"] = {"text": text, "usage": r.usage.model_dump(), "stream_chunks": len(chunks),
                            "sampled": a, "stop_text": stop.text, "stop_finish": stop.finish_reason}


def test_chat_completion_and_streaming(server):
    """The checkpoint's chat template (plain concatenation of the contents) gives the same text as the
    completion of that concatenation; streaming chat equals non-streaming."""
    msgs = [{"role": "user", "content": PROMPT}]
    r = server.chat.completions.create(model=NAME, messages=msgs, max_tokens=24, temperature=0.0, seed=0)
    text = r.choices[0].message.content
    assert text == _complete(server).choices[0].text
    chunks = list(server.chat.completions.create(model=NAME, messages=msgs, max_tokens=24, temperature=0.0,
                                                 seed=0, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert r.usage.completion_tokens <= 24
    RECORD["chat"] = {"text": text, "usage": r.usage.model_dump(), "stream_chunks": len(chunks)}


def test_per_request_options_through_vllm_xargs(server):
    opts = {"verify_policy": "mask_span_length", "acceptance": "greedy"}
    j = _complete(server, extra_body={"vllm_xargs": {"s2d2": json.dumps(opts)}}).choices[0].text
    flat = _complete(server, extra_body={"vllm_xargs": {"s2d2.verify_policy": "mask_span_length",
                                                       "s2d2.acceptance": "greedy"}}).choices[0].text
    preset = _complete(server, extra_body={"vllm_xargs": {"s2d2.preset": "sdar-a"}}).choices[0].text
    assert j == flat and j and preset
    RECORD["xargs"] = {"json": j, "flat": flat, "preset": preset}


def test_64_concurrent_mixed_requests(server):
    def one(i):
        kw = {"max_tokens": 8 + i % 24, "temperature": (0.0, 0.7, 1.0)[i % 3], "seed": i}
        if i % 4 == 1:
            kw["extra_body"] = {"vllm_xargs": {"s2d2.verify_policy": "score_hysteresis",
                                               "s2d2.score_type": "difference_dynamic"}}
        elif i % 4 == 2:
            kw["extra_body"] = {"vllm_xargs": {"s2d2.verify": "false"}}
        elif i % 4 == 3:
            kw["extra_body"] = {"vllm_xargs": {"s2d2.verify_policy": "contextual_bandit_ucb"}}
        r = _complete(server, prompt=f"import os\n\ndef f{i}(x):\n", **kw)
        return r.usage.completion_tokens, kw["max_tokens"]

    t0 = time.time()
    with ThreadPoolExecutor(64) as ex:
        res = list(ex.map(one, range(64)))
    assert all(0 < n <= m for n, m in res), res
    RECORD["concurrent_64"] = {"seconds": round(time.time() - t0, 2), "completion_tokens": sum(n for n, _ in res)}


BAD = {
    "n=2": (dict(n=2, temperature=1.0), "n=2"),
    "logprobs": (dict(logprobs=2), "logprobs"),
    "unknown policy": (dict(extra_body={"vllm_xargs": {"s2d2.verify_policy": "sometimes"}}), "verify_policy"),
    "threshold out of range": (dict(extra_body={"vllm_xargs": {"s2d2.confidence_threshold": 2.0}}),
                               "confidence_threshold"),
    "block size vs engine": (dict(extra_body={"vllm_xargs": {"s2d2.block_size": 8}}), "block_size"),
    "malformed xargs": (dict(extra_body={"vllm_xargs": {"s2d2": "{not json"}}), "JSON"),
    "unknown option": (dict(extra_body={"vllm_xargs": {"s2d2.blok_size": 4}}), "blok_size"),
    "prompt > max_model_len": (dict(prompt="x " * 2000), "context length"),
    "max_tokens=0": (dict(max_tokens=0), "max_tokens"),
}


def test_bad_inputs_give_400_and_the_server_keeps_serving(server):
    got = {}
    for name, (kw, needle) in BAD.items():
        with pytest.raises(openai.BadRequestError) as e:
            _complete(server, **kw)
        msg = str(e.value)
        got[name] = msg[:300]
        assert needle.lower() in msg.lower(), (name, msg)
    RECORD["bad_inputs"] = got
    assert _complete(server).choices[0].text  # still serving


def _metrics() -> tuple[list[str], dict[str, int]]:
    """Names of the diffusion / spec-decode / S2D2 metrics on the page, and the vllm:s2d2_* totals."""
    from vllm_s2d2.engine.metrics import read_s2d2_metrics

    text = urllib.request.urlopen(f"http://127.0.0.1:{PORT}/metrics", timeout=10).read().decode()
    names = sorted({ln.split("{")[0].split(" ")[0] for ln in text.splitlines()
                    if ln.startswith(("vllm:diffusion", "vllm:spec_decode", "vllm:s2d2"))})
    return names, read_s2d2_metrics(text)


def test_metrics_endpoint(server):
    """vLLM's diffusion counters and the plugin's vllm:s2d2_* counters; one always-verify request moves the
    verification counters (polled from the worker at vLLM's stats interval, 1 s here)."""
    _complete(server)
    time.sleep(2.5)
    _, before = _metrics()
    always = {"verify_policy": "mask_span_length", "min_span_length": 1}
    _complete(server, max_tokens=16, extra_body={"vllm_xargs": {"s2d2": json.dumps(always)}})
    names, after = [], before
    for _ in range(20):
        time.sleep(0.5)
        names, after = _metrics()
        if after.get("verify_steps", 0) > before.get("verify_steps", 0):
            break
    RECORD["metrics"] = names
    RECORD["s2d2_counters"] = {"before": before, "after": after}
    assert any(n.startswith("vllm:diffusion_num_denoising_steps") for n in names), names
    from vllm_s2d2.engine.stats import STAT_NAMES

    assert sorted(after) == sorted(STAT_NAMES), names
    from vllm_s2d2.engine.stats import counter_delta

    delta = counter_delta(before, after)
    assert delta["verify_steps"] > 0 and delta["draft_steps"] > 0 and delta["proposed_tokens"] > 0, delta
    assert delta["accepted_tokens"] <= delta["proposed_tokens"], delta
    assert after["accepted_tokens"] <= after["proposed_tokens"]


def test_non_diffusion_model_with_s2d2_fails_clearly(tmp_path):
    cfg = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 512, "hidden_size": 64,
           "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
           "head_dim": 32, "max_position_embeddings": 512, "torch_dtype": "float32"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    proc = subprocess.run(_cli(str(tmp_path), "--speculative-config", "s2d2", "--load-format", "dummy",
                               "--skip-tokenizer-init", "--port", str(PORT + 1)),
                          capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    RECORD["non_diffusion"] = {"returncode": proc.returncode, "tail": out[-600:]}
    assert proc.returncode != 0 and "block-diffusion" in out, out[-3000:]
