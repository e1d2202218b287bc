"""Imports only go downward (``docs/architecture.md``, layers), checked statically with ``ast``.

Layers, bottom to top::

    top-level modules   configs, s2d2_config, log, families     (anyone may import them)
    core/               pure torch: the S2D2 algorithm           (top-level modules, kernels/, torch, stdlib)
    kernels/            Triton kernels core/ may call            (torch, triton, stdlib; nothing of the package)
    engine/ reference/  the vLLM engine / the eager oracle       (core, top-level; never each other)
    model_executor/     vLLM model classes, attention backend    (engine, reference, core, top-level)
    patches/            vLLM shims, installed by register()      (imported only by register() and each other)
    vllm_s2d2 (root)    register(); at import time only top-level modules
    cli, testing/       applications and test helpers           (nothing in the package imports them)

Every import counts, at any depth (function-local, ``TYPE_CHECKING``, relative ``from . import``), and so do
``importlib.import_module("...")`` / ``__import__("...")`` calls with a constant name.
"""

from __future__ import annotations

import ast
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = "vllm_s2d2"

TOP_LEVEL = {f"{PKG}.configs", f"{PKG}.s2d2_config", f"{PKG}.log", f"{PKG}.families", f"{PKG}.d2f_merge",
             f"{PKG}.env"}
SUBPACKAGE_LAYERS = {"kernels": "kernels", "core": "core", "engine": "engine", "reference": "reference",
                     "model_executor": "model_executor", "patches": "patches", "testing": "app"}
APP_MODULES = {f"{PKG}.cli"}

# Which layers a layer may import (its own included).  "root" is the package's __init__.
ALLOWED = {
    "top": {"top"},
    "kernels": {"kernels"},
    "core": {"top", "kernels", "core"},
    "engine": {"top", "core", "engine"},
    "reference": {"top", "core", "reference"},
    "model_executor": {"top", "kernels", "core", "engine", "reference", "model_executor"},
    "patches": {"top", "core", "engine", "model_executor", "patches"},
    "root": {"top", "core", "engine", "reference", "model_executor", "patches", "root"},  # inside functions
    "app": {"top", "core", "engine", "reference", "model_executor", "root", "app"},
}
ROOT_IMPORT_TIME = {"top", "root"}  # what the package root may import at module level
CORE_EXTERNAL = {"torch", "__future__"}  # besides the standard library
# ... and, through kernels/ (imported inside functions, guarded): Triton, which torch itself installs on Linux
CORE_TRANSITIVE_EXTERNAL = CORE_EXTERNAL | {"triton"}
# Entry points into patches/ other than register() (pyproject.toml): the CLI shim must be installed before
# vLLM parses arguments, which happens before general plugins load.
PATCH_ENTRY_POINTS = {"vllm_s2d2.patches.cli_alias:activate"}


@dataclass(frozen=True)
class Import:
    importer: str  # module doing the import
    target: str  # imported module (package module, or an external top-level name)
    line: int
    function: str | None  # innermost enclosing function (None = runs at import time)


def layer_of(module: str) -> str | None:
    """The layer of a package module, or None for a module outside the package (or not mapped: a new module
    must be given a layer here)."""
    if module == PKG:
        return "root"
    if module in TOP_LEVEL:
        return "top"
    if module in APP_MODULES:
        return "app"
    parts = module.split(".")
    if parts[0] != PKG or len(parts) < 2:
        return None
    return SUBPACKAGE_LAYERS.get(parts[1])


def module_name(path: Path) -> tuple[str, bool]:
    """``(dotted name, is_package)`` of a file under ROOT."""
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def package_modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for path in sorted((ROOT / PKG).rglob("*.py")):
        name, is_pkg = module_name(path)
        out[name] = (path, is_pkg)
    return out


def collect_imports(module: str, is_package: bool, source: str, known: set[str]) -> list[Import]:
    """Every import of ``source`` (module ``module``), resolved to absolute names.  ``known``: the package's
    modules, so that ``from pkg import name`` counts as importing ``pkg.name`` when that is a module."""
    tree = ast.parse(source)
    found: list[Import] = []
    base_parts = module.split(".") if is_package else module.split(".")[:-1]

    def resolve_from(node: ast.ImportFrom) -> str:
        if node.level == 0:
            return node.module or ""
        if node.level - 1 >= len(base_parts):
            raise ValueError(f"{module}:{node.lineno}: relative import beyond the top-level package")
        parts = base_parts[:len(base_parts) - (node.level - 1)]
        return ".".join(parts + ([node.module] if node.module else []))

    def add(target: str, line: int, function: str | None) -> None:
        if target.split(".")[0] != PKG:
            target = target.split(".")[0]  # external: its distribution's top-level name
        found.append(Import(module, target, line, function))

    def visit(node: ast.AST, function: str | None) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            function = getattr(node, "name", "<lambda>")
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno, function)
        elif isinstance(node, ast.ImportFrom):
            base = resolve_from(node)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if sub in known else base, node.lineno, function)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            add(node.args[0].value, node.lineno, function)
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, None)
    return found


