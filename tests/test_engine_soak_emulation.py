"""A small soak of the engine on CPU: the GPU soak's mix (``benchmarks/soak.py``) through the emulated scheduler.

Requests arrive while others run (more requests than slots), each with its own routing policy, acceptance and
sampling (greedy with and without a seed, seeded sampling with top-k / top-p), mixed prompt and output lengths;
a small token budget cuts prefills and canvases; a resume finds its cached prefix blocks (vLLM's prefix cache,
SDAR); at random steps running requests are preempted (mid-block and
mid-verification: they re-prefill prompt + outputs from their saved state) and a few are aborted.  Every request
that finishes must equal the reference decoder run alone, token for token.  SDAR (block engine, chunked
prefills), Fast-dLLM v2 and LLaDA2 (block engines) and D2F on both bases (window engine, whole-prompt prefills).  The emulator computes every request's
forward on its own, so nothing depends on the batch: a mismatch here is a lost state, not a near tie that flipped
(as on a GPU).
"""

from __future__ import annotations

import os
import random
import sys

import pytest

pytest.importorskip("vllm")

sys.path.insert(0, os.path.dirname(__file__))
from engine_emulator import Emulator, EmuRequest, sampling_params  # noqa: E402
from test_engine_d2f import BASE as D2F_BASE  # noqa: E402
from test_engine_d2f import _tiny as d2f_tiny  # noqa: E402
from test_engine_emulation import reference, tiny  # noqa: E402,F401 - the tiny SDAR checkpoint fixture

from vllm_s2d2.families import BY_NAME  # noqa: E402

POLICIES = {
    "server_default": None,  # the engine's config: SDAR Config-A
    "threshold_no_verify": {"verify": False},
    "mask_span_length": {"verify_policy": "mask_span_length"},
    "score_hysteresis": {"verify_policy": "score_hysteresis", "score_type": "difference_dynamic"},
    "contextual_bandit_ucb": {"verify_policy": "contextual_bandit_ucb"},
    "greedy_acceptance": {"verify_policy": "mask_span_length", "acceptance": "greedy"},
    "static_remasking": {"remasking": "low_confidence_static", "verify_policy": "mask_span_length"},
}


# D2F (a window of blocks; whole-prompt prefills): its own engine options, the policies that apply to it
D2F_POLICIES = {name: POLICIES[name] for name in ("server_default", "threshold_no_verify", "mask_span_length",
                                                  "contextual_bandit_ucb", "greedy_acceptance")}


def _request(rng: random.Random, i: int, policies: dict = POLICIES, vocab: int = 500,
             prompt_pool: list[list[int]] | None = None) -> EmuRequest:
    prompt = list(rng.choice(prompt_pool)) if prompt_pool else [rng.randrange(vocab) for _ in range(rng.randint(1, 12))]
    policy = rng.choice(sorted(policies))
    extra = {"s2d2": policies[policy]} if policies[policy] else None
    kind = rng.choice(["greedy", "greedy_seeded", "sampled"])
    sampling = dict(temperature=0.0) if kind.startswith("greedy") else dict(
        temperature=rng.choice([0.7, 1.0]), top_k=rng.choice([0, 20]), top_p=rng.choice([1.0, 0.9]))
    seed = None if kind == "greedy" else rng.randrange(1000)
    sp = sampling_params(max_tokens=rng.randint(1, 24), seed=seed, extra_args=extra, **sampling)
    req = EmuRequest(f"cmpl-soak-{i}", prompt, sp)
    req.policy, req.kind = policy, kind
    return req


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mixed_load_with_preemptions_equals_the_reference(tiny, seed):
    soak(tiny, {}, POLICIES, 500, seed, budgets=[9, 13, 24], prefix_cache_block=4)


@pytest.mark.parametrize("seed", [0, 1])
def test_shared_prefix_cache_equals_the_reference(tiny, seed):
    """Prompts from a pool of three, so requests find blocks other requests computed: a new request its prompt's
    blocks, a resumed one also generated blocks of an earlier request with the same prompt and sampling.  The
    emulator checks that every computed position's KV holds the request's token and was computed from the tokens
    its keys hold now (no stale KV), and every output equals the reference."""
    soak(tiny, {}, POLICIES, 500, seed, budgets=[9, 13, 24], prefix_cache_block=4, prompt_pool_size=3)


