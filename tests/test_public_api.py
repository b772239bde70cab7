"""The package's public surface: lazy re-exports, ``__all__``, exceptions, typing markers."""

from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import REPO, worker_env

import daemoneye_eventbus
from daemoneye_eventbus import errors

PUBLIC_MODULES = [
    "errors",
    "deprecation",
    "registry_runtime",
    "topics",
    "correlation",
    "access",
    "sids",
    "frames",
    "protocol",
    "config",
    "statistics",
    "router",
    "rpc",
    "subscriptions",
    "budget",
    "ratelimit",
    "privileges",
    "transports",
    "transports.base",
    "transports.pipes",
    "transports.unix",
    "sessions",
    "sessions.base",
    "sessions.deadlines",
    "sessions.handler",
    "sessions.gate",
    "sessions.local",
    "sessions.local_rpc",
    "sessions.socket",
    "broker",
    "metrics",
    "client",
    "client.connection",
    "client.core",
    "client.pump",
    "client.requests",
    "client.rpc",
    "client.writer",
    "subscription",
    "responders",
    "delivery",
    "bus",
    "cli",
    "cli_control",
    "cli_bridge",
    "bridge.metrics",
    "demo",
    "demo_collectors",
    "watch",
    "control",
    "control.collectors",
    "control.registry",
    "control.strategies",
    "control.tasks",
    "control.distribution",
    "control.aggregation",
    "control.tracker",
    "control.rpc",
    "control.watch",
    "control.agent",
    "control.collector",
]
#: Modules that must stay free of I/O and of the event loop.
PURE_MODULES = [
    "topics",
    "correlation",
    "access",
    "sids",
    "frames",
    "protocol",
    "config",
    "statistics",
    "router",
    "rpc",
    "subscriptions",
    "budget",
    "ratelimit",
    "flow",
    "stamps",
    "retained",
    "presence",
    "privileges",
    "control",
    "control.collectors",
    "control.registry",
    "control.strategies",
    "control.tasks",
    "control.distribution",
    "control.aggregation",
    "control.tracker",
    "bridge",
    "bridge.subjects",
    "bridge.headers",
    "bridge.inbound_check",
]
PACKAGE_DIR = Path(daemoneye_eventbus.__file__).resolve().parent


def run_python(code: str, *, pythonpath: list[Path] | None = None) -> str:
    """Run ``code`` in a fresh interpreter; return its stdout (it must succeed)."""
    env = worker_env()
    if pythonpath is not None:
        env["PYTHONPATH"] = ":".join(str(p) for p in pythonpath)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# -- lazy re-exports ------------------------------------------------------------------


def test_all_is_the_sorted_exports() -> None:
    assert daemoneye_eventbus.__all__ == sorted(daemoneye_eventbus._EXPORTS)
    assert len(set(daemoneye_eventbus.__all__)) == len(daemoneye_eventbus.__all__)


def exported_object(name: str) -> object:
    """What ``daemoneye_eventbus.<name>`` must be: the attribute of its module, or the
    module itself when it is exported under its own name (``registry``)."""
    module_name = daemoneye_eventbus._EXPORTS[name]
    module = importlib.import_module(module_name)
    if module_name.rsplit(".", 1)[-1] == name:
        return module
    return getattr(module, name)


@pytest.mark.parametrize("name", sorted(daemoneye_eventbus._EXPORTS))
def test_export_resolves_to_the_module_object(name: str) -> None:
    value = getattr(daemoneye_eventbus, name)
    assert value is exported_object(name)
    # Cached after the first access.
    assert vars(daemoneye_eventbus)[name] is value
    assert getattr(daemoneye_eventbus, name) is value


def test_registry_is_the_generated_module() -> None:
    from daemoneye.eventbus.v1 import registry

    assert daemoneye_eventbus.registry is registry
    assert daemoneye_eventbus.Topic is registry.Topic


