"""benchmarks/quality.py: the speed-quality harness on the trained demo checkpoint (2 prompts, reference)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
CKPT = REPO / "assets" / "sdar-stdlib-10m"


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality_harness", REPO / "benchmarks" / "quality.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["quality_harness"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_score_text(quality):
    target = "    if x is None:\n        return 0\n    y = 1\n"
    assert quality.score_text("    if x is None:\n        return 0\n", target) == {"em1": 1.0, "em2": 1.0,
                                                                                 "sim1": 1.0}
    s = quality.score_text("\n    if x is None:  \n        return 1", target)  # blank lines, trailing spaces
    assert s["em1"] == 1.0 and s["em2"] == 0.0
    s = quality.score_text("    pass", target)
    assert s["em1"] == 0.0 and 0 < s["sim1"] < 1


def test_configs_are_valid_and_cover_the_grid(quality):
    from vllm_s2d2.s2d2_config import S2D2Config

    kinds = {}
    for name, (kind, cfg) in quality.CONFIGS.items():
        resolved = S2D2Config.from_dict(cfg).resolve("sdar", 4)
        assert resolved.verify == (kind == "s2d2"), name
        kinds.setdefault(kind, set()).add(resolved.block_size)
        if kind == "s2d2":
            kinds.setdefault("policies", set()).add(resolved.verify_policy)
    assert kinds["ar"] == {1} and kinds["static"] == kinds["dynamic"] == kinds["s2d2"] == {4, 16}
    assert kinds["policies"] == {"mask_span_length", "score_threshold", "score_hysteresis", "contextual_bandit_ucb"}
    assert len([n for n, (k, _) in quality.CONFIGS.items() if k == "dynamic"]) >= 6


def test_ar_nll_equals_position_by_position(quality):
    from vllm_s2d2.core import masks
    from vllm_s2d2.reference.models import ReferenceModel

    model = ReferenceModel.load(str(CKPT))
    prompt, gen = [100, 200, 300, 400, 500], [600, 700, 800]
    got = quality.ar_nll(model, prompt, gen, 8191)
    for j, tok in enumerate(gen):  # token p+j from a causal prefix + one mask at its position
        n = len(prompt) + j
        ids = torch.tensor(prompt + gen[:j] + [8191])
        vis = torch.zeros(n + 1, n + 1, dtype=torch.bool)
        vis[:n, :n] = masks.causal(n)
        vis[n] = True
        lp = torch.log_softmax(model.logits(ids, torch.arange(n + 1), vis, rows=torch.tensor([n]))[0], -1)
        assert got[j] == pytest.approx(-float(lp[tok]), abs=1e-4)


def test_harness_runs_on_two_prompts(quality, tmp_path):
    rc = quality.main(["--num-prompts", "2", "--max-tokens", "8", "--configs", "quick", "--out-dir", str(tmp_path),
                       "--tag", "test"])
    assert rc == 0
    rec = json.loads((tmp_path / "quality_reference_test.json").read_text())
    assert rec["backend"] == "reference" and rec["num_prompts"] == 2
    assert set(rec["summary"]) == {"ar", "dyn-b4-0.85", "s2d2-b4-score"} and len(rec["records"]) == 6
    for name, s in rec["summary"].items():
        assert s["tokens"] == 16 and 0 < s["tokens_per_forward"] <= s["tpf_fused"]
        assert 0 <= s["em1"] <= 1 and 0 < s["ar_nll"] < 9.1
        assert s["forwards"] == sum(s["forwards_by_kind"].values())
    ar = rec["summary"]["ar"]
    assert ar["forwards_by_kind"]["draft"] == 16 and ar["verify_rate"] == 0 and ar["acceptance_rate"] is None
    s2 = rec["summary"]["s2d2-b4-score"]
    assert s2["forwards_by_kind"]["verify"] > 0 and 0 <= s2["acceptance_rate"] <= 1
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "quality_reference_test.png").stat().st_size > 10_000


def test_vllm_backend_needs_gpu(quality, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("GPU host: the vLLM backend is exercised there")
    with pytest.raises(NotImplementedError):
        quality.main(["--backend", "vllm", "--num-prompts", "1", "--configs", "quick", "--out-dir", str(tmp_path)])


def test_compare_counts_equal_texts_per_configuration(quality, tmp_path):
    records = [{"config": c, "prompt": p, "text": f"{c}{p}"} for c in ("ar", "s2d2") for p in range(3)]
    theirs = [dict(r) for r in records[:5]]  # s2d2 prompt 2 missing from the other record
    theirs[1]["text"] = "other"  # ar prompt 1 differs
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"commit": "abc1234", "backend": "reference", "max_tokens": 8, "records": theirs}))
    cmp = quality.compare_texts(records, str(other))
    assert cmp["equal"] == {"ar": [2, 3], "s2d2": [2, 2]}
    assert (cmp["commit"], cmp["backend"], cmp["max_tokens"]) == ("abc1234", "reference", 8)
    with pytest.raises(SystemExit):  # a file that is no record is refused before anything is decoded
        quality.main(["--compare", str(tmp_path / "missing.json"), "--out-dir", str(tmp_path)])
