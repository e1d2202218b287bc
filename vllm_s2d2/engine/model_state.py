"""``S2D2ModelState``: the MRV2 ``ModelState`` of block-diffusion models (docs/architecture.md).

vLLM's runner stays stock; this class plugs the block-diffusion state machine into it:

* ``num_new_sampled_tokens_per_step = 0``: a decode query is only the canvas (W draft tokens, read by the
  runner from ``req_states.draft_tokens``); nothing is sampled "after" it.
* Persistent per-slot GPU state lives in one :class:`~vllm_s2d2.engine.stepper.S2D2Stepper` shared with the
  :class:`~vllm_s2d2.engine.sampler.S2D2Sampler` (``custom_sampler`` -> ``(S2D2Sampler, None)``).
* ``prepare_inputs`` returns a persistent ``positions`` buffer: the runner's positions, with the mask half of
  a 2L verify canvas moved to the first half's positions -- the same buffer is returned by
  ``prepare_dummy_inputs`` so CUDA graphs see one address.
* ``prepare_attn`` builds TRITON_ATTN metadata (``causal=True``; ``mm_req_doc_ranges`` only for block-causal
  prefill chunks) and attaches :class:`~vllm_s2d2.engine.attention_inputs.CanvasInputs`: the per-slot canvas
  tables the stepper wrote on the device and the slot of each batch row (:mod:`vllm_s2d2.engine.attention`).  No
  request's mask is computed on the host, so uniform decode batches replay as FULL CUDA graphs.
* Preemption: ``remove_request`` keeps a device snapshot of the slot's block state (RNG counter and routing
  state included, ``states.SavedRequest``);
  when the request comes back (re-prefilled with its committed tokens) the interrupted block continues.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from vllm import envs as vllm_envs
from vllm.config import VllmConfig
from vllm.config.compilation import CompilationMode, CUDAGraphMode
from vllm.v1.worker.gpu.attn_utils import build_attn_metadata
from vllm.v1.worker.gpu.input_batch import InputBatch
from vllm.v1.worker.gpu.model_states.interface import ModelState

from vllm_s2d2.core import reductions
from vllm_s2d2.engine import compiled_step
from vllm_s2d2.engine.attention import (EXACT_PREFILL_ENV, canvas_positions, exact_prefill_wanted, plan_canvas_rows,
                                        plan_prefill_chunks, prefill_ranges, write_prefill_tables)
from vllm_s2d2.engine.attention_inputs import CanvasInputs
from vllm_s2d2.engine.states import SavedRequest
from vllm_s2d2.engine.stats import RESUME_LOG_ENV, external_request_id, resume_message
from vllm_s2d2.engine.settings import ADDITIONAL_CONFIG_KEY, resolve_engine_settings
from vllm_s2d2.engine.stepper import S2D2Stepper
from vllm_s2d2.engine.window_stepper import WindowStepper
from vllm_s2d2.env import env_switch
from vllm_s2d2.log import get_logger

logger = get_logger(__name__)

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
            raise ValueError(f"S2D2 needs diffusion_config.canvas_length == {W} (the engine's canvas width), got "
                             f"{None if dc is None else dc.canvas_length}")
        pipelined = self.settings.info.pipelined
        stepper_cls = WindowStepper if pipelined else S2D2Stepper  # D2F: a window of blocks
        # (D2F's window step is not split into compiled stages yet)
        compile_step = not pipelined and compiled_step.wanted(
            device, model_compiled=vllm_config.compilation_config.mode != CompilationMode.NONE)
        compile_core = compiled_step.core_wanted(compile_step)
        self.stepper = stepper_cls(
            max_num_reqs=self.max_num_reqs, block_size=self.settings.block_size,
            family=self.settings.info.family, mask_token_id=self.settings.mask_token_id,
            engine_config=self.settings.config, max_model_len=self.max_model_len, device=device,
            use_cuda_graphs=vllm_config.compilation_config.cudagraph_mode != CUDAGraphMode.NONE,
            **({} if pipelined else {"compile_step": compile_step, "compile_core": compile_core}))
        if compile_step:
            logger.info(compiled_step.ON_MESSAGE)
        if compile_core:
            logger.info(compiled_step.CORE_MESSAGE)
        self._req_to_slot: dict[str, int] = {}
        self._saved: OrderedDict[str, SavedRequest] = OrderedDict()
        self._finished_stats: OrderedDict[str, dict[str, int]] = OrderedDict()
        self._log_resumes = env_switch(RESUME_LOG_ENV, False)
        self._positions = torch.zeros(self.max_num_tokens, dtype=torch.int64, device=device)
        # Slot of each batch row's canvas table (-1: stock attention); persistent, read by FULL graphs.
        self._row_slot = torch.full((self.max_num_reqs,), -1, dtype=torch.int32, device=device)
        pinned = device.type == "cuda"
        self._row_slot_host = [torch.full((self.max_num_reqs,), -1, dtype=torch.int32, pin_memory=pinned)
                               for _ in range(2)]
        self._row_slot_turn = 0
        self._sampler = None
        # Exact prefill (token-causal prefill rows through the canvas kernel): with batch-invariant kernels.
        self._exact_prefill = exact_prefill_wanted(bool(vllm_envs.VLLM_BATCH_INVARIANT))
        if self._exact_prefill:
            self._causal_table = torch.ones(W, W, dtype=torch.int8, device=device).tril()[None].contiguous()
            logger.info("S2D2: token-causal prefill rows go through the canvas kernel (exact prefill: a token's "
                        "K/V does not depend on how the step cut its row; %s=0 turns it off)", EXACT_PREFILL_ENV)
        # (read here too so that a bad value stops the engine at start-up, not at its first step)
        if reductions.fixed_order_wanted():
            logger.info("S2D2: the decode step's vocabulary reductions run in a fixed order (a request's step math "
                        "does not depend on the batch; %s=0 turns it off)", reductions.FIXED_ORDER_ENV)

    # -- requests ---------------------------------------------------------------------------------------
    def get_supported_generation_tasks(self):
        return ("generate",)

    def add_request(self, req_index: int, new_req_data: Any) -> None:
        req_id = new_req_data.req_id
        self._req_to_slot[req_id] = req_index
        saved = self._saved.pop(req_id, None)
        resumed = (new_req_data.prefill_token_ids is not None and new_req_data.prompt_token_ids is not None
                   and len(new_req_data.prefill_token_ids) > len(new_req_data.prompt_token_ids))
        if self._sampler is not None:
            self._sampler.next_request_id[req_index] = req_id  # (unseeded requests: the seed every rank derives)
            if saved is not None and resumed:
                self._sampler.next_saved[req_index] = saved
                if self._log_resumes:
                    logger.info(resume_message(external_request_id(req_id), len(new_req_data.prefill_token_ids)))

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

    def prepare_inputs(self, input_batch: InputBatch, req_states: Any) -> dict[str, Any]:
        """Positions for RoPE, written in place (a FULL graph reads this buffer): the runner's positions plus the
        per-slot offsets of canvas rows (the mask half of a 2L verify canvas), on the device."""
        n = input_batch.num_tokens_after_padding
        canvas_positions(input_batch.positions, input_batch.query_start_loc, input_batch.num_reqs,
                         self._row_slot, self.stepper.blocks.pos_offset, self._positions[:n])
        return {"positions": self._positions[:n]}

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
            canvas_only = True
            prefill_chunks = None
            self._set_row_slot(np.full(num_reqs, self.stepper.scratch, dtype=np.int32), num_reqs)
        else:
            max_seq_len = int(seq_lens_cpu_upper_bound[:num_reqs].max())
            plan = plan_canvas_rows(self.stepper, input_batch)
            canvas_only = plan.canvas_only
            ranges = None if canvas_only else prefill_ranges(self.stepper, input_batch)
            if plan.prefill_rows.size:
                write_prefill_tables(self.stepper, input_batch, plan.prefill_rows)
            self._set_row_slot(plan.row_slot, num_reqs)
            exact = self._exact_prefill and not canvas_only
            prefill_chunks = self._prefill_chunks(input_batch, plan.row_slot) if exact else None
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
        canvas = CanvasInputs(self.stepper.blocks.canvas_tables, self._row_slot[:num_reqs], canvas_only,
                              prefill_chunks, None if prefill_chunks is None else self._causal_table)
        for md in {id(m): m for m in metadata.values()}.values():
            md.s2d2_canvas = canvas
        return metadata

    def _prefill_chunks(self, input_batch: InputBatch, row_slot: np.ndarray
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The step's W-token prefill chunks on the device (None if it has no token-causal prefill row)."""
        chunk_row, chunk_offset = plan_prefill_chunks(self.stepper, input_batch, row_slot)
        if chunk_row.size == 0:
            return None
        host = torch.from_numpy(np.stack([chunk_row, chunk_offset]))
        on_device = host.to(self.device, non_blocking=False)
        return on_device[0], on_device[1], torch.zeros_like(on_device[0])

    def _set_row_slot(self, row_slot: np.ndarray, num_rows: int) -> None:
        """Write the step's row -> slot map into the persistent ``_row_slot`` (rows past the batch: -1, skipped),
        through one of two pinned staging buffers (the copy of the previous step may still be in flight)."""
        self._row_slot_turn ^= 1
        host = self._row_slot_host[self._row_slot_turn]
        host[:num_rows] = -1
        host[:row_slot.size] = torch.from_numpy(row_slot)
        self._row_slot[:num_rows].copy_(host[:num_rows], non_blocking=True)
