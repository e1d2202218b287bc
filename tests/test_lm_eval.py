"""lm-evaluation-harness with the plugin, on CPU: everything up to the engine core is real.

vLLM cannot run a block-diffusion engine without a GPU, so the probe (this file run as a script, in a subprocess
with vLLM's CPU platform, as ``tests/engine_cpu_probe.py`` does) replaces only the engine core
(``EngineCoreClient.make_client``) with a scripted one that answers each request with a fixed continuation.
Everything before it is the real code: lm-eval's CLI (``lm_eval run``: model-arg and gen-kwarg parsing, the
``vllm`` model class, the shipped task), ``vllm.LLM`` -> ``EngineArgs.create_engine_config`` (the plugin's
``speculative_config`` alias and config hook) -> ``LLMEngine`` with its real input processor (the plugin's
sampling validation) and output processor (detokenization, stop strings).  The scripted core records the
``EngineCoreRequest``\\ s the plugin's sampler would get (``SamplingParams.extra_args["s2d2"]`` ...) and the
``VllmConfig`` it was built with.

For ``--model local-completions`` the probe serves ``/v1/completions`` itself: each request body goes through
vLLM's own ``CompletionRequest`` -> ``to_sampling_params`` -> ``SamplingParams.verify`` against the real
``ModelConfig`` of an s2d2 engine (a 400 with vLLM's error text when it fails), so lm-eval's real
``local-completions`` client (concurrent requests) is checked as far as a CPU can.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "assets" / "sdar-stdlib-10m"
TASKS = REPO / "benchmarks" / "lm_eval"
sys.path.insert(0, str(TASKS))
import s2d2_stdlib_utils as task_utils  # noqa: E402

WRONG = "    return None\n"  # the scripted answer for odd-numbered held-out prompts


# ---- the probe (runs in a subprocess) ------------------------------------------------------------------------

RECORD: dict = {"configs": [], "requests": [], "answers": {}}


def cpu_platform() -> None:
    """vLLM's CPU platform on a machine without a GPU (tests/engine_cpu_probe.py says why)."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"  # LLMEngine then keeps no in-process executor
    import vllm.platforms as P
    from vllm.platforms.cpu import CpuPlatform

    P._current_platform = CpuPlatform()


def config_summary(cfg) -> dict:
    return {"model": cfg.model_config.model, "arch": cfg.model_config.architectures,
            "is_diffusion": cfg.model_config.is_diffusion, "max_model_len": cfg.model_config.max_model_len,
            "speculative_config": cfg.speculative_config is not None,
            "canvas": cfg.diffusion_config.canvas_length if cfg.diffusion_config else None,
            "s2d2": (cfg.additional_config or {}).get("s2d2"),
            "worker_ext": cfg.parallel_config.worker_extension_cls,
            "max_num_seqs": cfg.scheduler_config.max_num_seqs}


def sampling_summary(sp) -> dict:
    return {"temperature": sp.temperature, "top_p": sp.top_p, "top_k": sp.top_k, "seed": sp.seed,
            "max_tokens": sp.max_tokens, "stop": list(sp.stop or []), "ignore_eos": sp.ignore_eos,
            "extra_args": sp.extra_args, "logprobs": sp.logprobs, "prompt_logprobs": sp.prompt_logprobs}


