"""The shape of the package: layers a reader sees in the tree, and one rule between them.

Each subpackage is a layer. A module imports only its own layer and the layers below it that
the table ``MAY_IMPORT`` names; the graph has no cycle; the chain reaches no door and no HTTP
transport; every module imports on its own; no module outgrows what a reader takes in at once;
an ``NPL_ERR`` value is spelled in one module only.

The graph is read from the source (``ast``), imports inside functions and type-only imports
(``if TYPE_CHECKING:``) included: a lazy import is still a dependency, only one paid for later,
and a type named from a higher layer is a dependency of the reader's mind.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "npl_agi"
# The layers, lowest first, and what each may import besides itself.
MAY_IMPORT = {
    "core": set(),  # the wire formats, numbers, answers, outcome codes, networks, ranges: no I/O
    "config": {"core"},  # the configuration file and logging
    "backends": {"core", "config"},  # cache, queue, connection slots, locks, breaker store
    "transports": {"core", "config"},  # HTTP: requests and httpx over one set of decisions
    "chain": {"core", "config", "backends"},  # the stages, over a backend and an asker
    "askers": {"core", "config", "backends", "transports", "chain"},  # how the misses are asked
    "doors": {"core", "config", "backends", "transports", "chain", "askers"},  # process AGI, FastAGI
    "doubles": {"core", "config"},  # simulator, emulator, demo: apart from the product
    "admin": {"core", "config", "backends", "transports", "chain", "askers", "doors", "doubles"},
}
MAX_LINES = 450
NPL_ERR_MODULE = "npl_agi.core.codes"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _import_nodes(tree: ast.AST):
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def imports_of(name: str) -> set[str]:
    """The package's modules that module ``name`` imports, anywhere in its code."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            # ``from . import log`` imports the module npl_agi.log; ``from .cache import X`` npl_agi.backends.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        found.update(t for t in targets if t in MODULES and t != name)
    return found


def graph() -> dict[str, set[str]]:
    return {name: imports_of(name) for name in MODULES}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path that ends where it starts, or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        path.append(node)
        for target in sorted(edges[node]):
            cycle = visit(target)
            if cycle:
                return cycle
        path.pop()
        done.add(node)
        return None

    for start in sorted(edges):
        cycle = visit(start)
        if cycle:
            return cycle
    return None


def layer_of(name: str) -> str:
    """The layer of a module: its subpackage; ``npl_agi.config`` and ``npl_agi.log`` are the
    configuration's, the package's own ``__init__`` the core's."""
    parts = name.split(".")
    if name == "npl_agi":
        return "core"
    if parts[1] in ("config", "log"):
        return "config"
    return parts[1]


def reach(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in edges[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def test_the_graph_reader_sees_lazy_and_type_only_imports_and_cycles(tmp_path):
    assert "npl_agi.core.number" in imports_of("npl_agi.chain.lookup")  # imported inside functions
    probe = PACKAGE / "chain" / "_probe_type_only.py"
    probe.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from npl_agi.doors import server\n")
    try:
        MODULES["npl_agi.chain._probe_type_only"] = probe
        assert imports_of("npl_agi.chain._probe_type_only") == {"npl_agi.doors.server"}
    finally:
        MODULES.pop("npl_agi.chain._probe_type_only")
        probe.unlink()
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_module_is_in_a_layer():
    assert {layer_of(name) for name in MODULES} <= set(MAY_IMPORT)


def test_the_package_has_no_import_cycle():
    assert find_cycle(graph()) is None


def test_each_layer_imports_only_the_layers_below_it():
    wrong = [
        f"{name} ({layer_of(name)}) imports {target} ({layer_of(target)})"
        for name, targets in graph().items()
        for target in sorted(targets)
        if layer_of(target) != layer_of(name) and layer_of(target) not in MAY_IMPORT[layer_of(name)]
    ]
    assert wrong == []


def test_the_chain_reaches_no_door_and_no_transport():
    edges = graph()
    for name in (n for n in MODULES if layer_of(n) == "chain"):
        assert {layer_of(t) for t in reach(edges, name)} <= {"core", "config", "backends", "chain"}, name


def test_no_module_is_longer_than_a_reader_takes_in():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_npl_err_values_are_spelled_in_one_module():
    from npl_agi.core import codes

    values = {v for k, v in vars(codes).items() if k.isupper() and isinstance(v, str) and v}
    values |= set(codes.PERMANENT_ERRORS)
    spelled = {
        f"{name}:{node.lineno} {node.value}"
        for name, path in MODULES.items()
        if name != NPL_ERR_MODULE
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and node.value in values
    }
    assert spelled == set()


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports_first_in_a_fresh_interpreter(name):
    done = subprocess.run(
        [sys.executable, "-c", f"import {name}"],
        cwd=PACKAGE.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
