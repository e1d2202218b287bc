"""``vllm serve MODEL --speculative-config s2d2``, typed as is (also ``vllm bench throughput`` / ``vllm bench
latency``, whose parsers are ``FlexibleArgumentParser`` objects with vLLM's engine arguments too;
``tests/test_vllm_bench.py``).

vLLM 0.26 parses ``--speculative-config`` with ``json.loads`` (``engine/arg_utils.py``), so the bare word ``s2d2``
is an argparse error ("Value s2d2 cannot be converted") before any plugin code could see it: general plugins load
only when ``EngineArgs`` is built, after parsing.  This shim rewrites that one value to the JSON string ``"s2d2"``
in ``FlexibleArgumentParser.parse_args``; :mod:`.spec_alias` then handles it like ``speculative_config="s2d2"``.

To be installed before the CLI parses its arguments it is also reachable through the ``vllm.platform_plugins``
entry point :func:`activate`: vLLM resolves its platform (and calls every platform plugin) while it builds the
CLI parser.  :func:`activate` installs the shim and returns None ("not a platform"), so the platform choice is
unchanged.  Everything else on the command line is passed through untouched.
"""

from __future__ import annotations

import json
import sys

from vllm_s2d2.patches import require_vllm_version, wrap_once

METHOD = "s2d2"
FLAGS = ("--speculative-config", "-sc")
_MARK = "_s2d2_cli_alias_wrapped"


def rewrite_argv(args: list[str]) -> list[str]:
    """``--speculative-config s2d2`` / ``--speculative-config=s2d2`` / ``-sc s2d2`` -> the JSON string."""
    out = list(args)
    for i, a in enumerate(out):
        if a in FLAGS and i + 1 < len(out) and out[i + 1].strip() == METHOD:
            out[i + 1] = json.dumps(METHOD)
        elif a.startswith("--speculative-config=") and a.split("=", 1)[1].strip() == METHOD:
            out[i] = "--speculative-config=" + json.dumps(METHOD)
    return out


def install() -> None:
    """Wrap ``FlexibleArgumentParser.parse_args`` (idempotent)."""
    require_vllm_version("cli_alias")
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    def make(original):
        def parse_args(self, args=None, namespace=None):
            return original(self, rewrite_argv(sys.argv[1:] if args is None else list(args)), namespace)
        return parse_args

    wrap_once(FlexibleArgumentParser, "parse_args", _MARK, make)


def activate() -> None:
    """``vllm.platform_plugins`` entry point: install the shim early, select no platform."""
    try:
        install()
    except Exception as e:  # never break platform resolution (another vLLM version: register() says why)
        print(f"vllm-s2d2: CLI alias not installed: {e}", file=sys.stderr)
    return None
