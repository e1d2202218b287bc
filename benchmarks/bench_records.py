"""What every benchmark and GPU-test record carries, and the parts of the benchmarks that need no GPU.

* :func:`run_metadata`: the call that produced a record -- a fresh ``call_id``, the commit (``$COMMIT`` on the
  GPU host, whose copy of the tree has no ``.git``; else ``git rev-parse --short HEAD``, ``-dirty`` when tracked
  files differ from it), the device name, the vLLM / torch / transformers / Python versions and the UTC time.
  ``benchmarks/*.py`` and ``tests/gpu/gpu_records.py`` build their records' headers with it.
* :func:`ratios_vs_baseline`: step-time and output-throughput ratios of each mode against the vLLM AR baseline,
  computed only between rows of one call (timings of two device calls may come from different cards, clocks or
  trees): rows of another call raise :class:`MixedCallsError`.
* :func:`per_batch_table`: the per-batch-size summary the benchmarks print and store.
* :func:`run_worker_process`: runs one engine in its own process (GPU memory and vLLM's engine-core process are
  released when it exits) and reads back the ``BENCH_JSON=`` line it prints.
* :func:`union_us`, :func:`profile_summary`: the GPU-busy and launch counts of a torch.profiler window.
* :func:`plot_modes`: the PNG next to a record (matplotlib imported only here; no plot without it).

No GPU, vLLM or matplotlib import at module level: the CPU tests (``tests/test_benchmark_records.py``) load it.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterable

REPO = Path(__file__).resolve().parent.parent
BASELINE_MODE = "a"  # vLLM's own AR decode of the same weights (offline_throughput.MODES / _FAMILY_MODES)
RESULT_MARK = "BENCH_JSON="
META_KEYS = ("call_id", "commit", "device", "vllm", "torch", "transformers", "python", "utc")


class MixedCallsError(ValueError):
    """Rows of different device calls were about to be compared."""


# -- metadata ------------------------------------------------------------------------------------------------
def new_call_id() -> str:
    """``YYYYmmddTHHMMSSZ-<6 hex>``: unique per call, sortable by time."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return f"{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


def git_commit(repo: Path = REPO) -> str:
    """``$COMMIT`` if set (the GPU host's tree has no ``.git``), else the short HEAD hash of ``repo`` with
    ``-dirty`` when tracked files differ from it, else ``"unknown"``."""
    env = os.environ.get("COMMIT")
    if env:
        return env
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=20)
        if head.returncode != 0 or not head.stdout.strip():
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=20)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_version(name: str) -> str | None:
    """The installed version of ``name`` (distribution metadata first; the module's ``__version__`` if the
    metadata is missing, as in an unpacked site directory), None if it is not installed."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        pass
    try:
        mod = __import__(name)
    except Exception:  # noqa: BLE001 - not installed or broken: recorded as None
        return None
    return getattr(mod, "__version__", None)


def device_name() -> str:
    """The CUDA device's name, or ``"cpu (no CUDA)"``."""
    try:
        import torch
    except ImportError:
        return "cpu (no torch)"
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "cpu (no CUDA)"


