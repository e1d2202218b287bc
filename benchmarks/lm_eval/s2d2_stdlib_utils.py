"""Dataset and scoring of the ``s2d2_stdlib`` lm-eval task (``s2d2_stdlib.yaml`` beside this file).

The documents are the demo checkpoint's held-out prompts (``assets/sdar-stdlib-10m/heldout_prompts.jsonl``: a
stdlib function's header + docstring and the 8 source lines that follow, from modules the model never saw);
the scores are ``benchmarks/quality.py``'s: exact match of the first (``em1``) and of the first two (``em2``)
non-blank generated lines with the source, and ``sim1`` (difflib ratio of the first lines).  Standard library
only (plus ``datasets``, which lm-eval installs); lm-eval loads this file by path.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

DEFAULT_PROMPTS = Path(__file__).resolve().parents[2] / "assets" / "sdar-stdlib-10m" / "heldout_prompts.jsonl"


def read_prompts(path: str | Path | None = None) -> list[dict[str, Any]]:
    """The rows of a held-out prompts file (``prompt`` and ``target`` fields, one JSON object a line)."""
    path = Path(path) if path else DEFAULT_PROMPTS
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) \
                    or not isinstance(row.get("target"), str):
                raise ValueError(f"{path} line {n}: expected a JSON object with string 'prompt' and 'target'")
            rows.append({"prompt": row["prompt"], "target": row["target"], "module": str(row.get("module", "")),
                         "function": str(row.get("function", ""))})
    if not rows:
        raise ValueError(f"{path} holds no prompts")
    return rows


def load_heldout(prompts: str | None = None, **_: Any):
    """lm-eval ``custom_dataset``: ``{"test": Dataset}`` of the held-out prompts (``--metadata '{"prompts":
    PATH}'`` reads another file; lm-eval passes the task's other metadata too, ignored here)."""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(read_prompts(prompts))})


def nonblank_lines(text: str, k: int) -> list[str]:
    return [ln.rstrip() for ln in text.splitlines() if ln.strip()][:k]


def score(generated: str, target: str) -> dict[str, float]:
    """``em1`` / ``em2`` / ``sim1`` of one continuation (the same rule as ``benchmarks/quality.py``)."""
    g2, t2 = nonblank_lines(generated, 2), nonblank_lines(target, 2)
    g1 = g2[0] if g2 else ""
    t1 = t2[0] if t2 else ""
    return {"em1": float(bool(t1) and g1 == t1), "em2": float(len(t2) == 2 and g2 == t2),
            "sim1": difflib.SequenceMatcher(None, g1, t1).ratio()}


def doc_to_target(doc: dict[str, Any]) -> str:
    """The first non-blank line of the source after the docstring (what ``em1`` compares; shown in logs)."""
    lines = nonblank_lines(doc["target"], 1)
    return lines[0] if lines else ""


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    return score(results[0] if results else "", doc["target"])
