"""The house's architecture, checked: import-linter's contracts catch an upward import, and
tfmbgd's modules import one another without a cycle (tools/import_graph.py)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import import_graph  # noqa: E402

pytest.importorskip("importlinter")


def _lint_imports(tree):
    """`lint-imports` on the package in `tree` with the project's contracts."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    command = "import sys, importlinter.cli as cli; sys.exit(cli.lint_imports_command())"
    return subprocess.run([sys.executable, "-c", command, "--config", str(ROOT / "setup.cfg"), "--no-cache"],
                          cwd=tree, env=env, capture_output=True, text=True, timeout=120)


def test_the_contracts_hold_and_an_upward_import_breaks_them(tmp_path):
    shutil.copytree(ROOT / "tfmbgd", tmp_path / "tfmbgd", ignore=shutil.ignore_patterns("__pycache__"))
    kept = _lint_imports(tmp_path)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    assert "0 broken" in kept.stdout
    moments = tmp_path / "tfmbgd" / "engine" / "moments.py"
    moments.write_text(moments.read_text() + "\nfrom tfmbgd.loop import steps  # noqa: E402  (upward)\n")
    broken = _lint_imports(tmp_path)
    assert broken.returncode == 1
    assert "tfmbgd.engine.moments -> tfmbgd.loop.steps" in broken.stdout
    assert "Floors: app > fit > loop > instruments > engine > leaves BROKEN" in broken.stdout


def test_no_import_cycle_and_a_bounded_chain():
    imports = import_graph.graph()
    assert import_graph.cycles(imports) == []
    assert len(import_graph.chain(imports)) <= import_graph.LIMIT


def test_the_cycle_finder_finds_a_cycle():
    # the oracle for the check above: a hand-made graph with one cycle of three and a chain
    imports = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"d"}}
    assert import_graph.cycles(imports) == [["a", "b", "c"]]
    assert import_graph.chain({"a": {"b"}, "b": {"c"}, "c": set(), "e": {"c"}}) == ["a", "b", "c"]
