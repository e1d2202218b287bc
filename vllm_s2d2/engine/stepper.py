"""The engine's per-request block-diffusion state machine on persistent GPU buffers (no vLLM imports).

:class:`S2D2Stepper` owns every per-slot tensor (one row per vLLM request slot, ``max_num_reqs`` rows) and does
one engine step for all decoding requests of a batch at once: it gathers each request's block logits out of
the canvas logits, calls :func:`vllm_s2d2.core.step.draft_step` / :func:`~vllm_s2d2.core.step.finish_step`
(all decoding math lives in ``core``), decides what to emit, and writes the next canvas and the next step's
attention ranges.  The vLLM adapters (:mod:`.sampler`, :mod:`.model_state`) only translate ``InputBatch``
fields into the tensors this class takes, so the whole state machine is testable on CPU.

Per request (p = ``num_computed_tokens``, B = block size, W = 2B canvas, blocks aligned to absolute 0)::

    prefill (whole prompt, P tokens; emits 0)
      -> block [bs, bs+B) with bs = P // B * B; its prompt tail [bs, P) is already in the KV cache
    DRAFT   canvas [block[p-bs:] | MASK filler]          one denoising step on the block; emit 0
            (rows of the block: cache + block bidirectional; with draft_ver the rows before the
             block's first mask are token-causal)
      -> when the block has no mask left: COMMIT
      -> when the routing policy chose to verify: VERIFY (nothing committed by this step)
    VERIFY  canvas [first half (drafts filled) | MASK filler | mask half Lb x MASK | filler] (:mod:`.verify`)
            2L mask, mask half at the first half's positions; q = mask-half logits; accept / resample /
            quota top-up with the draft saved at the DRAFT step; emit 0 -> DRAFT or COMMIT
    COMMIT  canvas [final block[p-bs:] (Lb) | next block: B x MASK | filler]
            first half = the committed KV (token-causal rows with cache_ver, else block-bidirectional);
            second half = the next block's first draft (sees the first half); emit Lb tokens
            (num_rejected = query_len - Lb, so the scheduler advances num_computed_tokens by exactly Lb)

Families (``core.params.FamilyRules``; the diagram is SDAR's):

* LLaDA2.x: the same canvases and 2L verification; one token per step plus the threshold (``core``).  LLaDA2.1
  editing: draft steps may rewrite generated tokens of the block (``editing_threshold``); after the last mask up to
  ``max_post_steps`` more DRAFT steps edit it (``post`` counts them; an editing pass that changes nothing ends the
  block), and a ``max_tokens`` early finish waits until the block is settled (a stop token ends it at once, as in
  the reference).
* Fast-dLLM v2 (shift-aligned): block column i reads canvas row i - 1 (its first uncached column always holds a
  known token); a step decodes the sub-block of the first mask; VERIFY is a causal pass over the first half (no 2L
  launch, no position shift); each block's first token is the argmax of the previous forward's last logit -- the
  prefill's (``prefill_done(last_logits=...)``) or the COMMIT row Lb - 1, so COMMIT is not fused with the next
  block's first draft.

Emitting only at COMMIT keeps the invariant "KV below num_computed_tokens is commit-time KV".  Exception
(early finish): when a step leaves a final prefix in the block that already ends the request -- a stop token
(``eos_token_id`` / ``stop_token_ids`` exactly as vLLM's ``check_stop`` sees them) or ``max_tokens`` reached --
that prefix is emitted at once and vLLM finishes the request (the reference decoder likewise never commits a
finishing block).  The emitted tokens then go through vLLM's own stop checking.

Truncated canvases (the scheduler may give fewer than W slots): a step whose rows do not cover what it needs is
a no-op (state kept, emit 0, the same canvas is scheduled again) unless the cut is ``max_model_len``; then the
block is decoded only up to ``max_model_len`` (``region`` limits the eligible positions) and emitted when that
part is complete, which ends the request (length cap).  A COMMIT whose next block does not fit commits only.

RNG: ``core.rng`` keyed by (seed, counter); the counter advances once per draft step, exactly like the
reference decoder's, so sampled decoding equals the reference for the same seed.

Guard: the mask token's logit is set to -inf before ``draft_step`` (a drafted ``<MASK>`` would be committed as a
token equal to the mask id, i.e. stay masked, and the block would never finish -- the reference decoder loops
forever in that case).  For checkpoints that never predict ``<MASK>`` (trained ones) this changes nothing; the
proper home of this rule is ``core`` (reported), so that the reference applies it too.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Callable, Sequence

import numpy as np
import torch

from vllm_s2d2.core.params import FamilyRules, SamplingSpec, StepParams
from vllm_s2d2.core.policies import PolicyState
from vllm_s2d2.core.step import BlockState, draft_step, finish_step, shifted_next_token, verify_step
from vllm_s2d2.engine.stats import STAT_NAMES
from vllm_s2d2.engine.verify import DraftStore, verify_canvas
from vllm_s2d2.s2d2_config import S2D2Config

DRAFT, COMMIT, VERIFY = 0, 1, 2
NO_LIMIT = 2 ** 62
# attention spec columns: two bidirectional ranges [lo, hi] (absolute, inclusive; lo >= hi means none)
SPEC_COLS = 4
# Static per-slot facts (columns of S2D2Stepper._static), then up to max_stop_ids stop ids (-1 = none).
S_PROMPT_LEN, S_MAX_TOKENS, S_CACHE_VER, S_DRAFT_VER, S_MAX_POST, S_EDITING, S_STOPS = range(7)
# Resume snapshot (remove_request(save=True)): block tokens [B], then these scalars.
SNAP_BLOCK_START, SNAP_STEP, SNAP_COUNTER, SNAP_PHASE, SNAP_POST = range(5)


class PackedStepParams:
    """Per-slot :class:`StepParams` packed into three CPU/GPU matrices (float, int, bool) + the quota table.

    ``set_row`` stages one request's values on the CPU; ``flush`` copies the matrices to the device when rows
    changed; ``gather(slots)`` returns a batched ``StepParams`` (3 gathers instead of one per field)."""

    def __init__(self, max_num_reqs: int, quota_width: int, template: StepParams, device: torch.device):
        self.device = device
        self.f_names, self.i_names, self.b_names = [], [], []
        for fl in fields(StepParams):
            if fl.name in ("quota", "top_k", "top_p"):
                continue
            t = getattr(template, fl.name)
            (self.b_names if t.dtype == torch.bool else
             self.i_names if not t.is_floating_point() else self.f_names).append(fl.name)
        self.f_names.append("top_p")
        self.i_names.append("top_k")
        n = max_num_reqs
        self.f_cpu = torch.zeros(n, len(self.f_names), dtype=torch.float32)
        self.i_cpu = torch.zeros(n, len(self.i_names), dtype=torch.int64)
        self.b_cpu = torch.zeros(n, len(self.b_names), dtype=torch.bool)
        self.q_cpu = torch.ones(n, quota_width, dtype=torch.int64)
        self.f = self.f_cpu.to(device)
        self.i = self.i_cpu.to(device)
        self.b = self.b_cpu.to(device)
        self.q = self.q_cpu.to(device)
        self.dirty = False

    def set_row(self, slot: int, sp: StepParams) -> None:
        for j, name in enumerate(self.f_names):
            v = getattr(sp, name)
            self.f_cpu[slot, j] = 1.0 if (v is None and name == "top_p") else float(v[0])
        for j, name in enumerate(self.i_names):
            v = getattr(sp, name)
            self.i_cpu[slot, j] = 0 if v is None else int(v[0])
        for j, name in enumerate(self.b_names):
            self.b_cpu[slot, j] = bool(getattr(sp, name)[0])
        q = sp.quota[0]
        w = self.q_cpu.shape[1]
        if q.numel() > w:
            raise ValueError(f"denoising quota of {q.numel()} steps exceeds the engine's table width {w}")
        self.q_cpu[slot, :q.numel()] = q
        self.q_cpu[slot, q.numel():] = q[-1]
        self.dirty = True

    def flush(self) -> None:
        if not self.dirty:
            return
        for cpu, dev in ((self.f_cpu, self.f), (self.i_cpu, self.i), (self.b_cpu, self.b), (self.q_cpu, self.q)):
            _h2d(cpu, dev)
        self.dirty = False

    def gather(self, slots: torch.Tensor, use_top_k: bool, use_top_p: bool) -> StepParams:
        f, i, b, q = self.f[slots], self.i[slots], self.b[slots], self.q[slots]
        kw = {n: f[:, j] for j, n in enumerate(self.f_names)}
        kw.update({n: i[:, j] for j, n in enumerate(self.i_names)})
        kw.update({n: b[:, j] for j, n in enumerate(self.b_names)})
        kw["quota"] = q
        if not use_top_k:
            kw["top_k"] = None
        if not use_top_p:
            kw["top_p"] = None
        return StepParams(**kw)


def _gather_rows(logits: torch.Tensor, rows: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[R, B, V]``: canvas logits rows ``rows [R, B]`` where ``valid``, zeros elsewhere (static shapes)."""
    R, B = rows.shape
    rows = torch.where(valid, rows, torch.zeros_like(rows)).clamp(0, max(logits.shape[0] - 1, 0))
    out = logits[rows.reshape(-1)].view(R, B, -1)
    return torch.where(valid[..., None], out, torch.zeros_like(out))


