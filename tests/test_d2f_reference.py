"""The D2F reference decoder (``vllm_s2d2/reference/d2f.py``) on tiny random D2F checkpoints of both bases.

Invariants (``docs/plans/d2f.md`` §6), exact in fp32 on CPU:

* lossless: always-verify + greedy acceptance + ``cache_ver`` + ``verify_block_size`` 1 + ``decoded_token_threshold``
  1.0 gives the tokens of AR decoding (block size 1) token for token, while several blocks are active at once;
* ``block_add_threshold`` 1.0 never has two active blocks and equals plain D2F block decoding, checked against
  an independent per-block loop written here with dense masks.
"""

from __future__ import annotations

import pytest
import torch

from vllm_s2d2.configs import load_family_info
from vllm_s2d2.core.params import SamplingSpec
from vllm_s2d2.families import BY_NAME
from vllm_s2d2.reference import generate
from vllm_s2d2.reference.models import ReferenceModel
from vllm_s2d2.s2d2_config import S2D2Config
from vllm_s2d2.testing.checkpoints import build_tiny_checkpoint

GREEDY = SamplingSpec(temperature=0.0, seed=0)
PROMPTS = [[5, 17, 42], [7, 8, 9, 10, 11], list(range(20, 33))]
FAMILIES = ("d2f_llada", "d2f_dream")


@pytest.fixture(scope="module")
def d2f(tmp_path_factory):
    out = {}
    for fam in FAMILIES:
        path = build_tiny_checkpoint(fam, tmp_path_factory.mktemp(fam), small_vocab=True, dtype=torch.float32,
                                     init_std=0.5, seed=3)
        out[fam] = (ReferenceModel.load(path), load_family_info(path))
    return out


def lossless(**kw) -> S2D2Config:
    base = dict(block_size=4, verify_policy="mask_span_length", min_span_length=1, acceptance="greedy",
                cache_ver=True, verify_block_size=1, decoded_token_threshold=1.0, block_add_threshold=0.25,
                max_active_blocks=3)
    base.update(kw)
    return S2D2Config(**base)


def ar_mode() -> S2D2Config:
    return S2D2Config(block_size=1, verify=False, cache_ver=True, block_add_threshold=1.0, max_active_blocks=2)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("add", [0.25, 0.5])
def test_lossless_equals_ar_with_pipelining(d2f, family, add):
    model, info = d2f[family]
    ar = generate(model, info, PROMPTS, ar_mode(), GREEDY, max_tokens=18, ignore_eos=True)
    spec = generate(model, info, PROMPTS, lossless(block_add_threshold=add), GREEDY, max_tokens=18, ignore_eos=True)
    for a, s in zip(ar, spec):
        assert s.token_ids == a.token_ids
        assert a.stats.max_active_blocks == 1
    assert max(s.stats.max_active_blocks for s in spec) >= 2  # pipelining happened
    assert all(s.stats.verify_steps == s.stats.steps for s in spec)  # always verified
    assert sum(s.stats.steps for s in spec) < sum(a.stats.steps for a in ar)


@pytest.mark.parametrize("family", FAMILIES)
def test_lossless_across_window_sizes(d2f, family):
    model, info = d2f[family]
    ar = generate(model, info, PROMPTS[:2], ar_mode(), GREEDY, max_tokens=13, ignore_eos=True)
    for A in (1, 2, 4):
        spec = generate(model, info, PROMPTS[:2], lossless(max_active_blocks=A, block_add_threshold=0.1), GREEDY,
                        max_tokens=13, ignore_eos=True)
        assert [s.token_ids for s in spec] == [a.token_ids for a in ar]
        assert max(s.stats.max_active_blocks for s in spec) <= A


def _plain_block_decoding(model, info, prompt, B, skip, max_tokens, cache_ver):
    """Independent D2F decoding with one block at a time: each block from the prompt end is decoded with the
    threshold rule (p > skip, else the most confident mask), then committed (block-causal or token-causal KV)."""
    mask = info.mask_token_id
    P = len(prompt)
    seq = list(prompt)
    while len(seq) - P < max_tokens:
        block = [mask] * B
        while mask in block:
            ids = torch.tensor(seq + block)
            n, c = ids.numel(), len(seq)
            vis = torch.zeros(n, n, dtype=torch.bool)
            q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
            gen_q, gen_k = (q - P).clamp_min(0) // B, (k - P).clamp_min(0) // B
            committed = (k <= q) if cache_ver else (gen_k <= gen_q)
            vis[:, :] = (k < P) | ((q >= P) & (k >= P) & committed)
            vis[c:, c:] = True  # the open block: bidirectional
            vis[:P, P:] = False
            logits = model.logits(ids, torch.arange(n), vis, rows=torch.arange(c - 1, n))
            logits[:, mask] = float("-inf")
            # row j of `logits` is position c - 1 + j; aligned: position c + i reads row i + 1, shifted: row i.
            rows = logits[:B] if info.shifted else logits[1:]
            probs = rows.softmax(-1)
            p0, x0 = probs.max(-1)
            masked = torch.tensor([t == mask for t in block])
            take = masked & (p0 > skip)
            if not take.any():
                take = torch.zeros_like(masked)
                take[torch.where(masked, p0, torch.full_like(p0, -1.0)).argmax()] = True
            block = [int(x0[i]) if take[i] else block[i] for i in range(B)]
        seq += block
    return seq[P:P + max_tokens]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cache_ver", [False, True])
