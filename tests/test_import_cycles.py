"""The package's imports form a DAG, and its sub-packages import only what docs/DESIGN.md "Layers" allows.

Imports are read with ``ast`` from the source (nothing is imported): module-level ones and those inside functions,
so a function-local import cannot hide a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "attllm_jax"

# docs/DESIGN.md "Layers and what each may import": a new sub-package goes into both tables.
ALLOWED = {
    "files": set(),
    "outputs": set(),
    "errors": set(),
    "logs": set(),
    "ops": set(),
    "data": {"ops", "files", "outputs"},
    "attention": {"ops", "data", "files"},
    "retrieval": {"files"},
    "models": {"ops", "data"},
    "checkpoint": {"models", "files"},
    "convert": {"models", "checkpoint", "data", "files"},
    "evaluation": {"ops", "data", "attention", "retrieval", "models", "checkpoint", "files", "logs", "outputs"},
    "tuning": {
        "ops",
        "data",
        "attention",
        "retrieval",
        "models",
        "checkpoint",
        "files",
        "logs",
        "evaluation",
        "outputs",
    },
    "localization": {
        "ops",
        "data",
        "attention",
        "retrieval",
        "models",
        "checkpoint",
        "files",
        "logs",
        "evaluation",
        "outputs",
    },
    "serve": {"attention", "data", "retrieval", "evaluation", "localization", "logs"},
}
for _allowed in ALLOWED.values():  # errors.py sits below every layer
    _allowed.add("errors")
ALLOWED["errors"] = set()


def module_files(root: Path, package: str) -> dict[str, Path]:
    """``{"pkg.sub.module": path}`` for every ``.py`` file of ``package`` (``__init__`` is the package)."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its source (``from a.b import c`` names ``a.b.c`` when
    that is a module, else ``a.b``)."""
    modules = module_files(root, package)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = module.split(".") if is_package else module.split(".")[:-1]
                    base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names]
            for target in targets:
                if target.split(".")[0] != package:
                    continue
                resolved = _resolve(target, modules)
                if resolved is not None and resolved != module:
                    graph[module].add(resolved)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle ``[a, b, ..., a]`` of ``graph``, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    for start in sorted(graph):
        if start in state:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        state[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                path.pop()
                state[node] = 2
            elif state.get(child) == 1:
                return path[path.index(child) :] + [child]
            elif child not in state:
                state[child] = 1
                path.append(child)
                stack.append((child, iter(sorted(graph[child]))))
    return None


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_cycle_finder_sees_a_cycle_hidden_in_a_function(tmp_path):
    """Positive control: a cycle closed only by a function-local relative import is found, and the acyclic
    version of the same package is not flagged."""
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from pkg.b import g\n",
            "pkg/b.py": "def g():\n    from . import c\n",
            "pkg/c.py": "def h():\n    from pkg import a\n",
        },
    )
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.b"] == {"pkg.c"} and graph["pkg.c"] == {"pkg.a"}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
    (tmp_path / "pkg/c.py").write_text("def h():\n    import numpy\n")
    assert find_cycle(import_graph(tmp_path, "pkg")) is None


def test_the_package_has_no_import_cycle():
    graph = import_graph(ROOT, PACKAGE)
    assert len(graph) > 50  # the walk found the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_sub_packages_import_only_the_layers_below_them():
    graph = import_graph(ROOT, PACKAGE)
    layers = {_layer(m) for m in graph} - {None}
    unknown = sorted(layers - set(ALLOWED))
    assert not unknown, f"new sub-package(s) {unknown}: add them to docs/DESIGN.md 'Layers' and to ALLOWED here"
    bad = sorted(
        f"{m} imports {t}"
        for m, targets in graph.items()
        for t in targets
        if _layer(m) and _layer(t) and _layer(m) != _layer(t) and _layer(t) not in ALLOWED[_layer(m)]
    )
    assert not bad, "imports against docs/DESIGN.md 'Layers':\n" + "\n".join(bad)


@pytest.mark.parametrize("module", ["models.fields", "ops.gem", "data.preprocess"])
def test_low_modules_know_no_model_family(module):
    """The modules every family imports stay below the families (a family import here would close a cycle)."""
    graph = import_graph(ROOT, PACKAGE)
    families = {f"{PACKAGE}.models.{name}" for name in ("heads", "salad", "megaloc", "boq", "registry", "spec")}
    assert not graph[f"{PACKAGE}.{module}"] & families