@pytest.mark.parametrize("family", ["d2f_llada", "d2f_dream"])
def test_d2f_mixed_load_with_preemptions_equals_the_reference(tmp_path_factory, family):
    # D2F prefills whole prompts (prompt + outputs after a preemption: up to 36 tokens here), so the budget
    # must hold one; it still cuts canvases (a window canvas is up to 3 blocks of 4, plus the carried row)
    soak(d2f_tiny(tmp_path_factory, family), dict(D2F_BASE), D2F_POLICIES, 400, 0, budgets=[40, 48])


def family_policies(family: str) -> dict:
    """The policies above whose routing rule ``family`` defines (LLaDA2 has no bandit): what its server accepts."""
    return {name: opts for name, opts in POLICIES.items()
            if (opts or {}).get("verify_policy", BY_NAME[family].policies[0]) in BY_NAME[family].policies}


@pytest.mark.parametrize("family", ["fast_dllm_v2", "llada2"])
def test_family_mixed_load_with_preemptions_equals_the_reference(tmp_path_factory, family):
    """The GPU family soaks' mix (tests/gpu/test_soak.py::test_family_soak_under_kv_pressure) on CPU: Fast-dLLM v2
    (block 8 = two sub-blocks of 4, shifted logits) and LLaDA2 (block 4)."""
    from test_engine_families import _family

    # neither family's default keeps AR-like committed KV (cache_ver false), so vLLM prefills whole prompts
    # (prompt + outputs after a preemption: up to 36 tokens here) and the budget must hold one, as for D2F; six
    # canvases of up to 9 rows still overrun it, so later requests of a step get cut canvases
    soak(_family(tmp_path_factory, family, 8 if family == "fast_dllm_v2" else 4), {}, family_policies(family), 400,
         0, budgets=[40, 48])


def soak(tiny, engine: dict, policies: dict, vocab: int, seed: int, budgets: list[int],
         prefix_cache_block: int | None = None, prompt_pool_size: int = 0) -> None:
    model, _, hf, _ = tiny
    rng = random.Random(seed)
    emu = Emulator(model, hf, engine, max_num_reqs=6, token_budget=rng.choice(budgets), max_model_len=64,
                   prefix_cache_block=prefix_cache_block, shared_prefix_cache=prompt_pool_size > 0)
    pool = [[rng.randrange(vocab) for _ in range(rng.randint(9, 13))] for _ in range(prompt_pool_size)]
    waiting = [_request(rng, i, policies, vocab, pool) for i in range(14)]
    done: list[EmuRequest] = []
    preemptions = steps = aborts = 0
    while waiting or emu.running:
        while waiting and emu.free:
            emu.add(waiting.pop(0))
        before = list(emu.running)
        assert emu.step(), "nothing schedulable"
        steps += 1
        assert steps < 2000, "the engine does not terminate"
        done += [r for r in before if r.finished]
        running = [r for r in emu.running if not r.finished]
        if running and rng.random() < 0.35:
            emu.preempt(rng.choice(running))
            preemptions += 1
        if running and aborts < 2 and rng.random() < 0.02:
            emu.abort(rng.choice(emu.running))
            aborts += 1
    assert preemptions >= 5
    assert emu.stepper.host_totals()["verify_restarts"] > 0  # some preemption interrupted a verification
    assert (emu.prefix_hits > 0) == bool(prefix_cache_block)
    assert (emu.shared_hits > 0) == (prompt_pool_size > 0)
    finished = [r for r in done if r.finish_reason != "abort"]
    assert len(finished) == 14 - aborts
    mismatched = [(r.req_id, r.policy, r.kind) for r in finished
                  if r.output != reference(tiny, engine, r.prompt, r.sampling)]
    assert not mismatched, mismatched