def test_exports_are_in_their_modules_all() -> None:
    for name, module_name in daemoneye_eventbus._EXPORTS.items():
        if module_name.startswith("daemoneye_eventbus."):
            module = importlib.import_module(module_name)
            assert name in module.__all__, f"{name} is not in {module_name}.__all__"


def test_dir_lists_the_exports() -> None:
    listed = dir(daemoneye_eventbus)
    assert set(daemoneye_eventbus.__all__) <= set(listed)
    assert "__version__" in listed
    assert listed == sorted(listed)


def test_unknown_attribute() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = daemoneye_eventbus.no_such_name
    assert not hasattr(daemoneye_eventbus, "no_such_name")
    with pytest.raises(ImportError):
        exec("from daemoneye_eventbus import no_such_name", {})


def test_version_matches_pyproject() -> None:
    with (REPO / "pyproject.toml").open("rb") as f:
        project = tomllib.load(f)["project"]
    assert daemoneye_eventbus.__version__ == project["version"]


def test_package_import_is_lazy() -> None:
    """``import daemoneye_eventbus`` loads neither the broker nor protobuf nor asyncio."""
    out = run_python(
        "import json, sys, daemoneye_eventbus\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('asyncio', 'google', 'daemoneye', 'daemoneye_eventbus'))))"
    )
    assert json.loads(out) == ["daemoneye_eventbus"]


def test_pure_modules_work_without_generated_code() -> None:
    """The code generator imports ``topics`` and ``errors`` before ``generated/`` exists."""
    out = run_python(
        "import daemoneye_eventbus.topics as t, daemoneye_eventbus.errors as e\n"
        "t.validate_topic('events.process.lifecycle')\n"
        "print(t.matches('events.#', 'events.process.lifecycle'), e.InvalidTopic.__name__)",
        pythonpath=[REPO],
    )
    assert out.split() == ["True", "InvalidTopic"]


FIRST_NAME_PER_MODULE = {
    module: next(n for n, m in daemoneye_eventbus._EXPORTS.items() if m == module)
    for module in dict.fromkeys(daemoneye_eventbus._EXPORTS.values())
}


@pytest.mark.parametrize("name", list(FIRST_NAME_PER_MODULE.values()))
def test_export_resolves_in_a_fresh_interpreter(name: str) -> None:
    """The first access to a name imports what it needs, whatever was imported before."""
    module = daemoneye_eventbus._EXPORTS[name]
    own_name = module.rsplit(".", 1)[-1] == name
    out = run_python(
        "import importlib, daemoneye_eventbus as d\n"
        f"value = getattr(d, {name!r})\n"
        f"module = importlib.import_module({module!r})\n"
        f"print(value is (module if {own_name} else getattr(module, {name!r})))"
    )
    assert out.strip() == "True"


def test_registry_resolves_first_in_a_fresh_interpreter() -> None:
    """Regression: ``registry`` used to raise AttributeError unless something had
    imported ``daemoneye.eventbus.v1.registry`` before."""
    out = run_python(
        "import daemoneye_eventbus as d\n"
        "print(d.registry.__name__, d.registry.lookup('events.process.lifecycle').name)"
    )
    assert out.split() == ["daemoneye.eventbus.v1.registry", "events.process.lifecycle"]


# -- the modules' own __all__ ------------------------------------------------------------


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_module_all(module_name: str) -> None:
    module = importlib.import_module(f"daemoneye_eventbus.{module_name}")
    names = module.__all__
    assert isinstance(names, list)
    assert names, f"{module_name}.__all__ is empty"
    assert len(set(names)) == len(names)
    missing = [n for n in names if not hasattr(module, n)]
    assert missing == []
    for n in names:
        assert not n.startswith("_"), n


# -- exceptions ------------------------------------------------------------------------------


def exception_classes() -> dict[str, type[BaseException]]:
    return {
        name: obj
        for name, obj in vars(errors).items()
        if inspect.isclass(obj)
        and issubclass(obj, BaseException)
        and obj.__module__ == errors.__name__
    }


