"""Unit tests of the engine's vLLM-free pieces: attention ranges, per-request settings, packed parameters."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vllm_s2d2.core import masks
from vllm_s2d2.core.params import FamilyRules, SamplingSpec, StepParams
from vllm_s2d2.engine.attention import kernel_visibility, pad_ranges, prefill_block_ranges
from vllm_s2d2.engine.settings import request_config, resolve_engine_settings
from vllm_s2d2.engine.step_params import PackedStepParams
from vllm_s2d2.s2d2_config import S2D2Config

SDAR = {"architectures": ["SDARForCausalLM"], "vocab_size": 512, "block_size": 4, "mask_token_id": 511,
        "eos_token_id": 500}


def test_draft_range_gives_the_reference_draft_rows():
    # block [8, 12), query from p = 9 (prompt tail 8 cached), causal prefix 1 (draft_ver): rows of masks.draft_rows
    p, end, cp = 9, 12, 1
    vis = kernel_visibility(torch.arange(p, end), end, [(p + cp, end - 1)])
    want = masks.draft_rows(p, end - p, cp)
    assert torch.equal(vis, want)


def test_commit_ranges_give_causal_or_block_rows_and_a_bidirectional_next_block():
    p, bs, B = 9, 8, 4
    q = torch.arange(p, bs + 2 * B)
    n = bs + 2 * B
    causal_commit = kernel_visibility(q, n, [(bs + B, bs + 2 * B - 1)])
    assert torch.equal(causal_commit[: bs + B - p, : bs + B], masks.causal_rows(p, bs + B - p))
    block_commit = kernel_visibility(q, n, [(p, bs + B - 1), (bs + B, bs + 2 * B - 1)])
    assert block_commit[: bs + B - p, : bs + B].all() and not block_commit[: bs + B - p, bs + B:].any()
    assert block_commit[bs + B - p:].all()  # next block: everything before + itself bidirectionally


def test_prefill_block_ranges_match_committed_kv():
    P, B = 10, 4
    for start, end in ((0, 10), (0, 6), (6, 10)):
        vis = kernel_visibility(torch.arange(start, end), end, prefill_block_ranges(start, end, P, B))
        want = masks.committed_kv(P, B, False, P)[start:end, :end]
        if end == P:
            assert torch.equal(vis, want)
        else:  # a chunk cut inside a block cannot see the block's later prompt tokens (documented)
            assert torch.equal(vis, want & (torch.arange(end)[None, :] < end))
    # resumed request: generated tokens after the prompt's partial block get their own segment
    assert prefill_block_ranges(0, 16, 10, 4) == [(0, 3), (4, 7), (8, 9), (10, 11), (12, 15)]


def test_canvas_tables_equal_the_range_masks_they_replace_truncated_canvases_included():
    # The canvas kernel's rule (every key below p visible, then the table among the canvas slots) gives exactly
    # the mask vLLM's Triton kernel computed from the same ranges clipped to the keys present, for every query
    # length a truncated canvas can have.
    B, W = 4, 8
    spec = torch.tensor([[9, 11, 12, 15], [13, 15, 0, 0], [0, 0, 12, 15], [5, 5, 0, 0]])
    p = torch.tensor([9, 12, 9, 5])
    for q_len in range(1, W + 1):
        table = masks.canvas_visibility(spec, p, torch.full_like(p, W), torch.zeros(4, dtype=torch.bool),
                                        masks.verifier_2l(0, B))
        for r in range(4):
            seq_len = int(p[r]) + q_len
            ranges = [(lo, min(hi, seq_len - 1)) for lo, hi in spec[r].view(2, 2).tolist()]
            want = kernel_visibility(torch.arange(int(p[r]), seq_len), seq_len, [x for x in ranges if x[0] < x[1]])
            got = torch.cat([torch.ones(q_len, int(p[r]), dtype=torch.bool), table[r, :q_len, :q_len]], dim=1)
            assert torch.equal(got, want), (r, q_len)


def test_verify_rows_take_the_2l_pattern():
    B = 4
    pattern = masks.verifier_2l(0, B)
    table = masks.canvas_visibility(torch.zeros(1, 4, dtype=torch.long), torch.tensor([20]), torch.tensor([8]),
                                    torch.tensor([True]), pattern)
    assert torch.equal(table[0], pattern)
    assert torch.equal(torch.cat([torch.ones(2 * B, 20, dtype=torch.bool), table[0]], 1), masks.verifier_2l(20, B))


def test_prefill_ranges_are_padded():
    assert pad_ranges({0: []}) is None
    padded = pad_ranges({0: [(1, 2)], 1: [(1, 2), (3, 4), (5, 6)]})
    assert len(padded[1]) == 4 and padded[1][-1] == (0, 0)


def test_request_config_overrides():
    st = resolve_engine_settings(SDAR, {"verify": False})
    cfg = request_config(st.config, {"s2d2": {"remasking": "low_confidence_static", "draft_ver": False}},
                         "sdar", 4)
    assert cfg.remasking == "low_confidence_static" and cfg.draft_ver is False and cfg.block_size == 4
    assert request_config(st.config, None, "sdar", 4) is st.config
    for bad, name in (({"block_size": 8}, "block_size"), ({"cache_ver": False}, "cache_ver"), ({"nope": 1}, "nope"),
                      ({"preset": "sdar-b"}, "block_size"), ({"preset": "nope"}, "preset")):
        with pytest.raises(ValueError, match=name):
            request_config(st.config, {"s2d2": bad}, "sdar", 4)
    # a preset per request: its options, with the request's explicit keys winning
    cfg = request_config(st.config, {"s2d2": {"preset": "sdar-a", "score_threshold": 0.5}}, "sdar", 4)
    assert cfg.verify_policy == "score_threshold" and cfg.score_penalty_coef == 1.0 and cfg.score_threshold == 0.5
    assert resolve_engine_settings(SDAR, {"verify": True}).config.verify  # verification runs in the engine
    with pytest.raises(ValueError, match="not a supported block-diffusion architecture"):
        resolve_engine_settings(dict(SDAR, architectures=["Qwen3ForCausalLM"], model_type="qwen3"), None)
    # every family runs in the engine, with its own defaults
    llada = resolve_engine_settings(dict(SDAR, architectures=["LLaDA2MoeModelLM"], model_type="llada2_moe"),
                                    {"verify": False})
    assert llada.info.family == "llada2" and llada.block_size == 4


def test_request_overrides_spellings():
    from vllm_s2d2.engine.settings import request_overrides

    want = {"verify_policy": "score_hysteresis", "confidence_threshold": 0.9, "draft_ver": False}
    assert request_overrides({"s2d2": want}) == want
    assert request_overrides({"s2d2": json.dumps(want)}) == want
    flat = {"s2d2.verify_policy": "score_hysteresis", "s2d2.confidence_threshold": "0.9", "s2d2.draft_ver": "false",
            "other_plugin": 1}
    assert request_overrides(flat) == want
    assert request_overrides({"other": 1}) == {} and request_overrides(None) == {}
    for bad, needle in (({"s2d2": "{nope"}, "not valid JSON"), ({"s2d2": [1]}, "mapping"),
                        ({"s2d2": {"block_size": 4}, "s2d2.block_size": 4}, "given twice")):
        with pytest.raises(ValueError, match=needle):
            request_overrides(bad)
    st = resolve_engine_settings(SDAR, {"verify": False})
    cfg = request_config(st.config, flat, "sdar", 4)
    assert cfg.verify_policy == "score_hysteresis" and cfg.confidence_threshold == 0.9 and cfg.draft_ver is False
    with pytest.raises(ValueError, match="verify_polcy"):
        request_config(st.config, {"s2d2.verify_polcy": "x"}, "sdar", 4)


def test_packed_params_roundtrip():
    rules = FamilyRules.for_family("sdar", 511)
    cfgs = [S2D2Config(verify=False).resolve("sdar", 4),
            S2D2Config(verify=False, remasking="low_confidence_static", denoising_steps=2).resolve("sdar", 4)]
    specs = [SamplingSpec(temperature=0.0, seed=5), SamplingSpec(temperature=0.7, top_k=3, top_p=0.9, seed=6)]
    tmpl = StepParams.build(cfgs[:1], specs[:1], rules)
    packed = PackedStepParams(4, 4, tmpl, torch.device("cpu"))
    for slot, (c, s) in zip((2, 0), zip(cfgs, specs)):
        packed.set_row(slot, StepParams.build([c], [s], rules))
    packed.flush()
    got = packed.gather(torch.tensor([2, 0]), True, True)
    want = StepParams.build(cfgs, specs, rules)
    for name in ("temperature", "greedy", "seed", "remasking", "confidence_threshold", "verify", "estimator"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert got.top_k.tolist() == [0, 3] and got.top_p.tolist() == pytest.approx([1.0, 0.9])
    assert got.quota[:, :want.quota.shape[1]].tolist() == want.quota.tolist()


def test_model_classes_keep_hidden_states_for_the_shifted_first_token():
    """The plugin's model classes keep their last forward's hidden states; the model state turns token rows of it
    into logits (Fast-dLLM v2's first token after a prompt chunk that got no logits from vLLM)."""
    from types import SimpleNamespace

    import torch

    from vllm_s2d2.engine.model_state import S2D2ModelState
    from vllm_s2d2.model_executor.models.common import BlockDiffusionModel

    class Base(torch.nn.Module):
        def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
            return torch.stack([input_ids.float(), positions.float()], dim=1)

        def compute_logits(self, hidden):
            return hidden @ torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 3.0]])

    class Model(BlockDiffusionModel, Base):
        pass

    m = Model()
    out = m(input_ids=torch.tensor([5, 6, 7]), positions=torch.tensor([0, 1, 2]))
    assert torch.equal(m.s2d2_hidden_states, out)
    buffer = m.s2d2_hidden_states  # a persistent buffer (FULL CUDA graphs copy into it): the step's rows first
    out = m(input_ids=torch.tensor([8, 9]), positions=torch.tensor([3, 4]))
    assert m.s2d2_hidden_states is buffer and torch.equal(buffer[:2], out)
    rows = torch.tensor([1, 0])
    got = S2D2ModelState._token_logits(SimpleNamespace(model=m), rows)
    assert torch.equal(got, m.compute_logits(out[rows]))
    with pytest.raises(RuntimeError, match="BlockDiffusionModel"):
        S2D2ModelState._token_logits(SimpleNamespace(model=Base()), rows)


