"""The engine's state machine, sampler and attention ranges on CPU, against the reference decoder.

``tests/engine_emulator.py`` drives the real :class:`S2D2Sampler` / :class:`S2D2Stepper` / ``step_ranges``
through an emulation of vLLM 0.26's scheduler, runner and paged KV cache (dense recompute with each cached
position's recorded attention row, query rows under the Triton kernel's causal-OR-ranges mask).  The outputs
must equal ``vllm_s2d2.reference.generate`` token for token: mixed prompt lengths (shorter than a block, one
block, several), mixed max_tokens, static / dynamic / AR, block-causal caching, sampling with seeds, stop
tokens, truncated canvases (tiny token budget: chunked prefill and budget-cut canvases), per-request options,
aborts; ``max_model_len`` caps end requests without hanging.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter

import pytest
import torch

pytest.importorskip("vllm")

sys.path.insert(0, os.path.dirname(__file__))
from engine_emulator import Emulator, EmuRequest, sampling_params  # noqa: E402
from engine_helpers import build_tiny_checkpoint  # noqa: E402

from vllm_s2d2.configs import load_family_info  # noqa: E402
from vllm_s2d2.core.params import SamplingSpec  # noqa: E402
from vllm_s2d2.reference import generate  # noqa: E402
from vllm_s2d2.reference.accounting import reference_forwards  # noqa: E402
from vllm_s2d2.reference.models import ReferenceModel  # noqa: E402
from vllm_s2d2.s2d2_config import S2D2Config  # noqa: E402

PROMPT_LENS = (1, 3, 4, 5, 9, 2)
MAX_TOKENS = (1, 6, 11, 4, 9, 7)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = build_tiny_checkpoint(str(tmp_path_factory.mktemp("emu") / "sdar"), "sdar")
    model = ReferenceModel.load(path)
    info = load_family_info(path)
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 500, (n,), generator=g).tolist() for n in PROMPT_LENS]
    return model, info, hf, prompts


def reference(tiny, s2d2: dict, prompt, sp) -> list[int]:
    return reference_output(tiny, s2d2, prompt, sp).token_ids


def reference_output(tiny, s2d2: dict, prompt, sp):
    model, info, _, _ = tiny
    cfg = dict(s2d2)
    if sp.extra_args:
        cfg.update(sp.extra_args["s2d2"])
    stops = list(sp.stop_token_ids) + ([sp.eos_token_id] if sp.eos_token_id is not None else [])
    out = generate(model, info, [prompt], S2D2Config.from_dict(cfg),
                   sampling=SamplingSpec(temperature=sp.temperature, top_k=sp.top_k, top_p=sp.top_p, seed=sp.seed),
                   max_tokens=sp.max_tokens, ignore_eos=not stops, stop_token_ids=stops or None)
    return out[0]


def emulate(tiny, s2d2: dict, sps, *, budget=4096, max_model_len=256, abort=None, preempt=None, static=False,
            guard=None, id_prefix="r", compile_step=False, compile_core=False):
    model, _, hf, prompts = tiny
    emu = Emulator(model, hf, s2d2, token_budget=budget, max_model_len=max_model_len, static_shapes=static,
                   compile_step=compile_step, compile_core=compile_core)
    emu.step_guard = guard
    reqs = [EmuRequest(f"{id_prefix}{i}", list(p), sp) for i, (p, sp) in enumerate(zip(prompts, sps))]
    for r in reqs:
        emu.add(r)
    n = 0
    while emu.running:
        assert emu.step(), "nothing schedulable"
        n += 1
        assert n < 500, "engine does not terminate"
        if abort and n == abort[0]:
            emu.abort(reqs[abort[1]])
        if preempt and n in preempt[0]:
            for i in preempt[1]:
                if reqs[i] in emu.running:
                    emu.preempt(reqs[i])
    return reqs, emu


def check(tiny, s2d2, sps, **kw):
    reqs, emu = emulate(tiny, s2d2, sps, **kw)
    for r in reqs:
        if r.finish_reason == "abort":
            continue
        assert r.output == reference(tiny, s2d2, r.prompt, r.sampling), (len(r.prompt), r.sampling)
    return reqs, emu


def greedy(**kw):
    return [sampling_params(max_tokens=m, **kw) for m in MAX_TOKENS]


@pytest.mark.parametrize("s2d2", [
    {"verify": False},  # SDAR default: dynamic 0.85, cache_ver + draft_ver
    {"verify": False, "remasking": "low_confidence_static", "denoising_steps": 2},
    {"verify": False, "block_size": 1},  # AR mode
    {"verify": False, "cache_ver": False, "draft_ver": False},  # block-causal prefill and commits
], ids=["dynamic", "static", "ar", "blockcausal"])
def test_greedy_matches_reference(tiny, s2d2):
    reqs, emu = check(tiny, s2d2, greedy())
    assert [len(r.output) for r in reqs] == list(MAX_TOKENS)


def test_dynamic_commits_several_tokens_per_step(tiny):
    _, emu = check(tiny, {"verify": False, "block_size": 8, "confidence_threshold": 0.5},
                   [sampling_params(max_tokens=16) for _ in PROMPT_LENS])
    # 6 requests x 16 tokens in far fewer steps than tokens: the fused commit+draft and multi-token commits work
    assert emu.steps < 16


def test_sampling_with_seeds(tiny):
    check(tiny, {"verify": False}, [sampling_params(max_tokens=m, temperature=1.0, top_k=20, top_p=0.9, seed=i)
                                    for i, m in enumerate(MAX_TOKENS)])


def test_stop_tokens_and_per_request_options(tiny):
    reqs, _ = emulate(tiny, {"verify": False}, [sampling_params(max_tokens=12) for _ in PROMPT_LENS])
    stop = Counter(t for r in reqs for t in r.output).most_common(1)[0][0]
    sps = [sampling_params(max_tokens=12, stop_token_ids=[stop], eos_token_id=500,
                           extra_args={"s2d2": {"remasking": "low_confidence_static"}} if i % 2 else None)
           for i in range(len(PROMPT_LENS))]
    reqs, _ = check(tiny, {"verify": False}, sps)
    assert any(r.finish_reason == "stop" for r in reqs)


def test_truncated_canvases_and_chunked_prefill(tiny):
    check(tiny, {"verify": False}, greedy(), budget=7)


def test_abort_does_not_disturb_others(tiny):
    reqs, _ = check(tiny, {"verify": False}, greedy(), abort=(3, 5))
    assert reqs[5].finish_reason == "abort"


def test_max_model_len_caps_without_hanging(tiny):
    reqs, _ = emulate(tiny, {"verify": False}, [sampling_params(max_tokens=40) for _ in PROMPT_LENS],
                      max_model_len=15)
    for r in reqs:
        assert r.finish_reason == "length" and len(r.prompt) + len(r.output) == 15


def test_preemption_resumes_the_interrupted_block(tiny):
    # requests 1 and 5 are preempted twice (mid-block); vLLM re-prefills prompt + outputs and the model state's
    # snapshot continues the block with its RNG counter: outputs still equal the reference (sampled too)
    sps = [sampling_params(max_tokens=m, temperature=1.0, seed=i) for i, m in enumerate(MAX_TOKENS)]
    check(tiny, {"verify": False}, sps, preempt=({3, 6}, (1, 5)))


# -- Engine II: S2D2 verification ---------------------------------------------------------------------------
S2D2_CASES = {
    "always-greedy": {"verify_policy": "mask_span_length", "acceptance": "greedy"},
    "config-a": {},  # SDAR default = paper Config-A (score_threshold, static, c = 1)
    "hysteresis": {"verify_policy": "score_hysteresis", "score_type": "difference_dynamic"},
    "ucb": {"verify_policy": "contextual_bandit_ucb"},
    "span3-b8": {"verify_policy": "mask_span_length", "min_span_length": 3, "block_size": 8},
}


@pytest.mark.parametrize("case", list(S2D2_CASES))
def test_s2d2_greedy_matches_reference(tiny, case):
    # greedy drafts, but acceptance is random unless acceptance="greedy" (docs/algorithm.md): seed it
    _, emu = check(tiny, S2D2_CASES[case], greedy(seed=7))
    assert emu.verify_forwards > 0  # verification really ran


@pytest.mark.parametrize("case", ["config-a", "ucb"])
def test_s2d2_greedy_without_seed_is_reproducible(tiny, case):
    """The acceptance test is random even for greedy drafts; a temperature-0 request that sets no seed uses
    ``SamplingSpec.default_seed``, so its output is the reference's whatever its request id, its batch or its
    preemptions (a server's greedy request gives the same text every time)."""
    reqs, emu = check(tiny, S2D2_CASES[case], greedy(), preempt=({2, 5}, (1, 4)))
    assert emu.verify_forwards > 0
    others, _ = emulate(tiny, S2D2_CASES[case], greedy(), id_prefix="cmpl-other-")
    assert [r.output for r in others] == [r.output for r in reqs]


def test_s2d2_sampled_matches_reference_with_seeds(tiny):
    sps = [sampling_params(max_tokens=m, temperature=1.0, top_k=20, seed=10 + i) for i, m in enumerate(MAX_TOKENS)]
    _, emu = check(tiny, {"verify_policy": "mask_span_length"}, sps)
    assert emu.verify_forwards > 0


def test_s2d2_mixed_policies_per_request_and_tiny_budget(tiny):
    policies = [{"verify_policy": "mask_span_length"}, {"verify": False}, {"verify_policy": "score_hysteresis"},
                {"verify_policy": "contextual_bandit_ucb"}, {"acceptance": "greedy"}, {}]
    sps = [sampling_params(max_tokens=m, seed=i, extra_args={"s2d2": pol})
           for i, (m, pol) in enumerate(zip(MAX_TOKENS, policies))]
    check(tiny, {}, sps)
    check(tiny, {}, sps, budget=9)  # truncated verify canvases are retried, never half-applied


def test_fixed_order_reductions_keep_engine_equal_to_reference(tiny, monkeypatch):
    """Batch-invariant mode's step math (``VLLM_S2D2_FIXED_ORDER_REDUCTIONS=1``: integer prefix sums, the product
    scan; on CPU the softmax and sums stay torch's): engine = reference for sampled top-k / top-p requests with
    every policy, under a tiny budget."""
    from vllm_s2d2.core import reductions

    monkeypatch.setenv(reductions.FIXED_ORDER_ENV, "1")
    policies = [{"verify_policy": "mask_span_length"}, {"verify_policy": "score_hysteresis"},
                {"verify_policy": "contextual_bandit_ucb"}, {"acceptance": "greedy"}, {}, {"verify": False}]
    sps = [sampling_params(max_tokens=m, temperature=0.8 if i % 2 else 0.0, top_k=30 if i % 3 else 0,
                           top_p=0.9 if i % 2 else 1.0, seed=20 + i, extra_args={"s2d2": pol})
           for i, (m, pol) in enumerate(zip(MAX_TOKENS, policies))]
    _, emu = check(tiny, {}, sps, budget=9)
    assert emu.verify_forwards > 0


def test_s2d2_always_verify_greedy_equals_engine_ar_mode(tiny):
    """Invariant I1 inside the engine: always verify + greedy acceptance + cache_ver == AR mode (block 1)."""
    sps = greedy()
    ar, _ = emulate(tiny, {"verify": False, "block_size": 1}, sps)
    s2, emu = emulate(tiny, {"verify_policy": "mask_span_length", "acceptance": "greedy"}, greedy())
    assert [r.output for r in s2] == [r.output for r in ar]
    stats = emu.stepper.blocks.stats
    assert int(stats[:, 1].sum()) > 0 and int(stats[:, 3].sum()) > 0  # verify steps, accepted drafts


@pytest.mark.parametrize("case", ["span", "hysteresis", "ucb"])
def test_s2d2_preemption_during_verification(tiny, case):
    sps = [sampling_params(max_tokens=m, temperature=1.0, seed=i) for i, m in enumerate(MAX_TOKENS)]
    # The interrupted draft is redone with its own step index, random numbers and routing state (the stateful
    # policies: hysteresis on/off, the UCB statistics): the same tokens as the reference.
    policy = {"span": {"verify_policy": "mask_span_length"}}.get(case) or S2D2_CASES[case]
    # (steps 4 and 8: requests 1 and 4 have outputs by then, so they resume from their snapshots)
    reqs, emu = check(tiny, policy, sps, preempt=({4, 8}, (1, 4)))
    assert all(len(r.output) == r.sampling.max_tokens for r in reqs)
    assert emu.stepper.host_totals()["verify_restarts"] > 0  # (vllm:s2d2_verify_restarts)


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static-shapes"])
def test_verify_math_runs_only_in_steps_with_a_verifying_row(tiny, monkeypatch, static):
    """``StepFlags.verifying`` (the host's copy of the phases after the last step): never False in a step where a
    row is in VERIFY, and False in steps where none is, so those skip the verify math; under mixed policies,
    truncated canvases and preemption during verification, still equal to the reference."""
    import vllm_s2d2.engine.stepper as stepper_mod
    from vllm_s2d2.engine.states import VERIFY

    real = stepper_mod.S2D2Stepper.__dict__["step_fn"].__func__
    seen = []  # (flags.verify, flags.verifying, a row of the batch in VERIFY on the device)

    def observed(ctx, batch, flags):
        rows = batch.slots if batch.valid is None else batch.slots[batch.valid]
        seen.append((flags.verify, flags.verifying, bool((ctx.blocks.phase[rows] == VERIFY).any())))
        return real(ctx, batch, flags)

    monkeypatch.setattr(stepper_mod.S2D2Stepper, "step_fn", staticmethod(observed))
    policies = [{"verify_policy": "mask_span_length"}, {"verify": False}, {"verify_policy": "score_hysteresis"},
                {"verify_policy": "contextual_bandit_ucb"}, {"acceptance": "greedy"}, {}]
    sps = [sampling_params(max_tokens=m, seed=i, temperature=1.0 if i % 2 else 0.0, extra_args={"s2d2": pol})
           for i, (m, pol) in enumerate(zip(MAX_TOKENS, policies))]
    check(tiny, {}, sps, budget=9, static=static, preempt=({4, 8}, (1, 4)))
    assert not [s for s in seen if s[2] and not s[1]]  # no verifying row ever missed
    assert any(s[1] and s[2] for s in seen)  # the verify math ran
    assert any(s[0] and not s[1] for s in seen)  # and was skipped in steps that may verify but had no such row


def test_step_flag_combinations():
    """One CUDA graph per combination: 5 sampling combinations, each without verification, with routing only, and
    with a row in VERIFY (15); ``verifying`` never without ``verify``."""
    from vllm_s2d2.engine.step import StepFlags

    combos = StepFlags.combinations()
    assert len(combos) == len(set(combos)) == 15
    assert all(f.verify or not f.verifying for f in combos)


def test_s2d2_engine_statistics(tiny):
    """Engine counters: verify steps <= draft steps = forwards that verified, accepted <= proposed, and the log
    line the sampler prints."""
    from vllm_s2d2.engine.stats import format_stats

    _, emu = emulate(tiny, {"verify_policy": "mask_span_length"}, greedy(seed=3))
    t = emu.stepper.host_totals()
    assert 0 < t["verify_steps"] <= t["draft_steps"] and t["accepted_tokens"] <= t["proposed_tokens"]
    assert t["verify_steps"] == emu.verify_forwards
    assert t["committed_blocks"] > 0
    line = format_stats(t)
    assert line.startswith("S2D2 stats:") and f"verify steps {t['verify_steps']}" in line
    # what /metrics gets (vllm:s2d2_* counters, polled through the worker extension)
    from types import SimpleNamespace

    from vllm_s2d2.engine.worker_ext import S2D2WorkerExtension

    worker = SimpleNamespace(model_runner=SimpleNamespace(model_state=SimpleNamespace(stepper=emu.stepper)))
    assert S2D2WorkerExtension.s2d2_engine_totals(worker) == t
    _, base = emulate(tiny, {"verify": False}, greedy())
    tb = base.stepper.host_totals()
    assert tb["verify_steps"] == 0 and tb["proposed_tokens"] == 0 and tb["draft_steps"] > 0


@pytest.mark.parametrize("budget", [4096, 9])
def test_static_shape_step_matches_reference(tiny, budget):
    """The CUDA-graph step path (static buffers, batch padded to a power of two with SCRATCH rows, verification
    computed for every row) run eagerly on CPU: same outputs as the reference, padding adds nothing to the
    counters."""
    policies = [{"verify_policy": "mask_span_length"}, {"verify": False}, {"verify_policy": "score_hysteresis"},
                {"verify_policy": "contextual_bandit_ucb"}, {"acceptance": "greedy"}, {}]
    sps = [sampling_params(max_tokens=m, seed=i, temperature=1.0 if i % 2 else 0.0, top_k=5 if i == 3 else 0,
                           top_p=0.9 if i == 5 else 1.0, extra_args={"s2d2": pol})
           for i, (m, pol) in enumerate(zip(MAX_TOKENS, policies))]
    _, emu = check(tiny, {}, sps, budget=budget, static=True)
    assert emu.verify_forwards > 0
    _, eager = emulate(tiny, {}, sps, budget=budget)
    assert emu.stepper.host_totals() == eager.stepper.host_totals()


def test_per_request_statistics_equal_the_reference(tiny):
    """Each request's counters (what ``vllm_s2d2.request_stats`` returns) equal the reference decoder's: verify
    steps, proposed and accepted span tokens; policies mixed per request, seeded.  Outputs end on a block boundary:
    a request ending mid-block finishes in the engine as soon as its last token is final, while the reference
    decoder completes the block first (same tokens, possibly more verify steps)."""
    B = tiny[1].block_size
    policies = [{"verify_policy": "mask_span_length"}, {"verify": False}, {"verify_policy": "score_hysteresis"},
                {"verify_policy": "contextual_bandit_ucb"}, {"acceptance": "greedy"}, {}]
    sps = [sampling_params(max_tokens=(B - n % B) % B + 2 * B, seed=20 + i, extra_args={"s2d2": pol})
           for i, (n, pol) in enumerate(zip(PROMPT_LENS, policies))]
    reqs, _ = emulate(tiny, {}, sps)
    total_verified = 0
    for r in reqs:
        ref = reference_output(tiny, {}, r.prompt, r.sampling).stats
        got = r.stats
        assert r.output == reference(tiny, {}, r.prompt, r.sampling)
        assert (got["verify_steps"], got["proposed_tokens"], got["accepted_tokens"]) == (
            ref.verify_steps, ref.proposed_tokens, ref.accepted_tokens), (r.sampling.extra_args, got, ref)
        # the demo's and the quality harness's forward accounting: the reference decoder's forwards, kind by kind
        fw = reference_forwards(got)
        assert (fw["prefill"], fw["draft"], fw["verify"], fw["commit"]) == (
            ref.prefill_forwards, ref.draft_forwards, ref.verify_forwards, ref.commit_forwards), (got, ref)
        total_verified += got["verify_steps"]
    assert total_verified > 0


# -- no host reads in a decode step ------------------------------------------------------------------------
from sync_guard import HostRead, no_host_reads  # noqa: E402


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static-shapes"])
def test_decode_steps_read_nothing_back_from_the_device(tiny, static):
    """Every decode-only step (the model state's attention plan and positions, the sampler and the stepper) runs
    under a guard that raises on any host read of tensor values, for mixed policies, sampled and greedy rows,
    top-k / top-p, verification and truncated canvases; the outputs still equal the reference."""
    policies = [{"verify_policy": "mask_span_length"}, {"verify": False}, {"verify_policy": "score_hysteresis"},
                {"verify_policy": "contextual_bandit_ucb"}, {"acceptance": "greedy"}, {}]
    sps = [sampling_params(max_tokens=m, seed=i, temperature=1.0 if i % 2 else 0.0, top_k=20 if i == 1 else 0,
                           top_p=0.9 if i == 3 else 1.0, extra_args={"s2d2": pol})
           for i, (m, pol) in enumerate(zip(MAX_TOKENS, policies))]
    for budget in (4096, 9):
        _, emu = check(tiny, {}, sps, budget=budget, static=static, guard=no_host_reads)
        assert emu.guarded_steps > 0 and emu.verify_forwards > 0


def test_the_guard_catches_a_host_read_inside_the_step(tiny, monkeypatch):
    """The guard covers the step: a step that reads one device value (as the engine did until the phases of the
    coming step stopped being mirrored to the host) fails."""
    import vllm_s2d2.engine.stepper as stepper_mod

    real = stepper_mod.decode_step

    def reads_phase(ctx, batch, flags):
        bool((ctx.blocks.phase[batch.slots] == 2).any())  # what `phase_host` used to provide
        return real(ctx, batch, flags)

    monkeypatch.setattr(stepper_mod.S2D2Stepper, "step_fn", staticmethod(reads_phase))
    with pytest.raises(HostRead):
        emulate(tiny, {}, greedy(), guard=no_host_reads)
