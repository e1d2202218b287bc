"""Loggers for the plugin's modules, under vLLM's ``vllm`` logger.

vLLM configures only the ``vllm`` logger hierarchy (its handler, format and ``VLLM_LOGGING_LEVEL``); a logger named
``vllm_s2d2.…`` has no handler, so its INFO lines vanish (found on the GPU host: the worker's periodic S2D2 line never
appeared in a server log).  ``get_logger("vllm_s2d2.engine.sampler")`` is ``vllm.s2d2.engine.sampler``.
"""

from __future__ import annotations

import logging


def get_logger(module: str) -> logging.Logger:
    from vllm.logger import init_logger

    return init_logger("vllm.s2d2." + module.removeprefix("vllm_s2d2."))