def _stepper_batch(scheduled, computed, prefilling, slots, cache_ver=True, prompt_len=10):
    from types import SimpleNamespace

    import numpy as np

    from vllm_s2d2.engine.stepper import S2D2Stepper

    st = S2D2Stepper(max_num_reqs=4, block_size=4, family="sdar", mask_token_id=511,
                     engine_config=resolve_engine_settings(SDAR, {"cache_ver": cache_ver}).config,
                     max_model_len=64, device="cpu")
    for slot in slots:
        st.add_request(slot, prompt_len=prompt_len, config=resolve_engine_settings(SDAR, {"cache_ver": cache_ver}).config,
                       sampling=SamplingSpec(temperature=0.0), stop_ids=[], max_tokens=8)
    st.apply_staged_writes()
    qsl = np.concatenate([[0], np.cumsum(scheduled)]).astype(np.int32)
    batch = SimpleNamespace(num_reqs=len(slots), idx_mapping_np=np.array(slots, dtype=np.int32),
                            num_scheduled_tokens=np.array(scheduled, dtype=np.int32),
                            num_computed_tokens_np=np.array(computed, dtype=np.int32),
                            is_prefilling_np=np.array(prefilling), query_start_loc=torch.from_numpy(qsl))
    return st, batch


def test_uniform_batch_serves_a_w_token_prefill_chunk_with_its_block_causal_table():
    from vllm_s2d2.engine.attention import plan_canvas_rows, write_prefill_tables

    st, batch = _stepper_batch([8, 8], [0, 12], [True, False], [2, 0], cache_ver=False, prompt_len=6)
    plan = plan_canvas_rows(st, batch)
    assert plan.canvas_only and plan.row_slot.tolist() == [2, 0] and plan.prefill_rows.tolist() == [0]
    write_prefill_tables(st, batch, plan.prefill_rows)
    want = kernel_visibility(torch.arange(0, 8), 8, prefill_block_ranges(0, 8, 6, 4))
    assert torch.equal(st.blocks.canvas_tables[2].bool(), want)
    # a mixed batch: the prefill row goes to the stock kernel (-1), the canvas row to its slot
    st, batch = _stepper_batch([5, 8], [0, 12], [True, False], [2, 0], cache_ver=False, prompt_len=6)
    plan = plan_canvas_rows(st, batch)
    assert not plan.canvas_only and plan.row_slot.tolist() == [-1, 0] and plan.prefill_rows.size == 0


