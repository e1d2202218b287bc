"""Eager reference decoder over a dense, cache-free forward: the oracle for the vLLM engine."""

from vllm_s2d2.reference.decoder import DecodeStats, ReferenceOutput, generate

__all__ = ["DecodeStats", "ReferenceOutput", "generate"]