def violations(imports: list[Import]) -> list[str]:
    """The layering rules; one message per offending import."""
    out = []
    for imp in imports:
        src, dst = layer_of(imp.importer), layer_of(imp.target)
        where = f"{imp.importer}:{imp.line} imports {imp.target}"
        if src is None:
            out.append(f"{where}: {imp.importer} has no layer (add it to tests/test_imports.py)")
            continue
        if src == "core" and dst is None and imp.target not in CORE_EXTERNAL \
                and imp.target not in sys.stdlib_module_names:
            out.append(f"{where}: core/ may use only torch and the standard library")
        if dst is None:
            continue  # other external packages: not a layering question
        if dst == "patches" and src != "patches" and not (src == "root" and imp.function == "register"):
            out.append(f"{where}: patches/ is imported only by register() (and by patches/ itself)")
            continue
        if src == "root" and imp.function is None and dst not in ROOT_IMPORT_TIME:
            out.append(f"{where}: the package root imports only top-level modules at import time")
            continue
        if dst not in ALLOWED[src]:
            out.append(f"{where}: {src} may not import {dst} (allowed: {', '.join(sorted(ALLOWED[src]))})")
    return out


def package_imports() -> list[Import]:
    mods = package_modules()
    known = set(mods)
    out = []
    for name, (path, is_pkg) in mods.items():
        out += collect_imports(name, is_pkg, path.read_text(encoding="utf-8"), known)
    return out


# ---- the package -------------------------------------------------------------------------------------------


def test_every_module_has_a_layer():
    mods = package_modules()
    assert {f"{PKG}.core.step", f"{PKG}.engine.model_state", f"{PKG}.reference.decoder",
            f"{PKG}.model_executor.attention.backend", f"{PKG}.patches.spec_alias", f"{PKG}.families"} <= set(mods)
    assert [m for m in mods if layer_of(m) is None] == []


def test_imports_only_go_downward():
    assert violations(package_imports()) == []


def test_core_pulls_in_only_torch_and_stdlib_transitively():
    """core/ must stay importable without vLLM or transformers, also through the top-level modules it uses
    (e.g. ``configs`` imports transformers, so core may not import ``configs``)."""
    imports = package_imports()
    graph: dict[str, set[str]] = {}
    for imp in imports:
        graph.setdefault(imp.importer, set()).add(imp.target)
    for start in (m for m in package_modules() if layer_of(m) == "core"):
        seen, todo, external = set(), [start], set()
        while todo:
            m = todo.pop()
            if m in seen:
                continue
            seen.add(m)
            for t in graph.get(m, ()):
                if t.startswith(PKG):
                    todo.append(t)
                elif t not in sys.stdlib_module_names:
                    external.add(t)
        assert external <= CORE_TRANSITIVE_EXTERNAL, (start, sorted(external - CORE_TRANSITIVE_EXTERNAL))


