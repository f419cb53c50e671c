"""The project's layers, read from the source's import statements: what may import what, and no cycles.

- ``models/`` has no import cycle, and no module anywhere imports a project module inside a function (the way to
  dodge a cycle);
- ``data/`` imports from ``models/`` only the shared helpers (``models.sequences``);
- ``trainers/inference`` imports nothing from ``trainers/training`` or ``trainers/search``, so what runs a trained
  model (the lmms-eval plugin, ``scripts/predict.py``, the benchmark) loads no training code.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("configs", "data", "models", "trainers", "lmms_plugin")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_sources() -> dict[str, Path]:
    files = [p for package in PACKAGES for p in (ROOT / package).rglob("*.py")]
    files += [ROOT / "main.py", *(ROOT / "scripts").glob("*.py")]
    return {module_name(p): p for p in files}


SOURCES = project_sources()


def resolve(name: str) -> str | None:
    """The project module an import names (``from trainers.inference import evaluation`` names a module too)."""
    while name and name not in SOURCES:
        name = name.rpartition(".")[0]
    return name or None


def imports(path: Path, top_level_only: bool = True) -> list[tuple[str, int, bool]]:
    """(project module, line, at module level) of every import statement in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    module_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in {resolve(n) for n in names} - {None}:
            found.append((target, node.lineno, id(node) in module_level))
    return [f for f in found if f[2] or not top_level_only]


def graph() -> dict[str, set[str]]:
    return {name: {target for target, _, _ in imports(path)} - {name} for name, path in SOURCES.items()}


def reachable(start: str, edges: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in edges.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_import_graph_is_read_from_the_source():
    edges = graph()
    assert "models.sequences" in edges["data.collator"]
    assert "trainers.inference.pruned_model" in edges["trainers.training.preflight"]
    assert "trainers.training.trainer" in reachable("main", edges)


def test_no_project_import_inside_a_function():
    late = [f"{name}:{line} imports {target}" for name, path in SOURCES.items()
            for target, line, at_top in imports(path, top_level_only=False) if not at_top]
    assert not late, "imports inside functions (move them to the top; a cycle means a helper is in the wrong module): " \
                     + "; ".join(late)


@pytest.mark.parametrize("package", ["models", "data", "trainers", "configs"])
def test_no_import_cycle(package):
    edges = graph()
    cycles = sorted(name for name in edges if name.startswith(package) and name in reachable(name, edges))
    assert not cycles, f"modules that import themselves through others: {cycles}"


def test_data_uses_only_the_shared_helpers_of_models():
    edges = graph()
    reached = {(name, target) for name in edges if name.startswith("data.")
               for target in edges[name] if target.startswith("models") and target != "models.sequences"}
    assert not reached, f"data/ reaches into models/: {sorted(reached)}"


@pytest.mark.parametrize("entry", ["trainers.inference.pruned_model", "lmms_plugin.model", "scripts.predict",
                                   "scripts.benchmark"])
def test_inference_loads_no_training_code(entry):
    training = sorted(m for m in reachable(entry, graph()) if m.startswith(("trainers.training", "trainers.search")))
    assert not training, f"{entry} imports training code: {training}"
