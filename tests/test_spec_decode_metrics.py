"""vLLM's own speculative-decoding counters filled by S2D2 (``vllm:spec_decode_*``), on CPU.

* engine side: the per-span-position counters the decode step keeps on the device (``BlockStates.
  proposed_per_pos / accepted_per_pos``), driven through the CPU engine emulation (eager and the CUDA-graph
  static-buffer path, under the no-host-reads guard), and what the worker extension returns for the poll;
* frontend side: the poll (``patches/stats_metrics``) against the real ``LLMEngine.do_log_stats`` wrapper, the
  exported page compared line by line with what vLLM's own ``SpecDecodingProm`` exports for the same numbers,
  vLLM's ``SpecDecoding metrics`` log line, and ``vllm bench serve``'s own ``/metrics`` reader.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")
prometheus_client = pytest.importorskip("prometheus_client")

sys.path.insert(0, os.path.dirname(__file__))
from engine_emulator import Emulator, EmuRequest, sampling_params  # noqa: E402
from engine_helpers import build_tiny_checkpoint, vllm_log_records  # noqa: E402
from sync_guard import no_host_reads  # noqa: E402

from vllm_s2d2.engine.stats import STAT_NAMES  # noqa: E402
from vllm_s2d2.engine.worker_ext import QUALNAME, S2D2WorkerExtension  # noqa: E402

NAMES = {"vllm:spec_decode_num_drafts": "verify_steps", "vllm:spec_decode_num_draft_tokens": "proposed_tokens",
         "vllm:spec_decode_num_accepted_tokens": "accepted_tokens"}


# ---- engine side: per-position counters on the device --------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from vllm_s2d2.reference.models import ReferenceModel

    path = build_tiny_checkpoint(str(tmp_path_factory.mktemp("spec") / "sdar"), "sdar")
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 500, (n,), generator=g).tolist() for n in (1, 3, 4, 5, 9, 2)]
    return ReferenceModel.load(path), hf, prompts


def _run(tiny, static: bool, guard=None):
    model, hf, prompts = tiny
    emu = Emulator(model, hf, {}, static_shapes=static)
    emu.step_guard = guard
    policies = [{"verify_policy": "mask_span_length"}, {"verify": False}, {"verify_policy": "score_hysteresis"},
                {"verify_policy": "contextual_bandit_ucb"}, {"acceptance": "greedy"}, {}]
    for i, (p, pol) in enumerate(zip(prompts, policies)):
        emu.add(EmuRequest(f"r{i}", list(p), sampling_params(max_tokens=12 + i, seed=i,
                                                            temperature=1.0 if i % 2 else 0.0,
                                                            extra_args={"s2d2": pol})))
    n = 0
    while emu.running:
        assert emu.step()
        n += 1
        assert n < 500
    return emu


@pytest.mark.parametrize("static", [False, True])
def test_per_position_counters_add_up_to_the_totals(tiny, static):
    emu = _run(tiny, static, guard=no_host_reads)  # the new counters read nothing back inside a step
    t = emu.stepper.host_totals()
    pp = emu.stepper.mirror.per_position()
    B = emu.stepper.B
    assert len(pp["accepted_per_pos"]) == len(pp["proposed_per_pos"]) == B
    assert t["verify_steps"] > 0 and t["accepted_tokens"] > 0
    assert sum(pp["accepted_per_pos"]) == t["accepted_tokens"]
    assert sum(pp["proposed_per_pos"]) == t["proposed_tokens"]
    acc, prop = pp["accepted_per_pos"], pp["proposed_per_pos"]
    assert all(a >= b for a, b in zip(acc, acc[1:])) and all(a >= b for a, b in zip(prop, prop[1:]))
    assert all(a <= p for a, p in zip(acc, prop))
    assert prop[0] == t["verify_steps"]  # every verification proposes at least one span token
    if static:  # CUDA-graph padding rows (scratch slot) add nothing: the same counts as the eager path
        eager = _run(tiny, False)
        assert eager.stepper.mirror.per_position() == pp and eager.stepper.host_totals() == t
    # what the metrics poll gets through the worker extension (the 5 totals unchanged without per_position)
    worker = SimpleNamespace(model_runner=SimpleNamespace(model_state=SimpleNamespace(stepper=emu.stepper)))
    assert S2D2WorkerExtension.s2d2_engine_totals(worker) == t
    assert S2D2WorkerExtension.s2d2_engine_totals(worker, True) == {**t, **pp}


def test_no_verification_counts_nothing_per_position(tiny):
    model, hf, prompts = tiny
    emu = Emulator(model, hf, {"verify": False})
    emu.add(EmuRequest("r", list(prompts[4]), sampling_params(max_tokens=10)))
    while emu.running:
        assert emu.step()
    pp = emu.stepper.mirror.per_position()
    assert set(pp["accepted_per_pos"]) == set(pp["proposed_per_pos"]) == {0}


# ---- frontend side: the poll, the exported page, vLLM's log line, vllm bench serve's reader ------------------


@pytest.fixture(scope="module")
def engines():
    import vllm_s2d2
    from vllm.v1.engine.llm_engine import LLMEngine

    vllm_s2d2.register()
    return LLMEngine


class FakeEngine:
    """What ``LLMEngine.do_log_stats`` and the shim read of the engine."""

    def __init__(self):
        self.name = f"m-{uuid.uuid4().hex[:8]}"
        self.vllm_config = SimpleNamespace(parallel_config=SimpleNamespace(worker_extension_cls=QUALNAME),
                                           model_config=SimpleNamespace(served_model_name=self.name))
        self.logger_manager = SimpleNamespace(log=lambda: None)
        self.engine_core = SimpleNamespace(client_index=0)
        self.calls = []
        self.totals: dict = {}

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.calls.append((method, args))
        worker = SimpleNamespace(model_runner=SimpleNamespace(model_state=SimpleNamespace(stepper=self)))
        return [getattr(S2D2WorkerExtension, method)(worker, *args)]  # the real extension method

    # the stepper the worker extension reads (host copies of the device counters)
    def set(self, totals, accepted, proposed):
        self.totals_host = torch.tensor([totals.get(n, 0) for n in STAT_NAMES])
        self.mirror = SimpleNamespace(accepted_per_pos=torch.tensor(accepted), proposed_per_pos=torch.tensor(proposed))

    def page(self):
        text = prometheus_client.generate_latest().decode()
        return "\n".join(ln for ln in text.splitlines() if f'model_name="{self.name}"' in ln)


def _totals(v, p, a, d=20, c=3):
    return dict(zip(STAT_NAMES, (d, v, p, a, c)))


def test_poll_fills_vllms_spec_decode_counters(engines):
    e = FakeEngine()
    e.set(_totals(5, 14, 9), [5, 3, 1, 0], [5, 5, 3, 1])
    engines.do_log_stats(e)
    assert e.calls == [("s2d2_engine_totals", (True,))]
    get = prometheus_client.REGISTRY.get_sample_value
    lab = {"model_name": e.name, "engine": "0"}
    assert [get(n + "_total", lab) for n in NAMES] == [5, 14, 9]
    assert [get("vllm:spec_decode_num_accepted_tokens_per_pos_total", {**lab, "position": str(i)})
            for i in range(4)] == [5, 3, 1, 0]
    assert get("vllm:s2d2_verify_steps_total", lab) == 5  # the plugin's own counters as before
    e.set(_totals(8, 20, 13, d=30), [8, 4, 1, 0], [8, 7, 4, 1])
    engines.do_log_stats(e)
    assert [get(n + "_total", lab) for n in NAMES] == [8, 20, 13]
    assert get("vllm:spec_decode_num_accepted_tokens_per_pos_total", {**lab, "position": "1"}) == 4
    # a worker that answers without per-position counts still fills the three totals
    e.mirror = SimpleNamespace()
    e.totals_host = torch.tensor([31, 9, 22, 14, 4])
    engines.do_log_stats(e)
    assert [get(n + "_total", lab) for n in NAMES] == [9, 22, 14]
    assert get("vllm:spec_decode_num_accepted_tokens_per_pos_total", {**lab, "position": "0"}) == 8


def test_exported_page_equals_what_vllms_own_spec_decode_prom_exports(engines):
    """Feed vLLM's ``SpecDecodingProm`` (non-diffusion framing, a private registry) the same numbers: the
    samples of our page are the same names, label sets and values."""
    from vllm.v1.spec_decode.metrics import SpecDecodingProm, SpecDecodingStats

    e = FakeEngine()
    acc, prop = [6, 4, 2, 1], [6, 6, 5, 3]
    e.set(_totals(6, 20, 13), acc, prop)
    engines.do_log_stats(e)

    reg = prometheus_client.CollectorRegistry()

    class Private(SpecDecodingProm):
        @staticmethod
        def _counter_cls(**kw):
            return prometheus_client.Counter(registry=reg, **kw)

    prom = Private(SimpleNamespace(num_speculative_tokens=4), ["model_name", "engine"], {0: [e.name, "0"]})
    prom.observe(SpecDecodingStats(num_spec_tokens=4, num_drafts=6, num_draft_tokens=20, num_accepted_tokens=13,
                                   num_accepted_tokens_per_pos=acc, num_draft_tokens_per_pos=prop))

    def samples(registry, prefix="vllm:spec_decode"):
        return sorted((s.name, tuple(sorted(s.labels.items())), s.value) for m in registry.collect()
                      for s in m.samples if s.name.startswith(prefix) and s.name.endswith("_total")
                      and s.labels.get("model_name") == e.name)

    want = samples(reg)
    assert len(want) == 3 + 4 and samples(prometheus_client.REGISTRY) == want
    docs = {m.name: m.documentation for m in reg.collect()}
    ours = {m.name: m.documentation for m in prometheus_client.REGISTRY.collect() if m.name in docs}
    assert ours == docs  # the same help texts
    # why the plugin registers them: for a diffusion model vLLM exports other names (no clash, no spec_decode_*)
    reg2 = prometheus_client.CollectorRegistry()

    class Diffusion(SpecDecodingProm):
        @staticmethod
        def _counter_cls(**kw):
            return prometheus_client.Counter(registry=reg2, **kw)

    Diffusion(None, ["model_name", "engine"], {0: ["d", "0"]}, is_diffusion=True)
    assert sorted(m.name for m in reg2.collect()) == ["vllm:diffusion_num_canvas_positions",
                                                      "vllm:diffusion_num_committed_tokens",
                                                      "vllm:diffusion_num_denoising_steps"]


def test_counters_survive_vllms_unregister_at_engine_start(engines):
    """A second engine in the process: vLLM's PrometheusStatLogger unregisters every ``vllm:`` collector; the
    next poll registers ours again, values kept."""
    from vllm.v1.metrics.prometheus import unregister_vllm_metrics

    e = FakeEngine()
    e.set(_totals(2, 5, 3), [2, 1, 0, 0], [2, 2, 1, 0])
    engines.do_log_stats(e)
    unregister_vllm_metrics()
    lab = {"model_name": e.name, "engine": "0"}
    assert prometheus_client.REGISTRY.get_sample_value("vllm:spec_decode_num_drafts_total", lab) is None
    e.set(_totals(3, 7, 4), [3, 1, 0, 0], [3, 2, 2, 0])
    engines.do_log_stats(e)
    get = prometheus_client.REGISTRY.get_sample_value
    assert get("vllm:spec_decode_num_drafts_total", lab) == 3 and get("vllm:s2d2_accepted_tokens_total", lab) == 4
    assert get("vllm:spec_decode_num_accepted_tokens_per_pos_total", {**lab, "position": "0"}) == 3


def test_vllms_spec_decoding_log_line(engines):
    """After the S2D2 line, vLLM's own ``SpecDecoding metrics`` line (vLLM's SpecDecodingLogging) for the
    interval; none for an interval without verification."""
    e = FakeEngine()
    e.set(_totals(4, 10, 6), [4, 2, 0, 0], [4, 3, 2, 1])
    engines.do_log_stats(e)
    e.set(_totals(8, 20, 12, d=40), [8, 4, 0, 0], [8, 6, 4, 2])
    with vllm_log_records() as seen:
        engines.do_log_stats(e)
        e.set(_totals(8, 20, 12, d=45), [8, 4, 0, 0], [8, 6, 4, 2])  # drafts but no verification
        engines.do_log_stats(e)
    msgs = [r.getMessage() for r in seen]
    spec = [m for m in msgs if m.startswith("SpecDecoding metrics")]
    assert len(spec) == 1, msgs
    line = spec[0]
    assert "Mean acceptance length: 2.50" in line  # 1 + 6 accepted / 4 verifications
    assert "Accepted: 6 tokens" in line and "Drafted: 10 tokens" in line
    assert "Per-position acceptance rate: 1.000, 0.500, 0.000, 0.000" in line
    assert "Avg Draft acceptance rate: 60.0%" in line
    s2d2 = [i for i, m in enumerate(msgs) if m.startswith("S2D2 stats (last interval)")]
    assert len(s2d2) == 2 and s2d2[0] < msgs.index(line)


def test_vllm_bench_serve_reads_the_counters(engines):
    """``vllm bench serve`` reads ``vllm:spec_decode_*`` from ``/metrics`` before and after a run
    (``vllm/benchmarks/serve.py:fetch_spec_decode_metrics``): its reader on our page."""
    from vllm.benchmarks.serve import fetch_spec_decode_metrics

    e = FakeEngine()
    e.set(_totals(7, 18, 11), [7, 3, 1, 0], [7, 6, 4, 1])
    engines.do_log_stats(e)
    page = e.page()

    class Response:
        status = 200

        async def text(self):
            return page

        async def __aenter__(self):
            return self

        async def __aexit__(self, *a):
            return False

    class Session:
        def get(self, url):
            assert url == "http://x/metrics"
            return Response()

    m = asyncio.run(fetch_spec_decode_metrics("http://x", Session()))
    assert (m.num_drafts, m.num_draft_tokens, m.num_accepted_tokens) == (7, 18, 11)
    assert m.accepted_per_pos == {0: 7, 1: 3, 2: 1, 3: 0}