def test_one_block_at_a_time_is_plain_block_decoding(d2f, family, cache_ver):
    model, info = d2f[family]
    cfg = S2D2Config(block_size=4, verify=False, cache_ver=cache_ver, block_add_threshold=1.0,
                     confidence_threshold=0.3, max_active_blocks=3)
    outs = generate(model, info, PROMPTS, cfg, GREEDY, max_tokens=14, ignore_eos=True)
    for prompt, out in zip(PROMPTS, outs):
        assert out.stats.max_active_blocks == 1
        assert out.token_ids == _plain_block_decoding(model, info, prompt, 4, 0.3, 14, cache_ver)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_policy_and_estimator_runs_and_is_seeded(d2f, family):
    model, info = d2f[family]
    fam = BY_NAME[family]
    sampled = [SamplingSpec(temperature=1.0, top_k=20, seed=11), SamplingSpec(temperature=0.0, seed=0)]
    for policy in fam.policies:
        for estimator in fam.estimators:
            span = dict(min_span_length=2) if policy == "mask_span_length" else {}
            cfg = S2D2Config(block_size=4, verify_policy=policy, token_acceptance_estimator=estimator,
                             block_add_threshold=0.25, **span)
            first = generate(model, info, PROMPTS[:2], cfg, sampled, max_tokens=10, ignore_eos=True)
            again = generate(model, info, PROMPTS[:2], cfg, sampled, max_tokens=10, ignore_eos=True)
            assert [o.token_ids for o in first] == [o.token_ids for o in again]
            assert all(len(o.token_ids) == 10 for o in first)
            alone = generate(model, info, PROMPTS[1:2], cfg, sampled[1:], max_tokens=10, ignore_eos=True)
            assert alone[0].token_ids == first[1].token_ids  # batch composition does not matter


@pytest.mark.parametrize("family", FAMILIES)
def test_d2f_knobs_change_decoding_and_run(d2f, family):
    model, info = d2f[family]
    seeded = SamplingSpec(temperature=1.0, seed=5)
    base = dict(block_size=4, block_add_threshold=0.25, max_active_blocks=3)
    runs = {}
    for name, extra in [("plain", {}), ("no_resample", dict(allow_resample=False)),
                        ("gate", dict(accept_min_draft_confidence=0.5)), ("resample_q", dict(resample_min_q=0.3)),
                        ("runs", dict(partial_accept_run=2)), ("topup", dict(min_tokens_per_step=2))]:
        out = generate(model, info, PROMPTS, S2D2Config(**base, **extra), seeded, max_tokens=12, ignore_eos=True)
        assert all(len(o.token_ids) == 12 for o in out)
        runs[name] = [o.token_ids for o in out]
    assert runs["topup"] != runs["plain"] or runs["gate"] != runs["plain"]


def test_verify_block_size_generalises_the_2l_mask(d2f):
    model, info = d2f["d2f_llada"]
    outs = generate(model, info, PROMPTS, lossless(verify_block_size=2, acceptance="stochastic"),
                    SamplingSpec(temperature=1.0, seed=2), max_tokens=12, ignore_eos=True)
    assert all(o.stats.verify_steps > 0 and len(o.token_ids) == 12 for o in outs)


@pytest.mark.parametrize("family", FAMILIES)
def test_stops_end_the_output(d2f, family):
    model, info = d2f[family]
    cfg = S2D2Config(block_size=4, block_add_threshold=0.25)
    free = generate(model, info, PROMPTS, cfg, GREEDY, max_tokens=16, ignore_eos=True)
    for prompt, out in zip(PROMPTS, free):
        stop = out.token_ids[5]
        first = out.token_ids.index(stop)
        stopped = generate(model, info, [prompt], cfg, GREEDY, max_tokens=16, stop_token_ids=[stop])[0]
        assert stopped.finish_reason == "stop"
        assert stopped.token_ids[-1] == stop and stop not in stopped.token_ids[:-1]
        assert len(stopped.token_ids) <= 16 and first >= 0


@pytest.mark.parametrize("bad,match", [
    (dict(sub_block_size=2), "sub_block_size"),
    (dict(draft_ver=True), "draft_ver"),
    (dict(min_span_length=13, max_active_blocks=3), "min_span_length"),
])
def test_bad_d2f_options_are_clear_errors(d2f, bad, match):
    model, info = d2f["d2f_llada"]
    with pytest.raises(ValueError, match=match):
        generate(model, info, PROMPTS, S2D2Config(block_size=4, **bad), GREEDY, max_tokens=4)


def test_dream_needs_verify_block_size_one(d2f):
    model, info = d2f["d2f_dream"]
    with pytest.raises(ValueError, match="verify_block_size"):
        generate(model, info, PROMPTS, S2D2Config(block_size=4, verify_block_size=2), GREEDY, max_tokens=4)
