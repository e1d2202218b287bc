"""Eager reference decoder: block diffusion, AR mode and S2D2 for every family, one request at a time.

It is the oracle the vLLM engine is compared against.  Every decision is made by :mod:`vllm_s2d2.core`: the
step (sampling, spans, policies, acceptance, unmasking) by :mod:`~vllm_s2d2.core.step`, the block lifecycle
around it (region, ``draft_ver`` prefix, editing passes, early finish, query layouts) by
:mod:`~vllm_s2d2.core.block`, as in the engine; this module only arranges forwards:

* The model has **no KV cache**: each forward recomputes ``[committed tokens | query tokens]`` with an
  explicit dense mask.  Committed rows use the mask their KV was written with (block-causal, or
  token-causal with ``cache_ver``), which is exactly what a KV cache of committed tokens holds; query rows
  use the draft / 2L-verify / causal rows of :mod:`vllm_s2d2.core.masks`.  Forwards are counted one per pass
  a cached engine runs (prefill, draft, verify, commit); the engine fuses each commit into the next block's
  first draft (:func:`vllm_s2d2.reference.accounting.reference_forwards` maps its counters onto this accounting).
* Blocks are aligned to absolute position 0 (``docs/lifecycle.md``).  The **whole prompt is prefilled**, as
  vLLM schedules it, so the first decode block is the partial block after the prompt and the prompt tail is
  read from the cache.  This equals the SDAR reference for its paper configuration (``cache_ver`` +
  ``draft_ver``: the tail's KV is token-causal either way); without them, and for Fast-dLLM v2 / LLaDA2,
  it differs from the reference code when the prompt's length is not a multiple of B: there the reference
  lets the prompt tail attend to the block's masks, so the tail's cached KV differs and conditions every later
  block -- the first differing token can come many blocks later (``docs/deviations.md``).

Family specifics (``docs/families.md``): SDAR verifies with the 2L mask and tops up to the step quota;
Fast-dLLM v2 is shift-aligned, decodes sub-blocks of its 32-token blocks, verifies with a causal forward
and takes each block's first token from the previous forward's last logit; LLaDA2 commits one token per
step (plus everything above the threshold) and may edit its block (2.1, ``editing_threshold``).

Stopping (one rule for all families, as vLLM does it): the output ends at the first stop token, which is
kept, or after ``max_tokens``; ``ignore_eos`` disables stop tokens.  A stop token in the block's final prefix
ends the block at once; ``max_tokens`` is checked when the block is done (the engine already stops once the
final prefix reaches it: same tokens, fewer draft steps).  A block after which the request is finished is
not committed to the cache (its commit forward would be wasted).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch

from vllm_s2d2.configs import FamilyInfo
from vllm_s2d2.core import block as blk
from vllm_s2d2.core import masks
from vllm_s2d2.core.params import FamilyRules, SamplingSpec, StepParams
from vllm_s2d2.core.policies import PolicyState
from vllm_s2d2.core.step import (BlockState, align_shifted_logits, draft_step, finish_step, shifted_next_token,
                                 verify_step)
from vllm_s2d2.s2d2_config import S2D2Config


class DenseModel(Protocol):
    def logits(self, input_ids: torch.Tensor, position_ids: torch.Tensor, visible: torch.Tensor,
               rows: torch.Tensor | None = None) -> torch.Tensor: ...


@dataclass
class DecodeStats:
    prefill_forwards: int = 0
    draft_forwards: int = 0
    verify_forwards: int = 0
    commit_forwards: int = 0
    steps: int = 0
    verify_steps: int = 0
    proposed_tokens: int = 0  # span tokens offered to the verifier
    accepted_tokens: int = 0  # draft tokens the verifier accepted
    verify_committed_tokens: int = 0  # tokens committed by verify steps (accepted + corrections + top-ups)
    edited_tokens: int = 0  # LLaDA2.1 T2T edits applied
    generated_tokens: int = 0

    @property
    def forwards(self) -> int:
        return self.prefill_forwards + self.draft_forwards + self.verify_forwards + self.commit_forwards

    @property
    def decode_forwards(self) -> int:
        return self.draft_forwards + self.verify_forwards + self.commit_forwards

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d.update(forwards=self.forwards,
                 tokens_per_forward=self.generated_tokens / max(1, self.forwards),
                 verify_rate=self.verify_steps / max(1, self.steps),
                 acceptance_rate=self.accepted_tokens / max(1, self.proposed_tokens))
        return d

    def add(self, other: "DecodeStats") -> None:
        for k, v in other.__dict__.items():
            setattr(self, k, getattr(self, k) + v)


@dataclass
class ReferenceOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    stats: DecodeStats = field(default_factory=DecodeStats)


class _Request:
    """One request's decoding state: committed tokens, the open block, RNG counter, policy state."""

    def __init__(self, model: DenseModel, info: FamilyInfo, cfg: S2D2Config, sampling: SamplingSpec,
                 prompt: Sequence[int], max_tokens: int, stop_ids: set[int], device):
        self.model, self.info, self.cfg, self.device = model, info, cfg, device
        self.rules = FamilyRules.for_family(info.family, info.mask_token_id)
        self.params = StepParams.build([cfg], [sampling], self.rules, device)
        self.policy_state = PolicyState.zeros(1, device)
        self.B = cfg.block_size
        self.seq = list(prompt)  # committed tokens followed by the open block's known tokens
        self.prompt_len = len(prompt)
        self.max_tokens, self.stop_ids = max_tokens, stop_ids
        # The same facts as [1] tensors for core.block (stop ids: [1, K], K may be 0).
        long = dict(dtype=torch.long, device=device)
        self.t_prompt_len = torch.tensor([self.prompt_len], **long)
        self.t_max_tokens = torch.tensor([max_tokens], **long)
        self.t_stop_ids = torch.tensor([sorted(stop_ids)], **long).view(1, len(stop_ids))
        self.t_max_post = torch.tensor([cfg.max_post_steps or 0], **long)
        self.t_editing = torch.tensor([cfg.editing_threshold is not None], device=device)
        self.t_draft_ver = torch.tensor([bool(cfg.draft_ver)], device=device)
        self.cached = 0  # tokens whose KV is "stored"
        self.counter = 0
        self.stats = DecodeStats()

    # -- forwards ---------------------------------------------------------------------------------------
    def _committed_rows(self, upto: int) -> torch.Tensor:
        return masks.committed_kv(upto, self.B, bool(self.cfg.cache_ver), self.prompt_len, self.device)

    def _forward(self, query: torch.Tensor, positions: torch.Tensor, query_rows: torch.Tensor) -> torch.Tensor:
        """Logits of the query rows over ``[committed KV | query]`` (query_rows: ``[Lq, cached + Lq]``)."""
        c = self.cached
        ids = torch.cat([torch.tensor(self.seq[:c], dtype=torch.long, device=self.device), query])
        pos = torch.cat([torch.arange(c, device=self.device), positions])
        n = ids.numel()
        visible = torch.zeros(n, n, dtype=torch.bool, device=self.device)
        visible[:c, :c] = self._committed_rows(c)
        visible[c:, :] = query_rows
        return self.model.logits(ids, pos, visible, rows=torch.arange(c, n, device=self.device))

    def _store(self, upto: int) -> torch.Tensor:
        """Write tokens [cached, upto) to the cache (one forward); returns the last row's logits."""
        start = self.cached
        q = torch.tensor(self.seq[start:upto], dtype=torch.long, device=self.device)
        logits = self._forward(q, torch.arange(start, upto, device=self.device),
                               self._committed_rows(upto)[start:upto, :upto])
        self.cached = upto
        return logits[-1]

    def _append_shifted_token(self, last_logits: torch.Tensor) -> None:
        """Shift-aligned models: the token after a stored prefix is the argmax of its last logit."""
        if self.rules.shifted:
            self.seq.append(int(shifted_next_token(last_logits[None], self.info.mask_token_id)[0]))

    # -- the main loop ----------------------------------------------------------------------------------
    def run(self) -> ReferenceOutput:
        P = self.prompt_len
        self._append_shifted_token(self._store(P))  # the whole prompt is prefilled
        self.stats.prefill_forwards += 1
        while not self._decode_block():
            pass
        gen = self.seq[P:]
        stop_at = next((i for i, t in enumerate(gen) if t in self.stop_ids), None)
        if stop_at is not None and stop_at < self.max_tokens:
            gen, reason = gen[:stop_at + 1], "stop"
        else:
            gen, reason = gen[:self.max_tokens], "length"
        self.stats.generated_tokens = len(gen)
        return ReferenceOutput(list(self.seq[:P]), gen, reason, self.stats)

    def _decode_block(self) -> bool:
        """Decode the block holding position ``cached``; returns True when the request is finished.

        The block spans absolute ``[block_start, block_start + B)``; positions before ``cached`` (the prompt
        tail) are in the cache, so forwards query only ``[cached, block_end)``.  Core tensors always use
        the B columns of the whole block."""
        B, mask_id, dev = self.B, self.info.mask_token_id, self.device
        start = self.cached
        block_start = start // B * B
        end = block_start + B
        off = start - block_start
        t_bs = torch.tensor([block_start], device=dev)
        t_off = torch.tensor([off], device=dev)
        tail = torch.tensor([self.seq[block_start:start] + [mask_id] * (B - off)], dtype=torch.long, device=dev)
        first = torch.tensor([self.seq[start]], device=dev) if self.rules.shifted else None
        tokens = blk.open_block(tail, t_off, mask_id, first)
        positions = torch.arange(block_start, end, device=dev)
        editable = blk.editable_columns(t_bs, self.t_prompt_len, B)
        sub = self.cfg.sub_block_size or B
        # No step has run: ``again`` = the block has masks, ``settled`` = nothing can change any more.
        life = blk.post_steps(torch.zeros(1, dtype=torch.long, device=dev), torch.zeros(1, dtype=torch.bool,
                              device=dev), tokens, tokens, mask_id, self.t_max_post, self.t_editing)
        prefix = self._final_prefix(tokens, t_bs, t_off)
        if bool(blk.early_finish(prefix, life.settled)[0]):  # the shifted first token already ends it
            return True
        step = 0
        while bool(life.again[0]):
            region = blk.step_region(tokens, mask_id, sub)
            causal_prefix = blk.causal_prefix(tokens, mask_id, t_off, self.t_draft_ver)[0]
            query = blk.block_canvas(tokens, t_off, mask_id, B - off)[0]
            q_logits = self._forward(query, positions[off:], masks.draft_rows(start, B - off, causal_prefix, dev))
            logits = self._full_block(q_logits, off)
            self.stats.draft_forwards += 1
            counter = torch.tensor([self.counter], device=dev)
            block = BlockState(tokens, editable, region, torch.tensor([step], device=dev), counter)
            draft, self.policy_state = draft_step(logits, block, self.params, self.rules, self.policy_state)
            v_commit = v_tokens = v_acc = None
            if bool(draft.do_verify[0]):
                v_logits = self._verify_logits(draft.first_half, region[0], start, off)
                v_commit, v_tokens, v_acc = verify_step(draft, v_logits, self.params, self.rules, counter)
                self.stats.verify_forwards += 1
                self.stats.verify_steps += 1
                self.stats.proposed_tokens += int(draft.span_length[0])
                self.stats.accepted_tokens += int(v_acc[0])
                self.stats.verify_committed_tokens += int(v_commit.sum())
            result, self.policy_state = finish_step(block, draft, v_commit, v_tokens, v_acc, self.params,
                                                    self.policy_state)
            self.stats.steps += 1
            self.stats.edited_tokens += int(draft.edits.sum())
            self.counter += 1
            step += 1
            life = blk.post_steps(life.post, torch.ones(1, dtype=torch.bool, device=dev), tokens, result.tokens,
                                  mask_id, self.t_max_post, self.t_editing)
            tokens = result.tokens
            self.seq = self.seq[:block_start] + tokens[0].tolist()
            prefix = self._final_prefix(tokens, t_bs, t_off)
            if bool(prefix.stop[0]):  # a stop token in the final prefix ends the block (the rest is discarded)
                break
        if bool(blk.early_finish(prefix, life.settled)[0]):
            return True
        self._append_shifted_token(self._store(end))
        self.stats.commit_forwards += 1
        return False

    def _final_prefix(self, tokens: torch.Tensor, block_start: torch.Tensor, off: torch.Tensor) -> blk.FinalPrefix:
        return blk.final_prefix(tokens, self.info.mask_token_id, block_start, off, self.t_prompt_len,
                                self.t_stop_ids, self.t_max_tokens)

    def _full_block(self, query_logits: torch.Tensor, off: int) -> torch.Tensor:
        """``[1, B, V]`` logits for the whole block from the query rows (cached tail columns get zeros);
        shifted models are aligned so column i holds the prediction for position i."""
        full = torch.cat([query_logits.new_zeros(off, query_logits.shape[-1]), query_logits])[None]
        return align_shifted_logits(full) if self.rules.shifted else full

    def _verify_logits(self, first_half: torch.Tensor, region: torch.Tensor, start: int, off: int) -> torch.Tensor:
        """Verifier logits for the whole block ``[1, B, V]`` (aligned; cached columns zero); ``first_half [1, B]``."""
        B, dev = self.B, self.device
        block_start = start - off
        positions = torch.arange(start, block_start + B, device=dev)
        if self.rules.shifted:
            # Causal forward over [cached, sub-block end), drafts filled; logit i-1 predicts token i.
            stop = int(region.nonzero().max()) + 1
            q = self._forward(first_half[0, off:stop], positions[:stop - off],
                              masks.causal_rows(start, stop - off, dev))
            q = torch.cat([q, q.new_zeros(B - stop, q.shape[-1])])
            return self._full_block(q, off)
        # 2L query [first half[off:] | L x MASK], both halves at the block's positions
        L = B - off
        query = blk.block_canvas(first_half, torch.tensor([off], device=dev), self.info.mask_token_id, 2 * L)[0]
        q = self._forward(query, torch.cat([positions, positions]), masks.verifier_2l(start, L, dev))
        return self._full_block(q[L:], off)


