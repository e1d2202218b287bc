"""The serving benchmark's client side (TTFT / TPOT / throughput bookkeeping) against a fake streaming client."""

import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import serve_bench  # noqa: E402


class _FakeCompletions:
    def create(self, *, max_tokens, stream, stream_options, **kw):
        assert stream and stream_options == {"include_usage": True}
        for i in range(max_tokens):
            time.sleep(0.001)
            yield SimpleNamespace(choices=[SimpleNamespace(text=f"t{i}")], usage=None)
        yield SimpleNamespace(choices=[], usage=SimpleNamespace(completion_tokens=max_tokens))


def test_run_load_counts_tokens_and_latencies():
    client = SimpleNamespace(completions=_FakeCompletions())
    r = serve_bench.run_load(client, ["a", "b", "c", "d", "e"], concurrency=2, max_tokens=6)
    assert r["requests"] == 5 and r["output_tokens"] == 30
    assert r["output_tokens_per_s"] > 0 and r["requests_per_s"] > 0
    assert 0 < r["ttft_s"]["p50"] <= r["ttft_s"]["p90"] and r["tpot_s"]["mean"] > 0
    assert set(serve_bench.MODES) == {"ar", "threshold", "s2d2"} and serve_bench.MODES["s2d2"] == "s2d2"


def test_counter_delta_gives_the_runs_rates():
    before = {"draft_steps": 10, "verify_steps": 2, "proposed_tokens": 4, "accepted_tokens": 3, "committed_blocks": 1}
    after = {"draft_steps": 30, "verify_steps": 12, "proposed_tokens": 24, "accepted_tokens": 15,
             "committed_blocks": 6}
    d = serve_bench.counter_delta(before, after)
    assert (d["draft_steps"], d["verify_steps"], d["committed_blocks"]) == (20, 10, 5)
    assert d["verify_rate"] == 0.5 and d["acceptance_rate"] == 0.6
    assert serve_bench.counter_delta(before, {}) == {}  # a server without the counters
