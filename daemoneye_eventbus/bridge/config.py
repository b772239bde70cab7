"""The bridge's configuration, checked before anything connects.

Pure code: no event loop, no I/O but reading TLS files when
:meth:`NatsOptions.connect_options` builds the TLS context.
"""

from __future__ import annotations

import importlib.util
import math
import re
import ssl
from dataclasses import dataclass, field
from typing import Any, Final

from daemoneye_eventbus.bridge.subjects import (
    InvalidSubject,
    control_subject_pattern,
    filter_to_subjects,
    host_pattern,
    subject_covers,
    subjects_overlap,
    validate_host_id,
)
from daemoneye_eventbus.errors import EventBusError, InvalidTopic
from daemoneye_eventbus.topics import filters_overlap, split_topic, validate_topic_filter

__all__ = [
    "BRIDGE_COMPONENT",
    "DEFAULT_STREAM",
    "BridgeConfig",
    "BridgeConfigError",
    "NatsOptions",
]

#: The component the bridge claims on the local bus (declared in topics.proto:
#: a subscriber of the restricted ``events.*`` topics, a publisher of the
#: control topics the fleet may send).
BRIDGE_COMPONENT: Final = "bridge"

#: The JetStream stream the bridge publishes to, unless configured otherwise.
DEFAULT_STREAM: Final = "DAEMONEYE_EVENTS"

# A stream name: no whitespace, '.', '*', '>', path separators (the NATS rules).
_STREAM_NAME: Final = re.compile(r"[A-Za-z0-9_-]{1,128}")

#: Seconds in a day.
_DAY: Final = 86_400.0


class BridgeConfigError(EventBusError, ValueError):
    """The bridge's configuration is not usable; the message says why."""