def test_exception_hierarchy_promises() -> None:
    assert issubclass(errors.InvalidTopic, ValueError)
    assert issubclass(errors.AccessDenied, PermissionError)
    assert issubclass(errors.RequestTimeout, TimeoutError)
    assert issubclass(errors.ConnectionClosed, ConnectionError)
    for cls in exception_classes().values():
        assert issubclass(cls, errors.EventBusError)
    assert issubclass(errors.EventBusError, Exception)
    assert set(exception_classes()) == set(errors.__all__)


def test_errors_docstring_mentions_every_exception() -> None:
    doc = errors.__doc__
    assert doc is not None
    for name in exception_classes():
        assert re.search(rf"\b{name}\b", doc), name


def test_errors_docstring_tree_is_the_hierarchy() -> None:
    """Every line of the tree in the docstring holds: parent by indentation, builtin in ()."""
    doc = errors.__doc__
    assert doc is not None
    lines = doc.splitlines()
    root = next(line for line in lines if line.strip() == "EventBusError")
    base = root.index("EventBusError")
    parents: dict[int, type[BaseException]] = {0: errors.EventBusError}
    seen = {"EventBusError"}
    for line in lines:
        m = re.match(r"(\s*)(?:[│ ]\s*)*[├└]── (\w+)(?: \((\w+)\))?", line)
        if m is None:
            continue
        depth = (line.index(m.group(2)) - base) // 4
        cls = getattr(errors, m.group(2))
        assert issubclass(cls, parents[depth - 1]), line
        if m.group(3):
            builtin = getattr(builtins, m.group(3))
            assert issubclass(cls, builtin), line
        parents[depth] = cls
        seen.add(m.group(2))
    assert seen == set(exception_classes())


def test_exception_codes() -> None:
    remote = errors.RemoteProtocolError("bad frame", 7)
    server = errors.ServerError("refused", 3)
    assert (str(remote), remote.code) == ("bad frame", 7)
    assert (str(server), server.code) == ("refused", 3)


# -- typing markers ---------------------------------------------------------------------------


def test_py_typed_markers() -> None:
    assert (PACKAGE_DIR / "py.typed").is_file()
    assert (REPO / "generated" / "daemoneye" / "eventbus" / "v1" / "py.typed").is_file()


# -- pure modules ------------------------------------------------------------------------------


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Name) and node.id in ("__import__", "importlib"):
            names.add("<dynamic>")
    return names


def module_path(module_name: str) -> Path:
    """The source file of ``daemoneye_eventbus.<module_name>`` (a package's ``__init__``)."""
    path = PACKAGE_DIR.joinpath(*module_name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


@pytest.mark.parametrize("module_name", PURE_MODULES)
def test_pure_module_source_has_no_asyncio(module_name: str) -> None:
    imports = imported_modules(module_path(module_name))
    assert imports, module_name
    assert not {m for m in imports if m.split(".")[0] == "asyncio"}
    assert "<dynamic>" not in imports
    # Within the package, they import only other modules without asyncio.
    for m in imports:
        if m.startswith("daemoneye_eventbus."):
            assert m.removeprefix("daemoneye_eventbus.") in {
                *PURE_MODULES,
                "errors",
                "deprecation",
                "registry_runtime",
            }, m


@pytest.mark.parametrize("module_name", PURE_MODULES)
def test_pure_module_import_leaves_asyncio_out(module_name: str) -> None:
    out = run_python(
        f"import sys, daemoneye_eventbus.{module_name}\n"
        "print(sorted(m for m in sys.modules if m == 'asyncio' or m.startswith('asyncio.')))\n"
        "print('google.protobuf' in sys.modules)"
    )
    no_asyncio, protobuf_loaded = out.splitlines()
    assert no_asyncio == "[]"
    if module_name in ("correlation", "protocol") or module_name.startswith("control"):
        # They use the generated messages: protobuf itself runs without asyncio.
        assert protobuf_loaded == "True"
