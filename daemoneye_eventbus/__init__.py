"""daemoneye-eventbus: a typed, schema-first local pub/sub bus.

The public surface is re-exported here. ``matches``, ``validate_filter``
(topics) and ``filter_matches`` (correlation) are deprecated names of
:func:`topic_matches`, :func:`validate_topic_filter` and
:func:`correlation_matches`, kept for one release; using them warns. Names
are imported lazily, on first use, so that the code generator (which needs only
the pure ``topics`` and
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
    from daemoneye.eventbus.v1.registry import (
        RequestTopic,
        RequestTopicTemplate,
        Topic,
        TopicTemplate,
    )
    from daemoneye_eventbus.access import PeerCredentials, Policy
    from daemoneye_eventbus.broker import Broker
    from daemoneye_eventbus.bus import (
        BusEvent,
        DaemoneyeBroker,
        DaemoneyeEventBus,
        EventBus,
        EventBusStatistics,
        EventReceiver,
        EventSubscription,
    )
    from daemoneye_eventbus.client import Client, ClientStatistics, connect
    from daemoneye_eventbus.config import BrokerConfig
    from daemoneye_eventbus.correlation import (
        CorrelationMatcher,
        correlation_filter,
        correlation_matches,
        create_child,
        new_correlation,
        validate_correlation_filter,
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
        NoResponders,
        PayloadTypeMismatch,
        PolicyError,
        PrivilegeError,
        ProtocolError,
        RemoteProtocolError,
        RequestFailed,
        RequestTimeout,
        SchemaError,
        ServerError,
        SubscriptionExists,
        UnknownRequest,
        UnknownSubscription,
        UnknownTopic,
    )
    from daemoneye_eventbus.responders import IncomingRequest, Responder
    from daemoneye_eventbus.sessions import LocalSession
    from daemoneye_eventbus.statistics import (
        BrokerStatistics,
        ConnectionStatistics,
        SubscriptionStatistics,
    )
    from daemoneye_eventbus.subscription import Subscription
    from daemoneye_eventbus.topics import (
        SubscriptionTrie,
        topic_matches,
        validate_topic,
        validate_topic_filter,
    )

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
    "RequestTopic": "daemoneye.eventbus.v1.registry",
    "RequestTopicTemplate": "daemoneye.eventbus.v1.registry",
    "Topic": "daemoneye.eventbus.v1.registry",
    "TopicTemplate": "daemoneye.eventbus.v1.registry",
    "PeerCredentials": "daemoneye_eventbus.access",
    "Policy": "daemoneye_eventbus.access",
    "Broker": "daemoneye_eventbus.broker",
    "BrokerConfig": "daemoneye_eventbus.config",
    "BrokerStatistics": "daemoneye_eventbus.statistics",
    "ConnectionStatistics": "daemoneye_eventbus.statistics",
    "SubscriptionStatistics": "daemoneye_eventbus.statistics",
    "LocalSession": "daemoneye_eventbus.sessions",
    "BusEvent": "daemoneye_eventbus.bus",
    "DaemoneyeBroker": "daemoneye_eventbus.bus",
    "DaemoneyeEventBus": "daemoneye_eventbus.bus",
    "EventBus": "daemoneye_eventbus.bus",
    "EventBusStatistics": "daemoneye_eventbus.bus",
    "EventReceiver": "daemoneye_eventbus.bus",
    "EventSubscription": "daemoneye_eventbus.bus",
    "Client": "daemoneye_eventbus.client",
    "ClientStatistics": "daemoneye_eventbus.client",
    "Subscription": "daemoneye_eventbus.subscription",
    "connect": "daemoneye_eventbus.client",
    "CorrelationMatcher": "daemoneye_eventbus.correlation",
    "correlation_filter": "daemoneye_eventbus.correlation",
    "create_child": "daemoneye_eventbus.correlation",
    "correlation_matches": "daemoneye_eventbus.correlation",
    "validate_correlation_filter": "daemoneye_eventbus.correlation",
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
    "NoResponders": "daemoneye_eventbus.errors",
    "PayloadTypeMismatch": "daemoneye_eventbus.errors",
    "PolicyError": "daemoneye_eventbus.errors",
    "PrivilegeError": "daemoneye_eventbus.errors",
    "SubscriptionExists": "daemoneye_eventbus.errors",
    "ProtocolError": "daemoneye_eventbus.errors",
    "RemoteProtocolError": "daemoneye_eventbus.errors",
    "RequestFailed": "daemoneye_eventbus.errors",
    "RequestTimeout": "daemoneye_eventbus.errors",
    "SchemaError": "daemoneye_eventbus.errors",
    "ServerError": "daemoneye_eventbus.errors",
    "UnknownRequest": "daemoneye_eventbus.errors",
    "UnknownSubscription": "daemoneye_eventbus.errors",
    "UnknownTopic": "daemoneye_eventbus.errors",
    "IncomingRequest": "daemoneye_eventbus.responders",
    "Responder": "daemoneye_eventbus.responders",
    "SubscriptionTrie": "daemoneye_eventbus.topics",
    "topic_matches": "daemoneye_eventbus.topics",
    "validate_topic": "daemoneye_eventbus.topics",
    "validate_topic_filter": "daemoneye_eventbus.topics",
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
    "ConnectionStatistics",
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
    "IncomingRequest",
    "InvalidCorrelation",
    "InvalidTopic",
    "LimitExceeded",
    "LocalProtocolError",
    "LocalSession",
    "NetworkEvent",
    "NoResponders",
    "PayloadTypeMismatch",
    "PeerCredentials",
    "PerformanceEvent",
    "Policy",
    "PolicyError",
    "PrivilegeError",
    "ProcessBatch",
    "ProcessEvent",
    "ProtocolError",
    "ReceivedEvent",
    "RemoteProtocolError",
    "RequestFailed",
    "RequestTimeout",
    "RequestTopic",
    "RequestTopicTemplate",
    "Responder",
    "SchemaError",
    "ServerError",
    "Subscription",
    "SubscriptionExists",
    "SubscriptionStatistics",
    "SubscriptionTrie",
    "Topic",
    "TopicTemplate",
    "UnknownRequest",
    "UnknownSubscription",
    "UnknownTopic",
    "connect",
    "correlation_filter",
    "correlation_matches",
    "create_child",
    "new_correlation",
    "registry",
    "topic_matches",
    "validate_correlation_filter",
    "validate_topic",
    "validate_topic_filter",
    "with_stage",
    "with_tag",
]


#: Deprecated names, kept for one release: not in ``__all__``; using them warns.
_DEPRECATED: dict[str, str] = {
    "filter_matches": "daemoneye_eventbus.correlation",
    "matches": "daemoneye_eventbus.topics",
    "validate_filter": "daemoneye_eventbus.topics",
}


def __getattr__(name: str) -> Any:
    deprecated = _DEPRECATED.get(name)
    if deprecated is not None:  # the module's own __getattr__ warns
        return getattr(importlib.import_module(deprecated), name)
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
