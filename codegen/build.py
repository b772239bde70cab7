"""Run protoc and the registry renderer (the I/O around the pure parts)."""

from __future__ import annotations

import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

from google.protobuf import descriptor_pb2

from codegen.render import render, render_init
from codegen.render_ts import generate_ts
from codegen.schema import collect_schema
from daemoneye_eventbus.errors import SchemaError

__all__ = ["PACKAGE", "compile_schema", "generate"]

#: The proto package, directory and Python import path of the schema.
PACKAGE = "daemoneye.eventbus.v1"

_INIT_DOCS = {
    "daemoneye": "Generated code of the daemoneye schemas.",
    "daemoneye/eventbus": "Generated code of the daemoneye-eventbus schema.",
    "daemoneye/eventbus/v1": "Messages and typed topic registry of daemoneye.eventbus.v1.",
}


def _protoc(args: list[str]) -> None:
    from grpc_tools import protoc  # imported late: only the generator needs it

    include = str(resources.files("grpc_tools") / "_proto")
    code = protoc.main(["protoc", f"-I{include}", *args])
    if code != 0:
        raise SchemaError(f"protoc failed with exit code {code}")


def compile_schema(proto_root: Path, out: Path | None = None) -> descriptor_pb2.FileDescriptorSet:
    """Compile every ``.proto`` under ``proto_root``; with ``out``, write Python code too.

    Returns the descriptor set with imports and source info, for the registry.
    """
    protos = sorted(p.relative_to(proto_root).as_posix() for p in proto_root.rglob("*.proto"))
    if not protos:
        raise SchemaError(f"no .proto files under {proto_root}")
    with tempfile.TemporaryDirectory() as tmp:
        descriptor_set = Path(tmp) / "schema.binpb"
        args = [
            f"-I{proto_root}",
            "--include_imports",
            "--include_source_info",
            f"--descriptor_set_out={descriptor_set}",
        ]
        if out is not None:
            plugin = Path(sys.executable).parent / "protoc-gen-mypy"
            args += [
                f"--python_out={out}",
                f"--plugin=protoc-gen-mypy={plugin}",
                f"--mypy_out=quiet:{out}",
            ]
        _protoc([*args, *protos])
        return descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes())


def generate(proto_root: Path, out: Path, ts_out: Path | None = None) -> list[Path]:
    """Regenerate ``out`` from ``proto_root`` and return the files written.

    Output goes to a scratch directory first, so a broken schema leaves the
    committed files untouched; stale files of removed protos disappear.
    """
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        fds = compile_schema(proto_root, scratch)
        schema = collect_schema(fds)
        pkg_dir = scratch.joinpath(*PACKAGE.split("."))
        (pkg_dir / "registry.py").write_text(render(schema.topics, PACKAGE, schema.event_kinds))
        for rel, doc in _INIT_DOCS.items():
            (scratch / rel / "__init__.py").write_text(render_init(doc))
        (pkg_dir / "py.typed").write_text("")
        top = out / "daemoneye"
        if top.exists():
            shutil.rmtree(top)
        out.mkdir(parents=True, exist_ok=True)
        shutil.copytree(scratch / "daemoneye", top)
    written = sorted(p for p in top.rglob("*") if p.is_file())
    if ts_out is not None:
        written += generate_ts(proto_root, ts_out)
    return written