class Answers:
    """The scripted continuations: held-out prompt i gets its true source if i is even, ``WRONG`` if odd; any
    other prompt gets ``max_tokens`` copies of one token."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.by_prompt = {}
        for i, row in enumerate(task_utils.read_prompts()):  # (a prompt text may repeat: the first one counts)
            self.by_prompt.setdefault(row["prompt"], row["target"] if i % 2 == 0 else WRONG)

    def text(self, prompt: str) -> str | None:
        return self.by_prompt.get(prompt)

    def ids(self, prompt_ids: list[int], max_tokens: int) -> list[int]:
        text = self.text(self.tok.decode(prompt_ids))
        if text is None:
            return [11] * max_tokens
        ids = self.tok(text, add_special_tokens=False)["input_ids"][:max_tokens]
        RECORD["answers"][self.tok.decode(prompt_ids)] = self.tok.decode(ids)
        return ids


def install_scripted_core() -> None:
    """``EngineCoreClient.make_client`` -> a core that records requests and answers from :class:`Answers`."""
    from transformers import AutoTokenizer
    from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason
    from vllm.v1.engine.core_client import EngineCoreClient

    class ScriptedCore:
        def __init__(self, vllm_config):
            RECORD["configs"].append(config_summary(vllm_config))
            self.answers = Answers(AutoTokenizer.from_pretrained(vllm_config.model_config.model))
            self.pending = []

        def get_supported_tasks(self):
            return ("generate",)

        def add_request(self, req):
            RECORD["requests"].append(sampling_summary(req.sampling_params))
            self.pending.append(req)

        def get_output(self):
            outs = []
            for r in self.pending:
                n = r.sampling_params.max_tokens
                ids = self.answers.ids(list(r.prompt_token_ids), n)
                if len(ids) < n and not r.sampling_params.ignore_eos:  # ends with EOS, as an engine would
                    ids, reason = ids + [self.answers.tok.eos_token_id], FinishReason.STOP
                else:
                    reason = FinishReason.LENGTH
                outs.append(EngineCoreOutput(request_id=r.request_id, new_token_ids=ids, finish_reason=reason))
            self.pending = []
            return EngineCoreOutputs(outputs=outs)

        def abort_requests(self, ids):
            self.pending = [r for r in self.pending if r.request_id not in set(ids)]

        def dp_engines_running(self):
            return False

        def collective_rpc(self, *a, **k):
            return []

        def __getattr__(self, name):  # reset_mm_cache, shutdown, profile, sleep, ...: nothing to do
            return lambda *a, **k: None

    EngineCoreClient.make_client = staticmethod(lambda **kw: ScriptedCore(kw["vllm_config"]))


def run_lm_eval(argv: list[str]) -> dict:
    """``lm_eval run ARGV`` in this process; returns its results file (or the error)."""
    from lm_eval.__main__ import cli_evaluate

    start = len(RECORD["requests"])
    sys.argv = ["lm_eval", "run", *argv]
    out: dict = {}
    try:
        cli_evaluate()
    except BaseException as e:  # noqa: BLE001 - reported to the test
        out["error"] = f"{type(e).__name__}: {e}"
    path = argv[argv.index("--output_path") + 1]
    files = sorted(glob.glob(os.path.join(path, "**", "results_*.json"), recursive=True))
    if files:
        with open(files[-1]) as f:
            out["results"] = json.load(f)["results"]
    out["requests"] = RECORD["requests"][start:]
    out["config"] = RECORD["configs"][-1] if RECORD["configs"] else None
    return out


def serve_completions(port_holder: list, model_config, structured_outputs_config, tokenizer) -> None:
    """A stand-in for ``vllm serve``'s ``/v1/completions``: vLLM's request model and validation, scripted text."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    answers = Answers(tokenizer)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            try:
                req = CompletionRequest.model_validate(body)
                sp = req.to_sampling_params(max_tokens=req.max_tokens)
                sp.verify(model_config, None, structured_outputs_config, None)
            except ValueError as e:
                RECORD.setdefault("http_errors", []).append(str(e))
                self._send(400, {"error": {"message": str(e), "type": "BadRequestError", "code": 400}})
                return
            RECORD["requests"].append(sampling_summary(sp))
            prompts = req.prompt if isinstance(req.prompt, list) else [req.prompt]
            choices = []
            for i, p in enumerate(prompts):
                if not isinstance(p, str):
                    p = tokenizer.decode(p)
                text = answers.text(p) or "x"
                ids = tokenizer(text, add_special_tokens=False)["input_ids"][:sp.max_tokens]
                choices.append({"index": i, "text": tokenizer.decode(ids), "finish_reason": "length"})
            self._send(200, {"id": "cmpl-1", "object": "text_completion", "model": body.get("model"),
                             "choices": choices})

        def _send(self, code, obj):
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port_holder.append(server.server_address[1])
    threading.Thread(target=server.serve_forever, daemon=True).start()


