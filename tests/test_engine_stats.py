"""Per-request S2D2 statistics: recorded when vLLM removes a request from the worker, fetched by request id."""

from collections import OrderedDict
from types import SimpleNamespace

import pytest

from vllm_s2d2.engine.stats import STAT_NAMES, derived, external_request_id, format_stats, request_stats


def test_external_request_id_strips_vllm_suffix():
    assert external_request_id("7-1a2b3c4d") == "7"
    assert external_request_id("chatcmpl-abc-0123abcd") == "chatcmpl-abc"
    assert external_request_id("plain") == "plain"
    assert external_request_id("x-12") == "x-12"  # not vLLM's 8-hex suffix


def test_derived_rates_and_log_line():
    c = dict(zip(STAT_NAMES, (10, 4, 12, 9, 3)))
    d = derived(c)
    assert d["verify_rate"] == pytest.approx(0.4) and d["acceptance_rate"] == pytest.approx(0.75)
    assert derived(dict.fromkeys(STAT_NAMES, 0))["acceptance_rate"] == 0.0
    assert "verify rate 0.40" in format_stats(c) and "acceptance 0.75" in format_stats(c)


def test_reference_forwards_from_engine_counters():
    from vllm_s2d2.reference.accounting import reference_forwards

    c = derived(dict(zip(STAT_NAMES, (10, 4, 12, 9, 3))))  # what request_stats returns
    assert reference_forwards(c) == {"prefill": 1, "draft": 10, "verify": 4, "commit": 3}


class _Stepper:
    def __init__(self):
        self.rows = {}

    def host_slot_stats(self, slot):
        return dict(zip(STAT_NAMES, self.rows[slot]))

    def remove_request(self, slot, save=False):
        return None


def test_model_state_records_sums_preemptions_and_pops():
    pytest.importorskip("vllm")
    from vllm_s2d2.engine.model_state import S2D2ModelState

    ms = S2D2ModelState.__new__(S2D2ModelState)  # no GPU: only the bookkeeping under test
    ms.stepper = _Stepper()
    ms._req_to_slot, ms._saved, ms._finished_stats = {}, OrderedDict(), OrderedDict()
    ms.stepper.rows = {0: (5, 2, 6, 4, 1), 1: (3, 0, 0, 0, 1)}
    ms._req_to_slot.update({"a-0123abcd": 0, "b-89abcdef": 1, "_dummy": 1})
    ms.remove_request("a-0123abcd")  # preempted: counted so far ...
    ms._req_to_slot["a-0123abcd"] = 0
    ms.stepper.rows[0] = (1, 1, 2, 2, 1)
    ms.remove_request("a-0123abcd")  # ... then finished: summed
    ms.remove_request("_dummy")  # vLLM's dummy requests are not recorded
    ms.remove_request("b-89abcdef")
    assert ms.pop_request_stats(["a"]) == {"a": dict(zip(STAT_NAMES, (6, 3, 8, 6, 2)))}
    assert ms.pop_request_stats(["a", "zzz"]) == {}
    assert list(ms.pop_request_stats()) == ["b"] and ms.pop_request_stats() == {}


def test_request_stats_through_the_worker_extension():
    from vllm_s2d2.engine.worker_ext import S2D2WorkerExtension

    counters = dict(zip(STAT_NAMES, (4, 2, 6, 3, 1)))
    state = SimpleNamespace(pop_request_stats=lambda ids: {"r1": counters} if ids in (None, ["r1"]) else {})

    class Worker(S2D2WorkerExtension):
        model_runner = SimpleNamespace(model_state=state)

    def rpc(worker):
        return lambda method, args=(): [getattr(worker, method)(*args)]  # what collective_rpc does per worker

    out = request_stats(SimpleNamespace(collective_rpc=rpc(Worker())), ["r1"])
    assert out["r1"]["verify_steps"] == 2 and out["r1"]["acceptance_rate"] == pytest.approx(0.5)

    class Other(S2D2WorkerExtension):  # the extension on an engine whose model state is not the plugin's
        model_runner = SimpleNamespace(model_state=object())

    assert request_stats(SimpleNamespace(collective_rpc=rpc(Other()))) == {}
    with pytest.raises(RuntimeError, match="worker extension"):
        request_stats(SimpleNamespace(collective_rpc=rpc(object())))


def test_config_hook_installs_the_worker_extension():
    pytest.importorskip("vllm")
    from vllm_s2d2.engine.worker_ext import QUALNAME

    from vllm.utils.import_utils import resolve_obj_by_qualname

    assert resolve_obj_by_qualname(QUALNAME).__name__ == "S2D2WorkerExtension"


@pytest.mark.parametrize("log_resumes", [True, False])
def test_model_state_logs_a_resume_from_a_preemption_snapshot(log_resumes, monkeypatch):
    """With ``VLLM_S2D2_LOG_RESUMES=1`` a request that comes back with its snapshot (prefill longer than the prompt:
    it had emitted tokens) is named in one INFO line, which ``benchmarks/soak.py --server-log`` reads; a new
    request is not."""
    pytest.importorskip("vllm")
    from vllm_s2d2.engine import model_state
    from vllm_s2d2.engine.stats import resume_message

    lines: list[str] = []
    monkeypatch.setattr(model_state, "logger", SimpleNamespace(info=lines.append))
    ms = model_state.S2D2ModelState.__new__(model_state.S2D2ModelState)
    ms._req_to_slot, ms._saved, ms._log_resumes = {}, OrderedDict(), log_resumes
    ms._sampler = SimpleNamespace(next_request_id={}, next_saved={})
    ms._saved["cmpl-soak-load-7-0-0123abcd"] = "snapshot"
    new = SimpleNamespace(req_id="cmpl-soak-load-3-0-89abcdef", prompt_token_ids=[1, 2], prefill_token_ids=[1, 2])
    resumed = SimpleNamespace(req_id="cmpl-soak-load-7-0-0123abcd", prompt_token_ids=[1, 2],
                              prefill_token_ids=[1, 2, 3, 4, 5])
    ms.add_request(0, new)
    ms.add_request(1, resumed)
    assert ms._sampler.next_saved == {1: "snapshot"}
    assert lines == ([resume_message("cmpl-soak-load-7-0", 5)] if log_resumes else [])
