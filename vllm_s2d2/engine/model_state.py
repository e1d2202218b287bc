"""``S2D2ModelState``: the MRV2 ``ModelState`` of block-diffusion models (docs/architecture.md).

vLLM's runner stays stock; this class plugs the block-diffusion state machine into it:

* ``num_new_sampled_tokens_per_step = 0``: a decode query is only the canvas (W draft tokens, read by the
  runner from ``req_states.draft_tokens``); nothing is sampled "after" it.
* Persistent per-slot GPU state lives in one :class:`~vllm_s2d2.engine.stepper.S2D2Stepper` shared with the
  :class:`~vllm_s2d2.engine.sampler.S2D2Sampler` (``custom_sampler`` -> ``(S2D2Sampler, None)``).
* ``prepare_inputs`` returns a persistent ``positions`` buffer: the runner's positions, with the mask half of
  a 2L verify canvas moved to the first half's positions -- the same buffer is returned by
  ``prepare_dummy_inputs`` so CUDA graphs see one address.
* ``prepare_attn`` builds TRITON_ATTN metadata with ``causal=True`` plus per-request bidirectional ranges
  (``mm_req_doc_ranges``, :mod:`vllm_s2d2.engine.attention`).  The ranges of decoding requests depend on the
  previous step's outcome; the stepper copies them to pinned host memory at the end of every sampler call,
  and vLLM has already waited for that step's outputs, so reading them costs no stall.  Because the range
  tensor is rebuilt on every step, the config hook selects PIECEWISE CUDA graphs (not FULL).
* Preemption: ``remove_request`` keeps a device snapshot of the slot's block state (RNG counter included);
  when the request comes back (re-prefilled with its committed tokens) the interrupted block continues.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from vllm.config import VllmConfig
from vllm.config.compilation import CUDAGraphMode
from vllm.v1.worker.gpu.attn_utils import build_attn_metadata
from vllm.v1.worker.gpu.input_batch import InputBatch
from vllm.v1.worker.gpu.model_states.interface import ModelState

from vllm_s2d2.core.masks import verifier_qq_bias
from vllm_s2d2.engine.attention import step_ranges
from vllm_s2d2.engine.attention_inputs import VerifyGroup
from vllm_s2d2.engine.stats import external_request_id
from vllm_s2d2.engine.settings import ADDITIONAL_CONFIG_KEY, resolve_engine_settings
from vllm_s2d2.engine.states import VERIFY
from vllm_s2d2.engine.stepper import S2D2Stepper

_MAX_SAVED = 4096


class S2D2ModelState(ModelState):
    num_new_sampled_tokens_per_step: int = 0

    def __init__(self, vllm_config: VllmConfig, model: nn.Module, encoder_cache: Any, device: torch.device):
        super().__init__(vllm_config, model, encoder_cache, device)
        hf_config = self.model_config.hf_config
        self.settings = resolve_engine_settings(
            hf_config, (vllm_config.additional_config or {}).get(ADDITIONAL_CONFIG_KEY))
        W = self.settings.canvas_length
        dc = vllm_config.diffusion_config
        if dc is None or dc.canvas_length != W:
            raise ValueError(f"S2D2 needs diffusion_config.canvas_length == {W} (2 x block_size), got "
                             f"{None if dc is None else dc.canvas_length}")
        self.stepper = S2D2Stepper(
            max_num_reqs=self.max_num_reqs, block_size=self.settings.block_size,
            family=self.settings.info.family, mask_token_id=self.settings.mask_token_id,
            engine_config=self.settings.config, max_model_len=self.max_model_len, device=device,
            use_cuda_graphs=vllm_config.compilation_config.cudagraph_mode != CUDAGraphMode.NONE)
        self._req_to_slot: dict[str, int] = {}
        self._saved: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._finished_stats: OrderedDict[str, dict[str, int]] = OrderedDict()
        self._positions = torch.zeros(self.max_num_tokens, dtype=torch.int64, device=device)
        self._qq_bias = verifier_qq_bias(self.settings.block_size, device=device)
        self._sampler = None

    # -- requests ---------------------------------------------------------------------------------------
    def get_supported_generation_tasks(self):
        return ("generate",)

    def add_request(self, req_index: int, new_req_data: Any) -> None:
        req_id = new_req_data.req_id
        self._req_to_slot[req_id] = req_index
        saved = self._saved.pop(req_id, None)
        resumed = (new_req_data.prefill_token_ids is not None and new_req_data.prompt_token_ids is not None
                   and len(new_req_data.prefill_token_ids) > len(new_req_data.prompt_token_ids))
        if saved is not None and resumed and self._sampler is not None:
            self._sampler.next_saved[req_index] = saved

    def remove_request(self, req_id: str) -> None:
        slot = self._req_to_slot.pop(req_id, None)
        if slot is None:
            return
        real = not req_id.startswith("_")  # (vLLM's dummy requests start with "_")
        if real:
            self._record_stats(req_id, slot)
        snap = self.stepper.remove_request(slot, save=real)
        if snap is not None:
            self._saved[req_id] = snap
            while len(self._saved) > _MAX_SAVED:
                self._saved.popitem(last=False)

    def _record_stats(self, req_id: str, slot: int) -> None:
        """Keep the counters of a request leaving the worker (finished, aborted or preempted: a preempted
        request's counters restart on resume and are added up here)."""
        key = external_request_id(req_id)
        counters = self.stepper.host_slot_stats(slot)
        old = self._finished_stats.pop(key, None)
        if old is not None:
            counters = {k: counters[k] + old[k] for k in counters}
        self._finished_stats[key] = counters
        while len(self._finished_stats) > _MAX_SAVED:
            self._finished_stats.popitem(last=False)

    def pop_request_stats(self, request_ids: list[str] | None = None) -> dict[str, dict[str, int]]:
        """Counters of requests that left the worker (see :func:`vllm_s2d2.engine.stats.request_stats`)."""
        if request_ids is None:
            out = dict(self._finished_stats)
            self._finished_stats.clear()
            return out
        return {r: self._finished_stats.pop(r) for r in request_ids if r in self._finished_stats}

    def custom_sampler(self, sampler: Any):
        from vllm_s2d2.engine.sampler import S2D2Sampler

        self._sampler = S2D2Sampler(sampler, self.stepper, self.settings, self.model_config.get_vocab_size())
        self._sampler.token_logits = self._token_logits
        return self._sampler, None

    def _token_logits(self, rows: torch.Tensor) -> torch.Tensor:
        """Logits of token rows of the last forward, from the hidden states the plugin's model classes keep
        (:class:`~vllm_s2d2.model_executor.models.common.BlockDiffusionModel`)."""
        hidden = getattr(self.model, "s2d2_hidden_states", None)
        if hidden is None:
            raise RuntimeError(f"{type(self.model).__name__} keeps no hidden states; block-diffusion models must "
                               "derive from vllm_s2d2.model_executor.models.common.BlockDiffusionModel")
        return self.model.compute_logits(hidden.index_select(0, rows))

    # -- inputs -----------------------------------------------------------------------------------------
    def get_mm_embeddings(self, scheduled_encoder_inputs, input_batch, req_states):
        return None

    def _verifying(self, input_batch: InputBatch) -> np.ndarray:
        """Batch indices of requests whose coming step is a 2L verification with its full 2B canvas."""
        R = input_batch.num_reqs
        st = self.stepper
        if not st.two_l_verify:  # shift-aligned models verify with a plain causal pass (no 2L launch)
            return np.zeros(0, dtype=np.int64)
        st.sync_host()
        slots = np.asarray(input_batch.idx_mapping_np[:R], dtype=np.int64)
        q_len = np.asarray(input_batch.num_scheduled_tokens[:R])
        ok = ((st.phase_host[slots] == VERIFY) & st.active[slots]
              & ~np.asarray(input_batch.is_prefilling_np[:R], dtype=bool) & (q_len == st.W))
        return np.nonzero(ok)[0]

    def _verify_rows(self, input_batch: InputBatch, reqs: np.ndarray, first: int, count: int) -> torch.Tensor:
        qsl = np.asarray(input_batch.query_start_loc_np[:input_batch.num_reqs + 1], dtype=np.int64)
        rows = (qsl[reqs][:, None] + first + np.arange(count)[None, :]).reshape(-1)
        return torch.from_numpy(rows).to(self.device, non_blocking=True)

    def prepare_inputs(self, input_batch: InputBatch, req_states: Any) -> dict[str, Any]:
        n = input_batch.num_tokens_after_padding
        pos = self._positions[:n]
        pos.copy_(input_batch.positions[:n])
        reqs = self._verifying(input_batch)
        if reqs.size:
            # 2L canvas: the mask half (local slots B..2B-1) takes the first half's positions p .. p+B-1.
            B = self.settings.block_size
            rows = self._verify_rows(input_batch, reqs, B, B)
            pos.index_copy_(0, rows, pos.index_select(0, rows) - B)
        return {"positions": pos}

    def prepare_dummy_inputs(self, num_reqs: int, num_tokens: int) -> dict[str, Any]:
        return {"positions": self._positions[:num_tokens]}

    # -- attention --------------------------------------------------------------------------------------
    def prepare_attn(self, input_batch: InputBatch, cudagraph_mode: CUDAGraphMode, block_tables, slot_mappings,
                     attn_groups, kv_cache_config, for_capture: bool = False) -> dict[str, Any]:
        if cudagraph_mode == CUDAGraphMode.FULL:
            num_reqs = input_batch.num_reqs_after_padding
            num_tokens = input_batch.num_tokens_after_padding
        else:
            num_reqs = input_batch.num_reqs
            num_tokens = input_batch.num_tokens
        query_start_loc_cpu = torch.from_numpy(input_batch.query_start_loc_np[: num_reqs + 1])
        max_query_len = int(input_batch.num_scheduled_tokens.max())
        seq_lens_cpu_upper_bound = input_batch.seq_lens_cpu_upper_bound
        if for_capture:
            max_seq_len = self.max_model_len
            ranges = None
        else:
            max_seq_len = int(seq_lens_cpu_upper_bound[:num_reqs].max())
            ranges = step_ranges(self.stepper, input_batch)
        metadata = build_attn_metadata(
            attn_groups=attn_groups,
            num_reqs=num_reqs,
            num_tokens=num_tokens,
            query_start_loc_gpu=input_batch.query_start_loc[: num_reqs + 1],
            query_start_loc_cpu=query_start_loc_cpu,
            max_query_len=max_query_len,
            seq_lens=input_batch.seq_lens,
            max_seq_len=max_seq_len,
            block_tables=block_tables,
            slot_mappings=slot_mappings,
            kv_cache_config=kv_cache_config,
            seq_lens_cpu_upper_bound=seq_lens_cpu_upper_bound,
            dcp_local_seq_lens=input_batch.dcp_local_seq_lens,
            positions=input_batch.positions,
            is_prefilling=torch.from_numpy(input_batch.is_prefilling_np),
            mm_req_doc_ranges=ranges,
            for_cudagraph_capture=for_capture,
            causal=True,
        )
        reqs = np.zeros(0, dtype=np.int64) if for_capture else self._verifying(input_batch)
        if reqs.size:
            W = self.stepper.W
            idx = torch.from_numpy(reqs).to(self.device, non_blocking=True)
            group = VerifyGroup(
                rows=self._verify_rows(input_batch, reqs, 0, W),
                cu_seqlens_q=torch.arange(0, (reqs.size + 1) * W, W, dtype=torch.int32, device=self.device),
                seqused_k=input_batch.seq_lens.index_select(0, idx).to(torch.int32),
                block_table=block_tables[0].index_select(0, idx),
                max_seqlen_q=W,
                max_seqlen_k=int(np.asarray(seq_lens_cpu_upper_bound[:num_reqs])[reqs].max()),
                qq_bias=self._qq_bias)
            for md in {id(m): m for m in metadata.values()}.values():
                md.s2d2_verify = group
        return metadata
