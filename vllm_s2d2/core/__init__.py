"""The S2D2 algorithm as batched pure-torch functions (no vLLM, no transformers, no host syncs).

Modules: ``sampling`` (transform + draw), ``rng`` (counter-based uniforms), ``unmasking`` (commit rules),
``spans`` (first masked run), ``estimators`` (alpha, K-hat), ``policies`` (routing + state),
``acceptance`` (min(1, q/p) + residual), ``masks`` (dense reference masks), ``params`` (per-request
tensors, family rules), ``step`` (one S2D2 step).
"""