@dataclass(frozen=True, slots=True)
class NatsOptions:
    """How the bridge connects to NATS: passed through to nats-py's ``connect``.

    Secrets are given as files (``credentials``, ``nkey_seed``,
    ``token_file``, ``password_file``) so that they never appear in a process
    listing. ``tls_ca`` alone verifies the server; with ``tls_cert`` and
    ``tls_key`` the bridge also presents a client certificate.
    """

    servers: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    name: str = "daemoneye-eventbus-bridge"
    #: A NATS ``.creds`` file (user JWT and nkey seed).
    credentials: str | None = None
    #: A file holding an nkey seed.
    nkey_seed: str | None = None
    #: A file holding a token.
    token_file: str | None = None
    user: str | None = None
    #: A file holding the password of ``user``.
    password_file: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    #: The name to verify the server's certificate against, if not the URL's host.
    tls_hostname: str | None = None
    connect_timeout: float = 2.0

    def check(self) -> None:
        """Raise :class:`BridgeConfigError` for options that cannot work together."""
        if not self.servers:
            raise BridgeConfigError("no NATS server URL")
        for url in self.servers:
            if not re.match(r"^(nats|tls|ws|wss)://", url):
                raise BridgeConfigError(
                    f"NATS URL {url!r} must start with nats://, tls://, ws:// or wss://"
                )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise BridgeConfigError("--nats-tls-cert and --nats-tls-key go together")
        if self.password_file is not None and self.user is None:
            raise BridgeConfigError("a NATS password needs a user")
        if (
            sum(
                x is not None
                for x in (self.credentials, self.nkey_seed, self.token_file, self.user)
            )
            > 1
        ):
            raise BridgeConfigError(
                "give one of NATS credentials, nkey seed, token or user and password"
            )
        nkey = self.nkey_seed if self.nkey_seed is not None else self.credentials
        if nkey is not None and importlib.util.find_spec("nkeys") is None:
            raise BridgeConfigError(
                f"{nkey}: an nkey seed or credentials file needs the nkeys package "
                "(pip install 'nats-py[nkeys]')"
            )
        if not self.connect_timeout > 0:
            raise BridgeConfigError("the NATS connect timeout must be positive")

    def tls_context(self) -> ssl.SSLContext | None:
        """The TLS context for the connection, or None without TLS options.

        Raises :class:`BridgeConfigError` if a TLS file cannot be read or used.
        """
        if self.tls_ca is None and self.tls_cert is None:
            return None
        try:
            context = ssl.create_default_context(cafile=self.tls_ca)
            if self.tls_cert is not None and self.tls_key is not None:
                context.load_cert_chain(self.tls_cert, self.tls_key)
        except OSError as exc:  # ssl.SSLError too: a file that is no PEM, a key of another cert
            files = ", ".join(f for f in (self.tls_ca, self.tls_cert, self.tls_key) if f)
            reason = exc.strerror or str(exc)
            raise BridgeConfigError(f"NATS TLS files {files}: {reason}") from None
        return context

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments of ``nats.connect`` for these options (reads the secret files)."""
        out: dict[str, Any] = {
            "servers": list(self.servers),
            "name": self.name,
            "connect_timeout": self.connect_timeout,
        }
        if self.credentials is not None:
            out["user_credentials"] = _readable(self.credentials)
        if self.nkey_seed is not None:
            out["nkeys_seed"] = _readable(self.nkey_seed)
        if self.token_file is not None:
            out["token"] = _read_secret(self.token_file)
        if self.user is not None:
            out["user"] = self.user
            if self.password_file is not None:
                out["password"] = _read_secret(self.password_file)
        context = self.tls_context()
        if context is not None:
            out["tls"] = context
            if self.tls_hostname is not None:
                out["tls_hostname"] = self.tls_hostname
        return out


def _readable(path: str) -> str:
    """``path``, once it is known to be readable (nats-py reads it when connecting)."""
    try:
        with open(path, "rb"):
            return path
    except OSError as exc:
        raise BridgeConfigError(f"cannot read {path}: {exc.strerror}") from None


def _read_secret(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().strip()
    except OSError as exc:
        raise BridgeConfigError(f"cannot read {path}: {exc.strerror}") from None


@dataclass(frozen=True, slots=True)
class BridgeConfig:
    """Everything the bridge needs; :meth:`check` refuses what cannot work.

    Durations are in seconds; 0 for ``max_age`` and -1 for
    ``stream_max_bytes`` mean no limit.
    """

    host_id: str
    spool_path: str
    nats: NatsOptions = field(default_factory=NatsOptions)
    #: The local broker's address (socket path or pipe name); None: the default.
    broker_address: str | None = None
    component: str = BRIDGE_COMPONENT
    #: Bus topic filters whose events are forwarded. Control topics are never
    #: forwarded: their subjects are the inbound control subjects.
    forward: tuple[str, ...] = ("events.#",)
    #: Carry control messages from the fleet to the local bus.
    control: bool = False
    #: Ask the broker for lossless delivery (it holds the publishers rather
    #: than drop events the bridge has not read yet).
    lossless: bool = True
    #: With ``lossless``: events the broker may send ahead of what the bridge
    #: has read (and so spooled), at most: what a killed bridge can lose.
    window: int = 1024
    stream: str = DEFAULT_STREAM
    #: The stream's subjects, when the bridge creates it: the forwarded subjects
    #: of every host.
    stream_subjects: tuple[str, ...] | None = None
    #: Create the stream if it does not exist (otherwise: refuse to start).
    create_stream: bool = True
    max_age: float = 7 * _DAY
    stream_max_bytes: int = -1
    #: JetStream's window for dropping re-sent copies by ``Nats-Msg-Id``.
    duplicate_window: float = 600.0
    replicas: int = 1
    spool_max_events: int = 1_000_000
    spool_max_bytes: int = 1 << 30
    #: Events sent to JetStream and not yet acknowledged, at most.
    max_in_flight: int = 1024
    #: How long to wait for an acknowledgement before sending again.
    ack_timeout: float = 5.0
    #: Default deadline of a fleet request forwarded to a local responder.
    request_timeout: float = 5.0
    #: Longest deadline a fleet request may ask for (``Daemoneye-Timeout-Ms``).
    max_request_timeout: float = 60.0
    #: Inbound control messages handled at once, at most (more wait in NATS).
    max_inbound_pending: int = 256

    def forward_subjects(self) -> tuple[str, ...]:
        """The subjects this host's forwarded events go to (wildcards as in NATS)."""
        return tuple(s for f in self.forward for s in filter_to_subjects(self.host_id, f))

    def effective_stream_subjects(self) -> tuple[str, ...]:
        """``stream_subjects``, or the forwarded subjects with any host in place of this one."""
        if self.stream_subjects is not None:
            return self.stream_subjects
        return tuple(dict.fromkeys(host_pattern(s) for s in self.forward_subjects()))

    def check(self) -> None:
        """Raise :class:`BridgeConfigError` unless the configuration can work."""
        try:
            validate_host_id(self.host_id)
        except InvalidSubject as exc:
            raise BridgeConfigError(str(exc)) from None
        self.nats.check()
        self._check_forward()
        if not _STREAM_NAME.fullmatch(self.stream):
            raise BridgeConfigError(f"stream name {self.stream!r}: 1 to 128 of A-Z a-z 0-9 _ -")
        for subject in self.effective_stream_subjects():
            if not subject or any(t == "" for t in subject.split(".")):
                raise BridgeConfigError(f"stream subject {subject!r} is not a NATS subject")
            if subjects_overlap(subject, control_subject_pattern()):
                # JetStream would store the fleet's control messages and answer
                # its requests with a publish acknowledgement.
                raise BridgeConfigError(
                    f"stream subject {subject!r} takes the inbound control subjects "
                    f"({control_subject_pattern()})"
                )
        for subject in self.forward_subjects():
            if not any(subject_covers(p, subject) for p in self.effective_stream_subjects()):
                raise BridgeConfigError(
                    f"the stream's subjects {list(self.effective_stream_subjects())} "
                    f"do not take the forwarded subject {subject!r}"
                )
        for name in (
            "max_age",
            "duplicate_window",
            "ack_timeout",
            "request_timeout",
            "max_request_timeout",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise BridgeConfigError(f"{name} must be a finite number of seconds >= 0")
        for name in ("duplicate_window", "ack_timeout", "request_timeout", "max_request_timeout"):
            if getattr(self, name) <= 0:
                raise BridgeConfigError(f"{name} must be positive")
        if self.max_age and self.duplicate_window > self.max_age:
            raise BridgeConfigError(
                "the duplicate window cannot be longer than the stream's max age"
            )
        if self.request_timeout > self.max_request_timeout:
            raise BridgeConfigError("request_timeout is longer than max_request_timeout")
        if self.stream_max_bytes == 0 or self.stream_max_bytes < -1:
            raise BridgeConfigError("stream_max_bytes must be positive, or -1 for no limit")
        for name in (
            "replicas",
            "spool_max_events",
            "spool_max_bytes",
            "max_in_flight",
            "window",
            "max_inbound_pending",
        ):
            if getattr(self, name) < 1:
                raise BridgeConfigError(f"{name} must be at least 1")
        if not self.spool_path:
            raise BridgeConfigError("the bridge needs a spool file")

    def _check_forward(self) -> None:
        if not self.forward:
            raise BridgeConfigError("nothing to forward: give at least one filter")
        for flt in self.forward:
            try:
                validate_topic_filter(flt)
            except InvalidTopic as exc:
                raise BridgeConfigError(f"forward filter {flt!r}: {exc}") from None
            first = split_topic(flt)[0]
            if first == "control":
                raise BridgeConfigError(
                    f"forward filter {flt!r}: control topics are not forwarded (their "
                    "subjects are the inbound control subjects of this host)"
                )
            if first in ("+", "#"):
                raise BridgeConfigError(
                    f"forward filter {flt!r}: the first level must be a name (say "
                    "events.#): a wildcard there would take the stream over the inbound "
                    "control subjects"
                )
        for i, a in enumerate(self.forward):
            for b in self.forward[i + 1 :]:
                if filters_overlap(a, b):
                    raise BridgeConfigError(
                        f"forward filters {a!r} and {b!r} overlap: an event would be "
                        "forwarded twice; keep the wider one"
                    )
