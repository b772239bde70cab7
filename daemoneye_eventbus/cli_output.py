"""What the CLI prints: aligned tables, JSON with numbers as numbers, the broker's first line.

Pure formatting, no I/O: :func:`table` pads columns to their widest cell,
:func:`message_json` turns a protobuf message into a JSON-ready dict in
protobuf's JSON mapping but with 64-bit integers as JSON numbers (the mapping
writes them as strings, for JavaScript's sake; a count is a number), and
:func:`listening_line` is the line a broker started by the CLI prints first.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Collection, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final, cast

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from daemoneye_eventbus.runtime import running_loop_name

if TYPE_CHECKING:  # watch uses the tables without a broker
    from daemoneye_eventbus.broker import Broker

__all__ = ["listening_line", "message_json", "table"]

#: Field types protobuf's JSON mapping writes as strings.
_INT64: Final = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    }
)


def table(rows: Sequence[Sequence[str]], *, right: Collection[int] = ()) -> list[str]:
    """``rows`` as lines of columns padded to their widest cell, two spaces apart.

    Columns whose index is in ``right`` are right-aligned (figures), the
    others left-aligned; trailing blanks are cut.
    """
    if not rows:
        return []
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = []
    for row in rows:
        cells = [
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
    return out


def message_json(
    message: Message, *, omit: Iterable[str] = (), all_fields: bool = False
) -> dict[str, Any]:
    """``message`` in protobuf's JSON mapping, but with 64-bit integers as numbers.

    ``all_fields`` shows fields at their default (a counter at 0) too.
    ``omit`` names top-level fields (by their proto name) to leave out, such
    as a request id that only pairs a reply with its request.
    """
    data = json_format.MessageToDict(message, always_print_fields_with_no_presence=all_fields)
    # The C implementation's descriptor class is typed apart; it has the same interface.
    descriptor = cast(Descriptor, message.DESCRIPTOR)
    for name in omit:
        data.pop(descriptor.fields_by_name[name].json_name, None)
    return _numbers(descriptor, data)


def _numbers(descriptor: Descriptor, data: dict[str, Any]) -> dict[str, Any]:
    """Turn the 64-bit integer strings of ``data`` (a ``descriptor`` message) into ints."""
    if descriptor.file.name.startswith("google/protobuf/"):
        return data  # well-known types have JSON forms of their own (timestamps, wrappers)
    for field in descriptor.fields:
        if field.json_name not in data:
            continue
        value = data[field.json_name]
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            entry = field.message_type.fields_by_name["value"]
            data[field.json_name] = {k: _value(entry, v) for k, v in value.items()}
        elif field.is_repeated:
            data[field.json_name] = [_value(field, v) for v in value]
        else:
            data[field.json_name] = _value(field, value)
    return data


def _value(field: FieldDescriptor, value: Any) -> Any:
    if field.message_type is not None:
        return _numbers(field.message_type, value)
    if field.type in _INT64:
        return int(value)
    return value


def listening_line(broker: Broker) -> str:
    """The first line of a broker the CLI runs: where, how open, whose policy, which loop."""
    if sys.platform == "win32":
        sddl = broker.config.pipe_sddl or "default"
        return (
            f"daemoneye-eventbus broker listening on {broker.path} "
            f"(pipe security {sddl}, policy {broker.policy.source}, loop {running_loop_name()})"
        )
    return (
        f"daemoneye-eventbus broker listening on {broker.path} "
        f"(mode {broker.config.socket_mode:04o}, policy {broker.policy.source}, "
        f"uid {os.geteuid()}, gid {os.getegid()}, loop {running_loop_name()})"
    )