LOGLIKELIHOOD_YAML = """task: s2d2_stdlib_loglikelihood
custom_dataset: !function s2d2_stdlib_utils.load_heldout
output_type: loglikelihood
test_split: test
doc_to_text: "{{prompt}}"
doc_to_target: !function s2d2_stdlib_utils.doc_to_target
metric_list:
  - metric: acc
metadata:
  version: 1.0
  prompts: {prompts}
"""


def probe(tmp: str) -> dict:
    cpu_platform()
    install_scripted_core()
    out: dict = {}
    demo = str(DEMO)
    common = ["--include_path", str(TASKS), "--limit", "6", "--batch_size", "auto"]
    # 1. key=value model args, S2D2 options per request through --gen_kwargs (JSON) into extra_args
    out["kv"] = run_lm_eval([
        "--model", "vllm", "--model_args", f"pretrained={demo},speculative_config=s2d2,max_model_len=512",
        "--tasks", "s2d2_stdlib", "--gen_kwargs", '{"extra_args": {"s2d2": {"verify_policy": "mask_span_length", '
        '"min_span_length": 2}}}', "--output_path", os.path.join(tmp, "kv"), *common])
    # 2. JSON model args: a preset and options; gen kwargs as key=value (temperature / seed / extra_args)
    out["json"] = run_lm_eval([
        "--model", "vllm", "--model_args", json.dumps({
            "pretrained": demo, "max_model_len": 512, "max_num_seqs": 8,
            "speculative_config": {"method": "s2d2", "preset": "sdar-a", "confidence_threshold": 0.9}}),
        "--tasks", "s2d2_stdlib", "--gen_kwargs", "do_sample=True", "temperature=0.7", "seed=5",
        'extra_args={"s2d2":{"verify":False}}', "--output_path", os.path.join(tmp, "json"), *common])
    # 3. a per-request option the engine cannot honour: the plugin's validation stops the run
    out["bad_option"] = run_lm_eval([
        "--model", "vllm", "--model_args", f"pretrained={demo},speculative_config=s2d2,max_model_len=512",
        "--tasks", "s2d2_stdlib", "--gen_kwargs", '{"extra_args": {"s2d2": {"block_size": 8}}}',
        "--output_path", os.path.join(tmp, "bad"), *common])
    # 4. a log-likelihood task: refused with the reason, never scored
    ll_dir = os.path.join(tmp, "ll_task")
    os.makedirs(ll_dir, exist_ok=True)
    with open(os.path.join(ll_dir, "ll.yaml"), "w") as f:
        f.write(LOGLIKELIHOOD_YAML.replace("{prompts}", json.dumps(str(task_utils.DEFAULT_PROMPTS))))
    import shutil

    shutil.copy(TASKS / "s2d2_stdlib_utils.py", ll_dir)
    out["loglikelihood"] = run_lm_eval([
        "--model", "vllm", "--model_args", f"pretrained={demo},speculative_config=s2d2,max_model_len=512",
        "--tasks", "s2d2_stdlib_loglikelihood", "--include_path", ll_dir, "--limit", "2",
        "--output_path", os.path.join(tmp, "ll")])

    # 5. local-completions against the /v1/completions stand-in (model config of `vllm serve ... -sc s2d2`)
    from transformers import AutoTokenizer
    from vllm.engine.arg_utils import EngineArgs

    cfg = EngineArgs(model=demo, speculative_config="s2d2", max_model_len=512).create_engine_config()
    port: list = []
    serve_completions(port, cfg.model_config, cfg.structured_outputs_config, AutoTokenizer.from_pretrained(demo))
    url = f"http://127.0.0.1:{port[0]}/v1/completions"
    api = f"model=bench,base_url={url},tokenizer_backend=huggingface,tokenizer={demo},num_concurrent=4,max_retries=1"
    out["local_completions"] = run_lm_eval([
        "--model", "local-completions", "--model_args", api, "--tasks", "s2d2_stdlib", "--gen_kwargs",
        '{"vllm_xargs": {"s2d2.verify_policy": "score_hysteresis", "s2d2.confidence_threshold": 0.8}}',
        "--output_path", os.path.join(tmp, "lc"), "--include_path", str(TASKS), "--limit", "6"])
    out["local_completions_ll"] = run_lm_eval([
        "--model", "local-completions", "--model_args", api, "--tasks", "s2d2_stdlib_loglikelihood",
        "--include_path", ll_dir, "--limit", "2", "--output_path", os.path.join(tmp, "lcll")])
    out["http_errors"] = RECORD.get("http_errors", [])
    out["answers"] = RECORD["answers"]
    return out


