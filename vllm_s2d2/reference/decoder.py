"""Eager reference decoder: block diffusion, AR mode and S2D2 for every family, one request at a time.

It is the oracle the vLLM engine is compared against.  Every decision (sampling, spans, policies,
acceptance, unmasking) is made by :mod:`vllm_s2d2.core.step`; this module only arranges forwards:

* The model has **no KV cache**: each forward recomputes ``[committed tokens | query tokens]`` with an
  explicit dense mask.  Committed rows use the mask their KV was written with (block-causal, or
  token-causal with ``cache_ver``), which is exactly what a KV cache of committed tokens holds; query rows
  use the draft / 2L-verify / causal rows of :mod:`vllm_s2d2.core.masks`.  Forwards are counted as a
  cached engine would run them (prefill, draft, verify, commit), so the statistics are the engine's.
* Blocks are aligned to absolute position 0; full prompt blocks are prefilled; the prompt tail heads the
  first decode block and is never changed (S2D2_SPEC.md §1.1).

Family specifics (S2D2_SPEC.md §1-5): SDAR verifies with the 2L mask and tops up to the step quota;
Fast-dLLM v2 is shift-aligned, decodes sub-blocks of its 32-token blocks, verifies with a causal forward
and takes each block's first token from the previous forward's last logit; LLaDA2 commits one token per
step (plus everything above the threshold) and may edit its block (2.1, ``editing_threshold``).

Stopping (one rule for all families, as vLLM does it): the output ends at the first stop token, which is
kept, or after ``max_tokens``; ``ignore_eos`` disables stop tokens.  A block after which the request is
finished is not committed to the cache (its commit forward would be wasted).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch

from vllm_s2d2.configs import FamilyInfo
from vllm_s2d2.core import masks
from vllm_s2d2.core.params import FamilyRules, SamplingSpec, StepParams
from vllm_s2d2.core.policies import PolicyState
from vllm_s2d2.core.step import BlockState, align_shifted_logits, draft_step, finish_step, verify_step
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
        self.cached = 0  # tokens whose KV is "stored"
        self.counter = 0
        self.stats = DecodeStats()

    # -- forwards ---------------------------------------------------------------------------------------
    def _forward(self, query: torch.Tensor, positions: torch.Tensor, query_rows: torch.Tensor) -> torch.Tensor:
        c = self.cached
        ids = torch.cat([torch.tensor(self.seq[:c], dtype=torch.long, device=self.device), query])
        pos = torch.cat([torch.arange(c, device=self.device), positions])
        n = ids.numel()
        visible = torch.zeros(n, n, dtype=torch.bool, device=self.device)
        visible[:c, :c] = masks.committed_kv(c, self.B, bool(self.cfg.cache_ver), self.device)
        visible[c:, :] = query_rows
        return self.model.logits(ids, pos, visible, rows=torch.arange(c, n, device=self.device))

    def _store(self, upto: int) -> torch.Tensor | None:
        """Commit tokens [cached, upto) to the cache (1 forward); returns the last position's logits."""
        if upto <= self.cached:
            return None
        L = upto - self.cached
        q = torch.tensor(self.seq[self.cached:upto], dtype=torch.long, device=self.device)
        start = self.cached
        kv_rows = masks.committed_kv(upto, self.B, bool(self.cfg.cache_ver), self.device)[start:upto, :upto]
        logits = self._forward(q, torch.arange(start, upto, device=self.device), kv_rows)
        self.cached = upto
        return logits[-1]

    # -- the main loop ----------------------------------------------------------------------------------
    def run(self) -> ReferenceOutput:
        B, P = self.B, self.prompt_len
        prefill_to = (P // B) * B
        if self.rules.shifted and P % B == 0:
            # Fast-dLLM v2: every block starts with a known token; a block-aligned prompt's next token is
            # the argmax of the prefill's last logit (S2D2_SPEC.md §4).
            prefill_to = P
        if prefill_to > 0:
            last = self._store(prefill_to)
            self.stats.prefill_forwards += 1
            if self.rules.shifted and P % B == 0:
                self.seq.append(int(last.argmax()))
        finish = None
        while finish is None:
            finish = self._decode_block()
        gen = self.seq[P:]
        stop_at = next((i for i, t in enumerate(gen) if t in self.stop_ids), None)
        if stop_at is not None and stop_at < self.max_tokens:
            gen, reason = gen[:stop_at + 1], "stop"
        else:
            gen, reason = gen[:self.max_tokens], "length"
        self.stats.generated_tokens = len(gen)
        return ReferenceOutput(list(self.seq[:P]), gen, reason, self.stats)

    def _finished(self, upto: int) -> bool:
        gen = self.seq[self.prompt_len:upto]
        return len(gen) >= self.max_tokens or any(t in self.stop_ids for t in gen)

    def _decode_block(self) -> str | None:
        B, mask_id, dev = self.B, self.info.mask_token_id, self.device
        start = self.cached
        known = self.seq[start:]
        tokens = torch.tensor([known + [mask_id] * (B - len(known))], dtype=torch.long, device=dev)
        positions = torch.arange(start, start + B, device=dev)
        editable = (positions >= self.prompt_len)[None, :]
        sub = self.cfg.sub_block_size
        step = 0
        post_steps = 0
        while True:
            is_mask = tokens[0] == mask_id
            if not bool(is_mask.any()):
                if self.info.family != "llada2":
                    break
                post_steps += 1
                if post_steps > self.cfg.max_post_steps:
                    break
            # Fast-dLLM v2 unmasks the first sub-block that still has masks; others the whole block.
            if self.rules.shifted and bool(is_mask.any()):
                first = int(is_mask.int().argmax())
                lo = first // sub * sub
                region = ((positions >= start + lo) & (positions < start + lo + sub))[None, :]
            else:
                region = torch.ones(1, B, dtype=torch.bool, device=dev)
            first_mask = int(is_mask.int().argmax()) if bool(is_mask.any()) else B
            causal_prefix = first_mask if self.cfg.draft_ver else 0
            logits = self._forward(tokens[0], positions, masks.draft_rows(start, B, causal_prefix, dev))[None]
            self.stats.draft_forwards += 1
            if self.rules.shifted:
                logits = align_shifted_logits(logits)
            counter = torch.tensor([self.counter], device=dev)
            block = BlockState(tokens, editable, region, torch.tensor([step], device=dev), counter)
            draft, self.policy_state = draft_step(logits, block, self.params, self.rules, self.policy_state)
            v_commit = v_tokens = v_acc = None
            if bool(draft.do_verify[0]):
                q_logits = self._verify_logits(draft.first_half[0], region[0], start)
                v_commit, v_tokens, v_acc = verify_step(draft, q_logits[None], self.params, self.rules, counter)
                self.stats.verify_forwards += 1
                self.stats.verify_steps += 1
                self.stats.proposed_tokens += int(draft.span_length[0])
                self.stats.accepted_tokens += int(v_acc[0])
                self.stats.verify_committed_tokens += int(v_commit.sum())
            result, self.policy_state = finish_step(block, draft, v_commit, v_tokens, v_acc, self.params,
                                                    self.policy_state)
            made_edit = bool((draft.edits & ~draft.is_mask).any())
            tokens = result.tokens
            self.stats.steps += 1
            self.counter += 1
            step += 1
            if not bool(is_mask.any()) and not made_edit:  # LLaDA2 post step that changed nothing
                break
            self.seq = self.seq[:start] + tokens[0].tolist()
            if self._early_stop(tokens[0], mask_id):
                break
        self.seq = self.seq[:start] + tokens[0].tolist()
        end = start + B
        if self._finished(end):
            return "done"
        last = self._store(end)
        self.stats.commit_forwards += 1
        if self.rules.shifted:
            self.seq.append(int(last.argmax()))
            if self._finished(end + 1):
                return "done"
        return None

    def _early_stop(self, block: torch.Tensor, mask_id: int) -> bool:
        """A stop token with no mask before it ends the block (everything after it is discarded)."""
        if not self.stop_ids:
            return False
        toks = block.tolist()
        start = self.cached
        for i, t in enumerate(toks):
            if t == mask_id:
                return False
            if start + i >= self.prompt_len and t in self.stop_ids:
                return True
        return False

    def _verify_logits(self, first_half: torch.Tensor, region: torch.Tensor, start: int) -> torch.Tensor:
        """Verifier logits aligned to block positions ``[B, V]``."""
        B, dev = self.B, self.device
        positions = torch.arange(start, start + B, device=dev)
        if self.rules.shifted:
            # Causal forward over block start .. sub-block end, drafts filled; logit i-1 predicts token i.
            end = int(region.nonzero().max()) + 1
            logits = self._forward(first_half[:end], positions[:end], masks.causal_rows(start, end, dev))
            aligned = align_shifted_logits(logits[None])[0]
            pad = aligned.new_zeros(B - end, aligned.shape[-1])
            return torch.cat([aligned, pad])
        mask_half = torch.full((B,), self.info.mask_token_id, dtype=torch.long, device=dev)
        logits = self._forward(torch.cat([first_half, mask_half]), torch.cat([positions, positions]),
                               masks.verifier_2l(start, B, dev))
        return logits[B:]


def generate(model: DenseModel, info: FamilyInfo, prompts: Sequence[Sequence[int]], config: S2D2Config,
             sampling: SamplingSpec | Sequence[SamplingSpec] = SamplingSpec(temperature=0.0),
             max_tokens: int = 64, ignore_eos: bool = False, stop_token_ids: Sequence[int] | None = None,
             device: torch.device | str = "cpu") -> list[ReferenceOutput]:
    """Decode each prompt (token ids) with ``config`` resolved for the model's family.

    ``sampling`` may be one spec for all prompts or one per prompt; a seed of None draws a random one."""
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
        req = _Request(model, info, cfg, spec, prompt, max_tokens, stops, device)
        outs.append(req.run())
    return outs
