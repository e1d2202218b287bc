"""Test helpers: tiny random-weight checkpoints of every family (CPU-only, no network).

See :mod:`vllm_s2d2.testing.checkpoints` and :mod:`vllm_s2d2.testing.qwen_tokenizer`.
"""

from .checkpoints import (
    FAMILIES,
    SMALL_VOCAB_SIZE,
    as_plain_ar,
    as_plain_qwen3,
    build_plain_qwen3_checkpoint,
    build_tiny_checkpoint,
    expected_tensor_shapes,
    small_vocab_id,
    tiny_config,
    write_synthetic_tokenizer,
)

__all__ = [
    "FAMILIES",
    "SMALL_VOCAB_SIZE",
    "as_plain_ar",
    "as_plain_qwen3",
    "build_plain_qwen3_checkpoint",
    "build_tiny_checkpoint",
    "expected_tensor_shapes",
    "small_vocab_id",
    "tiny_config",
    "write_synthetic_tokenizer",
]
