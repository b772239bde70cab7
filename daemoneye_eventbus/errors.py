"""Exceptions raised by daemoneye-eventbus.

Every exception the library raises on purpose derives from
:class:`EventBusError`. Where a builtin describes the failure, the exception
inherits it too, so callers can catch either. Every error carries ``code``,
the wire ``ErrorCode`` that reports it to a peer (0 where none applies): the
router raises these errors with their code, the socket session sends that
code in an ``Error`` frame, and an in-process caller gets the same exception::

    EventBusError
    ├── InvalidTopic (ValueError)            a topic or filter breaks the grammar
    ├── InvalidCorrelation (ValueError)      correlation metadata or filter out of bounds
    ├── SchemaError                          the schema or the topic registry is broken
    ├── UnknownTopic (LookupError)           no topic of that name in the registry
    ├── UnknownSubscription (LookupError)    no subscription with that id
    ├── SubscriptionExists (ValueError)      that subscription id or subscriber is taken
    ├── PayloadTypeMismatch (TypeError)      a message of the wrong type for a topic
    ├── InvalidPayload (ValueError)          a payload that does not parse as its declared type
    ├── AccessDenied (PermissionError)       the broker refused the peer
    ├── LimitExceeded                        a configured limit was reached
    ├── PolicyError (ValueError)             the access policy file is unreadable or malformed
    ├── ProtocolError                        the wire protocol was broken
    │   ├── LocalProtocolError               ... by us (a bug or misuse)
    │   └── RemoteProtocolError              ... by the peer; closes that connection
    ├── ConnectionClosed (ConnectionError)   the connection is gone
    │   ├── ClosedResourceError              ... because we closed it
    │   └── BrokenResourceError              ... because the peer or the broker did
    ├── BrokerError                          the broker could not start or run
    │   ├── BrokerAlreadyRunning             another broker answers on the socket
    │   └── PrivilegeError                   no such user or group, or privileges not dropped
    ├── ServerError                          the broker answered with an Error frame
    ├── RequestTimeout (TimeoutError)        an answer did not come in time
    ├── NoResponders (LookupError)           no responder may answer a request on that topic
    ├── UnknownRequest (LookupError)         a reply names a request that is not waiting for it
    └── RequestFailed                        the responder could not answer (its reason)
"""

from __future__ import annotations

__all__ = [
    "AccessDenied",
    "BrokenResourceError",
    "BrokerAlreadyRunning",
    "BrokerError",
    "ClosedResourceError",
    "ConnectionClosed",
    "EventBusError",
    "InvalidCorrelation",
    "InvalidPayload",
    "InvalidTopic",
    "LimitExceeded",
    "LocalProtocolError",
    "NoResponders",
    "PayloadTypeMismatch",
    "PolicyError",
    "PrivilegeError",
    "ProtocolError",
    "RemoteProtocolError",
    "RequestFailed",
    "RequestTimeout",
    "SchemaError",
    "ServerError",
    "SubscriptionExists",
    "UnknownRequest",
    "UnknownSubscription",
    "UnknownTopic",
]


class EventBusError(Exception):
    """Base class of every exception raised by daemoneye-eventbus.

    ``code`` is the wire ``ErrorCode`` number that reports this error to a
    peer [protocol §7], or 0 where none applies; pass it as ``code=``.
    """

    code: int = 0

    def __init__(self, *args: object, code: int | None = None) -> None:
        super().__init__(*args)
        if code is not None:
            self.code = code


class InvalidTopic(EventBusError, ValueError):
    """A topic or topic filter breaks the topic grammar; the message says why."""


class InvalidCorrelation(EventBusError, ValueError):
    """Correlation metadata or a correlation filter is out of bounds or malformed."""


class SchemaError(EventBusError):
    """The schema is broken: duplicate topic, missing or unknown payload type, ..."""


class UnknownTopic(EventBusError, LookupError):
    """No topic of that name is declared in the registry."""


class UnknownSubscription(EventBusError, LookupError):
    """No active subscription has that id."""


class SubscriptionExists(EventBusError, ValueError):
    """The subscription id (or subscriber name) is already in use, or is 0."""


class PayloadTypeMismatch(EventBusError, TypeError):
    """A message's type is not the payload type declared for the topic."""


class InvalidPayload(EventBusError, ValueError):
    """A payload does not parse as the payload type its topic declares.

    The broker refuses such a publish (``ERROR_CODE_INVALID_PAYLOAD``); a
    subscriber that decodes one (behind a broker with validation off) gets
    this error with the event's ``topic``, ``payload_type`` and ``sequence``.
    """

    def __init__(
        self,
        message: str,
        *,
        topic: str = "",
        payload_type: str = "",
        sequence: int = 0,
        code: int | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.topic = topic
        self.payload_type = payload_type
        self.sequence = sequence


class AccessDenied(EventBusError, PermissionError):
    """The peer may not do what it asked."""


class LimitExceeded(EventBusError):
    """A configured limit (connections, subscriptions, queue, ...) was reached."""


class PolicyError(EventBusError, ValueError):
    """The policy file is unreadable or malformed; the message says where."""


class ProtocolError(EventBusError):
    """The wire protocol was broken."""


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol forbids: a bug or a misuse."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids.

    ``code`` is the ``ErrorCode`` value sent to the peer in the ``Error`` frame
    that closes the connection.
    """

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message, code=code)


class ConnectionClosed(EventBusError, ConnectionError):
    """The connection is closed; nothing more can be sent or received."""


class ClosedResourceError(ConnectionClosed):
    """The connection was closed by this side."""


class BrokenResourceError(ConnectionClosed):
    """The connection was closed by the peer, or broken."""


class BrokerError(EventBusError):
    """The broker could not start or keep running."""


class BrokerAlreadyRunning(BrokerError):
    """Another broker is live on the socket path; it is never taken over."""


class PrivilegeError(BrokerError):
    """The broker cannot drop its privileges as asked, or will not run as root.

    Raised for an unknown user or group, a failed ``setgroups``/``setgid``/
    ``setuid``, a process that could still regain root afterwards, and by
    ``serve`` when it runs as root without ``--user`` or ``--allow-root``.
    """


class ServerError(EventBusError):
    """The broker refused a request with an ``Error`` frame.

    ``code`` is the ``ErrorCode`` value the broker sent.
    """

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message, code=code)


class RequestTimeout(EventBusError, TimeoutError):
    """An answer did not arrive in time: the broker's, or the reply to a request
    by its deadline (``ERROR_CODE_REQUEST_TIMEOUT``)."""


class NoResponders(EventBusError, LookupError):
    """Nobody may answer the request: no responder serves its topic, or none
    that may read it (``ERROR_CODE_NO_RESPONDERS``, at once)."""


class UnknownRequest(EventBusError, LookupError):
    """A reply names a request this connection does not hold: answered already,
    past its deadline, or never delivered to it (``ERROR_CODE_UNKNOWN_REQUEST``)."""


class RequestFailed(EventBusError):
    """The responder took the request but could not answer it; ``reason`` is its word."""

    def __init__(self, reason: str, *, responder: str = "", topic: str = "") -> None:
        where = f" on {topic!r}" if topic else ""
        super().__init__(f"{responder or 'the responder'} failed the request{where}: {reason}")
        #: Why, as the responder said it.
        self.reason = reason
        #: The component that answered ("" if anonymous).
        self.responder = responder
        #: The request topic.
        self.topic = topic