def generate(model: DenseModel, info: FamilyInfo, prompts: Sequence[Sequence[int]], config: S2D2Config,
             sampling: SamplingSpec | Sequence[SamplingSpec] = SamplingSpec(temperature=0.0),
             max_tokens: int = 64, ignore_eos: bool = False, stop_token_ids: Sequence[int] | None = None,
             device: torch.device | str = "cpu") -> list[ReferenceOutput]:
    """Decode each prompt (token ids) with ``config`` resolved for the model's family.

    ``sampling`` may be one spec for all prompts or one per prompt; a seed of None is
    ``SamplingSpec.default_seed`` (fixed for greedy requests) or a random one."""
    if not prompts:
        raise ValueError("no prompts given")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    specs = [sampling] * len(prompts) if isinstance(sampling, SamplingSpec) else list(sampling)
    if len(specs) != len(prompts):
        raise ValueError(f"{len(specs)} sampling specs for {len(prompts)} prompts")
    cfg = config.resolve(info.family, info.block_size)
    stops = set() if ignore_eos else set(stop_token_ids if stop_token_ids is not None else info.stop_token_ids)
    outs = []
    for prompt, spec in zip(prompts, specs):
        if len(prompt) == 0:
            raise ValueError("empty prompt: at least one token is required")
        if any(t == info.mask_token_id for t in prompt):
            raise ValueError(f"prompt contains the mask token id {info.mask_token_id}")
        if getattr(info, "pipelined", False):  # D2F: a window of blocks (vllm_s2d2.reference.d2f)
            from vllm_s2d2.reference.d2f import PipelinedRequest

            req = PipelinedRequest(model, info, cfg, spec, prompt, max_tokens, stops, device)
        else:
            req = _Request(model, info, cfg, spec, prompt, max_tokens, stops, device)
        outs.append(req.run())
    return outs
