"""The ``vllm:s2d2_*`` Prometheus counters: the shim on vLLM 0.26's ``do_log_stats`` polls the worker extension
and adds the change of the engine totals (``vllm_s2d2.patches.stats_metrics``, ``vllm_s2d2.engine.metrics``)."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")
prometheus_client = pytest.importorskip("prometheus_client")

sys.path.insert(0, os.path.dirname(__file__))
from engine_helpers import vllm_log_records  # noqa: E402
from vllm_s2d2.engine.stats import STAT_NAMES  # noqa: E402
from vllm_s2d2.engine.worker_ext import QUALNAME, S2D2WorkerExtension  # noqa: E402


@pytest.fixture(scope="module")
def engines():
    import vllm_s2d2
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.llm_engine import LLMEngine

    vllm_s2d2.register()
    return AsyncLLM, LLMEngine


def _totals(**kw):
    return {n: kw.get(n, 0) for n in STAT_NAMES}


class FakeEngine:
    """What ``do_log_stats`` and the shim read of ``LLMEngine`` / ``AsyncLLM``."""

    def __init__(self, ext=QUALNAME, log_stats=True, client_index=0, fail=False):
        self.name = f"m-{uuid.uuid4().hex[:8]}"  # a fresh label set per test
        self.vllm_config = SimpleNamespace(parallel_config=SimpleNamespace(worker_extension_cls=ext),
                                           model_config=SimpleNamespace(served_model_name=self.name))
        self.logged = 0
        self.logger_manager = SimpleNamespace(log=self._log) if log_stats else None
        self.engine_core = SimpleNamespace(client_index=client_index)
        self.rpc_calls = []
        self.totals = _totals()
        self.fail = fail

    def _log(self):
        self.logged += 1

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.rpc_calls.append((method, timeout))
        if self.fail:
            raise TimeoutError("engine busy")
        return [dict(self.totals), dict(self.totals)]  # two tensor-parallel ranks, same counters

    def value(self, name):
        return prometheus_client.REGISTRY.get_sample_value(f"vllm:s2d2_{name}_total",
                                                           {"model_name": self.name, "engine": "0"})


class FakeAsyncEngine(FakeEngine):
    async def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        return FakeEngine.collective_rpc(self, method, timeout, args, kwargs)


def test_shim_wraps_both_engines_once(engines):
    from vllm_s2d2.patches import stats_metrics

    AsyncLLM, LLMEngine = engines
    before = (AsyncLLM.do_log_stats, LLMEngine.do_log_stats)
    stats_metrics.install()
    assert (AsyncLLM.do_log_stats, LLMEngine.do_log_stats) == before
    assert getattr(AsyncLLM.do_log_stats, "_s2d2_metrics_wrapped") and asyncio.iscoroutinefunction(
        AsyncLLM.do_log_stats)
    assert getattr(LLMEngine.do_log_stats, "_s2d2_metrics_wrapped")


def test_sync_engine_counts_the_change_of_the_totals(engines):
    _, LLMEngine = engines
    e = FakeEngine()
    e.totals = _totals(draft_steps=10, verify_steps=4, proposed_tokens=12, accepted_tokens=9, committed_blocks=2)
    LLMEngine.do_log_stats(e)
    assert e.logged == 1 and e.rpc_calls == [("s2d2_engine_totals", 5.0)]
    assert [e.value(n) for n in STAT_NAMES] == [10, 4, 12, 9, 2, 0]  # TP ranks are not added twice
    e.totals = _totals(draft_steps=15, verify_steps=4, proposed_tokens=12, accepted_tokens=9, committed_blocks=3)
    LLMEngine.do_log_stats(e)
    assert [e.value(n) for n in STAT_NAMES] == [15, 4, 12, 9, 3, 0]
    e.totals = _totals(draft_steps=2)  # an engine that started again counts from zero
    LLMEngine.do_log_stats(e)
    assert e.value("draft_steps") == 17


def test_the_interval_line_follows_vllms_line(engines):
    """The line goes through vLLM's own ``vllm`` logger (vLLM configures only that hierarchy: a logger named
    ``vllm_s2d2...`` would drop INFO lines in a real server)."""
    _, LLMEngine = engines
    e = FakeEngine()
    e.totals = _totals(draft_steps=10, verify_steps=5, proposed_tokens=8, accepted_tokens=6, committed_blocks=2)
    LLMEngine.do_log_stats(e)
    e.totals = _totals(draft_steps=14, verify_steps=6, proposed_tokens=12, accepted_tokens=7, committed_blocks=3)
    with vllm_log_records() as seen:
        LLMEngine.do_log_stats(e)
        LLMEngine.do_log_stats(e)  # an idle interval logs nothing
    lines = [r.getMessage() for r in seen if "S2D2 stats" in r.getMessage()]
    assert lines == ["S2D2 stats (last interval): draft steps 4, verify steps 1 (verify rate 0.25), span tokens "
                     "proposed 4, accepted 1 (acceptance 0.25), blocks committed 1"], lines


def test_plugin_loggers_live_under_vllms_logger():
    from vllm_s2d2.engine import config_hooks, sampler
    from vllm_s2d2.log import get_logger

    assert get_logger("vllm_s2d2.patches.stats_metrics").name == "vllm.s2d2.patches.stats_metrics"
    assert sampler.logger.name.startswith("vllm.s2d2.") and config_hooks.logger.name.startswith("vllm.s2d2.")


def test_async_engine_polls_after_vllms_own_loggers(engines):
    AsyncLLM, _ = engines
    e = FakeAsyncEngine()
    e.totals = _totals(draft_steps=7, verify_steps=3, proposed_tokens=5, accepted_tokens=5)
    asyncio.run(AsyncLLM.do_log_stats(e))
    assert e.logged == 1 and len(e.rpc_calls) == 1
    assert e.value("verify_steps") == 3 and e.value("accepted_tokens") == 5


@pytest.mark.parametrize("kw", [dict(ext=None), dict(ext="other.Extension"), dict(log_stats=False),
                                dict(client_index=1)])
def test_no_poll_for_other_engines_or_without_stats(engines, kw):
    _, LLMEngine = engines
    e = FakeEngine(**kw)
    e.totals = _totals(draft_steps=3)
    LLMEngine.do_log_stats(e)
    assert e.rpc_calls == [] and e.value("draft_steps") is None


def test_a_failing_poll_warns_and_keeps_the_stats_loop_alive(engines, caplog):
    AsyncLLM, LLMEngine = engines
    e = FakeEngine(fail=True)
    LLMEngine.do_log_stats(e)
    LLMEngine.do_log_stats(e)
    a = FakeAsyncEngine(fail=True)
    asyncio.run(AsyncLLM.do_log_stats(a))
    assert e.logged == 2 and len(e.rpc_calls) == 2 and a.logged == 1
    assert e.__dict__["_s2d2_poll_warned"] and a.__dict__["_s2d2_poll_warned"]
    assert e.value("draft_steps") == 0


def test_worker_extension_reads_the_steppers_host_totals():
    import torch

    stepper = SimpleNamespace(totals_host=torch.tensor([8, 3, 6, 4, 2]))
    w = SimpleNamespace(model_runner=SimpleNamespace(model_state=SimpleNamespace(stepper=stepper)))
    assert S2D2WorkerExtension.s2d2_engine_totals(w) == dict(zip(STAT_NAMES, [8, 3, 6, 4, 2]))
    # vLLM's own models (V1 GPUModelRunner: no model_state) answer None
    assert S2D2WorkerExtension.s2d2_engine_totals(SimpleNamespace(model_runner=SimpleNamespace())) is None


def test_metrics_page_parses_back_to_the_totals(engines):
    """``read_s2d2_metrics`` (used by the serve test and ``benchmarks/serve_bench.py``) on the real exposition
    text of the client library."""
    from vllm_s2d2.engine.metrics import read_s2d2_metrics

    _, LLMEngine = engines
    e = FakeEngine()
    e.totals = _totals(draft_steps=21, verify_steps=6, proposed_tokens=14, accepted_tokens=11, committed_blocks=5)
    LLMEngine.do_log_stats(e)
    page = prometheus_client.generate_latest().decode()
    mine = "\n".join(ln for ln in page.splitlines() if f'model_name="{e.name}"' in ln)
    assert read_s2d2_metrics(mine) == e.totals
    assert read_s2d2_metrics("# HELP vllm:s2d2_draft_steps_total x\nvllm:other 3\n") == {}
