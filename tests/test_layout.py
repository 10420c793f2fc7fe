"""The architecture, read from the source with ``ast`` (no import runs): dependencies point one
way, ``app -> trainer -> stages -> pipeline`` (DESIGN.md "Layers"), the application layer
(``pipeline/app/``) is imported by nothing else in ``pipeline/``, and no module imports itself
through others. Imports inside functions count too: a lazy import is still an arrow."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("pipeline", "stages", "trainer")
APP = "pipeline.app"
# The floor each layer stands on; a module may import its own floor and the ones below.
FLOORS = {"pipeline": 0, "stages": 1, "trainer": 2, APP: 3}


def module_name(path: Path, root: Path = REPO) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path = REPO) -> set[str]:
    """Every module ``path`` imports, anywhere in it (function bodies too), as absolute names;
    ``from X import y`` counts as importing both ``X`` and ``X.y`` (``y`` may be a submodule)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def floor(module: str) -> tuple[str, int]:
    layer = APP if module == APP or module.startswith(APP + ".") else module.split(".")[0]
    return layer, FLOORS[layer]


def graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports (names that are not modules, such as
    the ``y`` of ``from x import y`` when ``y`` is a function, are dropped)."""
    mods = modules()
    return {name: {m for m in imported_modules(path) if m in mods and m != name} for name, path in mods.items()}


def test_no_arrow_runs_up_a_floor():
    wrong = []
    for module, deps in graph().items():
        layer, level = floor(module)
        for dep in deps:
            dep_layer, dep_level = floor(dep)
            if dep_level > level:
                wrong.append(f"{module} ({layer}) imports {dep} ({dep_layer})")
    assert not wrong, "imports against the layering app -> trainer -> stages -> pipeline:\n" + "\n".join(sorted(wrong))


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    mods = modules()
    # A package's __init__ importing its own modules is not a circle a reader must follow.
    edges = {m: {d for d in deps if not (mods[m].name == "__init__.py" and d.startswith(m + "."))}
             for m, deps in graph().items()}
    found = cycles(edges)
    assert not found, "import circles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_walk_sees_real_arrows():
    # The check must be able to fail: known arrows of the layering are found.
    g = graph()
    assert "stages.scoring" in g["stages.judge"] and "pipeline.io" in g["stages.judge"]
    assert floor("pipeline.app.cli") == (APP, 3) and floor("stages.judge")[1] == 1
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_imported_modules_resolves_relative_and_from_imports(tmp_path):
    source = tmp_path / "pipeline" / "engines" / "x.py"
    source.parent.mkdir(parents=True)
    source.write_text("from .. import app\nfrom ..app.cli import main\nimport pipeline.app.registry\n"
                      "def f():\n    from pipeline.app import bench\n")
    found = imported_modules(source, tmp_path)
    assert {"pipeline.app", "pipeline.app.cli", "pipeline.app.registry", "pipeline.app.bench"} <= found


def test_app_layer_is_imported_by_nothing_else_in_pipeline():
    offenders = []
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        if module_name(path) == APP or module_name(path).startswith(APP + "."):
            continue
        hits = sorted(m for m in imported_modules(path) if m == APP or m.startswith(APP + "."))
        if hits:
            offenders.append(f"{path.relative_to(REPO)} imports {', '.join(hits)}")
    assert not offenders, "the application layer (pipeline/app/) sits on top; nothing else in pipeline/ may " \
                          "import it:\n  " + "\n  ".join(offenders)
