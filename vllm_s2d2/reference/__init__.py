"""Eager reference decoder over a dense, cache-free forward: the oracle for the vLLM engine.

Names are loaded on first use, so ``python -m vllm_s2d2.reference --help`` does not import torch."""

from __future__ import annotations

import importlib

__all__ = ["DecodeStats", "ReferenceOutput", "generate"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("vllm_s2d2.reference.decoder"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
