"""What lets several GPU test processes share one GPU (``pytest -n N``, pytest-xdist; ``tests/gpu/results/README.md``).

* Ports: a server a test starts listens on ``base + 100 * worker`` (``gw0`` -> +0, ``gw1`` -> +100, ...), so two
  workers that both need the serve tests' server never collide.  ``S2D2_GPU_WORKER_OFFSET=k`` adds k to the
  worker's number: two pytest runs side by side on one GPU (``tests/gpu/suite_calls.sh``) keep apart too.
* Memory: vLLM sizes its KV cache by profiling free GPU memory, and asserts that no other process *freed* memory
  meanwhile (``gpu_worker.determine_available_memory``) -- which another worker's engine shutting down does.  Under
  xdist every engine gets a fixed ``kv_cache_memory_bytes`` instead (vLLM then skips that measurement), and a small
  ``gpu_memory_utilization`` (it still gates start-up on that much free memory).  Run alone, nothing changes.

Engines started by a test inherit ``PYTEST_XDIST_WORKER`` (subprocesses keep the environment), so
``engine_worker.py`` applies the same rule."""

from __future__ import annotations

import os

KV_CACHE_BYTES = 2 << 30  # ample for the tiny checkpoints (max_model_len <= 1024, <= 64 sequences)
SHARED_UTILIZATION = 0.08


def worker_index() -> int:
    name = os.environ.get("PYTEST_XDIST_WORKER", "")
    index = int(name[2:]) if name.startswith("gw") and name[2:].isdigit() else 0
    return index + int(os.environ.get("S2D2_GPU_WORKER_OFFSET", "0") or "0")


def shared_gpu() -> bool:
    return bool(os.environ.get("PYTEST_XDIST_WORKER"))


def worker_port(base: int) -> int:
    return base + 100 * worker_index()


def llm_memory_kwargs(utilization: float = 0.3) -> dict:
    """``LLM(...)`` keyword arguments for GPU memory."""
    if not shared_gpu():
        return {"gpu_memory_utilization": utilization}
    return {"gpu_memory_utilization": SHARED_UTILIZATION, "kv_cache_memory_bytes": KV_CACHE_BYTES}


def serve_memory_args(utilization: float = 0.3) -> list[str]:
    """``vllm serve`` arguments for GPU memory."""
    return [f"--{k.replace('_', '-')}={v}" for k, v in llm_memory_kwargs(utilization).items()]
