"""Block-diffusion model classes registered with vLLM's ``ModelRegistry`` by :func:`vllm_s2d2.register`."""
