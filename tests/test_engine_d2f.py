"""D2F in the engine on CPU: the pipelined stepper, sampler and attention plan (``tests/engine_emulator.py``) against
the D2F reference decoder, token for token, for both bases (LLaDA: 2L verify; Dream: shifted, causal verify with
the carried logit), with several blocks active at once."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

pytest.importorskip("vllm")

sys.path.insert(0, os.path.dirname(__file__))
from engine_emulator import Emulator, EmuRequest, sampling_params  # noqa: E402
from test_engine_emulation import emulate, reference_output  # noqa: E402

from vllm_s2d2.configs import load_family_info  # noqa: E402
from vllm_s2d2.reference.models import ReferenceModel  # noqa: E402
from vllm_s2d2.testing.checkpoints import build_tiny_checkpoint  # noqa: E402

PROMPT_LENS = (1, 3, 4, 5, 9, 2)
MAX_TOKENS = (1, 6, 11, 4, 13, 7)
BASE = {"block_size": 4, "max_active_blocks": 3, "block_add_threshold": 0.25}


def _tiny(tmp_path_factory, family):
    path = build_tiny_checkpoint(family, tmp_path_factory.mktemp(family), small_vocab=True, dtype=torch.float32,
                                 init_std=0.5, seed=3)
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 400, (n,), generator=g).tolist() for n in PROMPT_LENS]
    return ReferenceModel.load(str(path)), load_family_info(str(path)), hf, prompts


@pytest.fixture(scope="module", params=["d2f_llada", "d2f_dream"])
def tiny(request, tmp_path_factory):
    return _tiny(tmp_path_factory, request.param)


def check(tiny, s2d2, sps, **kw):
    reqs, emu = emulate(tiny, s2d2, sps, **kw)
    for r in reqs:
        if r.finish_reason == "abort":
            continue
        ref = reference_output(tiny, s2d2, r.prompt, r.sampling)
        assert r.output == ref.token_ids, (len(r.prompt), r.sampling)
    return reqs, emu


def greedy(**kw):
    """Greedy sampling, seeded: S2D2's default acceptance is stochastic even at temperature 0 (p and q are the
    plain softmax), so the random numbers must be the reference's."""
    return [sampling_params(max_tokens=m, seed=i, **kw) for i, m in enumerate(MAX_TOKENS)]


@pytest.mark.parametrize("s2d2", [
    dict(BASE),  # always verify (the D2F default), block-causal committed KV
    dict(BASE, cache_ver=True),
    dict(BASE, verify=False),  # plain D2F
    dict(BASE, verify_policy="score_threshold", score_threshold=-1.0),
    dict(BASE, verify_policy="contextual_bandit_ucb"),
    dict(BASE, max_active_blocks=1),
], ids=["always_verify", "cache_ver", "plain", "score", "ucb", "one_block"])
def test_greedy_matches_reference(tiny, s2d2):
    check(tiny, s2d2, greedy())


@pytest.mark.parametrize("policy", [
    {}, dict(allow_resample=False, accept_min_draft_confidence=0.2, partial_accept_run=2),
    dict(verify_policy="score_threshold", score_threshold=-1.0), dict(verify_policy="score_hysteresis"),
    dict(verify_policy="contextual_bandit_ucb", token_acceptance_estimator="soft_renyi_2_entropy"),
    dict(resample_min_q=0.3, min_tokens_per_step=2, verify_block_size=2)],
    ids=["always_verify", "knobs", "score", "hysteresis", "ucb", "resample_q"])
def test_sampled_with_seeds_matches_reference(tiny, policy):
    if policy.get("verify_block_size", 1) > 1 and tiny[1].shifted:
        pytest.skip("Dream verifies causally: verify_block_size 1 only")
    sps = [sampling_params(temperature=1.0, top_k=20, seed=100 + i, max_tokens=m) for i, m in enumerate(MAX_TOKENS)]
    check(tiny, dict(BASE, **policy), sps)


def test_pipelining_is_exercised(tiny):
    model, info, hf, prompts = tiny
    out = reference_output(tiny, dict(BASE), prompts[4], sampling_params(max_tokens=13, seed=0))
    assert out.stats.max_active_blocks >= 2
    check(tiny, dict(BASE), greedy())


def test_stops_and_per_request_options(tiny):
    _, _, _, prompts = tiny
    free = reference_output(tiny, dict(BASE), prompts[3], sampling_params(max_tokens=12, seed=3)).token_ids
    stop = free[4]
    sps = [sampling_params(max_tokens=12, stop_token_ids=[stop], seed=i) for i in range(3)] + [
        sampling_params(max_tokens=9, seed=3, extra_args={"s2d2": {"verify": False}}),
        sampling_params(max_tokens=9, seed=4, extra_args={"s2d2": {"verify_policy": "score_hysteresis"}}),
        sampling_params(max_tokens=9, seed=5, extra_args={"s2d2": {"min_tokens_per_step": 2}})]
    check(tiny, dict(BASE), sps)