def _h2d(cpu: torch.Tensor, dev: torch.Tensor) -> None:
    """Host-to-device copy that never races later CPU writes (a pinned snapshot on CUDA)."""
    if dev.device.type == "cuda":
        dev.copy_(cpu.pin_memory(), non_blocking=True)
    else:
        dev.copy_(cpu)


class StepOutput:
    __slots__ = ("tokens", "num_emitted", "num_rejected")

    def __init__(self, tokens: torch.Tensor, num_emitted: torch.Tensor, num_rejected: torch.Tensor):
        self.tokens = tokens  # [R, W] emitted tokens first
        self.num_emitted = num_emitted  # [R] int32
        self.num_rejected = num_rejected  # [R] int32 (query_len - emitted)


class S2D2Stepper:
    """Persistent per-slot state + one batched block-diffusion step (see the module docstring)."""

    def __init__(self, *, max_num_reqs: int, block_size: int, family: str, mask_token_id: int,
                 engine_config: S2D2Config, max_model_len: int, device: torch.device | str,
                 max_stop_ids: int = 8, use_cuda_graphs: bool = False):
        self.max_num_reqs = max_num_reqs
        # Every per-slot buffer has one extra row, SCRATCH = max_num_reqs: the padding rows of a CUDA-graph step
        # point there (their writes land in it and are never read back).
        self.scratch = max_num_reqs
        n = max_num_reqs + 1
        self.B = B = block_size
        self.W = 2 * block_size
        self.mask_id = mask_token_id
        self.max_model_len = max_model_len
        self.device = device = torch.device(device)
        self.rules = FamilyRules.for_family(family, mask_token_id)
        # Fast-dLLM v2 (shift-aligned): sub-block regions, shifted logit rows, a causal verifier, and each block's
        # first token from the previous forward's last logit (see _step_core).  Others verify with the 2L mask.
        self.shifted = self.rules.shifted
        self.sub_block = int(engine_config.sub_block_size or block_size)
        self.engine_config = engine_config
        self.K = max_stop_ids
        self.family = family

        long = dict(dtype=torch.int64, device=device)
        self.tokens = torch.full((n, B), mask_token_id, **long)
        self.block_start = torch.zeros(n, **long)
        self.step_idx = torch.zeros(n, **long)
        self.counter = torch.zeros(n, **long)
        self.phase = torch.zeros(n, **long)
        self.post = torch.zeros(n, **long)  # LLaDA2.1 editing passes done after the block's last mask
        self.canvas = torch.full((n, self.W), mask_token_id, **long)  # next canvas per slot (-> draft_tokens)
        self.drafts: DraftStore | None = None  # allocated on the first (profiling) step: needs V and dtype
        self.phase_host = np.zeros(n, dtype=np.int64)  # phases of the coming step, for inputs/attention
        # Counters per slot and for the engine: STAT_NAMES (device; the engine totals reach the host with
        # every publish(), see S2D2Sampler's periodic log line)
        self.stats = torch.zeros(n, len(STAT_NAMES), **long)
        self.totals = torch.zeros(len(STAT_NAMES), **long)
        self.totals_host = torch.zeros(len(STAT_NAMES), dtype=torch.int64, pin_memory=(device.type == "cuda"))
        self.stats_host = torch.zeros(n, len(STAT_NAMES), dtype=torch.int64, pin_memory=(device.type == "cuda"))
        self.policy = PolicyState.zeros(n, device)
        self.attn_spec = torch.zeros(n, SPEC_COLS, dtype=torch.int32, device=device)
        self._cols = torch.arange(B, device=device)
        self._wcols = torch.arange(self.W, device=device)

        # Static per-slot facts (CPU master copy -> device when rows change): columns S_* above.
        self._static_cpu = torch.zeros(n, S_STOPS + self.K, dtype=torch.int64)
        self._static = self._static_cpu.to(device)
        self._static_dirty = False
        template = StepParams.build([engine_config], [SamplingSpec(top_k=1, top_p=0.5, seed=0)], self.rules, "cpu")
        self.params = PackedStepParams(n, max(B, template.quota.shape[1]), template, device)

        # CPU facts used without touching the device.
        self.active = np.zeros(n, dtype=bool)
        self.cache_ver = np.zeros(n, dtype=bool)
        self.draft_ver = np.zeros(n, dtype=bool)
        self.top_k_on = np.zeros(n, dtype=bool)
        self.top_p_on = np.zeros(n, dtype=bool)
        self.prompt_len = np.zeros(n, dtype=np.int64)

        # Staged resets: slot -> saved state row (or None for a fresh request).
        self._pending_reset: dict[int, torch.Tensor | None] = {}
        # Restore rows of resumed requests, consumed when their prefill completes.
        self._restore: dict[int, torch.Tensor] = {}

        # Mirror of attn_spec on the host, refreshed after every step (see publish()).
        self.attn_spec_host = torch.zeros(n, SPEC_COLS, dtype=torch.int32,
                                          pin_memory=(device.type == "cuda"))
        self._spec_event = torch.cuda.Event() if device.type == "cuda" else None
        self._phase_pinned = torch.zeros(n, dtype=torch.int64, pin_memory=(device.type == "cuda"))
        self._spec_published = False

        # CUDA graphs of the decode step (see _graph_step); eager on CPU or when vLLM runs enforce_eager.
        # (On a CPU device the same static-buffer path runs without a graph: the tests check it there.)
        self.use_cuda_graphs = bool(use_cuda_graphs)
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, tuple]] = {}
        self._graph_pool = None
        self._wlogits: torch.Tensor | None = None  # [max_num_reqs * W, V] static copy of the canvas logits
        self._g_slots = torch.full((max_num_reqs,), self.scratch, **long)
        self._g_p = torch.zeros(max_num_reqs, **long)
        self._g_q_len = torch.zeros(max_num_reqs, **long)
        self._g_valid = torch.zeros(max_num_reqs, dtype=torch.bool, device=device)
        self._g_row0 = torch.arange(max_num_reqs, **long) * self.W

    @property
    def two_l_verify(self) -> bool:
        """Whether VERIFY steps use the 2L canvas (position-aligned families) rather than a causal pass."""
        return not self.shifted

    # ------------------------------------------------------------------------------------------------------
    # request lifecycle (host side, staged)
    def add_request(self, slot: int, *, prompt_len: int, config: S2D2Config, sampling: SamplingSpec,
                    stop_ids: Sequence[int], max_tokens: int | None, saved: torch.Tensor | None = None) -> None:
        sp = StepParams.build([config], [sampling], self.rules, "cpu")
        self.params.set_row(slot, sp)
        stops = list(dict.fromkeys(int(s) for s in stop_ids))[: self.K]  # a truncated list only delays a stop
        row = self._static_cpu[slot]
        row[S_PROMPT_LEN] = prompt_len
        row[S_MAX_TOKENS] = NO_LIMIT if max_tokens is None else int(max_tokens)
        row[S_CACHE_VER] = int(bool(config.cache_ver))
        row[S_DRAFT_VER] = int(bool(config.draft_ver))
        row[S_MAX_POST] = int(config.max_post_steps or 0)
        row[S_EDITING] = int(config.editing_threshold is not None)
        row[S_STOPS:] = -1
        if stops:
            row[S_STOPS:S_STOPS + len(stops)] = torch.tensor(stops, dtype=torch.int64)
        self._static_dirty = True
        self.active[slot] = True
        self.cache_ver[slot] = bool(config.cache_ver)
        self.draft_ver[slot] = bool(config.draft_ver)
        self.top_k_on[slot] = sampling.top_k > 0 and sampling.temperature >= 1e-6
        self.top_p_on[slot] = sampling.top_p < 1.0 and sampling.temperature >= 1e-6
        self.prompt_len[slot] = prompt_len
        self.phase_host[slot] = DRAFT
        self._pending_reset[slot] = saved

    def remove_request(self, slot: int, save: bool = False) -> torch.Tensor | None:
        """Deactivate a slot; with ``save`` return a device snapshot of its block state (for a resume)."""
        self.active[slot] = False
        self._pending_reset.pop(slot, None)
        self._restore.pop(slot, None)
        if not save:
            return None
        return torch.cat([self.tokens[slot], self.block_start[slot:slot + 1], self.step_idx[slot:slot + 1],
                          self.counter[slot:slot + 1], self.phase[slot:slot + 1], self.post[slot:slot + 1]])

    def apply_staged_writes(self) -> None:
        self.params.flush()
        if self._static_dirty:
            _h2d(self._static_cpu, self._static)
            self._static_dirty = False
        if not self._pending_reset:
            return
        slots = torch.tensor(sorted(self._pending_reset), dtype=torch.int64).to(self.device, non_blocking=True)
        self.counter[slots] = 0
        self.step_idx[slots] = 0
        self.phase[slots] = DRAFT
        self.post[slots] = 0
        self.stats[slots] = 0
        self.policy.scatter_(slots, PolicyState.zeros(slots.numel(), self.device))
        for slot, saved in self._pending_reset.items():
            if saved is not None:
                self._restore[slot] = saved
        self._pending_reset.clear()

    # ------------------------------------------------------------------------------------------------------
    # prefill completion
    def prefill_done(self, slots: torch.Tensor, slots_np: np.ndarray, prefill_len: torch.Tensor,
                     token_at: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     draft_tokens: torch.Tensor, last_logits: torch.Tensor | None = None) -> None:
        """Open the first decode block of requests whose prompt (``prefill_len`` tokens) is now in the cache.

        ``token_at(slots [R], cols [R, B]) -> [R, B]`` reads prompt tokens (cols < prefill_len are valid).
        ``last_logits [R, V]``: the logits of each prompt's last token -- needed by shift-aligned models, whose
        token at position ``prefill_len`` is their argmax (:func:`~vllm_s2d2.core.step.shifted_next_token`)."""
        B = self.B
        P = prefill_len.to(torch.int64)
        bs = P // B * B
        cols = bs[:, None] + self._cols[None, :]
        known = cols < P[:, None]
        tok = token_at(slots, torch.minimum(cols, (P - 1).clamp_min(0)[:, None]).to(torch.int64)).to(torch.int64)
        tok = torch.where(known, tok, torch.full_like(tok, self.mask_id))
        if self.shifted:
            if last_logits is None:
                raise ValueError("a shift-aligned model needs the prompt's last logits to open its first block")
            first = shifted_next_token(last_logits, self.mask_id)
            tok = torch.where(cols == P[:, None], first[:, None], tok)
        self.tokens[slots] = tok
        self.block_start[slots] = bs
        self.step_idx[slots] = 0
        # A shift-aligned prompt that ends one short of a block boundary leaves a block without masks (its last
        # token came from the prompt's last logit): it is committed at once, with no draft step (as the
        # reference decoder does; a draft there would also advance the request's random-number counter).
        self.phase[slots] = torch.where((tok == self.mask_id).any(1), torch.full_like(bs, DRAFT),
                                        torch.full_like(bs, COMMIT))
        self.post[slots] = 0
        for k, slot in enumerate(slots_np.tolist()):
            saved = self._restore.pop(int(slot), None)
            if saved is not None:  # resumed after preemption: continue the interrupted block if it matches
                st = saved[B:]
                same = (st[SNAP_BLOCK_START] + B > P[k]) & (st[SNAP_BLOCK_START] <= P[k])
                self.tokens[slot] = torch.where(same, saved[:B], self.tokens[slot])
                self.block_start[slot] = torch.where(same, st[SNAP_BLOCK_START], self.block_start[slot])
                self.step_idx[slot] = torch.where(same, st[SNAP_STEP], self.step_idx[slot])
                ph = torch.where(st[SNAP_PHASE] == VERIFY, torch.full_like(st[SNAP_PHASE], DRAFT), st[SNAP_PHASE])
                self.phase[slot] = torch.where(same, ph, self.phase[slot])
                self.post[slot] = torch.where(same, st[SNAP_POST], self.post[slot])
                self.counter[slot] = st[SNAP_COUNTER]
        self._write_next(slots, P)
        self.export_canvas(slots, draft_tokens)

    def export_canvas(self, slots: torch.Tensor, draft_tokens: torch.Tensor) -> None:
        """Copy the next canvases of ``slots`` into the runner's ``draft_tokens`` (the input ids of the next
        step)."""
        draft_tokens[slots, :self.W] = self.canvas[slots].to(draft_tokens.dtype)

    # ------------------------------------------------------------------------------------------------------
    # one decode step
    def step(self, logits: torch.Tensor, slots: torch.Tensor, slots_np: np.ndarray, p: torch.Tensor,
             q_len: torch.Tensor, row0: torch.Tensor, draft_tokens: torch.Tensor) -> StepOutput:
        """One step for R decoding requests.

        ``logits [N, V]``: the canvas logits of the batch; request r's canvas rows are
        ``row0[r] .. row0[r] + q_len[r] - 1`` (query positions ``p[r] ..``).  ``slots``: their state rows.
        Writes the next canvas into ``draft_tokens[slot, :W]``; returns the emitted tokens.

        The tensor work (:meth:`_step_core`) runs eagerly or, with ``use_cuda_graphs``, as a CUDA graph captured
        per (padded batch size, any verifying row, any top-k, any top-p): same kernels, same numbers, no
        per-op launch cost."""
        self.sync_host()
        has_verify = bool((self.phase_host[slots_np] == VERIFY).any())
        use_top_k, use_top_p = bool(self.top_k_on[slots_np].any()), bool(self.top_p_on[slots_np].any())
        p, q_len, row0 = p.to(torch.int64), q_len.to(torch.int64), row0.to(torch.int64)
        self._ensure_drafts(logits.shape[-1], logits.dtype)
        if self.use_cuda_graphs:
            tokens, emitted, rejected = self._graph_step(logits, slots, p, q_len, row0, has_verify, use_top_k,
                                                         use_top_p)
        else:
            tokens, emitted, rejected = self._step_core(logits, slots, p, q_len, row0, None, has_verify,
                                                        use_top_k, use_top_p)
        self.export_canvas(slots, draft_tokens)
        return StepOutput(tokens, emitted, rejected)

    # ------------------------------------------------------------------------------------------------------
    # CUDA graphs of the step
    def _bucket(self, R: int) -> int:
        b = 1
        while b < R:
            b *= 2
        return min(b, self.max_num_reqs)

    def _graph_step(self, logits, slots, p, q_len, row0, has_verify, use_top_k, use_top_p):
        """Copy the step's inputs into static buffers (the W canvas logits rows of each request into
        ``_wlogits``; padding rows -> SCRATCH, ``q_len`` 0, invalid) and replay the graph of this shape."""
        W, R = self.W, slots.numel()
        Rp = self._bucket(R)
        key = (Rp, has_verify, use_top_k, use_top_p)
        if self.device.type == "cuda" and key not in self._graphs:
            self._capture(key)  # before the inputs are written: its warm-up runs on padding rows
        rows = row0[:, None] + torch.minimum(self._wcols[None, :], (q_len - 1).clamp_min(0)[:, None])
        torch.index_select(logits, 0, rows.reshape(-1), out=self._wlogits[:R * W])
        self._g_slots[:R].copy_(slots)
        self._g_p[:R].copy_(p)
        self._g_q_len[:R].copy_(q_len)
        self._g_valid[:R] = True
        self._pad_inputs(R, Rp)
        if self.device.type != "cuda":
            tokens, emitted, rejected = self._step_core(*self._static_args(key))
        else:
            graph, (tokens, emitted, rejected) = self._graphs[key]
            graph.replay()
        return tokens[:R], emitted[:R], rejected[:R]

    def _pad_inputs(self, lo: int, hi: int) -> None:
        """Static input rows ``[lo, hi)`` become padding: SCRATCH slot, empty query, not counted."""
        self._g_slots[lo:hi] = self.scratch
        self._g_q_len[lo:hi] = 0
        self._g_p[lo:hi] = 0
        self._g_valid[lo:hi] = False

    def _static_args(self, key) -> tuple:
        Rp, has_verify, use_top_k, use_top_p = key
        return (self._wlogits[:Rp * self.W], self._g_slots[:Rp], self._g_p[:Rp], self._g_q_len[:Rp],
                self._g_row0[:Rp], self._g_valid[:Rp], has_verify, use_top_k, use_top_p)

    def _capture(self, key) -> None:
        """Warm-up run on padding only (writes land in SCRATCH; the counters add zero), then capture (records,
        runs nothing): the caller writes the step's inputs afterwards."""
        self._pad_inputs(0, key[0])
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._step_core(*self._static_args(key))
        torch.cuda.current_stream().wait_stream(side)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            outs = self._step_core(*self._static_args(key))
        self._graphs[key] = (graph, outs)

    # ------------------------------------------------------------------------------------------------------
    def _step_core(self, logits: torch.Tensor, slots: torch.Tensor, p: torch.Tensor, q_len: torch.Tensor,
                   row0: torch.Tensor, valid: torch.Tensor | None, has_verify: bool, use_top_k: bool,
                   use_top_p: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The step's tensor work (no host syncs, no host-dependent shapes): state in, state + outputs out.
        ``valid`` (None = all) masks padding rows out of the engine counters."""
        B, mask_id = self.B, self.mask_id
        cols = self._cols[None, :]

        bs = self.block_start[slots]
        tok = self.tokens[slots]
        phase = self.phase[slots]
        stp = self.step_idx[slots]
        ctr = self.counter[slots]
        static = self._static[slots]
        prompt_len, max_tokens, stop_ids = static[:, S_PROMPT_LEN], static[:, S_MAX_TOKENS], static[:, S_STOPS:]
        max_post, editing = static[:, S_MAX_POST], static[:, S_EDITING].bool()
        post = self.post[slots]
        shift = int(self.shifted)

        off = (p - bs).clamp(0, B)
        Lb = B - off
        is_commit = phase == COMMIT
        is_verify = phase == VERIFY
        need = torch.where(is_commit | is_verify, Lb + B, Lb)
        full = q_len >= need
        clipped = ~full & (p + q_len >= self.max_model_len)
        commit_ok = is_commit & (q_len >= Lb)
        draft_rows_avail = q_len - torch.where(is_commit, Lb, torch.zeros_like(Lb))
        draft_ok = torch.where(is_commit, full | (clipped & commit_ok & (draft_rows_avail > 0)),
                               full | (clipped & (q_len > 0))) & ~is_verify
        if self.shifted:
            # The next block's first token comes from this commit forward, so its first draft cannot share it.
            draft_ok = draft_ok & ~is_commit
        verify_ok = is_verify & full  # a verify canvas is only ever written when it fits (see below)

        # The block this step denoises: the current one (DRAFT) or the fresh next one (COMMIT).  A shift-aligned
        # model's fresh block starts with the argmax of the committed block's last logit (canvas row Lb - 1).
        fresh = torch.full_like(tok, mask_id)
        if self.shifted:
            last_row = (row0 + Lb - 1).clamp(0, max(logits.shape[0] - 1, 0))
            first = shifted_next_token(logits[last_row], mask_id)
            fresh = torch.where(cols == 0, first[:, None], fresh)
        dblock = torch.where(is_commit[:, None], fresh, tok)
        doff = torch.where(is_commit, torch.zeros_like(off), off)
        dbs = bs + torch.where(is_commit, torch.full_like(bs, B), torch.zeros_like(bs))
        dstep = torch.where(is_commit, torch.zeros_like(stp), stp)
        avail = draft_rows_avail.clamp(min=0)
        avail_region = full[:, None] | (cols < (doff + avail)[:, None])
        region = avail_region
        d_is_mask = dblock == mask_id
        d_has_mask = d_is_mask.any(1)
        if self.shifted:
            # Fast-dLLM v2 decodes the sub-block holding the block's first mask.
            first_mask = torch.where(d_has_mask, d_is_mask.int().argmax(1), torch.zeros_like(doff))
            lo = first_mask // self.sub_block * self.sub_block
            region = region & (cols >= lo[:, None]) & (cols < (lo + self.sub_block)[:, None])
        editable = (dbs[:, None] + cols) >= prompt_len[:, None]

        # Block column i reads canvas row i - doff (position-aligned) or i - doff - 1 (shifted: the logit of the
        # previous position; the first uncached column always holds a known token).
        has_logit = (cols >= (doff + shift)[:, None]) & (cols < (doff + avail)[:, None])
        rows = (row0[:, None] + torch.where(is_commit, Lb, torch.zeros_like(Lb))[:, None]
                + (cols - doff[:, None] - shift))
        block_logits = _gather_rows(logits, rows, has_logit)

        params = self.params.gather(slots, use_top_k, use_top_p)
        pol = self.policy.index(slots)
        state = BlockState(dblock, editable, region, dstep, ctr)
        draft, pol2 = draft_step(block_logits, state, params, self.rules, pol)
        # A verify canvas needs 2B slots from the block start: near max_model_len the step falls back to the
        # baseline rule (the routing state already counted the decision).
        starts_verify = draft_ok & draft.do_verify & (dbs + 2 * B <= self.max_model_len)
        draft.do_verify = starts_verify
        result, pol3 = finish_step(state, draft, None, None, None, params, pol2)
        new_tok = torch.where((draft_ok & ~starts_verify)[:, None], result.tokens, dblock)
        self.drafts.save(slots, starts_verify, draft, block_logits, ctr, dstep)
        pol_next = self._pick_policy(pol, pol3, draft_ok & ~starts_verify)
        pol_next = self._pick_policy(pol_next, pol2, starts_verify)  # reward recorded when the verify ends

        n_accepted = torch.zeros_like(p)
        if has_verify:
            v_tok, pol_v, n_accepted = self._verify(logits, slots, tok, editable, off, row0, ctr, stp, params, pol)
            new_tok = torch.where(verify_ok[:, None], v_tok, new_tok)
            pol_next = self._pick_policy(pol_next, pol_v, verify_ok)
        self.policy.scatter_(slots, pol_next)
        ran = draft_ok | verify_ok

        # LLaDA2.1 editing passes (S2D2_SPEC.md §5): once the block has no mask, up to max_post_steps more draft
        # steps may edit it; an editing pass that changes nothing ends the block.
        edit_pass = draft_ok & ~d_has_mask
        changed = (new_tok != dblock).any(1)
        post_n = torch.where(commit_ok, torch.zeros_like(post), post) + edit_pass.long()  # (a commit opens a block)
        new_has_mask = (new_tok == mask_id).any(1)
        more_edits = ran & ~new_has_mask & ~(edit_pass & ~changed) & (post_n < max_post)
        # With editing, emitted tokens could still change until the block is settled.
        settled = ~editing | (~new_has_mask & ~more_edits)

        # Early finish: a final prefix (from doff) that already ends the request is emitted now.
        blocking = ((new_tok == mask_id) | ~avail_region) & (cols >= doff[:, None])
        first_block = torch.where(blocking.any(1), blocking.int().argmax(1), torch.full_like(doff, B))
        leading = (first_block - doff).clamp_min(0)
        in_lead = (cols >= doff[:, None]) & (cols < first_block[:, None])
        is_stop = (new_tok[:, :, None] == stop_ids[:, None, :]).any(-1) & in_lead & editable
        out_before = dbs + doff - prompt_len  # output tokens emitted before this block's rows
        reach_max = out_before + leading >= max_tokens
        region_done = ~((new_tok == mask_id) & avail_region).any(1)
        finish = ran & ~starts_verify & (leading > 0) & (
            is_stop.any(1) | ((reach_max | (clipped & region_done)) & settled))

        emitted = torch.where(commit_ok, Lb, torch.zeros_like(Lb)) + torch.where(finish, leading,
                                                                                  torch.zeros_like(leading))
        # Output row: Z = [current block (final for COMMIT, drafted for DRAFT) | drafted next block]
        cur = torch.where(is_commit[:, None], tok, new_tok)
        Z = torch.cat([cur, new_tok], dim=1)
        zi = (off[:, None] + self._wcols[None, :]).clamp(max=2 * B - 1)
        out_tokens = Z.gather(1, zi)

        # Next state.
        bs_n = torch.where(commit_ok, bs + B, bs)
        tok_n = torch.where(commit_ok[:, None], torch.where(draft_ok[:, None], new_tok, fresh),
                            torch.where(ran[:, None], new_tok, tok))
        stp_n = torch.where(commit_ok, draft_ok.long(), stp + draft_ok.long())
        self.block_start[slots] = bs_n
        self.tokens[slots] = tok_n
        self.step_idx[slots] = stp_n
        self.counter[slots] = ctr + draft_ok.long()
        self.post[slots] = post_n
        phase_n = torch.where((tok_n == mask_id).any(1) | more_edits, torch.full_like(phase, DRAFT),
                              torch.full_like(phase, COMMIT))
        phase_n = torch.where(ran | commit_ok, phase_n, phase)  # a step that did not run keeps its phase
        stay = starts_verify | (is_verify & ~verify_ok)  # a truncated verify step is retried
        self.phase[slots] = torch.where(stay, torch.full_like(phase, VERIFY), phase_n)
        inc = torch.stack([draft_ok.long(), verify_ok.long(),
                           torch.where(verify_ok, self.drafts.reqs["span_length"][slots], 0),
                           torch.where(verify_ok, n_accepted, 0), commit_ok.long()], dim=1)
        if valid is not None:
            inc = inc * valid[:, None].long()
        self.stats[slots] += inc
        self.totals += inc.sum(dim=0)
        self._write_next(slots, p + emitted)
        return out_tokens, emitted.to(torch.int32), (q_len - emitted).to(torch.int32)

    @staticmethod
    def _pick_policy(old: PolicyState, new: PolicyState, keep: torch.Tensor) -> PolicyState:
        def pick(a, b):
            k = keep.view(-1, *([1] * (a.dim() - 1)))
            return torch.where(k, b, a)
        return PolicyState(pick(old.hysteresis_on, new.hysteresis_on), pick(old.ucb_t, new.ucb_t),
                           pick(old.ucb_n, new.ucb_n), pick(old.ucb_mu, new.ucb_mu))

    def _ensure_drafts(self, vocab_size: int, dtype: torch.dtype) -> None:
        if self.drafts is None:
            self.drafts = DraftStore(self.max_num_reqs + 1, self.B, vocab_size, dtype, self.device)
        if self.use_cuda_graphs and self._wlogits is None:
            self._wlogits = torch.zeros(self.max_num_reqs * self.W, vocab_size, dtype=dtype, device=self.device)

    def _verify(self, logits, slots, tok, editable, off, row0, ctr, stp, params, pol):
        """Verification over every row (the caller keeps the rows whose step is a VERIFY): q from the mask half
        (canvas rows B + i), ``core.step.verify_step`` against the saved draft, then ``finish_step``.  Rows are
        independent, so computing all of them keeps the shapes static (CUDA graphs) and changes no number.
        Returns [R, B] tokens, policy state and accepted counts."""
        B = self.B
        draft = self.drafts.load(slots, params, self.mask_id)
        cols = self._cols[None, :]
        # q for block column i: the 2L mask half's row B + (i - off), or the causal pass's row i - off - 1
        # (shift-aligned models).
        base, shift = (B, 0) if self.two_l_verify else (0, 1)
        known = cols >= (off + shift)[:, None]
        q_logits = _gather_rows(logits, row0[:, None] + base + (cols - off[:, None] - shift), known)
        commit, tokens, accepted = verify_step(draft, q_logits, params, self.rules, self.drafts.counter[slots])
        vstate = BlockState(tok, editable, torch.ones_like(editable), stp, ctr)
        res, vpol = finish_step(vstate, draft, commit, tokens, accepted, params, pol)
        return res.tokens, vpol, res.num_accepted

    def _write_next(self, slots: torch.Tensor, p_next: torch.Tensor) -> None:
        """Next canvas ``[block[off:] | MASK ...]`` and next attention ranges for ``slots`` at query start
        ``p_next``."""
        B, mask_id = self.B, self.mask_id
        bs = self.block_start[slots]
        tok = self.tokens[slots]
        phase = self.phase[slots]
        static = self._static[slots]
        cache_ver, draft_ver = static[:, S_CACHE_VER].bool(), static[:, S_DRAFT_VER].bool()
        off = (p_next - bs).clamp(0, B)
        Lb = B - off
        src = (off[:, None] + self._wcols[None, :]).clamp(max=B - 1)
        canvas = torch.where(self._wcols[None, :] < Lb[:, None], tok.gather(1, src),
                             torch.full_like(src, mask_id))
        is_verify = phase == VERIFY
        if self.drafts is not None:
            vcanvas = verify_canvas(self.drafts.rows["first_half"][slots], off, mask_id)
            canvas = torch.where(is_verify[:, None], vcanvas, canvas)
        self.canvas[slots] = canvas

        is_mask = tok == mask_id
        first_mask = torch.where(is_mask.any(1), is_mask.int().argmax(1), torch.full_like(off, B))
        cp = torch.where(draft_ver, (first_mask - off).clamp_min(0), torch.zeros_like(off))
        end = bs + B - 1
        none = torch.zeros_like(bs)
        is_commit = phase == COMMIT
        r1_lo = torch.where(is_commit, torch.where(cache_ver, none, p_next), p_next + cp)
        r1_hi = torch.where(is_commit, torch.where(cache_ver, none, end), end)
        r2_lo = torch.where(is_commit, bs + B, none)
        r2_hi = torch.where(is_commit, bs + 2 * B - 1, none)
        spec = torch.stack([r1_lo, r1_hi, r2_lo, r2_hi], dim=1)
        spec = torch.where(is_verify[:, None], torch.zeros_like(spec), spec)  # the verify launch masks these
        self.attn_spec[slots] = spec.to(torch.int32)

    # ------------------------------------------------------------------------------------------------------
    # host mirror of the attention ranges
    def publish(self) -> None:
        """Start the device-to-host copy of the next step's attention ranges and phases (after every sampler
        call)."""
        if self.device.type == "cuda":
            self.attn_spec_host.copy_(self.attn_spec, non_blocking=True)
            self._phase_pinned.copy_(self.phase, non_blocking=True)
            self.totals_host.copy_(self.totals, non_blocking=True)
            self.stats_host.copy_(self.stats, non_blocking=True)
            self._spec_event.record()
        else:
            self.attn_spec_host.copy_(self.attn_spec)
            self._phase_pinned.copy_(self.phase)
            self.totals_host.copy_(self.totals)
            self.stats_host.copy_(self.stats)
        self._spec_published = True

    def sync_host(self) -> None:
        """Make ``attn_spec_host`` / ``phase_host`` current (waits for the copy started by :meth:`publish`,
        which has long finished: vLLM already synchronised on that step's sampled tokens)."""
        if not self._spec_published:
            return
        if self._spec_event is not None:
            self._spec_event.synchronize()
        self.phase_host[:] = self._phase_pinned.numpy()
        self._spec_published = False

    def host_totals(self) -> dict[str, int]:
        """Engine-wide counters as of the last published step."""
        self.sync_host()
        return dict(zip(STAT_NAMES, self.totals_host.tolist()))

    def host_slot_stats(self, slot: int) -> dict[str, int]:
        """Counters of one slot as of the last published step."""
        self.sync_host()
        return dict(zip(STAT_NAMES, self.stats_host[slot].tolist()))

    def host_attn_spec(self) -> np.ndarray:
        """``[max_num_reqs, 4]`` ranges for the coming step."""
        self.sync_host()
        return self.attn_spec_host.numpy()

    # ------------------------------------------------------------------------------------------------------
    def profile_draft(self, num_reqs: int, vocab_size: int, dtype: torch.dtype) -> None:
        """Run one worst-case draft step (``num_reqs`` x B x V) so vLLM's memory profiler sees its peak."""
        B = self.B
        logits = torch.zeros(num_reqs * B, vocab_size, dtype=dtype, device=self.device)
        slots = torch.zeros(num_reqs, dtype=torch.int64, device=self.device)
        params = self.params.gather(slots, True, True)
        cols = self._cols.expand(num_reqs, B)
        state = BlockState(torch.full((num_reqs, B), self.mask_id, dtype=torch.int64, device=self.device),
                           torch.ones_like(cols, dtype=torch.bool), torch.ones_like(cols, dtype=torch.bool),
                           torch.zeros(num_reqs, dtype=torch.int64, device=self.device),
                           torch.zeros(num_reqs, dtype=torch.int64, device=self.device))
        pol = PolicyState.zeros(num_reqs, self.device)
        self._ensure_drafts(vocab_size, dtype)
        draft, pol = draft_step(logits.view(num_reqs, B, -1), state, params, self.rules, pol)
        finish_step(state, draft, None, None, None, params, pol)
