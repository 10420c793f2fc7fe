"""The layout's rules, read from the source with ``ast`` (no import runs)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

APP = "pipeline.app"


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
