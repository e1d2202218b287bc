"""Bad input at every user-facing entry point: exit code 2 and one line naming the argument, the value and what is
allowed; never a traceback, a silent acceptance or a long silence (issue: first run and bad input).

CLI rows run the entry point as its command line does: ``runpy`` with ``run_name="__main__"`` and ``sys.argv``
set, stdout / stderr captured, ``SystemExit`` read, in one fresh interpreter per entry point (so the suite pays
each tool's imports once; ``python -m vllm_s2d2.reference`` alone imports torch and transformers through its
package).  A few rows also run as real subprocesses of the installed command lines, and
``test_help_and_argument_errors_import_no_vllm`` runs ``--help`` and one argument error of every CLI in a fresh
interpreter and checks that vLLM (and, outside the reference CLI, torch and transformers) never got imported.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "assets" / "sdar-stdlib-10m"
BENCH = REPO / "benchmarks"

# Runs rows of one entry point; prints RESULT=<json> (codes, outputs, heavy modules imported by then).
DRIVER = r"""
import contextlib, io, json, runpy, sys, traceback
out = []
for kind, target, argv in json.loads(sys.stdin.read()):
    so, se, code = io.StringIO(), io.StringIO(), 0
    sys.argv = [target] + argv
    with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
        try:
            if kind == "module":
                runpy.run_module(target, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(target, run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc(file=se)
            code = "exception"
    out.append({"code": code, "stdout": so.getvalue(), "stderr": se.getvalue(),
                "heavy": [m for m in ("vllm", "torch", "transformers") if m in sys.modules]})
sys.__stdout__.write("RESULT=" + json.dumps(out) + "\n")
"""

ENTRY = {  # name -> (kind, runpy target)
    "vllm-s2d2": ("module", "vllm_s2d2.cli"),
    "reference": ("module", "vllm_s2d2.reference"),
    "offline_throughput": ("path", str(BENCH / "offline_throughput.py")),
    "profile_step": ("path", str(BENCH / "profile_step.py")),
    "quality": ("path", str(BENCH / "quality.py")),
    "serve_bench": ("path", str(BENCH / "serve_bench.py")),
}


def drive(entry: str | list[str], rows: list[list[str]]) -> list[dict]:
    """Run ``rows`` (argv lists) of ``entry`` (one name, or one per row) in one fresh interpreter."""
    entries = [entry] * len(rows) if isinstance(entry, str) else entry
    todo = [[*ENTRY[e], argv] for e, argv in zip(entries, rows)]
    proc = subprocess.run([sys.executable, "-c", DRIVER], input=json.dumps(todo),
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT=")]
    assert line, proc.stderr[-3000:]
    return json.loads(line[-1][len("RESULT="):])


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, str]:
    """Broken checkpoint directories (config only: every error comes before any weight is read)."""
    root = tmp_path_factory.mktemp("bad_ckpts")
    cfg = json.loads((DEMO / "config.json").read_text())

    def make(name: str, config: str | bytes | None, prompts: bool = True, tokenizer: bool = False) -> str:
        d = root / name
        d.mkdir()
        if isinstance(config, bytes):
            (d / "config.json").write_bytes(config)
        elif config is not None:
            (d / "config.json").write_text(config)
        if prompts:
            shutil.copy(DEMO / "heldout_prompts.jsonl", d)
        if tokenizer:
            for f in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(DEMO / f, d)
        return str(d)

    return {
        "garbage": make("garbage", "{not json"),
        "list": make("list", "[1, 2]"),
        "binary": make("binary", b"\xff\xfe\x00garbage"),
        "qwen": make("qwen", json.dumps({**cfg, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"})),
        "notok": make("notok", json.dumps(cfg)),
        "noprompts": make("noprompts", json.dumps(cfg), prompts=False, tokenizer=True),
        "badprompts": make("badprompts", json.dumps(cfg), prompts=False, tokenizer=True),
        "missing": str(root / "missing"),
    }


# -- python -m vllm_s2d2.reference -------------------------------------------------------------------------
M = ["--model", str(DEMO)]
REFERENCE = [  # (argv, message regex); every row: exit code 2, one line on stderr
    # token ids: not integers, negative (also "--prompt-ids -5,..." which argparse takes for a flag), empty,
    # outside the vocabulary (8192), the mask id
    (M + ["--prompt-ids", "a,b"], r"argument --prompt-ids: must be comma-separated token ids >= 0, got 'a,b'"),
    (M + ["--prompt-ids", "1.5,2"], r"argument --prompt-ids: .* token ids >= 0, got '1\.5,2'"),
    (M + ["--prompt-ids", "1e3"], r"argument --prompt-ids: .*got '1e3'"),
    (M + ["--prompt-ids=-5,1,2"], r"argument --prompt-ids: .* token ids >= 0, got '-5,1,2'"),
    (M + ["--prompt-ids", "-5,1,2"], r"argument --prompt-ids: .* token ids >= 0, got '-5,1,2'"),
    (M + ["--prompt-ids", "-5"], r"argument --prompt-ids: .*got '-5'"),
    (M + ["--prompt-ids", ""], r"argument --prompt-ids: .*got ''"),
    (M + ["--prompt-ids", "1,2,1000000000"], r"argument --prompt-ids: token id 1000000000 is outside the "
                                             r"vocabulary .*\[0, 8192\)"),
    (M + ["--prompt-ids", "9000"], r"argument --prompt-ids: token id 9000 is outside .*\[0, 8192\)"),
    (M + ["--prompt-ids", "1,8191"], r"argument --prompt-ids: prompt 0 contains the mask token id 8191"),
    # sampling and lengths
    (M + ["--prompt", "x", "--max-tokens", "0"], r"argument --max-tokens: must be an integer >= 1, got '0'"),
    (M + ["--prompt", "x", "--max-tokens", "-1"], r"argument --max-tokens: must be an integer >= 1, got '-1'"),
    (M + ["--prompt", "x", "--max-tokens", "2.5"], r"argument --max-tokens: .*got '2\.5'"),
    (M + ["--prompt", "x", "--temperature", "-1"], r"argument --temperature: must be a number >= 0.*got '-1'"),
    (M + ["--prompt", "x", "--temperature", "nan"], r"argument --temperature: .*got 'nan'"),
    (M + ["--prompt", "x", "--top-p", "2"], r"argument --top-p: must be a number in \(0, 1\].*got '2'"),
    (M + ["--prompt", "x", "--top-p", "0"], r"argument --top-p: must be a number in \(0, 1\].*got '0'"),
    (M + ["--prompt", "x", "--top-k", "-3"], r"argument --top-k: must be an integer >= 0 \(0 = off\), got '-3'"),
    (M + ["--prompt", "x", "--seed", "x"], r"argument --seed: must be an integer.*got 'x'"),
    (M + ["--prompt", "x", "--dtype", "int8"], r"argument --dtype: invalid choice: 'int8'"),
    (M + ["--prompt", "x", "--max-tokens", "5000"], r"argument --max-tokens: 5000 new tokens .* "
                                                    r"max_position_embeddings=2048"),
    # S2D2 options: JSON, unknown key, bad value, family rule, block size above the positions (was: minutes)
    (M + ["--prompt", "x", "--s2d2-config", "{bad"], r"argument --s2d2-config: S2D2 config is not valid JSON"),
    (M + ["--prompt", "x", "--s2d2-config", '"sdar-a"'], r"argument --s2d2-config: .*must be an object"),
    (M + ["--prompt", "x", "--s2d2-config", '{"foo": 1}'], r"argument --s2d2-config: unknown S2D2 option.*foo"),
    (M + ["--prompt", "x", "--s2d2-config", '{"block_size": 0}'], r"argument --s2d2-config: .*block_size=0 must "
                                                                   r"be an integer >= 1"),
    (M + ["--prompt", "x", "--s2d2-config", '{"sub_block_size": 2}'], r"argument --s2d2-config: sub_block_size "
                                                                       r"applies to Fast-dLLM v2 only"),
    (M + ["--prompt", "x", "--s2d2-config", '{"block_size": 4096}'], r"argument --s2d2-config: block_size=4096 "
                                                                      r"exceeds the checkpoint's "
                                                                      r"max_position_embeddings=2048"),
    # prompts
    (M + ["--prompt", ""], r"argument --prompt: prompt 0 \(''\) has no tokens"),
    (M + ["--prompt", "x<|MASK|>"], r"argument --prompt: prompt 0 contains the mask token id 8191"),
    (M + ["--prompt-ids", "1", "--chat"], r"argument --chat: applies to --prompt text"),
    (M + ["--prompt", "x", "--prompt-ids", "1"], r"argument --prompt-ids: not allowed with argument --prompt"),
    (["--prompt", "x"], r"the following arguments are required: --model"),
]
REFERENCE_CKPT = [  # (checkpoint key, extra argv, message regex)
    ("missing", ["--prompt", "x"], r"argument --model: '.*missing' is not a directory"),
    ("garbage", ["--prompt", "x"], r"argument --model: '.*garbage/config\.json' is not valid JSON"),
    ("list", ["--prompt", "x"], r"argument --model: '.*list/config\.json' must hold a JSON object, got list"),
    ("binary", ["--prompt", "x"], r"argument --model: '.*binary/config\.json' is not a UTF-8 text file"),
    ("qwen", ["--prompt", "x"], r"argument --model: '.*qwen': `architectures` \['Qwen3ForCausalLM'\] is not a "
                                r"supported block-diffusion architecture"),
    ("notok", ["--prompt", "x"], r"argument --prompt: '.*notok' has no tokenizer .*pass token ids with "
                                 r"--prompt-ids$"),
]


def _check_one_line(r: dict, pattern: str, where: str) -> None:
    import re

    lines = r["stderr"].strip().splitlines()
    assert r["code"] == 2, (where, r)
    assert "Traceback" not in r["stderr"] and len(lines) == 1, (where, r["stderr"][-2000:])
    assert re.search(pattern, lines[0]), (where, pattern, lines[0])
    assert r["stdout"] == "", (where, r["stdout"][:500])


def test_reference_cli_bad_input(ckpts):
    rows = [argv for argv, _ in REFERENCE] + [["--model", ckpts[k]] + extra for k, extra, _ in REFERENCE_CKPT]
    pats = [p for _, p in REFERENCE] + [p for _, _, p in REFERENCE_CKPT]
    for argv, pat, r in zip(rows, pats, drive("reference", rows)):
        _check_one_line(r, pat, argv)
        assert r["stderr"].startswith("python -m vllm_s2d2.reference: error: "), r["stderr"]


# -- vllm-s2d2 (demo) ---------------------------------------------------------------------------------------
DEMO_ARGS = [  # argument errors: before anything heavy
    ([], r"^vllm-s2d2: error: no command given; available: demo"),
    (["frobnicate"], r"^vllm-s2d2: error: unknown command 'frobnicate'; available: demo"),
    (["demo", "--max-tokens", "0"], r"argument --max-tokens: must be an integer >= 1, got '0'"),
    (["demo", "--max-tokens", "-1"], r"argument --max-tokens: must be an integer >= 1, got '-1'"),
    (["demo", "--threads", "-1"], r"argument --threads: must be an integer >= 0 \(0 = torch's default\), got '-1'"),
    (["demo", "--num-prompts", "0"], r"argument --num-prompts: must be an integer >= 1, got '0'"),
    (["demo", "--num-prompts", "-1"], r"argument --num-prompts: must be an integer >= 1, got '-1'"),
    (["demo", "--first-prompt", "-1"], r"argument --first-prompt: must be an integer >= 0, got '-1'"),
    (["demo", "--temperature", "-1"], r"argument --temperature: must be a number >= 0"),
    (["demo", "--width", "0"], r"argument --width: must be an integer >= 1, got '0'"),
    (["demo", "--seed", "1.5"], r"argument --seed: must be an integer"),
    (["demo", "--columns", "ar,bogus"], r"argument --columns: unknown column\(s\) \['bogus'\]; choose from"),
    (["demo", "--columns", "ar,ar"], r"argument --columns: \['ar'\] listed twice"),
    (["demo", "--columns", ","], r"argument --columns: unknown column"),
    (["demo", "--backend", "gpu"], r"argument --backend: invalid choice: 'gpu'"),
    # the checkpoint's prompts and positions (was: all prompts for minutes / all-zero totals)
    (["demo", "--first-prompt", "100000"], r"argument --first-prompt: 100000 is past the last of the \d+ held-out"),
    (["demo", "--num-prompts", "100000"], r"argument --num-prompts: 100000 prompts from --first-prompt 0 run past"),
    (["demo", "--max-tokens", "5000"], r"argument --max-tokens: 5000 new tokens .*max_position_embeddings=2048"),
]
DEMO_CKPT = [
    ("missing", r"argument --model: no demo checkpoint found \(looked at '.*missing'"),
    ("garbage", r"argument --model: '.*garbage/config\.json' is not valid JSON"),
    ("qwen", r"argument --model: '.*qwen': `architectures` \['Qwen3ForCausalLM'\] is not a supported "
             r"block-diffusion architecture"),
    ("notok", r"argument --model: '.*notok' has no tokenizer"),
    ("noprompts", r"argument --model: '.*heldout_prompts\.jsonl' is missing"),
    ("badprompts", r"argument --model: '.*heldout_prompts\.jsonl' line 1: Expecting value"),
]


def test_demo_bad_input(ckpts):
    (Path(ckpts["badprompts"]) / "heldout_prompts.jsonl").write_text("not json\n")
    rows = [argv for argv, _ in DEMO_ARGS] + [["demo", "--model", ckpts[k]] for k, _ in DEMO_CKPT]
    pats = [p for _, p in DEMO_ARGS] + [p for _, p in DEMO_CKPT]
    for argv, pat, r in zip(rows, pats, drive("vllm-s2d2", rows)):
        _check_one_line(r, pat, argv)


# -- benchmarks ---------------------------------------------------------------------------------------------
BENCHMARKS = {
    "offline_throughput": [
        (["--batches", "0,1"], r"argument --batches: must be comma-separated integers >= 1, got '0,1'"),
        (["--batches", "-1,2"], r"argument --batches: .*got '-1,2'"),
        (["--batches", "x"], r"argument --batches: .*got 'x'"),
        (["--prompt-len", "0"], r"argument --prompt-len: must be an integer >= 1, got '0'"),
        (["--new-tokens", "-5"], r"argument --new-tokens: must be an integer >= 1, got '-5'"),
        (["--timeout", "0"], r"argument --timeout: must be an integer >= 1, got '0'"),
        (["--capture-sizes", "1,a"], r"argument --capture-sizes: .*got '1,a'"),
        (["--modes", "a,bq"], r"argument --modes: unknown mode\(s\) \['q'\]"),
        (["--family", "nope"], r"argument --family: invalid choice: 'nope'"),
        (["--merge"], r"--merge was removed"),
        (["--replot", "/no/such/record.json"], r"argument --replot: cannot read a JSON record from "
                                               r"'/no/such/record\.json'"),
    ],
    "profile_step": [
        (["--skip-steps", "-1"], r"argument --skip-steps: must be an integer >= 0, got '-1'"),
        (["--profile-steps", "0"], r"argument --profile-steps: must be an integer >= 1, got '0'"),
        (["--batches", "1,,0"], r"argument --batches: .*got '1,,0'"),
        (["--modes", "q"], r"argument --modes: unknown mode\(s\) \['q'\]"),
        (["--replot", str(REPO / "README.md")], r"argument --replot: cannot read a JSON record"),
    ],
    "quality": [
        (["--num-prompts", "-1"], r"argument --num-prompts: must be an integer >= 0 \(0 = all\), got '-1'"),
        (["--num-prompts", "100000"], r"argument --num-prompts: 100000 is more than the \d+ prompts"),
        (["--max-tokens", "0"], r"argument --max-tokens: must be an integer >= 1, got '0'"),
        (["--temperature", "-1"], r"argument --temperature: must be a number >= 0"),
        (["--workers", "0"], r"argument --workers: must be an integer >= 1, got '0'"),
        (["--threads", "0"], r"argument --threads: must be an integer >= 1, got '0'"),
        (["--configs", "nope"], r"argument --configs: unknown configurations \['nope'\]"),
        (["--model", "/no/such/model"], r"argument --model: '/no/such/model' is no checkpoint directory"),
        (["--prompts", str(REPO / "README.md")], r"argument --prompts: cannot read prompts from"),
        (["--replot", "/no/such/record.json"], r"argument --replot: '/no/such/record\.json' is not a record"),
    ],
    "serve_bench": [
        (["--modes", "ar,nope"], r"argument --modes: must be comma-separated modes from \['ar', 'threshold', "
                                 r"'s2d2'\], each once; got 'ar,nope'"),
        (["--concurrency", "0"], r"argument --concurrency: must be comma-separated integers >= 1, got '0'"),
        (["--requests", "0"], r"argument --requests: must be an integer >= 1, got '0'"),
        (["--max-tokens", "-1"], r"argument --max-tokens: must be an integer >= 1, got '-1'"),
        (["--port", "70000"], r"argument --port: must be an integer in \[1, 65535\], got '70000'"),
        (["--model", "/no/such/model"], r"argument --model: '/no/such/model' is no local checkpoint directory"),
        (["--server-args", '--x "unclosed'], r"argument --server-args: No closing quotation"),
    ],
}


@pytest.mark.parametrize("entry", sorted(BENCHMARKS))
def test_benchmark_bad_input(entry):
    rows = BENCHMARKS[entry]
    for (argv, pat), r in zip(rows, drive(entry, [a for a, _ in rows])):
        _check_one_line(r, pat, (entry, argv))
        assert r["stderr"].startswith(f"benchmarks/{entry}.py: error: "), r["stderr"]


def test_without_gpu_the_gpu_tools_say_so():
    import torch

    if torch.cuda.is_available():
        pytest.skip("GPU host")
    rows = [("vllm-s2d2", ["demo", "--backend", "vllm"],
             r"argument --backend: vllm: .*(no CUDA GPU|not installed).*--backend reference runs on the CPU"),
            ("offline_throughput", ["--modes", "a"], r"no CUDA GPU is visible"),
            ("profile_step", [], r"no CUDA GPU is visible"),
            ("quality", ["--backend", "vllm", "--num-prompts", "1"], r"--backend vllm needs vLLM and a CUDA GPU"),
            ("serve_bench", [], r"(no CUDA GPU is visible|not installed)")]
    results = drive([e for e, _, _ in rows], [a for _, a, _ in rows])
    for (entry, argv, pat), r in zip(rows, results):
        _check_one_line(r, pat, (entry, argv))


# -- real command lines -------------------------------------------------------------------------------------
@pytest.mark.parametrize("cmd,pattern", [
    (["vllm-s2d2", "demo", "--num-prompts", "-1"], r"^vllm-s2d2 demo: error: argument --num-prompts: must be an "
                                                   r"integer >= 1, got '-1'"),
    ([sys.executable, "-m", "vllm_s2d2.reference", "--model", str(DEMO), "--prompt-ids", "-5,1,2"],
     r"argument --prompt-ids: must be comma-separated token ids >= 0, got '-5,1,2'"),
    ([sys.executable, str(BENCH / "quality.py"), "--workers", "0"], r"argument --workers: must be an integer >= 1"),
])
def test_real_command_lines(cmd, pattern):
    exe = shutil.which(cmd[0]) or str(Path(sys.executable).parent / cmd[0])
    proc = subprocess.run([exe, *cmd[1:]], capture_output=True, text=True, cwd=REPO, timeout=300)
    _check_one_line({"code": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}, pattern, cmd)


# -- fast start: --help and argument errors import no vLLM ---------------------------------------------------
FAST = [  # (entry, argv rows: --help and argument errors, modules that must not be imported by then)
    ("vllm-s2d2", [["--help"], ["demo", "--help"], ["demo", "--max-tokens", "0"], ["demo", "--threads", "-1"]],
     ("vllm", "torch", "transformers")),
    # the reference CLI's package (vllm_s2d2/reference/__init__.py) imports the decoder: torch and transformers
    ("reference", [["--help"], ["--model", str(DEMO), "--prompt", "x", "--top-p", "2"],
                   ["--model", str(DEMO), "--prompt-ids", "-5,1,2"]], ("vllm",)),
    *[(b, [["--help"], BENCHMARKS[b][0][0]], ("vllm", "torch", "transformers")) for b in sorted(BENCHMARKS)],
]


@pytest.mark.parametrize("entry,rows,absent", FAST, ids=[e for e, _, _ in FAST])
def test_help_and_argument_errors_import_no_vllm(entry, rows, absent):
    """Every row in one fresh interpreter: none of ``absent`` is imported after all of them (so after each)."""
    results = drive(entry, rows)
    for argv, r in zip(rows, results):
        assert r["code"] == (0 if "--help" in argv else 2), (argv, r)
        if "--help" in argv:
            assert "usage:" in r["stdout"] and r["stderr"] == "", (argv, r)
    assert not set(absent) & set(results[-1]["heavy"]), (entry, results[-1]["heavy"])


# -- library entry points -----------------------------------------------------------------------------------
def test_s2d2_config_constructors_bad_input():
    from vllm_s2d2.s2d2_config import S2D2Config

    cases = [
        (lambda: S2D2Config.from_dict("sdar-a"), TypeError, r"expects a mapping of S2D2 options .* got str "
                                                            r"'sdar-a'; for a preset pass \{'preset': 'sdar-a'\}"),
        (lambda: S2D2Config.from_dict([("block_size", 4)]), TypeError, r"expects a mapping .* got list"),
        (lambda: S2D2Config.from_dict(4), TypeError, r"expects a mapping .* got int 4"),
        (lambda: S2D2Config.from_dict({1: 2}), ValueError, r"unknown S2D2 option\(s\) \[1\]"),
        (lambda: S2D2Config.from_json("[1]"), ValueError, r"S2D2 config JSON must be an object"),
        (lambda: S2D2Config(block_size=0), ValueError, r"block_size=0 must be an integer >= 1"),
        (lambda: S2D2Config().resolve("sdar", 0), ValueError, r"checkpoint_block_size=0 \(the checkpoint's trained "
                                                              r"block size, block_size in its config\.json\) must "
                                                              r"be an integer >= 1"),
        (lambda: S2D2Config().resolve("fast_dllm_v2", -32), ValueError, r"checkpoint_block_size=-32 .*bd_size"),
        (lambda: S2D2Config().resolve("sdar", 4.0), ValueError, r"checkpoint_block_size=4\.0"),
        (lambda: S2D2Config().resolve("gpt", 4), ValueError, r"unknown model family 'gpt'"),
    ]
    for fn, exc, pat in cases:
        with pytest.raises(exc, match=pat):
            fn()
    c = S2D2Config()
    c.block_size = 0  # set after construction: resolve() names it instead of a downstream knob
    with pytest.raises(ValueError, match=r"block_size=0 must be an integer >= 1") as ei:
        c.resolve("sdar", 4)
    assert "min_span_length" not in str(ei.value)


def test_checkpoint_file_errors_name_the_file(ckpts):
    from vllm_s2d2.configs import family_of, load_family_info

    for key, pat in (("garbage", r"garbage/config\.json' is not valid JSON \(Expecting"),
                     ("list", r"list/config\.json' must hold a JSON object, got list"),
                     ("binary", r"binary/config\.json' is not a UTF-8 text file")):
        with pytest.raises(ValueError, match=pat):
            load_family_info(ckpts[key])
        with pytest.raises(ValueError, match=pat):
            family_of(ckpts[key])
    gen = Path(ckpts["notok"]) / "generation_config.json"
    gen.write_text("{,}")
    try:
        with pytest.raises(ValueError, match=r"generation_config\.json' is not valid JSON"):
            load_family_info(ckpts["notok"])
    finally:
        gen.unlink()


def test_vllm_without_gpu_names_the_requirement(ckpts):
    """vLLM's CUDA wheel on a machine without a GPU resolves no platform; loading a block-diffusion model then
    fails with the plugin's message (LLM / EngineArgs and `vllm serve`), any other model with vLLM's own."""
    pytest.importorskip("vllm")
    code = (
        "import json, sys\n"
        "from vllm.platforms import current_platform\n"
        "if current_platform.device_type:\n"
        "    print('RESULT=' + json.dumps('platform')); sys.exit()\n"
        "from vllm.engine.arg_utils import EngineArgs\n"
        "from vllm_s2d2.engine.config_hooks import require_gpu_for_serve\n"
        "out = {}\n"
        "def err(fn):\n"
        "    try:\n"
        "        fn()\n"
        "    except Exception as e:\n"
        "        return f'{type(e).__name__}: {e}'\n"
        "out['llm'] = err(lambda: EngineArgs(model=sys.argv[1]).create_engine_config())\n"
        "out['alias'] = err(lambda: EngineArgs(model=sys.argv[1], speculative_config='s2d2').create_engine_config())\n"
        "out['plain'] = err(lambda: EngineArgs(model=sys.argv[2]).create_engine_config())\n"
        "out['serve'] = err(lambda: require_gpu_for_serve(['vllm', 'serve', sys.argv[1]]))\n"
        "out['serve_plain'] = err(lambda: require_gpu_for_serve(['vllm', 'serve', sys.argv[2]]))\n"
        "print('RESULT=' + json.dumps(out))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(DEMO), ckpts["qwen"]], capture_output=True, text=True,
                          timeout=600, env={**__import__("os").environ, "VLLM_LOGGING_LEVEL": "ERROR"})
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT=")]
    assert line, proc.stderr[-3000:]
    out = json.loads(line[-1][len("RESULT="):])
    if out == "platform":
        pytest.skip("vLLM resolved a device platform here")
    for k in ("llm", "alias", "serve"):
        assert out[k].startswith("RuntimeError: vllm-s2d2: ") and "(SDARForCausalLM)" in out[k], out[k]
        assert "needs a CUDA GPU" in out[k] and "python -m vllm_s2d2.reference" in out[k], out[k]
    assert out["plain"] and "vllm-s2d2" not in out["plain"], out["plain"]  # vLLM's own error, unchanged
    assert out["serve_plain"] is None
