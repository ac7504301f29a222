"""The layering contract (pyproject.toml, [tool.importlinter]) holds, and it would catch a violation.

import-linter builds the import graph of every package statically (no code runs), so this is fast.
The second test copies the packages into a temp dir, adds one forbidden import, and checks that the
same contract then fails: a contract that cannot fail would prove nothing.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGES = ("areal_py", "controller", "trainer", "rollout_server", "benchmarks")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())",
                           "--no-cache", str(root / "pyproject.toml")],
                          cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_layering_contract_is_kept() -> None:
    r = lint_imports(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "BROKEN" not in r.stdout and r.stdout.count("KEPT") >= 3


@pytest.mark.parametrize(("module", "line", "broken"), [
    ("controller/batching.py", "import trainer.learner", "benchmarks > app > roles"),
    ("areal_py/config/tree.py", "import rollout_server.server", "benchmarks > app > roles"),
    ("areal_py/wire/protocol/__init__.py", "import areal_py.app.cli", "every module of the core package"),
    ("areal_py/telemetry/charts.py", "import areal_py.telemetry.report", "no import cycles"),
    ("rollout_server/sglang_engine/wire.py", "import rollout_server.torch_engine.engine",
     "the generation backends are independent"),
])
def test_a_forbidden_import_breaks_the_contract(tmp_path: Path, module: str, line: str, broken: str) -> None:
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__", "results"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{line}  # deliberate violation\n")
    r = lint_imports(tmp_path)
    assert r.returncode != 0, r.stdout
    broken_section = r.stdout.split("Broken contracts", 1)[-1]
    assert broken in broken_section, r.stdout
