"""vLLM's own benchmark commands with the plugin, on CPU: ``vllm bench throughput`` / ``vllm bench latency`` with
``--speculative-config s2d2`` typed as in ``vllm serve``, and the ``vllm serve`` side of ``vllm bench serve``.

The probe (this file run as a script, in a subprocess) runs vLLM's real CLI entry point
(``vllm.entrypoints.cli.main.main`` with ``sys.argv`` as typed).  The probe resolves vLLM's platform as vLLM does (loading
the plugin's CLI shim through its ``vllm.platform_plugins`` entry point, as on a GPU host) and then sets the CPU
platform; the bench parser, ``EngineArgs.from_cli_args``,
``LLM``, the engine config (the plugin's alias and config hook), the input processor (the plugin's sampling
validation) and the output processor are vLLM's.  Only the engine core is scripted (``tests/test_lm_eval.py``),
so the numbers the commands print are those of the script, not of a model: what is checked is that the
speculative config reaches the ``VllmConfig`` the plugin sees and the requests reach it as ``SamplingParams`` it
accepts.  What they report for S2D2 on a GPU is for the GPU host.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _run_cli(argv: list[str]) -> dict:
    from test_lm_eval import RECORD

    from vllm.entrypoints.cli.main import main

    start_c, start_r = len(RECORD["configs"]), len(RECORD["requests"])
    sys.argv = ["vllm", *argv]
    out: dict = {}
    try:
        main()
    except SystemExit as e:
        if e.code not in (0, None):
            out["error"] = f"SystemExit: {e.code}"
    except Exception as e:  # noqa: BLE001
        out["error"] = f"{type(e).__name__}: {e}"
    out["configs"] = RECORD["configs"][start_c:]
    out["requests"] = RECORD["requests"][start_r:]
    return out


def probe(model: str, tmp: str) -> dict:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    sys.path.insert(0, HERE)
    # Platform resolution as on a GPU host: vLLM loads the vllm.platform_plugins entry points (the plugin's CLI
    # shim among them), then -- there being no GPU -- the CPU platform is set before any vLLM module binds it
    # (``vllm bench``'s own CPU fallback comes too late for EngineArgs here: "Device string must not be empty").
    import vllm.platforms as P
    from vllm.platforms.cpu import CpuPlatform

    P.resolve_current_platform_cls_qualname()
    P._current_platform = CpuPlatform()
    from test_lm_eval import install_scripted_core

    install_scripted_core()
    out: dict = {}
    common = ["--model", model, "--speculative-config", "s2d2", "--max-model-len", "256", "--load-format", "dummy"]
    out["throughput"] = _run_cli(["bench", "throughput", *common[:4], "--max-model-len", "1024", *common[6:],
                                  "--dataset-name", "random", "--random-input-len", "16", "--random-output-len", "8",
                                  "--num-prompts", "4", "--output-json", os.path.join(tmp, "throughput.json")])
    out["latency"] = _run_cli(["bench", "latency", *common[:2], "--speculative-config",
                               '{"method": "s2d2", "preset": "sdar-a", "verify_policy": "mask_span_length"}',
                               *common[4:], "--input-len", "8", "--output-len", "4", "--batch-size", "2",
                               "--num-iters-warmup", "1", "--num-iters", "2",
                               "--output-json", os.path.join(tmp, "latency.json")])
    import vllm.platforms as P

    out["platform"] = type(P.current_platform).__name__
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    out["shim"] = bool(getattr(FlexibleArgumentParser.parse_args, "_s2d2_cli_alias_wrapped", False))
    # the server of `vllm bench serve`: `vllm serve MODEL --speculative-config s2d2` through vLLM's serve parser
    from test_lm_eval import config_summary

    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.openai.cli_args import make_arg_parser

    args = make_arg_parser(FlexibleArgumentParser()).parse_args(
        ["--model", model, "--speculative-config", "s2d2", "--max-model-len", "256", "--load-format", "dummy"])
    try:
        out["serve"] = config_summary(AsyncEngineArgs.from_cli_args(args).create_engine_config())
    except Exception as e:  # noqa: BLE001
        out["serve"] = {"error": f"{type(e).__name__}: {e}"}
    # `vllm bench serve` itself takes no engine arguments: its parser parses a command line against a server
    from vllm.benchmarks.serve import add_cli_args

    bp = FlexibleArgumentParser()
    add_cli_args(bp)
    bargs = bp.parse_args(["--backend", "vllm", "--model", model, "--dataset-name", "random", "--num-prompts", "4",
                           "--max-concurrency", "2", "--random-input-len", "16", "--random-output-len", "8"])
    out["bench_serve"] = {"backend": bargs.backend, "endpoint": bargs.endpoint, "concurrency": bargs.max_concurrency}
    for name in ("throughput", "latency"):
        path = os.path.join(tmp, f"{name}.json")
        out[name]["json"] = json.load(open(path)) if os.path.exists(path) else None
    return out


@pytest.fixture(scope="module")
def probed(tiny_sdar, tmp_path_factory):
    pytest.importorskip("vllm")
    tmp = tmp_path_factory.mktemp("vllm_bench")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", VLLM_CACHE_ROOT=str(tmp / "vllm_cache"),
               VLLM_LOGGING_LEVEL="ERROR")
    env.pop("VLLM_PLUGINS", None)  # the platform plugin (CLI shim) must load as on a GPU host
    proc = subprocess.run([sys.executable, __file__, str(tiny_sdar), str(tmp)], capture_output=True, text=True,
                          timeout=900, env=env)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("VLLM_BENCH_PROBE=")]
    assert line, f"probe failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(line[-1][len("VLLM_BENCH_PROBE="):])


def test_the_cli_loads_the_shim_and_runs_on_the_cpu_platform(probed):
    assert probed["shim"] and probed["platform"] == "CpuPlatform"


def test_bench_throughput_carries_the_alias_into_the_engine_config(probed):
    run = probed["throughput"]
    assert "error" not in run, run["error"]
    (c,) = run["configs"]
    assert c["is_diffusion"] and not c["speculative_config"] and c["arch"] == ["SDARForCausalLM"]
    assert c["s2d2"]["verify"] is True and c["canvas"] == 2 * c["s2d2"]["block_size"]
    assert c["worker_ext"].endswith("S2D2WorkerExtension") and c["max_model_len"] == 1024
    assert len(run["requests"]) == 4
    for r in run["requests"]:  # what the command sends: temperature 1, ignore_eos, output-len tokens
        assert r["temperature"] == 1.0 and r["ignore_eos"] and r["max_tokens"] == 8 and r["extra_args"] is None
    assert run["json"]["num_requests"] == 4 and run["json"]["tokens_per_second"] > 0


def test_bench_latency_with_a_json_speculative_config(probed):
    run = probed["latency"]
    assert "error" not in run, run["error"]
    (c,) = run["configs"]
    assert c["s2d2"]["preset"] == "sdar-a" and c["s2d2"]["verify_policy"] == "mask_span_length"
    assert c["s2d2"]["cache_ver"] is True
    assert len(run["requests"]) == 2 * (1 + 2)  # batch 2, one warm-up + two iterations
    assert all(r["max_tokens"] == 4 and r["temperature"] == 1.0 for r in run["requests"])
    assert len(run["json"]["latencies"]) == 2


def test_vllm_serve_side_of_bench_serve(probed):
    s = probed["serve"]
    assert s["is_diffusion"] and s["s2d2"]["verify"] is True and not s["speculative_config"]
    assert probed["bench_serve"]["backend"] == "vllm" and probed["bench_serve"]["concurrency"] == 2


if __name__ == "__main__":
    result = probe(sys.argv[1], sys.argv[2])
    print("VLLM_BENCH_PROBE=" + json.dumps(result, default=str))