def test_canvas_positions_add_slot_offsets_on_canvas_rows_only():
    from vllm_s2d2.engine.attention import canvas_positions

    st, batch = _stepper_batch([3, 8], [0, 12], [True, False], [1, 0])
    st.blocks.pos_offset[0, 4:] = -4  # slot 0 holds a 2L verify canvas
    st.blocks.pos_offset[1] = -100  # never read: row 0 is a prefill row
    runner = torch.tensor([0, 1, 2] + list(range(12, 20)) + [0])  # padded to 12 rows, as the runner pads
    out = canvas_positions(runner, batch.query_start_loc, 2, torch.tensor([-1, 0], dtype=torch.int32),
                           st.blocks.pos_offset, torch.zeros(12, dtype=torch.long))
    assert out.tolist() == [0, 1, 2, 12, 13, 14, 15, 12, 13, 14, 15, 0]  # the last row is padding: unchanged 0


def test_step_graphs_are_all_captured_at_start_up(monkeypatch):
    """The profile run captures one graph per (padded batch size, step flags: verify, sampled, top-k, top-p --
    the last two only with sampled --, verifying -- only with verify), so serving never captures; on CPU nothing is captured but the static
    logits buffer is allocated."""
    from vllm_s2d2.engine.cudagraph_utils import StepGraphs

    graphs = StepGraphs(max_num_reqs=12, canvas_length=8, scratch_slot=12, device=torch.device("cpu"))
    assert sorted({k[0] for k in graphs.keys()}) == [1, 2, 4, 8, 12] and len(graphs.keys()) == 5 * 15
    assert graphs.capture_all(lambda *a: None, 32, torch.float32) == 0 and graphs.logits.shape == (96, 32)
    captured = []
    graphs.device = torch.device("cuda")  # pretend: record what would be captured
    monkeypatch.setattr(graphs, "_capture", lambda fn, key: (captured.append(key), graphs._graphs.update({key: 0})))
    assert graphs.capture_all(lambda *a: None, 32, torch.float32) == 75 and set(captured) == set(graphs.keys())
    assert graphs.capture_all(lambda *a: None, 32, torch.float32) == 0  # nothing twice


