"""Who may connect as which component, and who may publish or read which topic.

Pure code: no sockets, no event loop. A transport asks the kernel who a peer is
and reports it as :class:`PeerCredentials`; then:

1. :meth:`Policy.authenticate` turns the peer's credentials and the component
   its ``Hello`` claims into an :class:`Identity`, or refuses the claim;
2. :func:`may_publish` and :func:`may_read` decide, from the access level and
   the publisher and subscriber lists that the schema declares for a topic,
   whether that identity may publish on it or receive it;
3. :func:`filter_reach` decides whether a subscription filter can reach any
   declared topic, and any that the identity may read.

The rules (docs/security.md gives the reasoning):

* **public** topics are open to every connected peer, anonymous or not;
* **restricted** topics only to the components the schema lists as
  publishers (to publish) or subscribers (to receive);
* **privileged** topics are published only by listed components that the
  policy marks as privileged (the agent), and received only by listed
  components.

A policy is a TOML file::

    [components.procmond]
    uids = [0, 1001]                     # peers with one of these uids ...
    gids = [1002]                        # ... or this primary gid
    sids = ["S-1-5-32-544"]              # ... or (Windows) this user or group SID
    executables = ["/usr/sbin/procmond"] # optional: and the peer's executable is one of these

    [components.daemoneye-agent]
    uids = [0]
    privileged = true

    [components.procmond.rate]          # optional: publish at most this fast on average
    events_per_second = 20000
    bytes_per_second = 8388608
    burst_events = 40000                 # default: one second's worth

    [anonymous]
    allow = true                         # peers claiming no component: public topics only

Without a policy file, :meth:`Policy.default` applies: peers running as the
broker's own uid or as root (on Windows: as the broker's own user SID, as
LocalSystem or in the Administrators group) may act as any component the
schema names, ``daemoneye-agent`` is privileged, and every other peer may only
connect anonymously. Under any policy, a claim of a component that neither the schema
(:data:`SCHEMA_COMPONENTS`) nor the policy names is refused, with the list of
the known ones, and so is a claim of :data:`BROKER_COMPONENT`, the broker's
own component (the publisher of presence events).
"""

from __future__ import annotations

import logging
import ntpath
import sys
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from daemoneye.eventbus.v1 import registry
from daemoneye.eventbus.v1.frames_pb2 import ErrorCode
from daemoneye.eventbus.v1.options_pb2 import AccessLevel
from daemoneye_eventbus.errors import AccessDenied, PolicyError
from daemoneye_eventbus.ratelimit import RateLimit, rate_limit_from_mapping
from daemoneye_eventbus.sids import ADMINISTRATORS, LOCAL_SYSTEM, parse_sid, resolve_sids
from daemoneye_eventbus.sids import lookup_account as windows_lookup_account
from daemoneye_eventbus.topics import filters_overlap

__all__ = [
    "BROKER_COMPONENT",
    "DEFAULT_PRIVILEGED",
    "EXECUTABLE_PLATFORMS",
    "MAX_COMPONENT_CHARS",
    "ANONYMOUS",
    "AuditLog",
    "ComponentRule",
    "Identity",
    "PeerCredentials",
    "Policy",
    "PolicyError",
    "SCHEMA_COMPONENTS",
    "TopicAccess",
    "account_key",
    "filter_reach",
    "may_publish",
    "may_read",
    "peer_fields",
]

#: Longest component name a peer may claim.
MAX_COMPONENT_CHARS: Final = 128

#: Components privileged by the default policy.
DEFAULT_PRIVILEGED: Final = frozenset({"daemoneye-agent"})

#: The broker's own component: the publisher of ``control.presence``. It is
#: reserved: no peer may claim it, and no policy may name it.
BROKER_COMPONENT: Final = "daemoneye-eventbus"

#: Where the broker can read a peer's executable, so where a policy may list
#: ``executables`` (``sys.platform`` values): Linux (``/proc/<pid>/exe``), macOS
#: (``proc_pidpath``) and Windows (the client process's image). Elsewhere (the
#: BSDs) the kernel does not give the peer's pid, and such a policy is refused.
EXECUTABLE_PLATFORMS: Final = frozenset({"linux", "darwin", "win32"})

_DECLARATIONS: Final[tuple[registry.Topic[Any] | registry.TopicTemplate[Any], ...]] = (
    *registry.TOPICS.values(),
    *registry.TEMPLATES,
)
#: Every component the schema names as a publisher or subscriber of a topic,
#: but the broker's own (:data:`BROKER_COMPONENT`): those a peer may claim.
SCHEMA_COMPONENTS: Final = frozenset(
    name for topic in _DECLARATIONS for name in topic.publishers | topic.subscribers
) - {BROKER_COMPONENT}

