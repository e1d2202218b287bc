"""Triton kernels the decode math calls (leaf package: imports nothing from ``vllm_s2d2``)."""
