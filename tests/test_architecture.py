"""The shape of the package (docs/architecture.md): layers, seams and sizes.

Read from the source with ``ast``: which package module imports which (every
import, including those under ``TYPE_CHECKING``), who reads whose underscore
attributes, and how long modules and classes are.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "daemoneye_eventbus"

#: Every module's layer; a module imports only from its own layer or below.
LAYERS: dict[str, int] = {
    # the bottom: the error tree and the registry runtime the generated code imports
    "errors": 0,
    "deprecation": 0,
    "registry_runtime": 0,
    # pure: no event loop
    "topics": 1,
    "correlation": 1,
    "access": 1,
    "sids": 1,
    "frames": 1,
    "config": 1,
    "budget": 1,
    "ratelimit": 1,
    "flow": 1,
    "stamps": 1,
    "subscriptions": 1,
    "privileges": 1,
    "statistics": 1,
    "protocol": 1,
    "router": 1,
    "retained": 1,
    "presence": 1,
    "rpc": 1,
    "transports.pipes": 1,
    # the control plane's bookkeeping: pure, driven by an asyncio agent and collector
    "control": 1,
    "control.collectors": 1,
    "control.registry": 1,
    "control.strategies": 1,
    "control.tasks": 1,
    "control.distribution": 1,
    "control.aggregation": 1,
    "control.tracker": 1,
    # the NATS bridge's groundwork: the subject mapping is pure; the spool does
    # file I/O (sqlite3) but runs no event loop, so it sits here too (it is not
    # in tests/test_public_api.py's PURE_MODULES, which are free of I/O)
    "bridge": 1,
    "bridge.subjects": 1,
    "bridge.spool": 1,
    "bridge.headers": 1,
    "bridge.inbound_check": 1,
    # reads the TLS files and secrets it is given, runs no event loop
    "bridge.config": 1,
    # asyncio
    "runtime": 2,
    "delivery": 2,
    "subscription": 2,
    "responders": 2,
    "transports": 2,
    "transports.base": 2,
    "transports.unix": 2,
    "transports.windows": 2,
    "sessions": 2,
    "sessions.base": 2,
    "sessions.deadlines": 2,
    "sessions.handler": 2,
    "sessions.gate": 2,
    "sessions.flows": 2,
    "sessions.output": 2,
    "sessions.local": 2,
    "sessions.local_rpc": 2,
    "sessions.socket": 2,
    "client": 2,
    "client.connection": 2,
    "client.core": 2,
    "client.pump": 2,
    "client.requests": 2,
    "client.rpc": 2,
    "client.writer": 2,
    "broker": 2,
    "metrics": 2,
    # the control plane on the bus: the agent and the collector drive the bookkeeping
    "control.rpc": 2,
    "control.watch": 2,
    "control.agent": 2,
    "control.collector": 2,
    # the NATS bridge on the bus and on NATS
    "bridge.stats": 1,
    "bridge.link": 2,
    "bridge.outbound": 2,
    "bridge.inbound": 2,
    "bridge.runner": 2,
    # the bridge's figures for Prometheus, read on its loop (like "metrics")
    "bridge.metrics": 2,
    # faces
    "bus": 3,
    "cli": 3,
    "cli_args": 3,
    "cli_output": 3,
    "cli_control": 3,
    "cli_bridge": 3,
    "demo": 3,
    "demo_collectors": 3,
    "watch": 3,
    "__init__": 3,
}
PURE = {name for name, layer in LAYERS.items() if layer <= 1}

#: Longest module and class, in lines, and the ones allowed to be longer (why).
MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 300
LONGER: dict[str, str] = {}

#: asyncio's own underscore names a module may read, and why.
ASYNCIO_INTERNALS: dict[str, set[str]] = {
    # asyncio serves only the pipe instances it creates itself (with the default
    # security descriptor, accepting remote clients); the named-pipe transport
    # serves its own with the two calls ProactorEventLoop.start_serving_pipe
    # makes, both in one function (_asyncio_pipe_internals).
    "transports.windows": {"_proactor", "_make_duplex_pipe_transport"},
}


def _name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


MODULES = {_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _tree(name: str) -> ast.Module:
    return ast.parse(MODULES[name].read_text(), str(MODULES[name]))


def package_imports(name: str) -> set[str]:
    """The package modules ``name`` imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    out: set[str] = set()
    for node in ast.walk(_tree(name)):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for target in targets:
            if target.startswith("daemoneye_eventbus."):
                mod = target.removeprefix("daemoneye_eventbus.")
                if mod in MODULES:
                    out.add(mod)
    out.discard(name)
    return out


def test_every_module_has_a_layer() -> None:
    assert set(MODULES) == set(LAYERS)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_no_upward_imports(name: str) -> None:
    upward = {m for m in package_imports(name) if LAYERS[m] > LAYERS[name]}
    assert not upward, f"{name} (layer {LAYERS[name]}) imports from above: {sorted(upward)}"


def test_import_graph_has_no_cycles() -> None:
    # A package's __init__ re-exports its submodules; those never import it back.
    graph = {name: package_imports(name) for name in MODULES}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


@pytest.mark.parametrize("name", sorted(PURE))
def test_pure_modules_import_no_asyncio(name: str) -> None:
    for node in ast.walk(_tree(name)):
        if isinstance(node, ast.Import):
            assert all(a.name.split(".")[0] != "asyncio" for a in node.names), name
        elif isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] != "asyncio", name
    assert package_imports(name) <= PURE, name


def _defined_private_names(tree: ast.Module) -> set[str]:
    """Underscore names a module defines: functions, classes, assignments, attributes."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    # __slots__ entries are attributes too.
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "__slots__" for t in node.targets)
            and isinstance(node.value, ast.Tuple)
        ):
            names.update(
                e.value
                for e in node.value.elts
                if isinstance(e, ast.Constant) and isinstance(e.value, str)
            )
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_reads_another_modules_underscore_names(name: str) -> None:
    tree = _tree(name)
    own = _defined_private_names(tree)
    foreign: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("daemoneye"):
            foreign += [
                f"import {a.name}"
                for a in node.names
                if a.name.startswith("_") and not a.name.startswith("__")
            ]
        if isinstance(node, ast.Attribute):
            attr = node.attr
            if not attr.startswith("_") or attr.startswith("__"):
                continue
            value = node.value
            if isinstance(value, ast.Name) and value.id in ("self", "cls"):
                continue
            if attr not in own and attr not in ASYNCIO_INTERNALS.get(name, set()):
                foreign.append(f"line {node.lineno}: .{attr}")
    assert not foreign, f"{name} reaches into other modules' private names: {foreign}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_and_classes_stay_small(name: str) -> None:
    path = MODULES[name]
    lines = len(path.read_text().splitlines())
    if name not in LONGER:
        assert lines <= MAX_MODULE_LINES, f"{name}: {lines} lines"
    for node in ast.walk(_tree(name)):
        if isinstance(node, ast.ClassDef):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            key = f"{name}.{node.name}"
            if key not in LONGER:
                assert length <= MAX_CLASS_LINES, f"{key}: {length} lines"
