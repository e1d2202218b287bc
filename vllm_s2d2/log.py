"""Where the plugin's messages go: its loggers under vLLM's ``vllm`` logger, and the command-line tools' one-line
errors.

vLLM configures only the ``vllm`` logger hierarchy (its handler, format and ``VLLM_LOGGING_LEVEL``); a logger named
``vllm_s2d2.…`` has no handler, so its INFO lines vanish (found on the GPU host: the worker's periodic S2D2 line never
appeared in a server log).  ``get_logger("vllm_s2d2.engine.sampler")`` is ``vllm.s2d2.engine.sampler``.

The command-line tools (``vllm-s2d2``, ``python -m vllm_s2d2.reference``, ``benchmarks/*.py``) answer bad input
with exit code 2 and one line on stderr, ``PROG: error: argument --NAME: must be ..., got 'VALUE'``, never a
traceback; :class:`ArgumentParser` and the ``*_arg`` value parsers below give every tool the same wording.  This
module imports only the standard library, so a tool checks its arguments before anything heavy (torch,
transformers, vLLM) is imported.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from typing import Callable, Sequence


def get_logger(module: str) -> logging.Logger:
    from vllm.logger import init_logger

    return init_logger("vllm.s2d2." + module.removeprefix("vllm_s2d2."))


# -- command-line tools ------------------------------------------------------------------------------------------
class UsageError(ValueError):
    """Bad command-line input, found after argument parsing (e.g. against the checkpoint): the tool prints
    ``PROG: error: MESSAGE`` and exits with code 2 (:func:`usage_error`)."""


def usage_error(prog: str, message: object) -> int:
    """Print ``PROG: error: MESSAGE`` (one line) on stderr; returns the exit code 2."""
    text = " ".join(str(message).split()) or "invalid input"
    print(f"{prog}: error: {text}", file=sys.stderr)
    return 2


def logs_off_stdout() -> None:
    """Send vLLM's log lines to stderr unless the user chose a stream (``VLLM_LOGGING_STREAM``; vLLM's default is
    stdout).  The CPU tools print their results on stdout (``--json`` must stay parseable); call this before
    anything may import vLLM.  Subprocesses inherit it."""
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` with one-line errors (no usage block) and option values that start with ``-``.

    * an error prints ``PROG: error: MESSAGE (see PROG --help)`` on stderr and exits with code 2;
    * ``--opt -5,1,2`` is read as ``--opt=-5,1,2`` when ``--opt`` takes one value and ``-5,1,2`` is no option of
      the parser (argparse itself takes only plain negative numbers such as ``-5`` as values, and would report
      ``expected one argument``); the value's own check then names what is wrong with it.
    """

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")

    def parse_known_args(self, args: Sequence[str] | None = None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        out: list[str] = []
        i = 0
        while i < len(args):
            tok = args[i]
            action = self._option_string_actions.get(tok)
            if (action is not None and action.nargs is None and i + 1 < len(args)
                    and _dash_value(args[i + 1]) and args[i + 1] not in self._option_string_actions):
                out.append(f"{tok}={args[i + 1]}")
                i += 2
                continue
            out.append(tok)
            i += 1
        return super().parse_known_args(out, namespace)


def _dash_value(tok: str) -> bool:
    """``-5,1,2`` / ``-1.5`` / ``-.5``: a value that starts with a dash, not an option (``-x``, ``--x``)."""
    return len(tok) > 1 and tok[0] == "-" and (tok[1].isdigit() or tok[1] in ".,")


def _num(v: float) -> str:
    return str(v) if isinstance(v, int) else f"{v:g}"


def _bounds(lo: float | None, hi: float | None, lo_open: bool = False, hi_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{_num(lo)}, {_num(hi)}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {_num(lo)}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {_num(hi)}"
    return ""


def parse_int(text: str) -> int | None:
    """A decimal integer (``12``, ``-3``, ``+4``), or ``None`` (``1.5``, ``1e3``, ``0x10``, ``''``, ``'a'``)."""
    t = text.strip()
    body = t[1:] if t[:1] in "+-" else t
    return int(t) if body.isdigit() and body.isascii() else None


def int_arg(lo: int | None = None, hi: int | None = None, note: str = "") -> Callable[[str], int]:
    """argparse ``type=`` for an integer within ``[lo, hi]``; ``note`` (e.g. ``"0 = all"``) is added to the
    message."""
    want = " ".join(x for x in ("an integer", _bounds(lo, hi)) if x) + (f" ({note})" if note else "")

    def integer(text: str) -> int:
        v = parse_int(text)
        if v is None or (lo is not None and v < lo) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}")
        return v

    return integer


def float_arg(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False,
              note: str = "") -> Callable[[str], float]:
    """argparse ``type=`` for a finite number within the bounds (``lo_open`` / ``hi_open``: bound excluded)."""
    want = " ".join(x for x in ("a number", _bounds(lo, hi, lo_open, hi_open)) if x) + (f" ({note})" if note else "")

    def number(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            v = math.nan
        bad = (not math.isfinite(v) or (lo is not None and (v < lo or (lo_open and v == lo)))
               or (hi is not None and (v > hi or (hi_open and v == hi))))
        if bad:
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}")
        return v

    return number


def int_list_arg(lo: int | None = 1, hi: int | None = None, what: str = "integers",
                 as_text: bool = False) -> Callable[[str], list[int] | str]:
    """argparse ``type=`` for comma-separated integers within ``[lo, hi]`` (at least one; order kept);
    ``as_text``: checked, but kept as the text (for tools that pass it on to a subprocess)."""
    want = " ".join(x for x in (f"comma-separated {what}", _bounds(lo, hi)) if x)

    def int_list(text: str) -> list[int] | str:
        parts = [p.strip() for p in text.split(",")]
        vals = [parse_int(p) for p in parts if p]
        if not vals or any(v is None or (lo is not None and v < lo) or (hi is not None and v > hi) for v in vals):
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}")
        return text if as_text else vals  # type: ignore[return-value]

    return int_list
