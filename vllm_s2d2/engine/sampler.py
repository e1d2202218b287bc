"""``S2D2Sampler``: the MRV2 sampler of block-diffusion models (replaces vLLM's ``Sampler`` via
``ModelState.custom_sampler``, as vLLM's own ``diffusion_gemma.py:DiffusionSampler`` does; docs/architecture.md).

Per call (one engine step), from the ``InputBatch`` and host facts of the requests; a decode-only step reads
nothing back from the device and copies nothing to it (``tests/test_engine_emulation.py`` checks it):

* requests whose prompt completes this step (``is_prefilling`` and the chunk reaches ``prefill_len``): open
  their first block and write the first canvas into ``req_states.draft_tokens`` (emit 0);
* decoding requests (their canvas was scheduled as W draft tokens): one :meth:`S2D2Stepper.step`;
  ``num_sampled`` = emitted tokens, ``num_rejected`` = query_len - emitted, so ``post_update`` and the
  scheduler's rollback advance ``num_computed_tokens`` by exactly the committed tokens;
* everything else (prefill chunks, dummy/profiling batches): emit 0, reject 0.

Sampling knobs are read from ``SamplingParams`` in :meth:`add_request` (temperature incl. 0 = greedy, top-k,
top-p, seed; the frontend shim :mod:`vllm_s2d2.patches.sampling_validation` has already rejected what the
engine cannot honour).  Penalties are not applied (``penalties_state`` is a stub, as in DiffusionGemma).
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import torch

from vllm.v1.worker.gpu.sample.output import SamplerOutput

from vllm_s2d2.core.params import SamplingSpec
from vllm_s2d2.engine.settings import EngineSettings, request_config
from vllm_s2d2.engine.states import SavedRequest
from vllm_s2d2.engine.stepper import S2D2Stepper
from vllm_s2d2.log import get_logger

logger = get_logger(__name__)

_NO_PENALTIES_STATE = SimpleNamespace(output_bin_counts=None)


def sampling_spec(sp: Any) -> SamplingSpec:
    top_k = int(sp.top_k or 0)
    return SamplingSpec(temperature=float(sp.temperature), top_k=top_k if top_k > 0 else 0,
                        top_p=float(sp.top_p), seed=sp.seed)


def request_seed(req_id: str) -> int:
    """The seed of a sampled request that set none: derived from its (engine-internal, unique) id, so that every
    tensor-parallel rank draws the same random numbers, and a preempted request continues its own stream.
    (A greedy request that set none uses ``SamplingSpec.default_seed``: the same output on every run.)"""
    return int.from_bytes(hashlib.sha256(req_id.encode()).digest()[:8], "little") & (2 ** 62 - 1)


def stop_token_ids(sp: Any) -> list[int]:
    """The ids vLLM's ``check_stop`` stops on (eos unless ``ignore_eos``, plus ``stop_token_ids``); empty while
    ``min_tokens`` could suppress a stop (the engine then simply never finishes early)."""
    if getattr(sp, "min_tokens", 0):
        return []
    ids = [] if sp.eos_token_id is None else [int(sp.eos_token_id)]
    return ids + [int(t) for t in (sp.stop_token_ids or [])]


class S2D2Sampler:
    def __init__(self, base_sampler: Any, stepper: S2D2Stepper, settings: EngineSettings, vocab_size: int):
        self.req_states = base_sampler.req_states
        self.sampling_states = base_sampler.sampling_states  # read by the runner only for speculators
        self.stepper = stepper
        self.settings = settings
        self.vocab_size = vocab_size
        self.next_saved: dict[int, SavedRequest] = {}  # resume snapshots handed over by the model state
        self.next_request_id: dict[int, str] = {}  # the request id of each slot being added (from the model state)
        # token_logits(rows [n]) -> [n, V]: logits of the forward's token rows (flattened batch order).  Set by the
        # model state; shift-aligned models need it for the last prompt token (vLLM computes no logits for a
        # prefill chunk in a batch that carries draft tokens).
        self.token_logits: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._profiled = False

    @property
    def penalties_state(self):
        return _NO_PENALTIES_STATE

    def add_request(self, req_idx: int, prompt_len: int, sampling_params: Any) -> None:
        st = self.settings
        try:
            cfg = request_config(st.config, getattr(sampling_params, "extra_args", None), st.info.family,
                                 st.info.block_size)
        except ValueError as e:  # validated in the frontend; never take the engine down here
            logger.warning("ignoring invalid per-request S2D2 options: %s", e)
            cfg = st.config
        spec = sampling_spec(sampling_params)
        req_id = self.next_request_id.pop(req_idx, None)
        if spec.seed is None:  # greedy: the fixed default; sampled: the same stream on every tensor-parallel rank
            seed = spec.default_seed()
            if seed is None and req_id is not None:
                seed = request_seed(req_id)
            spec = replace(spec, seed=seed)
        self.stepper.add_request(req_idx, prompt_len=prompt_len, config=cfg, sampling=spec,
                                 stop_ids=stop_token_ids(sampling_params),
                                 max_tokens=sampling_params.max_tokens,
                                 saved=self.next_saved.pop(req_idx, None))

    def apply_staged_writes(self) -> None:
        self.stepper.apply_staged_writes()

    def __call__(self, logits: torch.Tensor, input_batch: Any, draft_logits: torch.Tensor | None = None
                 ) -> SamplerOutput:
        st = self.stepper
        R = input_batch.num_reqs
        dev = logits.device
        W = st.W
        sampled = torch.zeros(R, W, dtype=torch.int32, device=dev)
        num_sampled = torch.zeros(R, dtype=torch.int32, device=dev)
        num_rejected = torch.zeros(R, dtype=torch.int32, device=dev)

        slots_np = np.asarray(input_batch.idx_mapping_np[:R], dtype=np.int64)
        active = st.facts.active[slots_np]
        if not active.any():
            if not self._profiled and not st.facts.active.any():
                # vLLM's profile run: let the memory profiler see the draft step's peak once.
                self._profiled = True
                st.profile_draft(st.max_num_reqs, self.vocab_size, logits.dtype)
            return SamplerOutput(sampled, None, None, num_sampled, num_rejected)

        is_prefilling = np.asarray(input_batch.is_prefilling_np[:R], dtype=bool)
        nlogits = np.diff(np.asarray(input_batch.cu_num_logits_np[:R + 1]))
        done = active & is_prefilling & (
            input_batch.num_computed_prefill_tokens_np[:R] + input_batch.num_scheduled_tokens[:R]
            >= input_batch.prefill_len_np[:R])
        decode = active & ~is_prefilling & (nlogits > 0)
        draft_tokens = self.req_states.draft_tokens

        if done.any():
            idx = np.nonzero(done)[0]
            slots = _to_dev(slots_np[idx], dev)
            prefill_len = _to_dev(np.asarray(input_batch.prefill_len_np[idx], dtype=np.int64), dev)
            all_tokens = self.req_states.all_token_ids.gpu
            last_logits = None
            if st.shifted:
                if self.token_logits is None:
                    raise RuntimeError("shift-aligned model without a token_logits hook (see S2D2ModelState)")
                last_rows = _to_dev(np.asarray(input_batch.query_start_loc_np)[idx + 1] - 1, dev)
                last_logits = self.token_logits(last_rows)
            st.prefill_done(slots, slots_np[idx], prefill_len,
                            lambda s, c: all_tokens[s[:, None], c], draft_tokens, last_logits)

        if decode.any():
            idx_np = np.nonzero(decode)[0]
            qsl = input_batch.query_start_loc
            if idx_np.size == R:  # decode-only step: every input is already on the device
                rows = slice(0, R)
                slots = input_batch.idx_mapping[:R].to(torch.int64)
                q_len = (qsl[1:R + 1] - qsl[:R]).to(torch.int64)
            else:
                rows = _to_dev(idx_np, dev)
                slots = _to_dev(slots_np[idx_np], dev)
                q_len = (qsl[rows + 1] - qsl[rows]).to(torch.int64)
            p = input_batch.seq_lens[rows].to(torch.int64) - q_len
            row0 = input_batch.cu_num_logits[rows].to(torch.int64)
            out = st.step(logits, slots, slots_np[idx_np], p, q_len, row0, draft_tokens)
            sampled[rows] = out.tokens.to(torch.int32)
            num_sampled[rows] = out.num_emitted
            num_rejected[rows] = out.num_rejected

        st.publish()
        return SamplerOutput(sampled, None, None, num_sampled, num_rejected)


def _to_dev(x: np.ndarray, device: torch.device) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.int64))
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
