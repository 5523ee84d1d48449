"""The folders of ``lab/`` are its architecture: imports only go down the layers, never back up."""

from __future__ import annotations

import ast
from pathlib import Path

LAB = Path(__file__).resolve().parent.parent / "lab"

# Higher layers may import lower ones (a larger number), never the reverse; equal layers only themselves.
LAYERS = {
    "cli": 0, "bench": 0, "mutants": 0,
    "journeys": 1, "workshop": 1, "plugin": 1,
    "attacks": 2,
    "engine": 3,
    "postgres": 4,
    "registry": 5, "contracts": 5, "errors": 5,
}  # fmt: skip


def _imports(path: Path) -> list[tuple[str, int]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lab."):
            found.append((node.module.split(".")[1], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name.split(".")[1], node.lineno) for a in node.names if a.name.startswith("lab.")]
    return found


def test_every_module_of_lab_belongs_to_a_layer() -> None:
    """A new folder or top-level module gets a place in the diagram before it gets code."""
    tops = {p.relative_to(LAB).parts[0].removesuffix(".py") for p in LAB.iterdir() if p.name != "__pycache__"}
    assert tops - {"__init__"} == set(LAYERS)


def test_imports_only_go_down_the_layers() -> None:
    """cli -> journeys, workshop, plugin -> attacks -> engine -> postgres: nothing below imports anything above it."""
    upward = []
    for path in LAB.rglob("*.py"):
        parts = path.relative_to(LAB).with_suffix("").parts
        if parts == ("__init__",):
            continue  # the workshop API re-exports from every layer on purpose
        mine = LAYERS[parts[0]]
        for target, line in _imports(path):
            if target != parts[0] and LAYERS[target] <= mine and not (LAYERS[target] == mine == 5):
                upward.append(f"{path.relative_to(LAB.parent)}:{line} imports lab.{target}")
    assert upward == []


def test_scenarios_and_fixes_import_only_the_workshop_api() -> None:
    """A scenario, a fix or a learner's file needs nothing but ``import lab``."""
    offenders = []
    for folder in ("scenarios", "fixes"):
        for path in (LAB.parent / folder).glob("*.py"):
            offenders += [f"{path.name}:{line} imports lab.{target}" for target, line in _imports(path)]
    assert offenders == []
