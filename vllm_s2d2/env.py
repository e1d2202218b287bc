"""Environment switches read by more than one layer (a leaf module: imports nothing from ``vllm_s2d2``)."""

from __future__ import annotations

import os


def env_switch(name: str, default: bool) -> bool:
    """A 0 / 1 switch from the environment: "1" on, "0" off, unset or empty ``default``.  Any other value is a
    ``ValueError`` naming the variable."""
    value = os.environ.get(name, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{name} must be 0 or 1 (or unset), got {value!r}")
    return default if value == "" else value == "1"
