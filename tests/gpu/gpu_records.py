"""The one writer of GPU-test records: every JSON a GPU test leaves in ``$S2D2_GPU_LOG_DIR`` (on the device tool,
a folder under ``$OUT``; committed under ``tests/gpu/results/``) goes through :func:`write_record`, which puts
the run's metadata first -- ``call_id``, ``commit`` (``$COMMIT`` on the GPU host, whose tree has no ``.git``;
else ``git rev-parse --short HEAD``), ``device``, ``vllm``, ``torch``, ``transformers``, ``python``, ``utc``
(``benchmarks/bench_records.run_metadata``, shared with the benchmarks' records).  ``conftest.py`` writes the
session's outcomes through it too (``gpu-session.json``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_records  # noqa: E402

LOG_DIR_ENV = "S2D2_GPU_LOG_DIR"
_CALL_ID: list[str] = []  # one id for every record of this pytest process


def log_dir() -> str | None:
    """Where records go (``$S2D2_GPU_LOG_DIR``), None when unset (then nothing is written)."""
    return os.environ.get(LOG_DIR_ENV) or None


def call_id() -> str:
    if not _CALL_ID:
        _CALL_ID.append(bench_records.new_call_id())
    return _CALL_ID[0]


def make_record(test: str, payload: dict[str, Any], device: str | None = None) -> dict[str, Any]:
    """``{"test": test, "meta": run_metadata, **payload}`` (payload keys may not shadow ``test`` / ``meta``)."""
    clash = {"test", "meta"} & set(payload)
    if clash:
        raise ValueError(f"record payload may not use the keys {sorted(clash)}")
    return {"test": test, "meta": bench_records.run_metadata(call_id(), device), **payload}


def write_record(name: str, test: str, payload: dict[str, Any], directory: str | None = None) -> Path | None:
    """Write ``<directory or $S2D2_GPU_LOG_DIR>/<name>.json`` = :func:`make_record`; returns its path, or None
    when no folder is set."""
    d = directory or log_dir()
    if not d:
        return None
    return bench_records.write_json(Path(d) / f"{name}.json", make_record(test, payload))
