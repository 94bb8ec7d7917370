"""The package's layering, read from its own imports: dependencies point one way.

Bottom to top: the error root; the codec and the machine facts; one connection; the hub;
the backplane (which knows the hub only through its small interface); the Flask side;
the servers; the command line. The load generator (``chat.bench``) imports the library,
never the reverse. Every import counts, including those inside functions (a cycle hidden
in a function is still a cycle); only ``if TYPE_CHECKING:`` blocks are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "chat"

# An import must point to a strictly lower layer. A new module must be placed here.
LAYERS: dict[str, int] = {
    "errors": 0,
    "protocol": 1, "config": 1, "logs": 1, "system": 1,
    "multiroom": 1,  # the JSON endpoint's requests and events, I/O-free
    "connection": 2, "checks": 2,
    "hub": 3,
    "backplane": 4,
    "gate": 5,
    "takeover": 6,
    "views": 7,
    "metrics": 8,
    "app": 9,
    "handler": 10, "wsgi": 10, "doctor": 10,
    "upgrade": 11,  # the fast path in the accept loop; routes with the handler's cache
    "server": 12, "worker": 12,
    "bench": 20,  # chat.bench and every module in it
    "cli": 30, "__main__": 31, "__init__": 31,
}
# Third-party packages a low layer must not need: the codec is I/O-free, the hub knows
# no Flask, the load generator runs without gevent and Flask (each of its processes
# would otherwise carry ~25 MB for nothing).
FORBIDDEN = {
    "protocol": {"gevent", "greenlet", "flask", "werkzeug", "socket", "redis", "geventwebsocket"},
    "multiroom": {"gevent", "greenlet", "flask", "werkzeug", "socket", "redis", "geventwebsocket"},
    "connection": {"flask", "werkzeug", "redis", "geventwebsocket"},
    "hub": {"flask", "werkzeug", "redis", "geventwebsocket"},
    "bench": {"gevent", "greenlet", "flask", "werkzeug", "geventwebsocket"},
}


def module_name(path: Path, root: Path = ROOT) -> str:
    return ".".join(path.relative_to(root).with_suffix("").parts)


def layer_of(module: str) -> str:
    """The LAYERS key of ``chat.x.y``: ``x`` (every chat.bench module is ``bench``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"
        or isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path, root: Path = ROOT) -> set[str]:
    """Every module of ours and every top-level third-party package ``path`` imports."""
    module = module_name(path, root)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking_block(node):
            for child in node.orelse:  # the else branch runs
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            for alias in node.names:  # `from . import views` names a module
                candidate = f"{target}.{alias.name}"
                if (root / Path(*candidate.split("."))).with_suffix(".py").exists():
                    found.add(candidate)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return found


def our_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in modules and m != name}
            for name, path in modules.items()}


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in our_graph() if layer_of(m) not in LAYERS)
    assert not unplaced, f"place these modules in tests/test_layout.py's LAYERS: {unplaced}"


def test_imports_point_only_to_lower_layers():
    wrong = []
    for module, imported in our_graph().items():
        for target in imported:
            here, there = layer_of(module), layer_of(target)
            if here == there == "bench":
                continue  # inside the load generator: only cycles matter (next test)
            if LAYERS.get(there, 99) >= LAYERS.get(here, -1):
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_there_is_no_import_cycle():
    graph = our_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_low_layers_do_not_import_what_they_must_not_need(layer):
    for path in PACKAGE.rglob("*.py"):
        if layer_of(module_name(path)) != layer:
            continue
        packages = {name.split(".")[0] for name in imports_of(path)}
        assert not packages & FORBIDDEN[layer], f"{path.relative_to(ROOT)} imports {packages & FORBIDDEN[layer]}"


def test_the_check_sees_imports_inside_functions_and_skips_type_checking_blocks(tmp_path):
    """A cycle once hid in a function body (rooms imported app inside a function); the
    check must see that, and must not count imports made for type hints only."""
    package = tmp_path / "chat"
    package.mkdir()
    (package / "app.py").write_text("")
    (package / "hub.py").write_text("")
    (package / "rooms.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from .hub import Hub\n"
        "def view():\n    from . import app\n    from .app import thing\n")
    found = imports_of(package / "rooms.py", root=tmp_path)
    assert "chat.app" in found
    assert "chat.hub" not in found
