"""What the family soaks of ``tests/gpu/test_soak.py`` serve: a tiny random checkpoint of each other family (the
demo checkpoint covers SDAR), built as the family tests build them (fp32, ``init_std`` 0.4, the synthetic byte
tokenizer, widened where vLLM's Triton attention needs ``head_dim`` >= 32).  No CUDA import: the CPU test
``tests/test_soak_families.py`` checks that every soak policy and bad input means what the soak expects for each of
these engines."""

from __future__ import annotations

D2F_S2D2 = {"method": "s2d2", "max_active_blocks": 3, "block_add_threshold": 0.25}  # test_engine_d2f_gpu.S2D2

FAMILY_SOAKS: dict[str, dict] = {
    # family -> block size of the checkpoint, the server's --speculative-config, checkpoint config overrides
    "fast_dllm_v2": {"block": 8, "speculative_config": {"method": "s2d2"}, "config": {"hidden_size": 128}},
    "llada2": {"block": 4, "speculative_config": {"method": "s2d2"}, "config": {}},
    "d2f_dream": {"block": 4, "speculative_config": D2F_S2D2, "config": {"hidden_size": 128}},
}