def test_a_commit_canvas_cut_inside_its_block_keeps_the_block():
    """A COMMIT whose canvas the scheduler cut before the end of its block (a token budget shared with long prefill
    chunks, or a resumed request scheduled last) commits nothing, keeps its decided block and is retried; the
    full canvas then emits that block.  (It once replaced the block by the fresh, all-mask next one.)"""
    from vllm_s2d2.engine.states import COMMIT

    st, _ = _stepper_batch([8], [12], [False], [0])
    block = torch.tensor([5, 6, 7, 8])
    st.blocks.tokens[0], st.blocks.block_start[0], st.blocks.phase[0] = block, 12, COMMIT
    slots, slots_np = torch.tensor([0]), np.array([0], dtype=np.int32)
    draft_tokens = torch.zeros(4, 8, dtype=torch.int64)
    for q_len in (1, 3):  # cut: fewer rows than the block's 4 uncached positions
        out = st.step(torch.zeros(q_len, 512), slots, slots_np, torch.tensor([12]), torch.tensor([q_len]),
                      torch.tensor([0]), draft_tokens)
        assert int(out.num_emitted[0]) == 0 and int(out.num_rejected[0]) == q_len
        assert torch.equal(st.blocks.tokens[0], block) and int(st.blocks.phase[0]) == COMMIT
        assert int(st.blocks.block_start[0]) == 12 and draft_tokens[0, :4].tolist() == block.tolist()
    out = st.step(torch.zeros(8, 512), slots, slots_np, torch.tensor([12]), torch.tensor([8]), torch.tensor([0]),
                  draft_tokens)
    assert int(out.num_emitted[0]) == 4 and out.tokens[0, :4].tolist() == block.tolist()
    assert int(st.blocks.block_start[0]) == 16
