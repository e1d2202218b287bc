"""Attention paths of the plugin over vLLM's paged KV cache."""
