"""``vllm serve MODEL --speculative-config s2d2`` as typed: the CLI shim (:mod:`vllm_s2d2.patches.cli_alias`)."""

import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from vllm_s2d2.patches.cli_alias import rewrite_argv

PROBE = r"""
import json, sys
import vllm.platforms as P
from vllm.platforms.cpu import CpuPlatform
P._current_platform = CpuPlatform()
from vllm.entrypoints.openai.cli_args import make_arg_parser
from vllm.utils.argparse_utils import FlexibleArgumentParser
if sys.argv[1] == "shim":
    from vllm_s2d2.patches.cli_alias import activate
    assert activate() is None
p = make_arg_parser(FlexibleArgumentParser())
out = {}
for v in (["--speculative-config", "s2d2"], ["--speculative-config=s2d2"], ["-sc", "s2d2"],
          ["--speculative-config", '{"method": "s2d2", "preset": "sdar-b"}']):
    try:
        out[" ".join(v)] = p.parse_args(["--model", "x", *v]).speculative_config
    except SystemExit:
        out[" ".join(v)] = "argparse error"
print("PROBE=" + json.dumps(out))
"""


def test_rewrite_argv_touches_only_the_bare_alias():
    assert rewrite_argv(["serve", "m", "--speculative-config", "s2d2"]) == ["serve", "m", "--speculative-config",
                                                                           '"s2d2"']
    assert rewrite_argv(["--speculative-config=s2d2", "-sc", "s2d2"]) == ['--speculative-config="s2d2"', "-sc",
                                                                         '"s2d2"']
    keep = ["--speculative-config", '{"method": "s2d2"}', "--model", "s2d2", "--served-model-name", "s2d2"]
    assert rewrite_argv(keep) == keep


def test_platform_plugin_entry_point_is_declared():
    eps = {ep.name: ep.value for ep in entry_points(group="vllm.platform_plugins")}
    assert eps.get("s2d2_cli") == "vllm_s2d2.patches.cli_alias:activate"


@pytest.mark.parametrize("mode", ["stock", "shim"])
def test_vllm_cli_parser(mode):
    """With vLLM 0.26's real serve parser: the bare word fails without the shim and parses with it."""
    pytest.importorskip("vllm")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", VLLM_LOGGING_LEVEL="ERROR", VLLM_PLUGINS="none")
    proc = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env, timeout=300)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE=")]
    assert line, proc.stderr[-3000:]
    import json

    out = json.loads(line[0][len("PROBE="):])
    if mode == "stock":
        assert out["--speculative-config s2d2"] == "argparse error"  # why the shim exists
    else:
        assert out["--speculative-config s2d2"] == out["--speculative-config=s2d2"] == out["-sc s2d2"] == "s2d2"
    assert out['--speculative-config {"method": "s2d2", "preset": "sdar-b"}'] == {"method": "s2d2",
                                                                                  "preset": "sdar-b"}