#: The wire code of every refusal at the handshake.
_DENIED: Final = ErrorCode.ERROR_CODE_ACCESS_DENIED

# The schema's access levels (options.proto).
_PUBLIC: Final = AccessLevel.ACCESS_LEVEL_PUBLIC
_RESTRICTED: Final = AccessLevel.ACCESS_LEVEL_RESTRICTED
_PRIVILEGED: Final = AccessLevel.ACCESS_LEVEL_PRIVILEGED


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """Who is at the other end of a local connection, as the kernel says.

    Transports fill it in (``SO_PEERCRED`` on Linux, ``LOCAL_PEERCRED`` and
    ``LOCAL_PEERPID`` on macOS, ``getpeereid`` on the BSDs, the client
    process's token on Windows); it is never taken from what a peer claims.
    A pid of 0 means the kernel did not say (the BSDs).
    """

    pid: int
    uid: int
    gid: int
    #: Windows: the user SID of the peer's token (uid and gid are -1 there).
    sid: str | None = None
    #: Windows: the group SIDs of the peer's token (Administrators is S-1-5-32-544).
    group_sids: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a connection is, as established at the handshake."""

    #: What the kernel says; None for an in-process session.
    peer: PeerCredentials | None
    #: The accepted component, or "" for an anonymous peer.
    component: str = ""
    #: May publish on privileged topics it is listed for.
    privileged: bool = False
    #: In-process code of the agent that embeds the broker: it holds the broker
    #: object itself, so topic access rules do not apply to it.
    trusted: bool = False
    #: The rate limit the policy sets for this peer (None: none).
    rate: RateLimit | None = None

    @property
    def anonymous(self) -> bool:
        return not self.component

    def describe(self) -> str:
        who = self.component or "anonymous"
        if self.trusted:
            return f"{who} (in process)"
        if self.peer is None:
            return f"{who} (credentials unknown)"
        fields = ", ".join(f"{k} {v}" for k, v in peer_fields(self.peer).items())
        return f"{who} ({fields})"


#: The identity of a peer before its handshake, or one that claims nothing.
ANONYMOUS: Final = Identity(None)


@dataclass(frozen=True, slots=True)
class TopicAccess:
    """What access control needs to know of a topic (from the registry)."""

    #: The schema's access level: public, restricted or privileged.
    access: AccessLevel.ValueType
    publishers: frozenset[str] = frozenset()
    subscribers: frozenset[str] = frozenset()


def may_publish(identity: Identity, topic: TopicAccess) -> str | None:
    """None if ``identity`` may publish on ``topic``, else the reason it may not."""
    if topic.access == _PUBLIC or identity.trusted:
        return None
    if identity.anonymous:
        return "anonymous peers may publish only on public topics"
    if identity.component not in topic.publishers:
        return f"component {identity.component!r} is not a publisher of this topic"
    if topic.access == _PRIVILEGED and not identity.privileged:
        return f"component {identity.component!r} is not privileged"
    if topic.access not in (_RESTRICTED, _PRIVILEGED):
        return "topic has no access level"
    return None


def may_read(identity: Identity, topic: TopicAccess) -> bool:
    """Whether ``identity`` may receive events of ``topic``."""
    if topic.access == _PUBLIC or identity.trusted:
        return True
    if topic.access not in (_RESTRICTED, _PRIVILEGED):
        return False
    return not identity.anonymous and identity.component in topic.subscribers


def filter_reach(
    identity: Identity, filter: str, declared: Sequence[tuple[str, TopicAccess]]
) -> tuple[bool, bool]:
    """Whether ``filter`` can match any of the ``declared`` topics (given as
    ``(topic or template filter, access)``), and any that ``identity`` may read.
    """
    reaches = False
    for pattern, access in declared:
        if filters_overlap(filter, pattern):
            reaches = True
            if may_read(identity, access):
                return True, True
    return reaches, False


@dataclass(frozen=True, slots=True)
class ComponentRule:
    """Which peers may act as one component."""

    uids: frozenset[int] = frozenset()
    gids: frozenset[int] = frozenset()
    #: Windows: user or group SIDs, in canonical form (:func:`.sids.parse_sid`).
    sids: frozenset[str] = frozenset()
    #: If set, the peer's executable (Linux: ``/proc/<pid>/exe``) must be one of these.
    executables: frozenset[str] | None = None
    privileged: bool = False
    #: How fast peers acting as this component may publish (None: no limit).
    rate: RateLimit | None = None

    def allows(self, peer: PeerCredentials, executable: str | None) -> str | None:
        """None if ``peer`` matches the rule, else why not."""
        if not (
            (peer.uid >= 0 and peer.uid in self.uids)
            or (peer.gid >= 0 and peer.gid in self.gids)
            or _sid_match(peer, self.sids)
        ):
            if peer.sid is not None:
                return f"sid {peer.sid} (and its groups) is not allowed"
            return f"uid {peer.uid} / gid {peer.gid} is not allowed"
        if self.executables is not None and executable not in self.executables:
            return f"executable {executable or '(unknown)'} is not allowed"
        return None


@dataclass(frozen=True, slots=True)
class Policy:
    """Which peers may act as which components."""

    components: Mapping[str, ComponentRule] = field(default_factory=dict)
    #: Peers that may act as any component (the default policy's trusted uids).
    trusted_uids: frozenset[int] = frozenset()
    #: Windows: peers whose user SID or a group SID is one of these may act as
    #: any component (the default policy's trusted accounts).
    trusted_sids: frozenset[str] = frozenset()
    #: Components that trusted peers acting as them are privileged as.
    trusted_privileged: frozenset[str] = DEFAULT_PRIVILEGED
    #: Whether peers claiming no component may connect (public topics only).
    allow_anonymous: bool = True
    #: Where the policy came from, for logs.
    source: str = "default"
    #: How fast anonymous peers may publish (None: no limit).
    anonymous_rate: RateLimit | None = None

    @classmethod
    def default(cls, broker_uid: int, broker_sid: str | None = None) -> Policy:
        """The policy without a file: the broker's uid and root are trusted.

        On Windows (``broker_sid``, the broker's own user SID, given; the uid
        is -1 there) LocalSystem, the Administrators group and the broker's
        own user are trusted instead, and no uid is.
        """
        if broker_sid is None:
            return cls(trusted_uids=frozenset({broker_uid, 0}), source="default")
        return cls(
            trusted_uids=frozenset({broker_uid}) if broker_uid >= 0 else frozenset(),
            trusted_sids=frozenset({LOCAL_SYSTEM, ADMINISTRATORS, parse_sid(broker_sid)}),
            source="default",
        )

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        platform: str = sys.platform,
        lookup_account: Callable[[str], str] | None = None,
    ) -> Policy:
        """Read a policy file; raise :class:`PolicyError` naming what is wrong.

        ``platform`` and ``lookup_account`` are as for :meth:`from_mapping`.
        """
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as exc:
            raise PolicyError(f"cannot read policy {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise PolicyError(f"policy {path} is not valid TOML: {exc}") from None
        return cls.from_mapping(
            data, source=str(path), platform=platform, lookup_account=lookup_account
        )

    @classmethod
    def from_mapping(
        cls,
        data: Mapping[str, Any],
        source: str = "<mapping>",
        *,
        platform: str = sys.platform,
        lookup_account: Callable[[str], str] | None = None,
    ) -> Policy:
        """Build a policy from parsed TOML.

        ``platform`` is the ``sys.platform`` the broker runs on: ``executables``
        rules are refused where the broker cannot read a peer's executable
        (see :data:`EXECUTABLE_PLATFORMS`). ``lookup_account`` turns an account
        name in ``sids`` into a SID; by default Windows resolves it
        (:func:`~daemoneye_eventbus.sids.lookup_account`) and any other
        ``platform`` refuses account names.
        """
        unknown = set(data) - {"components", "anonymous"}
        if unknown:
            raise PolicyError(f"{source}: unknown section(s) {sorted(unknown)}")
        if lookup_account is None and platform == "win32":
            lookup_account = windows_lookup_account
        components: dict[str, ComponentRule] = {}
        raw_components = data.get("components", {})
        if not isinstance(raw_components, dict):
            raise PolicyError(f"{source}: [components] must be a table")
        for name, raw in raw_components.items():
            where = f"{source}: [components.{name}]"
            if name == BROKER_COMPONENT:
                raise PolicyError(f"{where}: {BROKER_COMPONENT!r} is the broker's own component")
            components[name] = rule = _rule(raw, where, lookup_account)
            if rule.executables is not None and platform not in EXECUTABLE_PLATFORMS:
                raise PolicyError(
                    f"{where}: executables rules need the peer's executable, which the "
                    f"broker can read only on Linux, macOS and Windows, not on {platform}"
                )
        anonymous = data.get("anonymous", {})
        if not isinstance(anonymous, dict) or set(anonymous) - {"allow", "rate"}:
            raise PolicyError(f"{source}: [anonymous] takes only allow = true|false and rate")
        allow = anonymous.get("allow", True)
        if not isinstance(allow, bool):
            raise PolicyError(f"{source}: [anonymous] allow must be true or false")
        rate = anonymous.get("rate")
        return cls(
            components=components,
            allow_anonymous=allow,
            source=source,
            anonymous_rate=None if rate is None else rate_limit_from_mapping(rate, source),
        )

    def authenticate(
        self, peer: PeerCredentials | None, claimed: str, executable: str | None = None
    ) -> Identity:
        """The identity of a peer that claims ``claimed`` (or "" for none).

        Raises :class:`AccessDenied` (code ``ERROR_CODE_ACCESS_DENIED``) with
        the reason when the claim is refused: a claim too long, no claim where
        the policy wants one, a component neither the schema nor the policy
        names (the reason lists the known ones), or a peer the policy does not
        allow to act as the component. ``executable`` is the peer's
        ``/proc/<pid>/exe``, when it could be read.
        """
        if len(claimed) > MAX_COMPONENT_CHARS:
            raise AccessDenied(
                f"a component name is at most {MAX_COMPONENT_CHARS} characters, not {len(claimed)}",
                code=_DENIED,
            )
        if claimed == BROKER_COMPONENT:
            raise AccessDenied(
                f"component {BROKER_COMPONENT!r} is reserved for the broker itself", code=_DENIED
            )
        if not claimed:
            if not self.allow_anonymous:
                raise AccessDenied("anonymous peers are not allowed by the policy", code=_DENIED)
            return Identity(peer, rate=self.anonymous_rate)
        if claimed not in self.known_components:
            raise AccessDenied(
                f"unknown component {_show(claimed)}; known components (the schema's and "
                f"the policy's): {', '.join(sorted(self.known_components))}",
                code=_DENIED,
            )
        if peer is None:
            raise AccessDenied(
                "the peer's credentials are unknown; no component claim is allowed", code=_DENIED
            )
        rule = self.components.get(claimed)
        if rule is not None:
            reason = rule.allows(peer, executable)
            if reason is None:
                return Identity(peer, claimed, rule.privileged, rate=rule.rate)
            raise AccessDenied(f"component {_show(claimed)} refused: {reason}", code=_DENIED)
        if (peer.uid >= 0 and peer.uid in self.trusted_uids) or _sid_match(peer, self.trusted_sids):
            return Identity(peer, claimed, claimed in self.trusted_privileged)
        who = f"uid {peer.uid}" if peer.sid is None else f"sid {peer.sid}"
        raise AccessDenied(f"{who} may not act as component {_show(claimed)}", code=_DENIED)

    @property
    def known_components(self) -> frozenset[str]:
        """The components a peer may claim at all: those the schema or this policy names."""
        return SCHEMA_COMPONENTS | frozenset(self.components)

    def needs_executable(self, claimed: str) -> bool:
        """Whether :meth:`authenticate` needs the peer's executable path for this claim."""
        rule = self.components.get(claimed)
        return rule is not None and rule.executables is not None


