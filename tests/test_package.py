"""The shape of the package: every module imports on its own, the cache and the locks import
nothing that imports them back, and an installed package holds every module of the source tree."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "npl_agi"
# The modules whose imports must form no cycle (the rest of the graph has its own work to do).
ACYCLIC = ("npl_agi.cache", "npl_agi.locks", "npl_agi.permissions")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imported_by(name: str) -> set[str]:
    """The npl_agi modules that ``name`` imports, wherever in the file (a function's import is an
    import too), except under ``if TYPE_CHECKING:``, which never runs. Importing a module runs
    its packages' ``__init__`` first, so they count, but not the importer's own packages."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    own = set(ancestors(name))
    targets = {t for t in found if t in MODULES}
    return {m for t in targets for m in (t, *ancestors(t)) if m not in own and m != name}


def test_the_import_graph_is_read_from_the_files() -> None:
    assert "npl_agi.config" in imported_by("npl_agi.lookup")
    assert "npl_agi.cache" in imported_by("npl_agi.lookup")  # inside a function


@pytest.mark.parametrize("name", [m for m in MODULES if m.startswith(ACYCLIC)])
def test_no_cache_or_lock_module_imports_a_module_that_imports_it_back(name: str) -> None:
    graph = {m: imported_by(m) for m in MODULES}
    paths = {m: [name, m] for m in graph[name]}
    todo = list(graph[name])
    while todo:
        current = todo.pop()
        assert current != name, " -> ".join(paths[current])
        for nxt in graph[current]:
            if nxt not in paths:
                paths[nxt] = [*paths[current], nxt]
                todo.append(nxt)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports_alone_in_a_fresh_interpreter(name: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", f"import {name}"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr


def test_the_built_package_holds_every_module(tmp_path: Path) -> None:
    """What ``pip install`` (install.sh) puts in place, not the editable checkout the tests run.

    Built from a copy: a build in the checkout leaves a ``build/`` that the next build reuses."""
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(tmp_path), str(source)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = tmp_path.glob("npl_agi-*.whl")
    built = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("npl_agi/") and n.endswith(".py")}
    assert built == {str(p.relative_to(ROOT)) for p in MODULES.values()}