# ---- the tests -----------------------------------------------------------------------------------------------


def test_shipped_task_loads_and_scores_a_known_answer():
    # (lm_eval.tasks, not lm_eval: with benchmarks/ on sys.path a missing lm-eval would import the folder
    # benchmarks/lm_eval as a namespace package)
    pytest.importorskip("lm_eval.tasks")
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(TASKS))
    task = tm.load(["s2d2_stdlib"])["tasks"]["s2d2_stdlib"]
    docs = list(task.test_docs())
    rows = task_utils.read_prompts()
    assert len(docs) == len(rows) == 258
    d = docs[0]
    assert task.doc_to_text(d) == rows[0]["prompt"] and task.doc_to_target(d) == "    if self.use_main_ns:"
    assert task.config.output_type == "generate_until"
    assert task.config.generation_kwargs["until"] == ["\ndef ", "\nclass ", "\n\n\n"]
    assert task.process_results(d, [d["target"]]) == {"em1": 1.0, "em2": 1.0, "sim1": 1.0}
    wrong = task.process_results(d, [WRONG])
    assert wrong["em1"] == wrong["em2"] == 0.0 and 0 < wrong["sim1"] < 1
    # the first line right, the second wrong
    first = d["target"].splitlines()[0]
    assert task.process_results(d, [first + "\n    x = 1\n"])["em1"] == 1.0
    assert task.process_results(d, [first + "\n    x = 1\n"])["em2"] == 0.0
    task.build_all_requests(limit=3, rank=0, world_size=1)
    assert [i.request_type for i in task.instances] == ["generate_until"] * 3


def test_task_scores_as_the_quality_harness():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import quality

    for row in task_utils.read_prompts()[:20]:
        for gen in (row["target"], WRONG, "\n\n" + row["target"][:30], ""):
            assert task_utils.score(gen, row["target"]) == quality.score_text(gen, row["target"])


def test_other_prompts_file_and_bad_files(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"prompt": "def f():\n", "target": "    return 1\n"}) + "\n\n")
    assert task_utils.read_prompts(p) == [{"prompt": "def f():\n", "target": "    return 1\n", "module": "",
                                           "function": ""}]
    pytest.importorskip("datasets")
    assert task_utils.load_heldout(prompts=str(p), version=1.0)["test"][0]["target"] == "    return 1\n"
    p.write_text('{"prompt": 1}\n')
    with pytest.raises(ValueError, match="line 1"):
        task_utils.read_prompts(p)
    p.write_text("\n")
    with pytest.raises(ValueError, match="no prompts"):
        task_utils.read_prompts(p)


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    pytest.importorskip("lm_eval.tasks")
    pytest.importorskip("vllm")
    tmp = tmp_path_factory.mktemp("lm_eval_probe")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", VLLM_CACHE_ROOT=str(tmp / "vllm_cache"),
               HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(tmp / "hf_datasets"))
    proc = subprocess.run([sys.executable, __file__, str(tmp)], capture_output=True, text=True, timeout=900,
                          env=env, cwd=str(REPO))
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("LM_EVAL_PROBE=")]
    assert line, f"probe failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(line[-1][len("LM_EVAL_PROBE="):])


