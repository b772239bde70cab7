"""The NATS JetStream bridge: the pieces built so far (docs/bridge.md).

* :mod:`daemoneye_eventbus.bridge.subjects` (pure): bus topics and filters
  <-> NATS subjects, host ids, inbound control subjects, ``Nats-Msg-Id``.
* :mod:`daemoneye_eventbus.bridge.spool` (no event loop; SQLite file I/O):
  the bounded on-disk FIFO that holds events while the link to NATS is down.

This package module imports neither of them, nor NATS, nor asyncio: import
the submodule you need. The bridge itself is
:class:`daemoneye_eventbus.bridge.runner.Bridge`, its Prometheus metrics
:mod:`daemoneye_eventbus.bridge.metrics`, and ``daemoneye-eventbus bridge``
(:mod:`daemoneye_eventbus.cli_bridge`) runs it.
"""

from __future__ import annotations

__all__: list[str] = []
