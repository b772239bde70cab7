"""daemoneye-eventbus: a typed, schema-first local pub/sub bus.

The public surface is re-exported here. Names are imported lazily, on first
use, so that the code generator (which needs only the pure ``topics`` and
``errors`` modules) runs even while ``generated/`` is missing or stale.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from daemoneye.eventbus.v1 import registry
    from daemoneye.eventbus.v1.correlation_pb2 import CorrelationFilter, CorrelationMetadata
    from daemoneye.eventbus.v1.events_pb2 import (
        CollectionEvent,
        FilesystemEvent,
        NetworkEvent,
        PerformanceEvent,
        ProcessBatch,
        ProcessEvent,
    )
    from daemoneye.eventbus.v1.registry import Topic, TopicTemplate
    from daemoneye_eventbus.broker import Broker, BrokerConfig, BrokerStatistics
    from daemoneye_eventbus.bus import (
        BusEvent,
        DaemoneyeBroker,
        DaemoneyeEventBus,
        EventBus,
        EventBusStatistics,
        EventReceiver,
        EventSubscription,
    )
    from daemoneye_eventbus.client import Client, ClientStatistics, Subscription, connect
    from daemoneye_eventbus.correlation import (
        CorrelationMatcher,
        correlation_filter,
        create_child,
        filter_matches,
        new_correlation,
        with_stage,
        with_tag,
    )
    from daemoneye_eventbus.delivery import EventQueue, ReceivedEvent
    from daemoneye_eventbus.errors import (
        AccessDenied,
        BrokenResourceError,
        BrokerAlreadyRunning,
        BrokerError,
        ClosedResourceError,
        ConnectionClosed,
        EventBusError,
        InvalidCorrelation,
        InvalidTopic,
        LimitExceeded,
        LocalProtocolError,
        PayloadTypeMismatch,
        ProtocolError,
        RemoteProtocolError,
        RequestTimeout,
        SchemaError,
        ServerError,
        UnknownSubscription,
        UnknownTopic,
    )
    from daemoneye_eventbus.topics import SubscriptionTrie, matches, validate_filter, validate_topic

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "registry": "daemoneye.eventbus.v1.registry",
    "CorrelationFilter": "daemoneye.eventbus.v1.correlation_pb2",
    "CorrelationMetadata": "daemoneye.eventbus.v1.correlation_pb2",
    "CollectionEvent": "daemoneye.eventbus.v1.events_pb2",
    "FilesystemEvent": "daemoneye.eventbus.v1.events_pb2",
    "NetworkEvent": "daemoneye.eventbus.v1.events_pb2",
    "PerformanceEvent": "daemoneye.eventbus.v1.events_pb2",
    "ProcessBatch": "daemoneye.eventbus.v1.events_pb2",
    "ProcessEvent": "daemoneye.eventbus.v1.events_pb2",
    "Topic": "daemoneye.eventbus.v1.registry",
    "TopicTemplate": "daemoneye.eventbus.v1.registry",
    "Broker": "daemoneye_eventbus.broker",
    "BrokerConfig": "daemoneye_eventbus.broker",
    "BrokerStatistics": "daemoneye_eventbus.broker",
    "BusEvent": "daemoneye_eventbus.bus",
    "DaemoneyeBroker": "daemoneye_eventbus.bus",
    "DaemoneyeEventBus": "daemoneye_eventbus.bus",
    "EventBus": "daemoneye_eventbus.bus",
    "EventBusStatistics": "daemoneye_eventbus.bus",
    "EventReceiver": "daemoneye_eventbus.bus",
    "EventSubscription": "daemoneye_eventbus.bus",
    "Client": "daemoneye_eventbus.client",
    "ClientStatistics": "daemoneye_eventbus.client",
    "Subscription": "daemoneye_eventbus.client",
    "connect": "daemoneye_eventbus.client",
    "CorrelationMatcher": "daemoneye_eventbus.correlation",
    "correlation_filter": "daemoneye_eventbus.correlation",
    "create_child": "daemoneye_eventbus.correlation",
    "filter_matches": "daemoneye_eventbus.correlation",
    "new_correlation": "daemoneye_eventbus.correlation",
    "with_stage": "daemoneye_eventbus.correlation",
    "with_tag": "daemoneye_eventbus.correlation",
    "EventQueue": "daemoneye_eventbus.delivery",
    "ReceivedEvent": "daemoneye_eventbus.delivery",
    "AccessDenied": "daemoneye_eventbus.errors",
    "BrokenResourceError": "daemoneye_eventbus.errors",
    "BrokerAlreadyRunning": "daemoneye_eventbus.errors",
    "BrokerError": "daemoneye_eventbus.errors",
    "ClosedResourceError": "daemoneye_eventbus.errors",
    "ConnectionClosed": "daemoneye_eventbus.errors",
    "EventBusError": "daemoneye_eventbus.errors",
    "InvalidCorrelation": "daemoneye_eventbus.errors",
    "InvalidTopic": "daemoneye_eventbus.errors",
    "LimitExceeded": "daemoneye_eventbus.errors",
    "LocalProtocolError": "daemoneye_eventbus.errors",
    "PayloadTypeMismatch": "daemoneye_eventbus.errors",
    "ProtocolError": "daemoneye_eventbus.errors",
    "RemoteProtocolError": "daemoneye_eventbus.errors",
    "RequestTimeout": "daemoneye_eventbus.errors",
    "SchemaError": "daemoneye_eventbus.errors",
    "ServerError": "daemoneye_eventbus.errors",
    "UnknownSubscription": "daemoneye_eventbus.errors",
    "UnknownTopic": "daemoneye_eventbus.errors",
    "SubscriptionTrie": "daemoneye_eventbus.topics",
    "matches": "daemoneye_eventbus.topics",
    "validate_filter": "daemoneye_eventbus.topics",
    "validate_topic": "daemoneye_eventbus.topics",
}

__all__ = [
    "AccessDenied",
    "BrokenResourceError",
    "Broker",
    "BrokerAlreadyRunning",
    "BrokerConfig",
    "BrokerError",
    "BrokerStatistics",
    "BusEvent",
    "Client",
    "ClientStatistics",
    "ClosedResourceError",
    "CollectionEvent",
    "ConnectionClosed",
    "CorrelationFilter",
    "CorrelationMatcher",
    "CorrelationMetadata",
    "DaemoneyeBroker",
    "DaemoneyeEventBus",
    "EventBus",
    "EventBusError",
    "EventBusStatistics",
    "EventQueue",
    "EventReceiver",
    "EventSubscription",
    "FilesystemEvent",
    "InvalidCorrelation",
    "InvalidTopic",
    "LimitExceeded",
    "LocalProtocolError",
    "NetworkEvent",
    "PayloadTypeMismatch",
    "PerformanceEvent",
    "ProcessBatch",
    "ProcessEvent",
    "ProtocolError",
    "ReceivedEvent",
    "RemoteProtocolError",
    "RequestTimeout",
    "SchemaError",
    "ServerError",
    "Subscription",
    "SubscriptionTrie",
    "Topic",
    "TopicTemplate",
    "UnknownSubscription",
    "UnknownTopic",
    "connect",
    "correlation_filter",
    "create_child",
    "filter_matches",
    "matches",
    "new_correlation",
    "registry",
    "validate_filter",
    "validate_topic",
    "with_stage",
    "with_tag",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    imported = importlib.import_module(module)
    # A module exported under its own name (``registry``) is the module itself.
    value = imported if module.rsplit(".", 1)[-1] == name else getattr(imported, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
