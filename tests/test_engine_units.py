"""Unit tests of the engine's vLLM-free pieces: attention ranges, per-request settings, packed parameters."""

from __future__ import annotations

import json
import numpy as np
import pytest
import torch

from vllm_s2d2.core import masks
from vllm_s2d2.core.params import FamilyRules, SamplingSpec, StepParams
from vllm_s2d2.engine.attention import decode_ranges, kernel_visibility, pad_ranges, prefill_block_ranges
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


def test_decode_ranges_clip_to_present_keys_and_pad():
    spec = np.array([[5, 11, 12, 15], [9, 9, 0, 0]], dtype=np.int32)
    assert decode_ranges(spec, np.array([14, 20])) == [[(5, 11), (12, 13)], []]
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
    assert m.s2d2_hidden_states is out
    rows = torch.tensor([2, 0])
    got = S2D2ModelState._token_logits(SimpleNamespace(model=m), rows)
    assert torch.equal(got, m.compute_logits(out[rows]))
    with pytest.raises(RuntimeError, match="BlockDiffusionModel"):
        S2D2ModelState._token_logits(SimpleNamespace(model=Base()), rows)
