"""The broker's limits and deadlines: one frozen :class:`BrokerConfig` (pure).

Every limit here is enforced, by the router (topics, subscriptions, batches,
frame sizes), the sessions (queues, deadlines) or the broker (connections).
docs/security.md lists them with the reasoning behind each default.
"""

from __future__ import annotations

from dataclasses import dataclass

from daemoneye.eventbus.v1 import frames_pb2
from daemoneye_eventbus.access import Policy
from daemoneye_eventbus.frames import DEFAULT_MAX_FRAME_BYTES, HANDSHAKE_MAX_FRAME_BYTES
from daemoneye_eventbus.topics import DEFAULT_MAX_TOPIC_BYTES, DEFAULT_MAX_TOPIC_LEVELS

__all__ = ["BrokerConfig"]


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """Limits and deadlines of a broker. Every one is enforced."""

    #: Largest frame body after the handshake, in bytes.
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    #: Largest frame body before the handshake completes, in bytes.
    handshake_max_frame_bytes: int = HANDSHAKE_MAX_FRAME_BYTES
    #: Seconds a client has to complete the handshake, however slowly it sends.
    handshake_timeout: float = 2.0
    #: Open connections at most, in total.
    max_connections: int = 1024
    #: Open connections at most per peer uid.
    max_connections_per_uid: int = 256
    #: Subscriptions at most per connection.
    max_subscriptions: int = 1024
    #: Longest topic or filter, in bytes.
    max_topic_bytes: int = DEFAULT_MAX_TOPIC_BYTES
    #: Most levels in a topic or filter.
    max_topic_levels: int = DEFAULT_MAX_TOPIC_LEVELS
    #: Messages queued at most for one subscriber before drops start.
    max_queue_messages: int = 1000
    #: Bytes queued at most for one subscriber before drops start.
    max_queue_bytes: int = 8 * 1024 * 1024
    #: Frames handled from one connection per event-loop turn; the rest of its
    #: input waits (reading paused) for the next turn, so that a flood from one
    #: peer cannot delay another's handshake, pong or publish [protocol §1].
    max_frames_per_turn: int = 64
    #: Bytes of broker memory one connection's subscriptions may hold (filters
    #: and compiled correlation filters, see daemoneye_eventbus.budget).
    max_subscription_bytes: int = 4 * 1024 * 1024
    #: Bytes of broker memory all subscriptions together may hold.
    max_total_subscription_bytes: int = 64 * 1024 * 1024
    #: Bytes of pending output all connections together may hold while their
    #: peers do not read (each frame counted with its overhead); past it,
    #: events for a backed-up subscriber are dropped and a backed-up peer
    #: that asks for more replies is disconnected as a slow consumer.
    max_total_queue_bytes: int = 64 * 1024 * 1024
    #: Bytes of partial input all connections together may hold (frames not
    #: yet complete); a connection that would go past it is closed.
    max_total_input_bytes: int = 32 * 1024 * 1024
    #: Retained events the broker keeps at most (one per concrete retained
    #: topic); a publish that would retain one more is refused [protocol §5].
    max_retained_events: int = 10_000
    #: Bytes of broker memory the retained events may hold together (each
    #: its encoded Publish plus daemoneye_eventbus.retained.RETAINED_COST).
    max_retained_bytes: int = 16 * 1024 * 1024
    #: Seconds a subscriber's socket may stay backed up, or a lossless
    #: subscriber may hold its publishers without granting credit, before it
    #: is disconnected as a slow consumer.
    slow_consumer_timeout: float = 10.0
    #: Most credit (events) a lossless subscription may be granted; also its
    #: window when the client leaves the choice to the broker.
    max_credit_window: int = 1_000_000
    #: Requests one connection may have waiting for their replies at once.
    max_pending_requests: int = 1024
    #: Requests all connections together may have waiting for their replies.
    max_total_pending_requests: int = 65_536
    #: Seconds a request waits for its reply when it asks for no deadline.
    default_request_timeout: float = 5.0
    #: The longest deadline a request may ask for, in seconds; a longer one is
    #: shortened to it.
    max_request_timeout: float = 300.0
    #: Seconds of silence after which the broker pings a client.
    heartbeat_interval: float = 5.0
    #: Seconds of silence after which the broker disconnects a client.
    idle_timeout: float = 15.0
    #: Seconds a graceful shutdown may spend draining queues.
    drain_timeout: float = 5.0
    #: Accept topics the schema does not declare (as public topics).
    allow_undeclared_topics: bool = False
    #: Parse every published payload as its topic's declared type and refuse
    #: (ERROR_CODE_INVALID_PAYLOAD) what does not parse [protocol §5].
    validate_payloads: bool = True
    #: With validation on, skip it for in-process publishers (the agent's own
    #: code, which holds the broker anyway).
    trust_local_payloads: bool = False
    #: Permission bits of the socket file (Unix sockets).
    socket_mode: int = 0o600
    #: Group of the socket file (gid), or None to keep the broker's (Unix sockets).
    socket_group: int | None = None
    #: Security descriptor (SDDL) of the named pipe (Windows), or None for the
    #: default: full access for LocalSystem, Administrators and the broker's
    #: own user, nobody else (daemoneye_eventbus.transports.pipes.default_sddl).
    pipe_sddl: str | None = None
    #: Which peers may act as which component; None for :meth:`Policy.default`.
    policy: Policy | None = None
    #: Kernel send buffer asked for on each connection (SO_SNDBUF), or None for
    #: the system default. A larger buffer absorbs a subscriber's short stalls
    #: without drops; the kernel caps it at net.core.wmem_max.
    socket_send_buffer: int | None = 1024 * 1024

    def limits(self) -> frames_pb2.Limits:
        """The limits as announced in ``Welcome``."""
        return frames_pb2.Limits(
            max_frame_bytes=self.max_frame_bytes,
            max_topic_bytes=self.max_topic_bytes,
            max_topic_levels=self.max_topic_levels,
            max_subscriptions=self.max_subscriptions,
            max_queue_messages=self.max_queue_messages,
            max_queue_bytes=self.max_queue_bytes,
            heartbeat_interval_ms=int(self.heartbeat_interval * 1000),
            idle_timeout_ms=int(self.idle_timeout * 1000),
            max_pending_requests=self.max_pending_requests,
            max_request_timeout_ms=int(self.max_request_timeout * 1000),
            default_request_timeout_ms=int(
                min(self.default_request_timeout, self.max_request_timeout) * 1000
            ),
        )