def test_patches_entry_points():
    """The only ways into patches/ besides register(): the entry points declared in pyproject.toml."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    eps = {v for group in meta["project"]["entry-points"].values() for v in group.values()}
    assert {v for v in eps if v.startswith(f"{PKG}.patches")} == PATCH_ENTRY_POINTS
    assert f"{PKG}:register" in eps


def test_package_import_time_imports_no_engine():
    """The root's import-time imports (what ``import vllm_s2d2`` runs) include no engine module, directly or
    through the top-level modules."""
    imports = package_imports()
    graph: dict[str, set[str]] = {}
    for imp in imports:
        if imp.function is None:
            graph.setdefault(imp.importer, set()).add(imp.target)
    seen, todo = set(), [PKG]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += [t for t in graph.get(m, ()) if t.startswith(PKG)]
    assert not [m for m in seen if layer_of(m) not in ("root", "top")], sorted(seen)


# ---- the checker itself: it reports upward and sideways imports --------------------------------------------

KNOWN = {f"{PKG}", f"{PKG}.engine", f"{PKG}.engine.stats", f"{PKG}.engine.model_state", f"{PKG}.core",
         f"{PKG}.core.masks", f"{PKG}.model_executor", f"{PKG}.model_executor.attention",
         f"{PKG}.model_executor.attention.backend", f"{PKG}.reference", f"{PKG}.reference.decoder",
         f"{PKG}.patches", f"{PKG}.patches.spec_alias", f"{PKG}.configs", f"{PKG}.families", f"{PKG}.cli"}


def check(module: str, source: str, is_package: bool = False) -> list[str]:
    return violations(collect_imports(module, is_package, source, KNOWN))


@pytest.mark.parametrize("module,source,is_package,expect", [
    # engine -> model_executor: at module level, inside a function, relative
    ("vllm_s2d2.engine.x", "from vllm_s2d2.model_executor.attention.backend import VerifyGroup", False,
     "engine may not import model_executor"),
    ("vllm_s2d2.engine.x", "def f():\n    import vllm_s2d2.model_executor.attention.backend\n", False,
     "engine may not import model_executor"),
    ("vllm_s2d2.engine.x", "from ..model_executor.attention import backend", False,
     "engine may not import model_executor"),
    ("vllm_s2d2.engine.x", "import importlib\nimportlib.import_module('vllm_s2d2.model_executor')", False,
     "engine may not import model_executor"),
    # engine <-> reference
    ("vllm_s2d2.engine.x", "from vllm_s2d2.reference import decoder", False, "engine may not import reference"),
    ("vllm_s2d2.reference.x", "from vllm_s2d2.engine.stats import STAT_NAMES", False,
     "reference may not import engine"),
    ("vllm_s2d2.reference", "from ..engine import stats", True, "reference may not import engine"),
    ("vllm_s2d2.reference.x", "from vllm_s2d2.model_executor.attention import backend", False,
     "reference may not import model_executor"),
    # core: only core, top-level modules, torch, stdlib
    ("vllm_s2d2.core.x", "from vllm_s2d2.engine import stats", False, "core may not import engine"),
    ("vllm_s2d2.core.x", "import vllm", False, "core/ may use only torch"),
    ("vllm_s2d2.core.x", "from transformers import AutoConfig", False, "core/ may use only torch"),
    ("vllm_s2d2.core.x", "import numpy as np", False, "core/ may use only torch"),
    # top-level modules import only each other
    ("vllm_s2d2.configs", "from vllm_s2d2.core import masks", False, "top may not import core"),
    # the package root: no engine at import time
    ("vllm_s2d2", "from vllm_s2d2.engine.stats import request_stats", True,
     "the package root imports only top-level modules at import time"),
    ("vllm_s2d2", "from .engine import stats", True,
     "the package root imports only top-level modules at import time"),
    # patches: only register() and patches/ itself
    ("vllm_s2d2.engine.x", "def f():\n    from vllm_s2d2.patches import spec_alias\n", False,
     "patches/ is imported only by register()"),
    ("vllm_s2d2", "def other():\n    from vllm_s2d2.patches import spec_alias\n", True,
     "patches/ is imported only by register()"),
    ("vllm_s2d2.cli", "from vllm_s2d2 import patches", False, "patches/ is imported only by register()"),
    # nothing in the package imports the applications; nothing below the root imports the root
    ("vllm_s2d2.engine.x", "from vllm_s2d2 import cli", False, "engine may not import app"),
    ("vllm_s2d2.reference.x", "from vllm_s2d2 import register", False, "reference may not import root"),
    # a module with no layer is reported
    ("vllm_s2d2.newpkg.x", "import os", False, "has no layer"),
])
def test_checker_reports(module, source, is_package, expect):
    msgs = check(module, source, is_package)
    assert len(msgs) == 1 and expect in msgs[0], msgs


@pytest.mark.parametrize("module,source,is_package", [
    ("vllm_s2d2.engine.x", "from vllm_s2d2.core.masks import verifier_qq_bias\nimport vllm\nimport numpy", False),
    ("vllm_s2d2.model_executor.x", "def f():\n    from vllm_s2d2.engine.model_state import S2D2ModelState\n",
     False),
    ("vllm_s2d2.core.x", "import torch\nimport math\nfrom vllm_s2d2.families import family\nfrom . import masks",
     False),
    ("vllm_s2d2", "from vllm_s2d2.families import FAMILIES\n"
                  "def register():\n    from vllm_s2d2.patches import spec_alias\n"
                  "    from vllm_s2d2.engine.stats import request_stats\n", True),
    ("vllm_s2d2.patches.x", "from vllm_s2d2.patches import spec_alias\nfrom vllm_s2d2.engine import stats", False),
    ("vllm_s2d2.cli", "from vllm_s2d2 import register\nfrom vllm_s2d2.reference import decoder", False),
])
def test_checker_accepts_downward_imports(module, source, is_package):
    assert check(module, source, is_package) == []


def test_relative_imports_resolve():
    imps = collect_imports("vllm_s2d2.engine.x", False,
                           "from . import stats\nfrom ..core import masks\nfrom .. import configs", KNOWN)
    assert [i.target for i in imps] == ["vllm_s2d2.engine.stats", "vllm_s2d2.core.masks", "vllm_s2d2.configs"]
    imps = collect_imports("vllm_s2d2.engine", True, "from . import stats\nfrom .stats import STAT_NAMES", KNOWN)
    assert [i.target for i in imps] == ["vllm_s2d2.engine.stats", "vllm_s2d2.engine.stats"]
    with pytest.raises(ValueError):  # beyond the top-level package
        collect_imports("vllm_s2d2.engine.x", False, "from ... import y", KNOWN)