def _expected(answers: dict, n: int) -> dict:
    """The scores of the first ``n`` documents given the continuations the scripted engine returned."""
    scores = [task_utils.score(answers[r["prompt"]], r["target"]) for r in task_utils.read_prompts()[:n]]
    return {k: sum(s[k] for s in scores) / n for k in ("em1", "em2", "sim1")}


def test_vllm_model_key_value_args_and_json_gen_kwargs(probed):
    run = probed["kv"]
    assert "error" not in run, run.get("error")
    c = run["config"]
    assert c["is_diffusion"] and not c["speculative_config"] and c["arch"] == ["SDARForCausalLM"]
    assert c["canvas"] == 8 and c["s2d2"]["verify"] is True and c["s2d2"]["block_size"] == 4
    assert c["max_model_len"] == 512 and c["worker_ext"].endswith("S2D2WorkerExtension")
    reqs = run["requests"]
    assert len(reqs) == 6
    for r in reqs:
        assert r["extra_args"] == {"s2d2": {"verify_policy": "mask_span_length", "min_span_length": 2}}
        assert r["temperature"] == 0.0 and r["max_tokens"] == 48
        assert r["stop"] == ["\ndef ", "\nclass ", "\n\n\n", "<|endoftext|>"]  # the task's, + EOS (lm-eval adds it)
        assert r["logprobs"] is None and r["prompt_logprobs"] is None
    res = run["results"]["s2d2_stdlib"]
    want = _expected(probed["answers"], 6)
    for k in ("em1", "em2", "sim1"):
        assert res[f"{k},none"] == pytest.approx(want[k]), k
    assert res["em1,none"] == 0.5  # held-out prompts 0, 2, 4 got their source, 1, 3, 5 a wrong line


def test_vllm_model_json_args_with_a_preset_and_key_value_gen_kwargs(probed):
    run = probed["json"]
    assert "error" not in run, run.get("error")
    s = run["config"]["s2d2"]
    assert s["verify_policy"] == "score_threshold" and s["cache_ver"] is True  # preset sdar-a ...
    assert s["confidence_threshold"] == 0.9  # ... with an explicit option over it
    assert run["config"]["max_num_seqs"] == 8
    for r in run["requests"]:
        assert r["temperature"] == 0.7 and r["seed"] == 5 and r["extra_args"] == {"s2d2": {"verify": False}}
    assert "s2d2_stdlib" in run["results"]


def test_invalid_per_request_option_is_an_error(probed):
    err = probed["bad_option"].get("error") or ""
    assert "ValueError" in err and "block_size" in err and "results" not in probed["bad_option"]


def test_loglikelihood_tasks_are_refused_with_the_reason(probed):
    for key in ("loglikelihood", "local_completions_ll"):
        run = probed[key]
        assert "results" not in run, (key, run.get("results"))  # no score, right or wrong
        assert "error" in run, key
    err = probed["loglikelihood"]["error"]
    assert "ValueError" in err and "prompt_logprobs" in err and "no left-to-right log-likelihood" in err
    assert "generate-until" in err
    # through the OpenAI route the server answers 400 with the same reason (what lm-eval logs before failing)
    assert any("no left-to-right log-likelihood" in e for e in probed["http_errors"])


def test_local_completions_carries_vllm_xargs(probed):
    run = probed["local_completions"]
    assert "error" not in run, run.get("error")
    assert len(run["requests"]) == 6
    for r in run["requests"]:
        assert r["extra_args"] == {"s2d2.verify_policy": "score_hysteresis", "s2d2.confidence_threshold": 0.8}
        assert r["temperature"] == 0.0 and r["max_tokens"] == 48
    res = run["results"]["s2d2_stdlib"]
    assert res["em1,none"] == pytest.approx(probed["kv"]["results"]["s2d2_stdlib"]["em1,none"])


if __name__ == "__main__":
    result = probe(sys.argv[1])
    print("LM_EVAL_PROBE=" + json.dumps(result, default=str))