def run_metadata(call_id: str | None = None, device: str | None = None) -> dict[str, Any]:
    """The header every record starts with: ``call_id, commit, device, vllm, torch, transformers, python,
    utc`` (``device`` may be given when the caller knows it better, e.g. the reference decoder on CPU)."""
    return {
        "call_id": call_id or new_call_id(),
        "commit": git_commit(),
        "device": device if device is not None else device_name(),
        "vllm": package_version("vllm"),
        "torch": package_version("torch"),
        "transformers": package_version("transformers"),
        "python": platform.python_version(),
        "utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def write_json(path: str | os.PathLike, record: dict) -> Path:
    """Write ``record`` (indented JSON), creating the folder; returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(record, indent=1) + "\n")
    return p


# -- argument helpers ----------------------------------------------------------------------------------------
def parse_int_list(text: str) -> list[int]:
    """``"1,16,64"`` -> ``[1, 16, 64]`` (positive, no duplicates, order kept)."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        v = int(part)
        if v <= 0:
            raise ValueError(f"expected positive integers, got {v}")
        if v not in out:
            out.append(v)
    if not out:
        raise ValueError(f"no integers in {text!r}")
    return out


def with_baseline(groups: list[str], baseline: str = BASELINE_MODE) -> list[str]:
    """The engine groups of one call with the baseline first: added as its own group when no group has it;
    a group that contains it with other modes is split (the baseline is a different architecture)."""
    out = [baseline]
    for g in groups:
        rest = g.replace(baseline, "")
        if rest and rest not in out:
            out.append(rest)
    return out


# -- ratios against the AR baseline -------------------------------------------------------------------------
def ratios_vs_baseline(rows: Iterable[dict], baseline: str = BASELINE_MODE) -> dict[str, dict[str, dict]]:
    """``{mode: {str(batch): {"step_time_ratio", "output_tokens_per_s_ratio"}}}`` of every non-baseline row
    against the baseline row of the same batch size.

    ``step_time_ratio`` = the mode's ``step_ms_median`` / the baseline's; ``output_tokens_per_s_ratio`` = the
    mode's ``output_tokens_per_s`` / the baseline's (a row without one of them gives None for that ratio).
    Every row must carry the same ``call_id`` as its baseline: :class:`MixedCallsError` otherwise (also for two
    baseline rows of one batch size from different calls, and for rows without a ``call_id``)."""
    rows = list(rows)
    for r in rows:
        if not r.get("call_id"):
            raise MixedCallsError(f"row {r.get('mode')}/{r.get('batch')} names no call_id: cannot tell which "
                                  "call measured it")
    base: dict[int, dict] = {}
    for r in rows:
        if r["mode"] != baseline:
            continue
        old = base.get(r["batch"])
        if old is not None and old["call_id"] != r["call_id"]:
            raise MixedCallsError(f"two baseline rows for batch {r['batch']} from calls {old['call_id']} and "
                                  f"{r['call_id']}")
        base[r["batch"]] = r
    out: dict[str, dict[str, dict]] = {}
    for r in rows:
        if r["mode"] == baseline or r["batch"] not in base:
            continue
        b = base[r["batch"]]
        if r["call_id"] != b["call_id"]:
            raise MixedCallsError(f"{r['mode']}/{r['batch']} ran in call {r['call_id']}, the baseline in "
                                  f"{b['call_id']}: ratios are computed only within one call")
        out.setdefault(r["mode"], {})[str(r["batch"])] = {
            "step_time_ratio": _div(r.get("step_ms_median"), b.get("step_ms_median")),
            "output_tokens_per_s_ratio": _div(r.get("output_tokens_per_s"), b.get("output_tokens_per_s")),
        }
    return out


def _div(a, b):
    if a is None or b is None or not b:
        return None
    return a / b


def per_batch_table(rows: Iterable[dict], ratios: dict, fields: tuple[str, ...]) -> dict[str, dict[str, dict]]:
    """``{str(batch): {mode: {field: value} + ratios}}``: one row per mode, the fields present in it."""
    table: dict[str, dict[str, dict]] = {}
    for r in sorted(rows, key=lambda r: (r["batch"], r["mode"] != BASELINE_MODE, r["mode"])):
        entry = {f: r.get(f) for f in fields if f in r}
        entry.update(ratios.get(r["mode"], {}).get(str(r["batch"]), {}))
        table.setdefault(str(r["batch"]), {})[r["mode"]] = entry
    return table


# -- subprocess per engine -----------------------------------------------------------------------------------
def run_worker_process(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[dict | None, str | None]:
    """Run ``cmd`` in its own session; return (the JSON of its last ``BENCH_JSON=`` line, None) or (None, the
    tail of its stderr / a timeout note).  On timeout the whole process group is killed (vLLM's engine-core
    grandchild holds GPU memory)."""
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True,
                                env=env)
        try:
            stdout, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.communicate()
            err.seek(0)
            return None, f"timeout after {timeout}s: {err.read()[-3000:]}"
        err.seek(0)
        lines = [ln for ln in stdout.splitlines() if ln.startswith(RESULT_MARK)]
        if not lines:
            return None, f"exit code {proc.returncode}: {err.read()[-4000:]}"
        return json.loads(lines[-1][len(RESULT_MARK):]), None


def emit_result(result: dict) -> None:
    """The worker side of :func:`run_worker_process`."""
    print(RESULT_MARK + json.dumps(result), flush=True)


# -- torch.profiler summaries --------------------------------------------------------------------------------
LAUNCH_APIS = frozenset({"cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                         "cudaLaunchCooperativeKernel", "cudaGraphLaunch"})


def union_us(intervals: Iterable[tuple[float, float]]) -> float:
    """Total length of the union of ``(start, end)`` intervals (overlapping kernels on several streams count
    once)."""
    total = 0.0
    cur_s = cur_e = None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def profile_summary(device_events: Iterable[tuple[str, float, float]], api_counts: dict[str, int], steps: int,
                    wall_s: float) -> dict[str, float]:
    """Per-step figures of one profiled window of ``steps`` engine steps lasting ``wall_s`` seconds.

    ``device_events``: ``(name, start_us, end_us)`` of every GPU activity (kernels, memcpy, memset);
    ``api_counts``: host-side calls by name.  ``gpu_busy_fraction`` = the union of GPU activity / the window's
    wall time (the profiler's own host overhead lengthens the window a little, so this is a lower bound);
    ``launch_calls_per_step`` counts the host's kernel- and graph-launch calls, ``device_kernels_per_step`` the
    kernels the GPU ran (a CUDA-graph replay is one launch call and many kernels)."""
    events = list(device_events)
    steps = max(1, steps)
    busy_us = union_us((s, e) for _, s, e in events)
    kernels = sum(1 for n, _, _ in events if not n.startswith(("Memcpy", "Memset")))
    launches = sum(c for n, c in api_counts.items() if n in LAUNCH_APIS)
    return {
        "profiled_steps": steps,
        "profiled_step_ms": 1e3 * wall_s / steps,
        "gpu_busy_ms_per_step": busy_us / 1e3 / steps,
        "gpu_busy_fraction": (busy_us / 1e6) / wall_s if wall_s > 0 else None,
        "launch_calls_per_step": launches / steps,
        "graph_launches_per_step": api_counts.get("cudaGraphLaunch", 0) / steps,
        "device_kernels_per_step": kernels / steps,
    }


# -- plots ---------------------------------------------------------------------------------------------------
def plot_modes(path: str | os.PathLike, title: str, panels: list[tuple[str, dict[str, dict[int, float]]]],
               hline: dict[int, float] | None = None) -> bool:
    """One panel per ``(y label, {mode label: {batch: value}})``, batch on a log2 axis; ``hline`` =
    ``{panel index: y}`` draws a dashed reference line.  False (and no file) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    # one colour per mode label in every panel (a panel without the baseline must not shift the colours)
    labels = list(dict.fromkeys(label for _, series in panels for label in series))
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = {label: cycle[k % len(cycle)] for k, label in enumerate(labels)}
    for i, (ax, (ylabel, series)) in enumerate(zip(axes[0], panels)):
        ticks: set[int] = set()
        for label, points in series.items():
            xs = sorted(b for b, v in points.items() if v is not None)
            ticks.update(xs)
            if xs:
                ax.plot(xs, [points[b] for b in xs], "o-", label=label, color=colour[label])
        if hline and i in hline:
            ax.axhline(hline[i], color="gray", linestyle="--", linewidth=1)
        ax.set_xscale("log", base=2)
        if ticks:
            ax.set_xticks(sorted(ticks), [str(t) for t in sorted(ticks)])
            ax.minorticks_off()
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def mode_series(record: dict, rows: Iterable[dict], fields: tuple[str, ...]) -> dict[str, dict[str, dict]]:
    """Plot series per field: ``{field: {"mode: label": {batch: value}}}``, plus ``"step_time_ratio"`` (every mode but
    the baseline, from ``record["ratios_vs_baseline"]``)."""
    labels = {m: f"{m}: {v['label']}" for m, v in record["modes"].items()}
    out: dict[str, dict[str, dict]] = {f: {} for f in fields + ("step_time_ratio",)}
    for r in rows:
        lab = labels.get(r["mode"], r["mode"])
        for f in fields:
            out[f].setdefault(lab, {})[r["batch"]] = r.get(f)
        if r["mode"] != record["baseline"]:
            out["step_time_ratio"].setdefault(lab, {})[r["batch"]] = (
                record["ratios_vs_baseline"].get(r["mode"], {}).get(str(r["batch"]), {}).get("step_time_ratio"))
    return out


def record_title(record: dict) -> str:
    """``<benchmark>: <model> | <device> | commit <c> | vLLM <v>, torch <t> | call <id>``."""
    m = record["call"]
    return (f"{record['benchmark']}: {record.get('model', '')}\n{m['device']} | commit {m['commit']} | vLLM "
            f"{m['vllm']}, torch {m['torch']}, transformers {m['transformers']} | call {m['call_id']}")
