"""GPU tests: the session's own record.  When ``$S2D2_GPU_LOG_DIR`` is set and a test under ``tests/gpu`` ran,
``gpu-session.json`` there holds every test's outcome and duration, the counts and the pytest arguments, after
the run's metadata (device, vLLM / torch / transformers versions, commit: ``gpu_records.write_record``).

Light on purpose: the CPU suite loads this file too (its GPU tests then skip; a session in which every test
skipped writes no record).

Under pytest-xdist (``-n N``, several workers sharing one GPU: ``gpu_env.py``) only the controller writes
``gpu-session.json`` (it sees every worker's reports); every session, with or without xdist, rewrites
``gpu-session-partial.json`` after each test so that a run cut off by the device call's time limit still leaves
what finished; each worker's own records and server logs go to
``$S2D2_GPU_LOG_DIR/<worker>/`` so that workers never overwrite each other's files."""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # gpu_records (whatever pytest's import mode)

_REPORTS: list[dict] = []
_START = time.time()  # this file loads when tests/gpu is collected
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if _WORKER and os.environ.get("S2D2_GPU_LOG_DIR"):  # before any test module reads it
    os.environ["S2D2_GPU_LOG_DIR"] = os.path.join(os.environ["S2D2_GPU_LOG_DIR"], _WORKER)
    os.makedirs(os.environ["S2D2_GPU_LOG_DIR"], exist_ok=True)


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":  # failures / skips in setup or teardown count too
        entry = {"test": report.nodeid, "when": report.when, "outcome": report.outcome,
                 "seconds": round(report.duration, 2)}
        if report.outcome == "failed":  # the reason, kept even if the device call is cut off later
            entry["message"] = report.longreprtext[-3000:]
        _REPORTS.append(entry)
        if _WORKER:  # the controller records it
            return
        from gpu_records import log_dir, write_record

        if log_dir():  # after every test: a run cut off by the call's time limit keeps what finished
            write_record("gpu-session-partial", "pytest session so far (tests/gpu)",
                         session_payload(_REPORTS, 1, [], time.time() - _START))


def session_payload(reports: list[dict], exitstatus: int, args: list[str], seconds: float) -> dict:
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    for r in reports:
        if r["outcome"] == "failed" and r["when"] != "call":
            counts["errors"] += 1
        elif r["outcome"] in counts:
            counts[r["outcome"]] += 1
    return {**counts, "exit_code": int(exitstatus), "seconds": round(seconds, 1),
            "command": "pytest " + " ".join(args), "tests": reports}


def pytest_sessionfinish(session, exitstatus):
    if _WORKER or all(r["outcome"] == "skipped" for r in _REPORTS):  # nothing ran (e.g. no CUDA): no record
        return
    from gpu_records import log_dir, write_record

    if log_dir():
        write_record("gpu-session", "pytest session (tests/gpu)",
                     session_payload(_REPORTS, exitstatus, list(session.config.invocation_params.args),
                                     time.time() - _START))