def _show(claimed: str) -> str:
    """A claimed name as quoted in messages: short, whatever the peer sent."""
    text = repr(claimed)
    return text if len(text) <= 66 else text[:64] + "…'"


def account_key(peer: PeerCredentials | None) -> int | str:
    """The account a peer runs as, for per-user counts: its user SID where the
    kernel gives one (Windows), else its uid; -1 for unknown credentials."""
    if peer is None:
        return -1
    return peer.sid if peer.sid is not None else peer.uid


def peer_fields(peer: PeerCredentials) -> dict[str, object]:
    """Who a peer is, for audit lines and messages: pid, uid and gid, or on
    Windows (where there is no uid) pid and user SID."""
    if peer.sid is not None:
        return {"pid": peer.pid, "sid": peer.sid}
    return {"pid": peer.pid, "uid": peer.uid, "gid": peer.gid}


def _sid_match(peer: PeerCredentials, sids: frozenset[str]) -> bool:
    """Whether the peer's user SID or one of its group SIDs is in ``sids``."""
    if not sids:
        return False
    return (peer.sid is not None and peer.sid in sids) or not sids.isdisjoint(peer.group_sids)


def _sids(raw: Any, where: str, lookup: Callable[[str], str] | None) -> frozenset[str]:
    value = raw.get("sids", [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise PolicyError(f"{where}: sids must be a list of SIDs (or Windows account names)")
    try:
        return resolve_sids(value, lookup)
    except ValueError as exc:
        raise PolicyError(f"{where}: {exc}") from None


def _ids(raw: Any, where: str, key: str) -> frozenset[int]:
    value = raw.get(key, [])
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise PolicyError(f"{where}: {key} must be a list of non-negative integers")
    return frozenset(value)


def _absolute(path: str) -> bool:
    """An absolute path: ``/usr/sbin/procmond``, or on Windows ``C:\\...\\procmond.exe``."""
    return path.startswith("/") or (ntpath.isabs(path) and bool(ntpath.splitdrive(path)[0]))


def _rule(raw: Any, where: str, lookup: Callable[[str], str] | None) -> ComponentRule:
    if not isinstance(raw, dict):
        raise PolicyError(f"{where} must be a table")
    unknown = set(raw) - {"uids", "gids", "sids", "executables", "privileged", "rate"}
    if unknown:
        raise PolicyError(f"{where}: unknown key(s) {sorted(unknown)}")
    executables = raw.get("executables")
    if executables is not None and (
        not isinstance(executables, list)
        or not all(isinstance(e, str) and _absolute(e) for e in executables)
    ):
        raise PolicyError(f"{where}: executables must be a list of absolute paths")
    privileged = raw.get("privileged", False)
    if not isinstance(privileged, bool):
        raise PolicyError(f"{where}: privileged must be true or false")
    rule = ComponentRule(
        uids=_ids(raw, where, "uids"),
        gids=_ids(raw, where, "gids"),
        sids=_sids(raw, where, lookup),
        executables=frozenset(executables) if executables is not None else None,
        privileged=privileged,
        rate=None if raw.get("rate") is None else rate_limit_from_mapping(raw["rate"], where),
    )
    if not rule.uids and not rule.gids and not rule.sids:
        raise PolicyError(f"{where}: give uids, gids or sids (or several)")
    return rule


class AuditLog:
    """Structured audit lines for refusals, rate-limited per peer account.

    Each line goes to the ``daemoneye_eventbus.audit`` logger at WARNING with
    ``key=value`` fields (also passed as ``extra={"audit": {...}}``): the
    peer's pid, uid and gid, or on Windows its pid and user SID. A peer's
    account (uid, or SID; :func:`account_key`) gets at most ``burst`` lines per
    ``window`` seconds; the lines suppressed beyond that are counted and
    reported in its next line.
    """

    def __init__(
        self,
        logger: logging.Logger | None = None,
        *,
        burst: int = 20,
        window: float = 10.0,
        max_peers: int = 4096,
    ) -> None:
        self.logger = logger or logging.getLogger("daemoneye_eventbus.audit")
        self.burst = burst
        self.window = window
        self.max_peers = max_peers
        # account (uid or SID) -> [window start, count, suppressed]
        self._buckets: dict[int | str, list[float]] = {}
        #: Lines suppressed in total.
        self.suppressed = 0

    def record(self, event: str, peer: PeerCredentials | None, **fields: object) -> bool:
        """Log one refusal; return False if it was suppressed by the rate limit."""
        key = account_key(peer)
        now = time.monotonic()
        bucket = self._buckets.get(key)
        if bucket is None or now - bucket[0] >= self.window:
            if bucket is None and len(self._buckets) >= self.max_peers:
                self._buckets.clear()
            suppressed = int(bucket[2]) if bucket is not None else 0
            bucket = self._buckets[key] = [now, 0.0, 0.0]
        else:
            suppressed = 0
        if bucket[1] >= self.burst:
            bucket[2] += 1
            self.suppressed += 1
            return False
        bucket[1] += 1
        record: dict[str, object] = {"event": event}
        if peer is not None:
            record.update(peer_fields(peer))
        record.update(fields)
        if suppressed:
            record["suppressed_before"] = suppressed
        text = " ".join(f"{k}={_quote(v)}" for k, v in record.items())
        self.logger.warning("audit %s", text, extra={"audit": record})
        return True


def _quote(value: object) -> str:
    # Cut first, then escape: a cut inside an escape could unbalance the quotes
    # and let a peer-controlled value forge the fields after it.
    text = str(value)[:256]
    if not text or any(c.isspace() or c in '"=\\' for c in text) or not text.isprintable():
        return '"' + text.encode("unicode_escape").decode().replace('"', '\\"') + '"'
    return text
