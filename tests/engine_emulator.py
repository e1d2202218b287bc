"""A CPU emulation of vLLM 0.26's scheduler + MRV2 runner around the plugin's real sampler and mask code.

What is real: :class:`~vllm_s2d2.engine.stepper.S2D2Stepper`, :class:`~vllm_s2d2.engine.sampler.S2D2Sampler`
and the model state's attention plan (:mod:`vllm_s2d2.engine.attention`: which rows are canvas rows, the
prefill tables and ranges, the RoPE positions) -- the exact objects the GPU engine runs.  What is emulated,
following the 0.26 source:

* scheduling: prompts (optionally chunked by a token budget), then W canvas tokens per decode request
  (truncated by the budget and by ``max_model_len``, ``scheduler.py:502-518``); rollback
  ``num_computed -= num_rejected`` (``scheduler.py:1675-1702``); ``check_stop`` on emitted tokens
  (eos / stop ids / max_tokens / max_model_len);
* the runner's ``InputBatch`` fields the plugin reads, ``draft_tokens`` -> input ids of the canvas;
* the paged KV cache: every position keeps the attention row it was written with (what the KV of that slot
  encodes); a forward is a dense recompute of ``[cached | query]`` where cached rows use their recorded rows
  and query rows use what the attention backend computes: canvas rows see every key below the canvas plus
  their slot's table (the canvas kernel), other rows the stock Triton mask (causal OR ranges,
  ``attention.kernel_visibility``) -- the same dense model the reference decoder uses, so the emulated engine
  must equal ``reference.generate`` token for token.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch

from vllm_s2d2.engine.attention import (canvas_positions, kernel_visibility, plan_canvas_rows, prefill_ranges,
                                        write_prefill_tables)
from vllm_s2d2.engine.settings import resolve_engine_settings
from vllm_s2d2.engine.states import VERIFY
from vllm_s2d2.engine.stepper import S2D2Stepper
from vllm_s2d2.engine.window_stepper import WindowStepper


@dataclass
class EmuRequest:
    req_id: str
    prompt: list[int]
    sampling: SimpleNamespace  # SamplingParams-like
    slot: int = -1
    num_computed: int = 0
    output: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    rows: dict[int, torch.Tensor] = field(default_factory=dict)  # position -> recorded visibility row
    kv_tokens: dict[int, int] = field(default_factory=dict)  # position -> token written there
    kv_context: dict[int, tuple] = field(default_factory=dict)  # position -> (keys it saw, their tokens then)
    forwards: int = 0
    stats: dict | None = None  # the stepper's counters when the request left (what the model state records)

    prefill_tokens: list[int] | None = None  # prompt + outputs after a preemption (vLLM re-prefills them)

    @property
    def prefill_len(self) -> int:
        return len(self.prefill_tokens if self.prefill_tokens is not None else self.prompt)

    @property
    def prefilling(self) -> bool:
        return self.num_computed < self.prefill_len


def sampling_params(temperature=0.0, top_k=0, top_p=1.0, seed=None, max_tokens=16, stop_token_ids=(),
                    eos_token_id=None, ignore_eos=False, extra_args=None):
    return SimpleNamespace(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, max_tokens=max_tokens,
                           stop_token_ids=list(stop_token_ids), eos_token_id=None if ignore_eos else eos_token_id,
                           min_tokens=0, extra_args=extra_args)


class Emulator:
    def __init__(self, model, hf_config: dict, s2d2: dict, *, max_num_reqs=8, max_model_len=256,
                 token_budget=4096, static_shapes=False, prefix_cache_block: int | None = None,
                 shared_prefix_cache: bool = False, compile_step: bool = False, compile_core: bool = False):
        self.model = model
        self.settings = resolve_engine_settings(hf_config, s2d2)
        self.W = self.settings.canvas_length
        self.max_model_len = max_model_len
        self.budget = token_budget
        self.prefix_cache_block = prefix_cache_block  # vLLM's prefix cache on resumes (block size), or None
        self.prefix_hits = 0  # resumes that found cached blocks
        # vLLM's prefix cache across requests (with prefix_cache_block): every full block below a request's
        # computed tokens, keyed by the token ids up to its end (what vLLM's block hash chain encodes), found by any
        # later request -- a new one by its prompt, a resumed one by prompt + outputs.  Never evicted.
        self.shared_blocks: dict[tuple, list[tuple]] = {}  # tokens[:end] -> [(row, kv token, kv context)] x size
        self.shared_hits = 0  # requests that started after blocks another request computed
        pipelined = self.settings.info.pipelined
        # as the config hook sets it (D2F: never, its prompt is one bidirectional segment)
        self.chunked_prefill = bool(self.settings.config.cache_ver) and not pipelined
        self.shared_prefix_cache = shared_prefix_cache and bool(prefix_cache_block) and self.chunked_prefill
        self.stepper = (WindowStepper if pipelined else S2D2Stepper)(max_num_reqs=max_num_reqs, block_size=self.settings.block_size,
                                   family=self.settings.info.family, mask_token_id=self.settings.mask_token_id,
                                   engine_config=self.settings.config, max_model_len=max_model_len, device="cpu",
                                   use_cuda_graphs=static_shapes,  # on CPU: the graph's static-buffer path
                                   **({"compile_step": True, "compile_core": compile_core} if compile_step else {}))
        self.req_states = SimpleNamespace(
            draft_tokens=torch.zeros(max_num_reqs, self.W, dtype=torch.int64),
            all_token_ids=SimpleNamespace(gpu=torch.zeros(max_num_reqs, max_model_len, dtype=torch.int32)))
        base = SimpleNamespace(req_states=self.req_states, sampling_states=None)
        from vllm_s2d2.engine.sampler import S2D2Sampler

        self.sampler = S2D2Sampler(base, self.stepper, self.settings, hf_config["vocab_size"])
        self.free = list(range(max_num_reqs))
        self.running: list[EmuRequest] = []
        self.steps = 0
        self.verify_forwards = 0
        # Optional context manager (e.g. tests/sync_guard.no_host_reads) around the plugin's work in decode-only
        # steps: the model state's attention plan and positions, and the sampler call.
        self.step_guard = None
        self.guarded_steps = 0

    # -- lifecycle -------------------------------------------------------------------------------------
    def add(self, req: EmuRequest, saved: torch.Tensor | None = None) -> None:
        req.slot = self.free.pop(0)
        tokens = req.prefill_tokens if req.prefill_tokens is not None else req.prompt
        self.req_states.all_token_ids.gpu[req.slot].zero_()
        self.req_states.all_token_ids.gpu[req.slot, :len(tokens)] = torch.tensor(tokens)
        self.sampler.next_request_id[req.slot] = req.req_id  # (as the model state hands it over)
        if saved is not None:
            self.sampler.next_saved[req.slot] = saved
        if self.shared_prefix_cache:
            self._lookup_shared(req, tokens)
        self.sampler.add_request(req.slot, len(req.prompt), req.sampling)
        self.sampler.apply_staged_writes()
        self.running.append(req)

    def abort(self, req: EmuRequest) -> None:
        req.finished, req.finish_reason = True, "abort"
        self._remove(req)

    def preempt(self, req: EmuRequest) -> None:
        """vLLM preemption: KV freed, the request later re-prefills prompt + outputs (model state snapshot)."""
        saved = self.stepper.remove_request(req.slot, save=True)
        self.running.remove(req)
        self.free.append(req.slot)
        keep = 0
        if self.prefix_cache_block and self.chunked_prefill:  # as the config hook allows it (cache_ver, no D2F)
            # vLLM's prefix cache: the whole cached blocks of prompt + outputs come back without a forward (never
            # the last token, which vLLM always computes); the re-prefill starts after them
            size = self.prefix_cache_block
            keep = min(req.num_computed, len(req.prompt) + len(req.output) - 1) // size * size
        req.num_computed = keep
        self.prefix_hits += keep > 0
        for cached in (req.rows, req.kv_tokens, req.kv_context):
            for k in [k for k in cached if k >= keep]:
                del cached[k]
        req.prefill_tokens = req.prompt + req.output
        # as the model state does: only a request with outputs resumes from its snapshot; one preempted before
        # its first token starts afresh (what it drafted is redone with the same random numbers)
        self.add(req, saved if req.output else None)

    def _lookup_shared(self, req: EmuRequest, tokens: list[int]) -> None:
        """Start ``req`` after the longest run of cached blocks matching ``tokens`` (never its last token)."""
        size, end = self.prefix_cache_block, 0
        while end + size <= len(tokens) - 1 and tuple(tokens[:end + size]) in self.shared_blocks:
            end += size
        if end <= req.num_computed:
            return
        foreign = False
        for start in range(0, end, size):
            for k, (row, tok, ctx) in enumerate(self.shared_blocks[tuple(tokens[:start + size])], start):
                foreign |= k >= req.num_computed and (req.kv_context.get(k) != ctx or req.rows.get(k) is None)
                req.rows[k], req.kv_tokens[k], req.kv_context[k] = row.clone(), tok, ctx
        req.num_computed = end
        self.shared_hits += foreign

    def _publish_shared(self, req: EmuRequest) -> None:
        """Cache the full blocks below what vLLM counts computed for ``req`` (its KV must hold those tokens)."""
        size = self.prefix_cache_block
        tokens = req.prompt + req.output
        known = min(req.num_computed, len(tokens))
        for end in range(size, known // size * size + 1, size):
            key = tuple(tokens[:end])
            if key in self.shared_blocks:
                continue
            for k in range(end - size, end):
                if req.kv_tokens.get(k) != tokens[k]:
                    raise AssertionError(f"{req.req_id}: computed position {k} holds KV of token "
                                         f"{req.kv_tokens.get(k)}, the request's token there is {tokens[k]}")
            self.shared_blocks[key] = [(req.rows[k].clone(), req.kv_tokens[k], req.kv_context[k])
                                       for k in range(end - size, end)]

    def _remove(self, req: EmuRequest) -> None:
        req.stats = self.stepper.host_slot_stats(req.slot)
        self.stepper.remove_request(req.slot)
        self.running.remove(req)
        self.free.append(req.slot)

    # -- one engine step -------------------------------------------------------------------------------
    def schedule(self):
        budget = self.budget
        sched = []
        for r in self.running:
            if budget <= 0:
                break
            if r.prefilling:
                n = min(r.prefill_len - r.num_computed, budget)
                if n < r.prefill_len - r.num_computed and not self.chunked_prefill:
                    break  # vLLM with chunked prefill disabled (config hook, cache_ver=false): whole prompts only
                spec = 0
            else:
                n = min(self.W, budget, self.max_model_len - r.num_computed)
                spec = n
            if n <= 0:
                continue
            budget -= n
            sched.append((r, n, spec))
        return sched

    def step(self) -> bool:
        sched = self.schedule()
        if not sched:
            return False
        self.steps += 1
        R = len(sched)
        reqs = [s[0] for s in sched]
        nsched = np.array([s[1] for s in sched], dtype=np.int32)
        nspec = np.array([s[2] for s in sched], dtype=np.int32)
        computed = np.array([r.num_computed for r in reqs], dtype=np.int32)
        prefill_len = np.array([r.prefill_len for r in reqs], dtype=np.int32)
        qsl = np.zeros(R + 1, dtype=np.int32)
        np.cumsum(nsched, out=qsl[1:])
        any_spec = bool(nspec.sum())
        nlogits = nspec if any_spec else np.ones(R, dtype=np.int32)
        cu = np.zeros(R + 1, dtype=np.int32)
        np.cumsum(nlogits, out=cu[1:])
        batch = SimpleNamespace(
            num_reqs=R, req_ids=[r.req_id for r in reqs],
            idx_mapping_np=np.array([r.slot for r in reqs], dtype=np.int32),
            idx_mapping=torch.tensor([r.slot for r in reqs], dtype=torch.int32),
            num_scheduled_tokens=nsched, num_computed_tokens_np=computed,
            num_computed_prefill_tokens_np=np.minimum(computed, prefill_len), prefill_len_np=prefill_len,
            is_prefilling_np=computed < prefill_len,
            num_draft_tokens_per_req=nspec if any_spec else None,
            query_start_loc=torch.from_numpy(qsl.copy()), query_start_loc_np=qsl,
            seq_lens=torch.from_numpy(computed + nsched), cu_num_logits=torch.from_numpy(cu.copy()),
            cu_num_logits_np=cu)
        # Attention as the model state and the backend run it: canvas rows read their slot's table (keys below the
        # canvas all visible), other rows the stock kernel's mask; RoPE positions with the canvas offsets.
        runner_pos = torch.cat([torch.arange(c, c + n) for c, n in zip(computed.tolist(), nsched.tolist())])
        decode_only = not batch.is_prefilling_np.any()
        guard = self.step_guard if (self.step_guard is not None and decode_only) else contextlib.nullcontext
        with guard():  # what the model state runs before the forward
            plan = plan_canvas_rows(self.stepper, batch)
            if plan.prefill_rows.size:
                write_prefill_tables(self.stepper, batch, plan.prefill_rows)
            ranges = {} if plan.canvas_only else (prefill_ranges(self.stepper, batch) or {})
            positions = canvas_positions(runner_pos, batch.query_start_loc, R, torch.from_numpy(plan.row_slot),
                                         self.stepper.blocks.pos_offset, torch.zeros_like(runner_pos))
        phases = self.stepper.blocks.phase.clone()
        logits_rows, token_rows = [], []
        for i, (r, n, spec) in enumerate(sched):
            p = r.num_computed
            if r.prefilling:
                src = r.prefill_tokens if r.prefill_tokens is not None else r.prompt
                ids = src[p:p + n]
            else:
                ids = self.req_states.draft_tokens[r.slot, :n].tolist()
            rr = [x for x in ranges.get(i, []) if x[0] < x[1]]
            slot = int(plan.row_slot[i])
            table = self.stepper.blocks.canvas_tables[slot, :n, :n].bool() if slot >= 0 else None
            is_verify = not r.prefilling and n == self.W and int(phases[r.slot]) == VERIFY
            logits = self._forward(r, p, ids, rr, table, positions[int(qsl[i]):int(qsl[i + 1])])
            token_rows.append(logits)
            self.verify_forwards += int(is_verify)
            r.forwards += 1
            if spec:
                logits_rows.append(logits)
            elif not any_spec:
                logits_rows.append(logits[-1:])
        logits = torch.cat(logits_rows) if logits_rows else torch.zeros(0, self.model.vocab_size)
        all_rows = torch.cat(token_rows)  # what the model classes keep: every token row of the forward
        self.sampler.token_logits = lambda rows: all_rows[rows]
        with guard():
            out = self.sampler(logits, batch)
        self.guarded_steps += int(guard is self.step_guard)
        for i, (r, n, spec) in enumerate(sched):
            e = int(out.num_sampled[i])
            rej = int(out.num_rejected[i])
            r.num_computed += n - rej
            if spec:
                assert rej == n - e
            toks = out.sampled_token_ids[i, :e].tolist()
            for t in toks:
                r.output.append(int(t))
                reason = self._check_stop(r)
                if reason:
                    r.finished, r.finish_reason = True, reason
                    break
            if self.shared_prefix_cache and not r.finished:
                self._publish_shared(r)  # (vLLM caches blocks when it schedules; a finished request is not)
            if r.finished:
                self._remove(r)
        return True

    def _check_stop(self, r: EmuRequest) -> str | None:
        sp = r.sampling
        t = r.output[-1]
        if (sp.eos_token_id is not None and t == sp.eos_token_id) or t in sp.stop_token_ids:
            return "stop"
        if len(r.prompt) + len(r.output) >= self.max_model_len or len(r.output) >= sp.max_tokens:
            return "length"
        return None

    def _forward(self, r: EmuRequest, p: int, ids: list[int], ranges, table: torch.Tensor | None,
                 query_positions: torch.Tensor) -> torch.Tensor:
        n = p + len(ids)
        tokens = [r.kv_tokens[k] for k in range(p)] + list(ids)
        vis = torch.zeros(n, n, dtype=torch.bool)
        for k in range(p):
            row = r.rows[k]
            if row[p:].any():  # a cached row must only see cached keys (KV invariant of the engine)
                raise AssertionError(f"cached position {k} attended to a key >= num_computed {p}")
            m = min(row.numel(), n)
            vis[k, :m] = row[:m]
            keys, then = r.kv_context.get(k, ((), ()))
            if tuple(tokens[j] for j in keys) != then:  # the KV of k was computed from other tokens than now
                raise AssertionError(f"stale KV at cached position {k} (below num_computed {p}): written when keys "
                                     f"{list(keys)} held {list(then)}, now {[tokens[j] for j in keys]}")
        q_pos = torch.arange(p, n)
        positions = torch.cat([torch.arange(p), query_positions])
        if table is not None:  # the canvas kernel: every key below p, then the slot's table
            vis[p:, :p] = True
            vis[p:, p:] = table
        else:
            vis[p:] = kernel_visibility(q_pos, n, ranges)
        logits = self.model.logits(torch.tensor(tokens), positions, vis, rows=q_pos)
        for j, k in enumerate(range(p, n)):  # KV written by this forward (overwrites rejected slots)
            r.rows[k] = vis[k].clone()
            r.kv_tokens[k] = ids[j]
            keys = tuple(vis[k].nonzero().flatten().tolist())
            r.kv_context[k] = (keys, tuple(tokens[i] for i in keys))
        return logits

    def run(self, max_steps: int = 100000) -> None:
        while self.running and max_steps > 0:
            if not self.step():
                raise RuntimeError("nothing schedulable")
            max_steps -= 1
