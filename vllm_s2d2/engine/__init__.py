"""vLLM-facing engine: config hook, model state, sampler and the block-diffusion state machine.

``settings``, ``stepper`` and ``attention`` import nothing from vLLM (unit-testable anywhere);
``config_hooks``, ``model_state`` and ``sampler`` are imported only inside vLLM processes.
"""