def test_preemption_resumes_the_window(tiny):
    sps = greedy()
    check(tiny, dict(BASE), sps, preempt=((3, 6), (2, 4)))
    seeded = [sampling_params(temperature=1.0, seed=7 + i, max_tokens=m) for i, m in enumerate(MAX_TOKENS)]
    # (late enough that requests 1 and 4 have outputs: a request preempted before its first token starts afresh)
    _, emu = check(tiny, dict(BASE), seeded, preempt=((6, 9, 12), (1, 4)))
    assert emu.stepper.host_totals()["verify_restarts"] > 0  # a preemption hit a pending verification
    # A stateful routing policy resumes with its statistics (from before the draft that a restart redoes).
    check(tiny, dict(BASE, verify_policy="contextual_bandit_ucb"), seeded, preempt=((5, 8, 11), (1, 4)))


def test_max_model_len_caps_without_hanging(tiny):
    model, _, hf, prompts = tiny
    emu = Emulator(model, hf, dict(BASE), max_model_len=24)
    reqs = [EmuRequest(f"r{i}", list(p), sampling_params(max_tokens=64, seed=i)) for i, p in enumerate(prompts)]
    for r in reqs:
        emu.add(r)
    emu.run(max_steps=400)
    assert all(r.finished for r in reqs)
    assert all(len(r.prompt) + len(r.output) <= 24 for r in reqs)


def test_decode_steps_read_nothing_back_from_the_device(tiny):
    """Every decode-only step of the window engine (attention plan, positions, sampler, stepper) runs under the guard
    that raises on any host read of a tensor value; mixed policies, sampled and greedy rows, top-k / top-p."""
    from sync_guard import no_host_reads

    policies = [{}, {"verify": False}, {"verify_policy": "score_hysteresis"}, {"verify_policy": "contextual_bandit_ucb"},
                {"acceptance": "greedy"}, {"partial_accept_run": 2}]
    sps = [sampling_params(max_tokens=m, seed=i, temperature=1.0 if i % 2 else 0.0, top_k=20 if i == 1 else 0,
                           top_p=0.9 if i == 3 else 1.0, extra_args={"s2d2": pol})
           for i, (m, pol) in enumerate(zip(MAX_TOKENS, policies))]
    _, emu = check(tiny, dict(BASE), sps, guard=no_host_reads)
    assert emu.guarded_steps > 0 and emu.verify_forwards > 0


@pytest.mark.parametrize("option", [{"max_active_blocks": 2}, {"verify_block_size": 2}, {"block_size": 8}])
def test_engine_fixed_d2f_options_per_request_are_errors(tiny, option):
    """Options that shape the engine's canvas cannot change per request: a clear error, never silently ignored."""
    from vllm_s2d2.engine.settings import request_config, resolve_engine_settings

    _, info, hf, _ = tiny
    settings = resolve_engine_settings(hf, dict(BASE))
    name = next(iter(option))
    with pytest.raises(ValueError, match=f"{name}.*fixed per engine"):
        request_config(settings.config, {"s2d2": option}, info.family, info.block_size)
    same = {name: getattr(settings.config, name)}
    assert request_config(settings.config, {"s2d2": same}, info.family, info.block_size) == settings.config


def test_static_shape_step_matches_reference(tiny):
    """The window step through the CUDA-graph path's static buffers (padded batches, scratch-slot padding rows;
    on CPU the same path runs without a graph), greedy and seeded, equals the reference."""
    sps = [sampling_params(max_tokens=m, seed=i, temperature=1.0 if i % 2 else 0.0, top_k=20 if i % 2 else 0)
           for i, m in enumerate(MAX_TOKENS)]
    _, emu = check(tiny, dict(BASE), sps, static=True)
    assert emu.stepper.graphs is not None


def test_unseeded_requests_draw_the_same_numbers_on_every_rank(tiny):
    """Tensor parallelism runs the sampler on every rank: a request without a seed gets one derived from its id,
    so two engines (two ranks) given the same requests decide alike, and different requests differ."""
    from vllm_s2d2.engine.sampler import request_seed

    assert request_seed("cmpl-1-0a1b2c3d") == request_seed("cmpl-1-0a1b2c3d") != request_seed("cmpl-2-0a1b2c3d")
    sps = [sampling_params(temperature=1.0, top_k=20, max_tokens=m) for m in MAX_TOKENS]  # no seeds
    rank0, _ = emulate(tiny, dict(BASE), sps)
    rank1, _ = emulate(tiny, dict(BASE), sps)
    assert [r.output for r in rank0] == [r.output for r in rank1]
