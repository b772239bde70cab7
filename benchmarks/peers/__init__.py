"""The systems the suite compares: this bus and its peers, one adapter each.

Adapters import their client libraries only inside the functions that use
them, so every adapter imports (and can say what is missing) before the
libraries are installed.
"""

from __future__ import annotations

from typing import Final

from benchmarks.peers.base import Adapter
from benchmarks.peers.daemoneye_peer import DaemoneyeAdapter
from benchmarks.peers.mqtt_peer import MqttAdapter
from benchmarks.peers.nats_peer import NatsAdapter
from benchmarks.peers.zmq_peer import ZmqAdapter

__all__ = ["ADAPTERS", "SYSTEMS", "Adapter", "adapter"]

ADAPTERS: Final[dict[str, type[Adapter]]] = {
    "daemoneye": DaemoneyeAdapter,
    "zmq": ZmqAdapter,
    "nats": NatsAdapter,
    "mqtt": MqttAdapter,
}
#: Every system, in table order.
SYSTEMS: Final = tuple(ADAPTERS)


def adapter(name: str) -> Adapter:
    """A new adapter for the system called ``name``."""
    return ADAPTERS[name]()
