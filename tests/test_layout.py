"""The code's shape: layers that say who may import whom, and parts small enough to read.

The import contracts live in pyproject.toml (``[tool.importlinter]``) and are checked here and
by ``make lint``. The size limits: a module at most 400 lines, a class at most 250, a function
at most 60 unless a ``# long: <reason>`` comment right above its ``def`` says why.
"""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.conftest import ROOT

MODULE, CLASS, FUNCTION = 400, 250, 60
PACKAGES = ("fedsim", "strategies")


def _sources():
    for package in PACKAGES:
        yield from sorted((ROOT / package).rglob("*.py"))


def _reason_above(lines: list[str], node: ast.AST) -> bool:
    first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
    above = lines[first - 2].strip() if first >= 2 else ""
    return above.startswith("# long:")


def test_modules_classes_and_functions_are_small():
    too_big = []
    for path in _sources():
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        name = path.relative_to(ROOT)
        if len(lines) > MODULE:
            too_big.append(f"{name}: {len(lines)} lines (module limit {MODULE})")
        for node in ast.walk(ast.parse(text)):
            size = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, ast.ClassDef) and size > CLASS:
                too_big.append(f"{name}:{node.name}: {size} lines (class limit {CLASS})")
            is_function = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            if is_function and size > FUNCTION and not _reason_above(lines, node):
                too_big.append(f"{name}:{node.name}: {size} lines (function limit {FUNCTION})")
    assert not too_big, "split these (or say why above the def with # long: ...):\n" + "\n".join(
        too_big
    )


def test_imports_keep_to_the_layers():
    """import-linter in its own process (it reconfigures logging, disabling loggers that
    exist)."""
    command = "import sys; from importlinter.cli import lint_imports_command as c; sys.exit(c())"
    proc = subprocess.run(
        [sys.executable, "-c", command, "--no-cache", str(ROOT / "pyproject.toml")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]


def test_every_conf_folder_is_a_group_or_a_preset():
    from fedsim import registry

    assert sorted(registry.folders()) == sorted([*registry.names(), *registry.PRESETS])
