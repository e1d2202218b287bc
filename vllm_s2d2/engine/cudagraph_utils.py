"""CUDA graphs of the decode step: static input buffers, one graph per (padded batch size, the batch's
:class:`~vllm_s2d2.engine.step.StepFlags`).

The step's inputs are copied into static buffers (each request's W canvas-logits rows into ``logits``; padding
rows point at the scratch slot with an empty query and are not counted) and the graph of that shape is
replayed: the same kernels and numbers as the eager step without the per-op launch cost.  Every graph is captured
at start-up (:meth:`StepGraphs.capture_all`, from vLLM's memory-profiling run).  On a CPU device the same
static-buffer path runs without a graph, so the CPU tests cover it.
"""

from __future__ import annotations

from typing import Callable

import torch

from vllm_s2d2.engine.step import StepBatch, StepFlags

GraphKey = tuple[int, StepFlags]  # (padded batch size, the batch's host-side facts)
StepFn = Callable[[StepBatch, StepFlags], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class StepGraphs:
    def __init__(self, max_num_reqs: int, canvas_length: int, scratch_slot: int, device: torch.device):
        self.max_num_reqs = max_num_reqs
        self.W = canvas_length
        self.scratch_slot = scratch_slot
        self.device = device
        long = dict(dtype=torch.int64, device=device)
        self.slots = torch.full((max_num_reqs,), scratch_slot, **long)
        self.start = torch.zeros(max_num_reqs, **long)
        self.query_len = torch.zeros(max_num_reqs, **long)
        self.valid = torch.zeros(max_num_reqs, dtype=torch.bool, device=device)
        self.logits_row0 = torch.arange(max_num_reqs, **long) * canvas_length
        self.logits: torch.Tensor | None = None  # [max_num_reqs * W, V], allocated with the first step
        self._graphs: dict[GraphKey, tuple[torch.cuda.CUDAGraph, tuple]] = {}
        self._pool = None

    def bucket(self, num_reqs: int) -> int:
        """The padded batch size: the next power of two, at most ``max_num_reqs``."""
        size = 1
        while size < num_reqs:
            size *= 2
        return min(size, self.max_num_reqs)

    def keys(self) -> list[GraphKey]:
        """Every graph a step can need: each padded batch size with each combination of step flags."""
        sizes = sorted({self.bucket(n) for n in range(1, self.max_num_reqs + 1)})
        return [(size, flags) for size in sizes for flags in StepFlags.combinations()]

    def capture_all(self, step_fn: StepFn, vocab_size: int, dtype: torch.dtype) -> int:
        """Capture every graph of :meth:`keys` now (at start-up, from vLLM's profile run), so none is captured
        while serving.  Returns the number captured (0 off CUDA)."""
        self._allocate(vocab_size, dtype)
        if self.device.type != "cuda":
            return 0
        todo = [key for key in self.keys() if key not in self._graphs]
        for key in todo:
            self._capture(step_fn, key)
        return len(todo)

    def _allocate(self, vocab_size: int, dtype: torch.dtype) -> None:
        if self.logits is None:
            self.logits = torch.zeros(self.max_num_reqs * self.W, vocab_size, dtype=dtype, device=self.device)

    def run(self, step_fn: StepFn, batch: StepBatch, flags: StepFlags):
        R, W = batch.slots.numel(), self.W
        self._allocate(batch.logits.shape[-1], batch.logits.dtype)
        key = (self.bucket(R), flags)
        if self.device.type == "cuda" and key not in self._graphs:
            self._capture(step_fn, key)  # (normally done at start-up) before the inputs are written
        cols = torch.arange(W, device=self.device)[None, :]
        rows = batch.logits_row0[:, None] + torch.minimum(cols, (batch.query_len - 1).clamp_min(0)[:, None])
        torch.index_select(batch.logits, 0, rows.reshape(-1), out=self.logits[:R * W])
        self.slots[:R].copy_(batch.slots)
        self.start[:R].copy_(batch.start)
        self.query_len[:R].copy_(batch.query_len)
        self.valid[:R] = True
        self._pad(R, key[0])
        if self.device.type != "cuda":
            tokens, emitted, rejected = step_fn(self._static_batch(key[0]), flags)
        else:
            graph, (tokens, emitted, rejected) = self._graphs[key]
            graph.replay()
        return tokens[:R], emitted[:R], rejected[:R]

    def _pad(self, lo: int, hi: int) -> None:
        """Static input rows ``[lo, hi)`` become padding: scratch slot, empty query, not counted."""
        self.slots[lo:hi] = self.scratch_slot
        self.query_len[lo:hi] = 0
        self.start[lo:hi] = 0
        self.valid[lo:hi] = False

    def _static_batch(self, size: int) -> StepBatch:
        return StepBatch(self.logits[:size * self.W], self.slots[:size], self.start[:size],
                         self.query_len[:size], self.logits_row0[:size], self.valid[:size])

    def _capture(self, step_fn: StepFn, key: GraphKey) -> None:
        """Warm-up run on padding only (writes land in the scratch slot; the counters add zero), then capture
        (records, runs nothing): the caller writes the step's inputs afterwards."""
        self._pad(0, key[0])
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step_fn(self._static_batch(key[0]), key[1])
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            outs = step_fn(self._static_batch(key[0]), key[1])
        self._graphs[key] = (graph, outs)
