"""The decode step's integer stages as compiled kernels.

A decode step is a few hundred small tensor operations around the model math: phase rules, the block
lifecycle, the next state and canvas, the counters (:func:`.step.prepare` and :func:`.step.settle`).  Inside the
step's CUDA graph each is its own kernel, and at small batches their launches, not the model, set the step's
time.  ``torch.compile`` (Inductor) fuses each stage into a few kernels.

Only stages without floating-point arithmetic are compiled: integer and boolean operations, comparisons,
selections and gathers give the same bits however they are fused, so the compiled step still equals the
reference decoder.  The sampling transform, the estimators, the acceptance test and the bandit (``core.step``)
stay eager, where fusing could change a rounding -- unless ``VLLM_S2D2_COMPILE_CORE=1`` (experimental, off by
default) compiles that middle too, to measure what its few hundred kernels per step cost.

On a CUDA device the SDAR, Fast-dLLM v2 and LLaDA2 engines compile the stages whenever vLLM compiles the model
(its compilation mode is not NONE: ``enforce_eager=True``, ``-cc.mode=none`` and ``TORCH_COMPILE_DISABLE=1`` turn
both off); ``VLLM_S2D2_COMPILE_STEP=0`` / ``=1`` forces the step's choice either way (``docs/architecture.md``,
"Stepper").  Compiling happens in the warm-up before each step graph is captured, at start-up.  D2F's window step
is not split this way yet.
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch

from vllm_s2d2.env import env_switch

F = TypeVar("F", bound=Callable)

COMPILE_ENV = "VLLM_S2D2_COMPILE_STEP"
ON_MESSAGE = "S2D2 decode step: prepare and settle stages compiled (VLLM_S2D2_COMPILE_STEP=0 turns it off)"
# Experimental, off by default: the floating-point middle of the step (``step.core_math``) compiled as well.
CORE_ENV = "VLLM_S2D2_COMPILE_CORE"
CORE_MESSAGE = ("S2D2 decode step: the model math compiled too (VLLM_S2D2_COMPILE_CORE=1, experimental: fused "
                "floating point may round differently from the reference decoder)")

# Graph variants a stage may need: batch size 1 and >1 (Inductor specialises size 1), the sampled / verifying
# flags (prepare), each family layout.
_RECOMPILE_LIMIT = 128  # (the compiled model math also specialises on every StepFlags combination)


@functools.cache
def _compiled(fn: F) -> F:
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, _RECOMPILE_LIMIT)
    return torch.compile(fn, dynamic=True, fullgraph=True)


def stage(fn: F, compiled: bool) -> F:
    """``fn`` itself, or its compiled version when ``compiled`` (built once per function, on first use)."""
    return _compiled(fn) if compiled else fn


def wanted(device: torch.device, model_compiled: bool) -> bool:
    """Whether the step compiles its integer stages: only on a CUDA device; ``$VLLM_S2D2_COMPILE_STEP`` "1" / "0"
    forces yes / no, unset (or empty) follows ``model_compiled`` (vLLM compiles the model).  Any other value is a
    ``ValueError`` naming the variable."""
    return env_switch(COMPILE_ENV, model_compiled) and torch.device(device).type == "cuda"


def core_wanted(step_compiled: bool) -> bool:
    """Whether the step's floating-point middle is compiled too: only with ``$VLLM_S2D2_COMPILE_CORE`` = "1" and
    the integer stages compiled.  Off by default: Inductor's fused kernels may round the sampling transform, the
    estimators and the acceptance test differently from the eager reference decoder.  Any value but "", "0",
    "1" is a ``ValueError`` naming the variable."""
    return env_switch(CORE_ENV, False) and step_compiled
