"""Eager reference decoder for the pipelined family D2F (Dream / LLaDA-8B + D2F LoRA), one request at a time.

D2F decodes a *window* of up to ``A = max_active_blocks`` blocks of B positions at once, blocks counted from
the prompt end (``docs/plans/d2f.md`` §1).  Every decision is made by :mod:`vllm_s2d2.core`: the window's
bookkeeping (add, activate, baseline, top-up, to-cache, shift, final prefix) by :mod:`~vllm_s2d2.core.pipeline`,
the step (draft, route, verify, accept, commit) by :mod:`~vllm_s2d2.core.step` over the flattened window; this
module only arranges the dense forwards (no KV cache: ``[committed | query]`` with explicit masks):

* **Prefill**: the prompt, one bidirectional segment.
* **Step forward**: ``[TO_CACHE blocks | ACTIVE blocks]``.  The TO_CACHE rows are the KV this forward writes
  (block-causal, or token-causal with ``cache_ver``), so committing is fused into the next draft, as in D2F;
  ACTIVE rows are block-causal over the window and draft every mask of every active block.
* **Verify** (when routed): the whole uncached window with every mask replaced by its draft.  Position-aligned
  LLaDA runs the 2L forward generalised to ``verify_block_size``; shift-aligned Dream runs one causal forward,
  its first logit being the last cached row's (carried from the forward that wrote it).

Differences from the reference code (``docs/deviations.md``): Dream's masks are applied (the reference passes
them under an argument name its Dream model ignores); the window holds at most A blocks; blocks are opened until
``max_tokens`` is covered and the output keeps its stop token (as vLLM does); a step that does not verify commits
by plain D2F's rule.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from vllm_s2d2.configs import FamilyInfo
from vllm_s2d2.core import masks, pipeline
from vllm_s2d2.core.params import FamilyRules, SamplingSpec, StepParams
from vllm_s2d2.core.policies import PolicyState
from vllm_s2d2.core.step import BlockState, draft_step, finish_step, verify_step
from vllm_s2d2.reference.decoder import DecodeStats, DenseModel, ReferenceOutput
from vllm_s2d2.s2d2_config import S2D2Config


class PipelineStats(DecodeStats):
    """:class:`DecodeStats` plus how many blocks were active: ``max_active_blocks`` and the sum over steps."""

    def __init__(self) -> None:
        super().__init__()
        self.max_active_blocks = 0
        self.active_block_steps = 0  # sum over steps of the ACTIVE blocks (mean = this / steps)
        self.cached_blocks = 0  # blocks whose KV a step forward wrote


class PipelinedRequest:
    """One request's D2F decoding: committed tokens, the window, the carried logit (Dream), RNG counter."""

    def __init__(self, model: DenseModel, info: FamilyInfo, cfg: S2D2Config, sampling: SamplingSpec,
                 prompt: Sequence[int], max_tokens: int, stop_ids: set[int], device):
        self.model, self.info, self.cfg, self.device = model, info, cfg, device
        self.mask_id = info.mask_token_id
        self.rules = FamilyRules.for_family(info.family, info.mask_token_id)
        self.params = StepParams.build([cfg], [sampling], self.rules, device)
        self.policy_state = PolicyState.zeros(1, device)
        self.B, self.A = cfg.block_size, cfg.max_active_blocks
        self.prompt = list(prompt)
        self.seq: list[int] = []  # committed tokens (the KV cache holds exactly these)
        self.prompt_len, self.max_tokens = len(prompt), max_tokens
        long = dict(dtype=torch.long, device=device)
        self.t_stop_ids = torch.tensor([sorted(stop_ids)], **long).view(1, len(stop_ids))
        self.t_max_blocks = torch.tensor([math.ceil(max_tokens / self.B)], **long)
        self.window = pipeline.new_window(1, self.A, self.B, self.mask_id, device)
        self.last_logit: torch.Tensor | None = None  # Dream: raw logit of the last committed row
        self.counter = 0
        self.stats = PipelineStats()

    # -- forwards ---------------------------------------------------------------------------------------
    def _forward(self, query: torch.Tensor, positions: torch.Tensor, query_rows: torch.Tensor) -> torch.Tensor:
        """Raw logits of the query rows over ``[committed | query]`` (``query_rows [Lq, C + Lq]``)."""
        c = len(self.seq)
        ids = torch.cat([torch.tensor(self.seq, dtype=torch.long, device=self.device), query])
        pos = torch.cat([torch.arange(c, device=self.device), positions])
        n = ids.numel()
        visible = torch.zeros(n, n, dtype=torch.bool, device=self.device)
        visible[:c, :c] = masks.committed_kv_from_prompt(c, self.B, self.prompt_len, bool(self.cfg.cache_ver),
                                                         self.device)
        visible[c:, :] = query_rows
        return self.model.logits(ids, pos, visible, rows=torch.arange(c, n, device=self.device))

    def _prefill(self) -> None:
        """The prompt in one bidirectional forward; Dream keeps its last row's logit."""
        P = self.prompt_len
        prompt = torch.tensor(self.prompt, dtype=torch.long, device=self.device)
        logits = self._forward(prompt, torch.arange(P, device=self.device),
                               torch.ones(P, P, dtype=torch.bool, device=self.device))
        self.seq = list(self.prompt)
        self.last_logit = logits[-1]
        self.stats.prefill_forwards += 1

    def _aligned(self, raw: torch.Tensor, before: torch.Tensor | None) -> torch.Tensor:
        """Logits aligned to the rows' positions: Dream's row i takes raw row i - 1 (row 0: ``before``)."""
        if not self.rules.shifted:
            return raw
        return torch.cat([before[None], raw[:-1]])

    def _window_logits(self, rows: torch.Tensor, n_active: int) -> torch.Tensor:
        """``[1, A*B, V]``: ``rows`` for the first ``n_active`` blocks, zeros for the EMPTY slots."""
        full = rows.new_zeros(self.A * self.B, rows.shape[-1])
        full[:n_active * self.B] = rows
        return full[None]

    # -- the main loop ----------------------------------------------------------------------------------
    def run(self) -> ReferenceOutput:
        self._prefill()
        while not self._step():
            pass
        gen = self.seq[self.prompt_len:] + self._window_prefix()
        stop_at = next((i for i, t in enumerate(gen) if t in self.t_stop_ids[0].tolist()), None)
        if stop_at is not None and stop_at < self.max_tokens:
            gen, reason = gen[:stop_at + 1], "stop"
        else:
            gen, reason = gen[:self.max_tokens], "length"
        self.stats.generated_tokens = len(gen)
        return ReferenceOutput(self.prompt, gen, reason, self.stats)

    def _window_prefix(self) -> list[int]:
        prefix = pipeline.window_final_prefix(self.window, self.mask_id, self.t_stop_ids)
        return self.window.tokens.view(-1)[:int(prefix.length[0])].tolist()

    def _finished(self) -> bool:
        """The committed tokens plus the window's final prefix reach a stop id or ``max_tokens``."""
        prefix = pipeline.window_final_prefix(self.window, self.mask_id, self.t_stop_ids)
        done = len(self.seq) - self.prompt_len
        stop_before_cap = bool(prefix.stop[0]) and done + int(prefix.first_stop[0]) < self.max_tokens
        return stop_before_cap or done + int(prefix.length[0]) >= self.max_tokens

    def _step(self) -> bool:
        """One D2F step (add/activate, fused commit + draft forward, optional verify); True when finished."""
        B, A, dev, p = self.B, self.A, self.device, self.params
        w = pipeline.add_block(self.window, p.block_add_threshold, self.t_max_blocks, self.mask_id)
        w = pipeline.activate(w, p.decoded_token_threshold, self.mask_id)
        status = w.status[0]
        n_cache = int((status == pipeline.TO_CACHE).sum())
        n_occupied = int((status != pipeline.EMPTY).sum())
        if n_occupied == 0:  # (cannot happen before _finished says so)
            raise RuntimeError("D2F reference: an empty window while the request is unfinished")

        # Forward over [TO_CACHE | ACTIVE]: writes the TO_CACHE blocks' KV and drafts the ACTIVE ones.
        c = len(self.seq)
        query = w.tokens[0, :n_occupied].reshape(-1)
        causal_len = n_cache * B if self.cfg.cache_ver else 0
        raw = self._forward(query, torch.arange(c, c + n_occupied * B, device=dev),
                            masks.window_rows(c, n_occupied, B, causal_len, dev))
        aligned = self._aligned(raw, self.last_logit)
        n_active = n_occupied - n_cache
        if n_active:
            self.stats.draft_forwards += 1
        else:  # a full window of finished blocks: this forward only writes their KV, frees the slots
            self.stats.commit_forwards += 1
        if n_cache:
            self.seq = self.seq + query[:n_cache * B].tolist()
            self.last_logit = raw[n_cache * B - 1]
            self.stats.cached_blocks += n_cache
        w = pipeline.shift_window(w, self.mask_id).window
        if not n_active:
            self.window = w
            return self._finished()
        self.stats.max_active_blocks = max(self.stats.max_active_blocks, n_active)
        self.stats.active_block_steps += n_active

        logits = self._window_logits(aligned[n_cache * B:], n_active)
        counter = torch.tensor([self.counter], device=dev)
        flat = w.tokens.view(1, A * B)
        block = BlockState(flat, torch.ones_like(flat, dtype=torch.bool),
                           pipeline.masked_in_active(w, self.mask_id).view(1, A * B),
                           torch.zeros(1, dtype=torch.long, device=dev), counter, window=w)
        draft, self.policy_state = draft_step(logits, block, p, self.rules, self.policy_state)
        v_commit = v_tokens = v_acc = None
        if bool(draft.do_verify[0]):
            v_logits = self._verify_logits(draft.first_half[0, :n_active * B], n_active)
            v_commit, v_tokens, v_acc = verify_step(draft, v_logits, p, self.rules, counter, window=w)
            self.stats.verify_forwards += 1
            self.stats.verify_steps += 1
            self.stats.proposed_tokens += int(draft.span_length[0])
            self.stats.accepted_tokens += int(v_acc[0])
            self.stats.verify_committed_tokens += int(v_commit.sum())
        result, self.policy_state = finish_step(block, draft, v_commit, v_tokens, v_acc, p, self.policy_state)
        self.stats.steps += 1
        self.counter += 1
        w = pipeline.apply_commit(w, result.committed.view(1, A, B), result.tokens.view(1, A, B), self.t_stop_ids)
        self.window = pipeline.mark_to_cache(w, self.mask_id)
        return self._finished()

    def _verify_logits(self, filled: torch.Tensor, n_active: int) -> torch.Tensor:
        """Verifier logits ``[1, A*B, V]`` aligned to window positions, from the uncached window with its drafts
        filled in (``filled [L]``, L = n_active * B)."""
        c, L, dev = len(self.seq), filled.numel(), self.device
        positions = torch.arange(c, c + L, device=dev)
        tbs = self.cfg.verify_block_size
        if self.rules.shifted:  # one causal forward; row i - 1 predicts position i
            raw = self._forward(filled, positions, masks.target_causal_rows(c, L, tbs, dev))
            return self._window_logits(self._aligned(raw, self.last_logit), n_active)
        query = torch.cat([filled, torch.full_like(filled, self.mask_id)])
        raw = self._forward(query, torch.cat([positions, positions]), masks.verifier_2l(c, L, dev, tbs=tbs))
        return self._window_logits(raw[L:], n_active)
