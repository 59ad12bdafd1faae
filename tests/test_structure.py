"""Structural rules the code keeps: the data flows one way, shared logic is written once."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import influencekit as ik
from influencekit.solvers.base import ApproximateInverse

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "influencekit"


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            found.append("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
    return found


def _calls(path: Path) -> set[str]:
    """Called names, qualified by their module or object where written so (``os.replace``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            function = node.func
            if isinstance(function, ast.Attribute):
                owner = getattr(function.value, "id", "")
                names.add(f"{owner}.{function.attr}" if owner else function.attr)
            else:
                names.add(getattr(function, "id", ""))
    return names


@pytest.mark.parametrize("module", ["spectrum.py", "linalg.py", "curvature.py", "gradients.py",
                                    "data.py", "parameters.py", "objective.py"])
def test_lower_stages_do_not_import_the_solvers(module: str) -> None:
    assert not [name for name in _imports(SOURCE / module) if "solvers" in name]


@pytest.mark.parametrize("solver", [ik.KFAC, ik.EKFAC, ik.Arnoldi, ik.Deflated])
def test_approximate_inverses_share_one_verify_and_report_path(solver: type) -> None:
    assert issubclass(solver, ApproximateInverse)
    assert "_solve" not in vars(solver)


@pytest.mark.parametrize("module", ["cg.py", "lissa.py"])
def test_preconditioners_are_set_up_in_one_place(module: str) -> None:
    assert "make_preconditioner" in _calls(SOURCE / "solvers" / module)
    assert "make_solver" not in _calls(SOURCE / "solvers" / module)


def test_files_are_written_only_by_the_atomic_writer() -> None:
    writers = {"os.replace", "os.rename", "tempfile.mkstemp", "tempfile.NamedTemporaryFile",
               "mkstemp", "NamedTemporaryFile"}
    offenders = [str(path.relative_to(ROOT)) for folder in (SOURCE, ROOT / "benchmarks")
                 for path in folder.rglob("*.py")
                 if path.name != "io.py" and _calls(path) & writers]
    assert offenders == []
