"""Device operations per decode step, counted on CPU, by stage of ``engine/step.py:decode_step``.

On a GPU every operation of the step is one kernel inside the step's CUDA graph, and at small batches their
number, not the model, sets much of the step's time.  This counts them without a GPU: the tiny SDAR checkpoint
runs through the CPU emulation of the engine (``tests/engine_emulator.py``: the plugin's real stepper, sampler
and attention plan) with static shapes (the CUDA-graph path), and a ``TorchDispatchMode`` counts every aten
operation of each decode step, filed under ``prepare``, ``settle`` (the integer stages the engine compiles on a
GPU, ``engine/compiled_step.py``) or ``core`` (everything else: the floating-point model math of ``core.step``
and the engine's glue around it).  View operations (``view``, ``select``, ``unsqueeze``...) are counted too:
they launch no kernel, so the figures bound the kernel count from above.

    python benchmarks/step_ops.py                    # static, verify and sampled, one request, JSON on stdout
    python benchmarks/step_ops.py --modes static --out ops.json

Reported per mode: the median step's total and per-stage counts (every decode step of a mode issues the same
operations, so median = min = max unless a step changes phase).
"""

from __future__ import annotations

import collections
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from vllm_s2d2.log import ArgumentParser  # noqa: E402 - stdlib only

STAGES = ("prepare", "settle")
MODES = {
    "static": ({"verify": False, "remasking": "low_confidence_static", "denoising_steps": 4}, {}),
    "verify": ({"verify_policy": "mask_span_length", "min_span_length": 1}, {}),
    "sampled": ({"verify_policy": "mask_span_length", "min_span_length": 1},
                {"temperature": 1.0, "seed": 1, "top_k": 20, "top_p": 0.9}),
}


def _stage_of(frame) -> str:
    """The stage whose code is on the stack (the innermost ``engine/step.py`` stage), else ``core``."""
    while frame is not None:
        code = frame.f_code
        if code.co_name in STAGES and code.co_filename.endswith(os.path.join("engine", "step.py")):
            return code.co_name
        frame = frame.f_back
    return "core"


def count_mode(model_dir: str, s2d2: dict, sampling: dict, max_tokens: int = 24) -> dict:
    """Operations per decode step of one request decoded with ``s2d2`` (an S2D2Config dict) and ``sampling``."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    import vllm_s2d2.engine.stepper as stepper_mod
    from engine_emulator import EmuRequest, Emulator, sampling_params
    from vllm_s2d2.reference.models import ReferenceModel

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.by_stage: collections.Counter = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.by_stage[_stage_of(sys._getframe(1))] += 1
            return func(*args, **(kwargs or {}))

    with open(os.path.join(model_dir, "config.json")) as f:
        hf = json.load(f)
    model = ReferenceModel.load(model_dir)
    steps: list[collections.Counter] = []
    saved = stepper_mod.S2D2Stepper.__dict__["step_fn"]  # the staticmethod itself, to put back as it was
    real = saved.__func__

    def counted(ctx, batch, flags):
        mode = Count()
        with mode:
            out = real(ctx, batch, flags)
        steps.append(mode.by_stage)
        return out

    stepper_mod.S2D2Stepper.step_fn = staticmethod(counted)
    try:
        emu = Emulator(model, hf, s2d2, static_shapes=True)
        prompt = torch.randint(0, 500, (11,), generator=torch.Generator().manual_seed(0)).tolist()
        emu.add(EmuRequest("r0", prompt, sampling_params(max_tokens=max_tokens, **sampling)))
        while emu.running:
            if not emu.step():
                raise RuntimeError("the emulated engine scheduled nothing")
    finally:
        stepper_mod.S2D2Stepper.step_fn = saved
    totals = sorted(sum(s.values()) for s in steps)
    median = totals[len(totals) // 2]
    step = next(s for s in steps if sum(s.values()) == median)
    return {"steps": len(steps), "ops_per_step": median, "min": totals[0], "max": totals[-1],
            "by_stage": {k: step.get(k, 0) for k in (*STAGES, "core")}}


def main(argv: list[str] | None = None) -> dict:
    ap = ArgumentParser(prog="benchmarks/step_ops.py", description=__doc__.split("\n")[0])
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {list(MODES)}")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        ap.error(f"argument --modes: must be comma-separated modes from {list(MODES)}; got {args.modes!r}")
    from engine_helpers import build_tiny_checkpoint  # the engine tests' tiny SDAR checkpoint

    with tempfile.TemporaryDirectory(prefix="s2d2_step_ops_") as tmp:
        model_dir = build_tiny_checkpoint(os.path.join(tmp, "sdar"), "sdar")
        record = {"benchmark": "step_ops", "model": "tiny SDAR (tests/engine_helpers.py), one request, static shapes",
                  "modes": {m: {"s2d2": MODES[m][0], "sampling": MODES[m][1],
                                **count_mode(model_dir, *MODES[m])} for m in modes}}
    text = json.dumps(record, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return record


if __name__ == "__main__":
    main()
