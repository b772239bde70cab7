"""Access control without sockets or an event loop: policies, rules, audit lines, overlap."""

from __future__ import annotations

import itertools
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemoneye.eventbus.v1 import registry
from daemoneye.eventbus.v1.frames_pb2 import ErrorCode
from daemoneye.eventbus.v1.options_pb2 import AccessLevel
from daemoneye_eventbus.access import (
    ANONYMOUS,
    SCHEMA_COMPONENTS,
    AuditLog,
    Identity,
    PeerCredentials,
    Policy,
    PolicyError,
    TopicAccess,
    may_publish,
    may_read,
)
from daemoneye_eventbus.errors import AccessDenied, EventBusError
from daemoneye_eventbus.topics import filters_overlap

BROKER_UID = 1000
STRANGER_UID = 1234
AUDIT_LOGGER = "daemoneye_eventbus.audit"


def peer(uid: int, gid: int | None = None, pid: int = 4321) -> PeerCredentials:
    return PeerCredentials(pid, uid, uid if gid is None else gid)


# -- policy files ----------------------------------------------------------------------------

VALID_POLICY = """\
# a comment
[components.procmond]
uids = [1001]
gids = [2002]
executables = ["/usr/sbin/procmond"]

[components.netmond]
gids = [3003]

[components.daemoneye-agent]
uids = [0]
privileged = true

[anonymous]
allow = false
"""


@pytest.fixture
def file_policy(tmp_path: Path) -> Policy:
    path = tmp_path / "policy.toml"
    path.write_text(VALID_POLICY)
    return Policy.load(path)


def test_load_valid_policy(tmp_path: Path, file_policy: Policy) -> None:
    assert file_policy.source == str(tmp_path / "policy.toml")
    assert set(file_policy.components) == {"procmond", "netmond", "daemoneye-agent"}
    procmond = file_policy.components["procmond"]
    assert procmond.uids == {1001}
    assert procmond.gids == {2002}
    assert procmond.executables == frozenset({"/usr/sbin/procmond"})
    assert not procmond.privileged
    netmond = file_policy.components["netmond"]
    assert netmond.uids == frozenset()
    assert netmond.gids == frozenset({3003})
    assert netmond.executables is None
    assert file_policy.components["daemoneye-agent"].privileged
    assert file_policy.allow_anonymous is False
    # A policy file trusts nobody beyond its rules.
    assert file_policy.trusted_uids == frozenset()


def test_load_minimal_policy_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.toml"
    path.write_text("")
    policy = Policy.load(str(path))
    assert policy.components == {}
    assert policy.allow_anonymous is True
    assert policy.trusted_uids == frozenset()


@pytest.mark.parametrize(
    ("text", "where", "what"),
    [
        pytest.param("[extra]\nx = 1\n", "policy.toml", "unknown section", id="unknown-section"),
        pytest.param(
            "[components.procmond]\nuids = [1]\nuser = 'x'\n",
            "[components.procmond]",
            "unknown key",
            id="unknown-key",
        ),
        pytest.param(
            "[components.procmond]\nuids = 1\n",
            "[components.procmond]",
            "uids must be a list of non-negative integers",
            id="uids-not-a-list",
        ),
        pytest.param(
            "[components.procmond]\ngids = '1'\n",
            "[components.procmond]",
            "gids must be a list of non-negative integers",
            id="gids-not-a-list",
        ),
        pytest.param(
            "[components.procmond]\nuids = [-1]\n",
            "[components.procmond]",
            "uids must be a list of non-negative integers",
            id="negative-uid",
        ),
        pytest.param(
            "[components.procmond]\ngids = [-5]\n",
            "[components.procmond]",
            "gids must be a list of non-negative integers",
            id="negative-gid",
        ),
        pytest.param(
            "[components.procmond]\nuids = [true]\n",
            "[components.procmond]",
            "uids must be a list of non-negative integers",
            id="bool-uid",
        ),
        pytest.param(
            "[components.procmond]\ngids = [false]\n",
            "[components.procmond]",
            "gids must be a list of non-negative integers",
            id="bool-gid",
        ),
        pytest.param(
            "[components.procmond]\nuids = [1.0]\n",
            "[components.procmond]",
            "uids must be a list of non-negative integers",
            id="float-uid",
        ),
        pytest.param(
            "[components.procmond]\nuids = [1]\nexecutables = ['usr/sbin/procmond']\n",
            "[components.procmond]",
            "executables must be a list of absolute paths",
            id="relative-executable",
        ),
        pytest.param(
            "[components.procmond]\nuids = [1]\nexecutables = '/usr/sbin/procmond'\n",
            "[components.procmond]",
            "executables must be a list of absolute paths",
            id="executables-not-a-list",
        ),
        pytest.param(
            "[components.procmond]\nuids = [1]\nprivileged = 'yes'\n",
            "[components.procmond]",
            "privileged must be true or false",
            id="privileged-not-bool",
        ),
        pytest.param(
            "[components.procmond]\nprivileged = true\n",
            "[components.procmond]",
            "give uids, gids or sids",
            id="no-uids-no-gids",
        ),
        pytest.param(
            "[components.procmond]\nuids = []\ngids = []\n",
            "[components.procmond]",
            "give uids, gids or sids",
            id="empty-uids-and-gids",
        ),
        pytest.param("components = 3\n", "[components]", "must be a table", id="components-value"),
        pytest.param(
            "[components]\nprocmond = 1\n",
            "[components.procmond]",
            "must be a table",
            id="component-not-a-table",
        ),
        pytest.param(
            "[anonymous]\nallow = 'no'\n",
            "[anonymous]",
            "allow must be true or false",
            id="anonymous-allow-not-bool",
        ),
        pytest.param(
            "[anonymous]\nallow = true\ndeny = true\n",
            "[anonymous]",
            "takes only allow",
            id="anonymous-unknown-key",
        ),
        pytest.param("anonymous = 1\n", "[anonymous]", "takes only allow", id="anonymous-value"),
        pytest.param(
            "[components.procmond\nuids = [1]\n", "policy.toml", "not valid TOML", id="bad-toml"
        ),
        pytest.param("uids = [1, 2\n", "policy.toml", "not valid TOML", id="bad-toml-array"),
    ],
)
def test_malformed_policy_names_the_place(tmp_path: Path, text: str, where: str, what: str) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(PolicyError) as info:
        Policy.load(path)
    message = str(info.value)
    assert str(path) in message
    assert where in message
    assert what in message
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, EventBusError)


def test_missing_policy_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.toml"
    with pytest.raises(PolicyError, match="cannot read policy") as info:
        Policy.load(path)
    assert str(path) in str(info.value)
    assert "No such file" in str(info.value)


def test_policy_file_that_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read policy"):
        Policy.load(tmp_path)


def test_from_mapping_names_its_source() -> None:
    with pytest.raises(PolicyError, match=r"^inline: unknown section\(s\) \['bogus'\]"):
        Policy.from_mapping({"bogus": {}}, source="inline")
    with pytest.raises(PolicyError, match=r"^<mapping>: \[components\.x\]: unknown key"):
        Policy.from_mapping({"components": {"x": {"uids": [1], "uid": 1}}})


# -- authenticate: the default policy --------------------------------------------------------


@pytest.fixture
def default_policy() -> Policy:
    return Policy.default(BROKER_UID)


def test_default_policy_shape(default_policy: Policy) -> None:
    assert default_policy.source == "default"
    assert default_policy.trusted_uids == {BROKER_UID, 0}
    assert default_policy.components == {}
    assert default_policy.allow_anonymous
    assert default_policy.trusted_privileged == {"daemoneye-agent"}


@pytest.mark.parametrize("uid", [BROKER_UID, 0])
@pytest.mark.parametrize("component", sorted(SCHEMA_COMPONENTS - {"daemoneye-agent"}))
def test_default_policy_trusts_broker_uid_and_root(
    default_policy: Policy, uid: int, component: str
) -> None:
    p = peer(uid)
    identity = default_policy.authenticate(p, component)
    assert identity == Identity(p, component, privileged=False)
    assert not identity.anonymous
    assert not identity.trusted


@pytest.mark.parametrize("uid", [BROKER_UID, 0])
def test_default_policy_agent_is_privileged(default_policy: Policy, uid: int) -> None:
    identity = default_policy.authenticate(peer(uid), "daemoneye-agent")
    assert identity.component == "daemoneye-agent"
    assert identity.privileged


def test_default_policy_others_only_anonymous(default_policy: Policy) -> None:
    p = peer(STRANGER_UID)
    identity = default_policy.authenticate(p, "")
    assert identity.anonymous
    assert identity.peer == p
    assert not identity.privileged
    assert identity.describe() == f"anonymous (pid 4321, uid {STRANGER_UID}, gid {STRANGER_UID})"
    with pytest.raises(AccessDenied) as info:
        default_policy.authenticate(p, "procmond")
    assert str(info.value) == f"uid {STRANGER_UID} may not act as component 'procmond'"
    assert isinstance(info.value, PermissionError)
    with pytest.raises(AccessDenied, match="daemoneye-agent"):
        default_policy.authenticate(p, "daemoneye-agent")


def test_schema_components_are_the_registrys_publishers_and_subscribers() -> None:
    named: set[str] = set()
    for topic in registry.TOPICS.values():
        named |= topic.publishers | topic.subscribers
    for template in registry.TEMPLATES:
        named |= template.publishers | template.subscribers
    assert named == SCHEMA_COMPONENTS
    assert {"daemoneye-agent", "procmond", "netmond"} <= SCHEMA_COMPONENTS


@pytest.mark.parametrize("uid", [BROKER_UID, 0, STRANGER_UID])
def test_default_policy_refuses_an_unknown_component_listing_the_known(
    default_policy: Policy, uid: int
) -> None:
    # Trusted uids may claim any component the schema names, and nothing else.
    with pytest.raises(AccessDenied) as info:
        default_policy.authenticate(peer(uid), "nosuchcomponent")
    known = ", ".join(sorted(SCHEMA_COMPONENTS))
    assert str(info.value) == (
        f"unknown component 'nosuchcomponent'; known components (the schema's and the "
        f"policy's): {known}"
    )
    assert info.value.code == ErrorCode.ERROR_CODE_ACCESS_DENIED
    assert default_policy.known_components == SCHEMA_COMPONENTS


def test_a_policy_may_name_components_the_schema_does_not() -> None:
    policy = Policy.from_mapping({"components": {"inventory-tool": {"uids": [BROKER_UID]}}})
    assert policy.known_components == SCHEMA_COMPONENTS | {"inventory-tool"}
    assert policy.authenticate(peer(BROKER_UID), "inventory-tool").component == "inventory-tool"
    with pytest.raises(AccessDenied, match=r"unknown component 'inventry-tool'; .*inventory-tool"):
        policy.authenticate(peer(BROKER_UID), "inventry-tool")


def test_every_handshake_refusal_carries_the_access_denied_code(
    default_policy: Policy, file_policy: Policy
) -> None:
    refusals = [
        (default_policy, peer(BROKER_UID), "p" * 129),
        (default_policy, None, "procmond"),
        (default_policy, peer(STRANGER_UID), "procmond"),
        (file_policy, peer(1001), ""),
        (file_policy, peer(5555), "netmond"),
        (file_policy, peer(0), "perfmond"),
    ]
    for policy, who, claimed in refusals:
        with pytest.raises(AccessDenied) as info:
            policy.authenticate(who, claimed)
        assert info.value.code == ErrorCode.ERROR_CODE_ACCESS_DENIED, claimed


def test_default_policy_ignores_the_gid(default_policy: Policy) -> None:
    # A stranger in the broker's (or root's) group is still a stranger.
    with pytest.raises(AccessDenied):
        default_policy.authenticate(peer(STRANGER_UID, gid=0), "procmond")
    with pytest.raises(AccessDenied):
        default_policy.authenticate(peer(STRANGER_UID, gid=BROKER_UID), "procmond")


def test_anonymous_refused_when_not_allowed() -> None:
    policy = Policy(trusted_uids=frozenset({BROKER_UID}), allow_anonymous=False)
    with pytest.raises(AccessDenied, match="anonymous peers are not allowed"):
        policy.authenticate(peer(STRANGER_UID), "")
    # Even the trusted uid must claim a component then.
    with pytest.raises(AccessDenied, match="anonymous"):
        policy.authenticate(peer(BROKER_UID), "")
    assert policy.authenticate(peer(BROKER_UID), "procmond").component == "procmond"


def test_unknown_credentials_may_only_be_anonymous(default_policy: Policy) -> None:
    assert default_policy.authenticate(None, "") == ANONYMOUS
    with pytest.raises(AccessDenied, match="credentials are unknown"):
        default_policy.authenticate(None, "procmond")


# -- authenticate: a policy file -------------------------------------------------------------


def test_file_policy_uid_match(file_policy: Policy) -> None:
    p = peer(1001, gid=7)
    identity = file_policy.authenticate(p, "procmond", "/usr/sbin/procmond")
    assert identity == Identity(p, "procmond", privileged=False)


def test_file_policy_gid_match(file_policy: Policy) -> None:
    p = peer(5555, gid=2002)
    assert file_policy.authenticate(p, "procmond", "/usr/sbin/procmond").component == "procmond"
    q = peer(5555, gid=3003)
    assert file_policy.authenticate(q, "netmond").component == "netmond"


def test_file_policy_neither_uid_nor_gid(file_policy: Policy) -> None:
    with pytest.raises(AccessDenied) as info:
        file_policy.authenticate(peer(5555, gid=6666), "procmond", "/usr/sbin/procmond")
    assert str(info.value) == "component 'procmond' refused: uid 5555 / gid 6666 is not allowed"
    # A gid rule matches the gid only: the same number as a uid does not count.
    with pytest.raises(AccessDenied, match="uid 3003 / gid 1 is not allowed"):
        file_policy.authenticate(peer(3003, gid=1), "netmond")


def test_file_policy_executables(file_policy: Policy) -> None:
    assert file_policy.needs_executable("procmond")
    assert not file_policy.needs_executable("netmond")
    assert not file_policy.needs_executable("perfmond")
    assert not file_policy.needs_executable("")
    p = peer(1001)
    assert file_policy.authenticate(p, "procmond", "/usr/sbin/procmond").component == "procmond"
    with pytest.raises(AccessDenied) as info:
        file_policy.authenticate(p, "procmond", "/usr/bin/python3")
    assert str(info.value) == (
        "component 'procmond' refused: executable /usr/bin/python3 is not allowed"
    )
    with pytest.raises(AccessDenied, match=r"executable \(unknown\) is not allowed"):
        file_policy.authenticate(p, "procmond", None)
    with pytest.raises(AccessDenied, match=r"executable \(unknown\)"):
        file_policy.authenticate(p, "procmond")
    # The uid check comes first: the right executable under the wrong uid is refused.
    with pytest.raises(AccessDenied, match="uid 9 / gid 9 is not allowed"):
        file_policy.authenticate(peer(9), "procmond", "/usr/sbin/procmond")


def test_file_policy_empty_executables_admits_nobody() -> None:
    policy = Policy.from_mapping({"components": {"procmond": {"uids": [1], "executables": []}}})
    assert policy.needs_executable("procmond")
    with pytest.raises(AccessDenied, match="executable"):
        policy.authenticate(peer(1), "procmond", "/usr/sbin/procmond")


def test_file_policy_privileged_flag(file_policy: Policy) -> None:
    agent = file_policy.authenticate(peer(0), "daemoneye-agent")
    assert agent.privileged
    # Without the flag, even the agent is not privileged.
    plain = Policy.from_mapping({"components": {"daemoneye-agent": {"uids": [0]}}})
    assert not plain.authenticate(peer(0), "daemoneye-agent").privileged
    # The flag may make another component privileged.
    odd = Policy.from_mapping({"components": {"procmond": {"uids": [5], "privileged": True}}})
    assert odd.authenticate(peer(5), "procmond").privileged


@pytest.mark.parametrize("uid", [0, BROKER_UID])
def test_file_policy_unlisted_component_refused_even_for_root(
    file_policy: Policy, uid: int
) -> None:
    with pytest.raises(AccessDenied) as info:
        file_policy.authenticate(peer(uid), "perfmond")
    assert str(info.value) == f"uid {uid} may not act as component 'perfmond'"


def test_file_policy_root_not_in_rule_refused(file_policy: Policy) -> None:
    with pytest.raises(AccessDenied, match="uid 0 / gid 0 is not allowed"):
        file_policy.authenticate(peer(0), "procmond", "/usr/sbin/procmond")


def test_file_policy_anonymous(file_policy: Policy) -> None:
    with pytest.raises(AccessDenied, match="anonymous"):
        file_policy.authenticate(peer(1001), "")
    allowing = Policy.from_mapping({"components": {"procmond": {"uids": [1]}}})
    assert allowing.authenticate(peer(STRANGER_UID), "").anonymous


# -- may_publish / may_read ----------------------------------------------------------------

PUBLIC = TopicAccess(AccessLevel.ACCESS_LEVEL_PUBLIC)
RESTRICTED = TopicAccess(
    AccessLevel.ACCESS_LEVEL_RESTRICTED, frozenset({"procmond"}), frozenset({"daemoneye-agent"})
)
PRIVILEGED = TopicAccess(
    AccessLevel.ACCESS_LEVEL_PRIVILEGED,
    frozenset({"daemoneye-agent"}),
    frozenset({"procmond", "netmond"}),
)
NO_LEVEL = TopicAccess(
    AccessLevel.ACCESS_LEVEL_UNSPECIFIED, frozenset({"procmond"}), frozenset({"procmond"})
)
UNKNOWN_LEVEL = TopicAccess(
    AccessLevel.ValueType(7), frozenset({"procmond"}), frozenset({"procmond"})
)

P = peer(1001)
IDENTITIES: dict[str, Identity] = {
    "anonymous": Identity(P),
    "procmond": Identity(P, "procmond"),
    "procmond-privileged": Identity(P, "procmond", privileged=True),
    "netmond": Identity(P, "netmond"),
    "agent": Identity(P, "daemoneye-agent", privileged=True),
    "agent-unprivileged": Identity(P, "daemoneye-agent"),
    "in-process": Identity(None, "", privileged=True, trusted=True),
    "in-process-agent": Identity(None, "daemoneye-agent", privileged=True, trusted=True),
}
TOPIC_ACCESS = {
    "public": PUBLIC,
    "restricted": RESTRICTED,
    "privileged": PRIVILEGED,
    "no-level": NO_LEVEL,
    "unknown-level": UNKNOWN_LEVEL,
}

# identity -> topic -> (may publish, may read)
EXPECTED: dict[str, dict[str, tuple[bool, bool]]] = {
    "anonymous": {
        "public": (True, True),
        "restricted": (False, False),
        "privileged": (False, False),
        "no-level": (False, False),
        "unknown-level": (False, False),
    },
    "procmond": {
        "public": (True, True),
        "restricted": (True, False),  # a publisher, not a subscriber
        "privileged": (False, True),  # a subscriber, not a publisher
        "no-level": (False, False),
        "unknown-level": (False, False),
    },
    "procmond-privileged": {
        "public": (True, True),
        "restricted": (True, False),
        "privileged": (False, True),  # privilege does not make it a listed publisher
        "no-level": (False, False),
        "unknown-level": (False, False),
    },
    "netmond": {
        "public": (True, True),
        "restricted": (False, False),
        "privileged": (False, True),
        "no-level": (False, False),
        "unknown-level": (False, False),
    },
    "agent": {
        "public": (True, True),
        "restricted": (False, True),
        "privileged": (True, False),
        "no-level": (False, False),
        "unknown-level": (False, False),
    },
    "agent-unprivileged": {
        "public": (True, True),
        "restricted": (False, True),
        "privileged": (False, False),  # listed, but not privileged
        "no-level": (False, False),
        "unknown-level": (False, False),
    },
    "in-process": dict.fromkeys(TOPIC_ACCESS, (True, True)),
    "in-process-agent": dict.fromkeys(TOPIC_ACCESS, (True, True)),
}


_PAIRS = list(itertools.product(IDENTITIES, TOPIC_ACCESS))


@pytest.mark.parametrize(("who", "topic"), _PAIRS, ids=[f"{w}-{t}" for w, t in _PAIRS])
def test_may_publish_and_read_table(who: str, topic: str) -> None:
    identity = IDENTITIES[who]
    access_ = TOPIC_ACCESS[topic]
    publish, read = EXPECTED[who][topic]
    reason = may_publish(identity, access_)
    assert (reason is None) == publish, reason
    if reason is not None:
        assert reason  # a refusal always says why
    assert may_read(identity, access_) is read


def test_may_publish_reasons() -> None:
    assert may_publish(IDENTITIES["anonymous"], RESTRICTED) == (
        "anonymous peers may publish only on public topics"
    )
    assert may_publish(IDENTITIES["netmond"], RESTRICTED) == (
        "component 'netmond' is not a publisher of this topic"
    )
    assert may_publish(IDENTITIES["agent-unprivileged"], PRIVILEGED) == (
        "component 'daemoneye-agent' is not privileged"
    )
    assert may_publish(IDENTITIES["procmond"], NO_LEVEL) == "topic has no access level"


def test_identity_describe() -> None:
    assert IDENTITIES["in-process-agent"].describe() == "daemoneye-agent (in process)"
    assert Identity(None, "procmond").describe() == "procmond (credentials unknown)"
    assert IDENTITIES["procmond"].describe() == "procmond (pid 4321, uid 1001, gid 1001)"
    assert ANONYMOUS.anonymous
    assert ANONYMOUS.describe() == "anonymous (credentials unknown)"


# -- the real registry -------------------------------------------------------------------------

Decl = registry.Topic[Any] | registry.TopicTemplate[Any]
DECLS: list[Decl] = [*registry.TOPICS.values(), *registry.TEMPLATES]


def _name(decl: Decl) -> str:
    return decl.name if isinstance(decl, registry.Topic) else decl.pattern


def _access(decl: Decl) -> TopicAccess:
    return TopicAccess(decl.access, decl.publishers, decl.subscribers)


def _readable(identity: Identity) -> set[str]:
    return {_name(d) for d in DECLS if may_read(identity, _access(d))}


def _publishable(identity: Identity) -> set[str]:
    return {_name(d) for d in DECLS if may_publish(identity, _access(d)) is None}


PUBLIC_TOPICS = {
    "events.process.anomaly",
    "control.health.heartbeat",
    "control.health.status",
    "control.health.diagnostics",
}
PROCESS_RESTRICTED = {
    "events.process.lifecycle",
    "events.process.metadata",
    "events.process.tree",
    "events.process.integrity",
    "events.process.batch",
}
#: What every collector tells the agent: who it is, and its tasks' progress and results.
COLLECTOR_CONTROL = {
    "control.collector.registration",
    "control.collector.result",
    "control.collector.progress",
}
PRIVILEGED_CONTROL = {
    "control.collector.lifecycle",
    "control.collector.config",
    "control.collector.task",
    "control.collector.task.{type}.{id}",
    "control.agent.orchestration",
    "control.agent.policy",
    # Request topics: the agent asks, the collectors answer.
    "control.collector.rpc.health.{id}",
    "control.collector.rpc.config.{id}",
    "control.collector.rpc.lifecycle.{id}",
    "control.collector.rpc.task.{id}",
    "control.collector.queue.{type}",
}


def test_registry_levels_are_what_these_tests_assume() -> None:
    by_level: dict[int, set[str]] = {}
    for d in DECLS:
        by_level.setdefault(int(d.access), set()).add(_name(d))
    assert by_level[1] == PUBLIC_TOPICS
    assert by_level[3] == PRIVILEGED_CONTROL
    assert by_level[2] >= PROCESS_RESTRICTED
    assert set(by_level) == {1, 2, 3}


def test_registry_anonymous_reads_and_publishes_exactly_the_public_topics() -> None:
    anon = Identity(P)
    assert _readable(anon) == PUBLIC_TOPICS
    assert _publishable(anon) == PUBLIC_TOPICS


def test_registry_procmond() -> None:
    procmond = Identity(P, "procmond")
    published = _publishable(procmond)
    assert published >= PROCESS_RESTRICTED
    assert published == PUBLIC_TOPICS | PROCESS_RESTRICTED | COLLECTOR_CONTROL
    assert not published & PRIVILEGED_CONTROL
    # Not another collector's events.
    assert "events.network.connections" not in published
    # Even if a policy marked it privileged, it is not a publisher of control topics.
    assert _publishable(Identity(P, "procmond", privileged=True)) == published
    readable = _readable(procmond)
    assert "control.collector.lifecycle" in readable
    assert "control.collector.lifecycle" not in published
    assert "control.agent.policy" in readable
    assert "control.collector.task.{type}.{id}" in readable
    # It does not read its own restricted events: only the agent does.
    assert not readable & PROCESS_RESTRICTED
    assert not readable & COLLECTOR_CONTROL


def test_registry_agent() -> None:
    agent = Identity(P, "daemoneye-agent", privileged=True)
    published = _publishable(agent)
    assert published >= PRIVILEGED_CONTROL
    assert not published & PROCESS_RESTRICTED
    readable = _readable(agent)
    events = {_name(d) for d in DECLS if _name(d).startswith("events.")}
    assert events <= readable
    assert readable >= COLLECTOR_CONTROL
    assert not published & COLLECTOR_CONTROL
    assert "control.collector.lifecycle" not in readable  # a command for collectors
    assert "control.agent.policy" in readable
    # The same component without the privileged flag publishes no privileged topic.
    assert not _publishable(Identity(P, "daemoneye-agent")) & PRIVILEGED_CONTROL


def test_registry_trusted_in_process() -> None:
    trusted = Identity(None, "", privileged=True, trusted=True)
    every = {_name(d) for d in DECLS}
    assert _readable(trusted) == every
    assert _publishable(trusted) == every


# -- the audit log -------------------------------------------------------------------------------

_PAIR = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)=("(?:[^"\\]|\\.)*"|[^\s"]+)')


def parse_audit_line(line: str) -> dict[str, str]:
    """Parse ``audit k=v k="quoted" ...`` strictly; the pairs must tile the line."""
    assert line.startswith("audit "), line
    rest = line.removeprefix("audit ")
    out: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        m = _PAIR.match(rest, pos)
        assert m is not None, f"unparsable at {pos}: {rest[pos:]!r}"
        key, raw = m.group(1), m.group(2)
        assert key not in out, f"field {key} appears twice in {line!r}"
        if raw.startswith('"'):
            out[key] = raw[1:-1].encode("ascii").decode("unicode_escape")
        else:
            out[key] = raw
        pos = m.end()
        if pos < len(rest):
            assert rest[pos] == " ", f"no separator at {pos}: {rest!r}"
            pos += 1
    return out


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    # AuditLog reads time.monotonic() at each record.
    monkeypatch.setattr(time, "monotonic", c)
    return c


def audit_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == AUDIT_LOGGER]


def audit_fields(record: logging.LogRecord) -> dict[str, object]:
    fields = getattr(record, "audit", None)
    assert isinstance(fields, dict)
    return fields


@pytest.fixture
def audit_caplog(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.WARNING, logger=AUDIT_LOGGER):
        yield caplog


def test_audit_line_format(audit_caplog: pytest.LogCaptureFixture) -> None:
    log = AuditLog()
    assert log.logger.name == AUDIT_LOGGER
    assert log.record("publish_refused", peer(1001, gid=1002, pid=77), topic="events.x", n=3)
    [record] = audit_records(audit_caplog)
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        "audit event=publish_refused pid=77 uid=1001 gid=1002 topic=events.x n=3"
    )
    assert audit_fields(record) == {
        "event": "publish_refused",
        "pid": 77,
        "uid": 1001,
        "gid": 1002,
        "topic": "events.x",
        "n": 3,
    }
    assert parse_audit_line(record.getMessage())["uid"] == "1001"


def test_audit_without_peer(audit_caplog: pytest.LogCaptureFixture) -> None:
    log = AuditLog()
    assert log.record("connection_refused", None, reason="x")
    [record] = audit_records(audit_caplog)
    assert record.getMessage() == "audit event=connection_refused reason=x"
    assert audit_fields(record) == {"event": "connection_refused", "reason": "x"}


def test_audit_custom_logger(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("tests.audit.custom")
    with caplog.at_level(logging.WARNING, logger="tests.audit.custom"):
        AuditLog(logger).record("e", None)
    assert [r.getMessage() for r in caplog.records if r.name == logger.name] == ["audit event=e"]


@pytest.mark.parametrize(
    "value",
    [
        "with space",
        'say "hi"',
        "two\nlines",
        "tab\there",
        "carriage\rreturn",
        "key=value",
        'x" uid=0 forged="1',
        "bell\x07nul\x00",
        "back\\slash and space",
        "unicode é ✓ space",
        "\u2028line separator",
        "",
    ],
)
def test_audit_values_are_quoted_safely(audit_caplog: pytest.LogCaptureFixture, value: str) -> None:
    AuditLog().record("subscribe_refused", peer(1001), filter=value, reason="r")
    [record] = audit_records(audit_caplog)
    line = record.getMessage()
    assert "\n" not in line
    assert "\r" not in line
    assert line.isprintable()
    fields = parse_audit_line(line)
    assert list(fields) == ["event", "pid", "uid", "gid", "filter", "reason"]
    assert fields["filter"] == value
    assert fields["uid"] == "1001"  # a value cannot forge another field
    assert fields["reason"] == "r"


@settings(max_examples=300, deadline=None)
@given(value=st.text(max_size=25))  # short: never cut at 256
def test_audit_short_values_round_trip(value: str) -> None:
    logger = logging.getLogger("tests.audit.roundtrip")
    captured: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            captured.append(record.getMessage())

    handler = Grab()
    logger.addHandler(handler)
    logger.propagate = False
    try:
        AuditLog(logger).record("handshake_refused", peer(1), claimed=value, reason="r")
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    [line] = captured
    assert line.isprintable()
    fields = parse_audit_line(line)
    assert list(fields) == ["event", "pid", "uid", "gid", "claimed", "reason"]
    assert fields["claimed"] == value


def test_audit_long_values_are_cut(audit_caplog: pytest.LogCaptureFixture) -> None:
    AuditLog().record("e", None, plain="x" * 1000, spaced="y " * 500)
    fields = parse_audit_line(audit_records(audit_caplog)[0].getMessage())
    assert fields["plain"] == "x" * 256
    assert len(fields["spaced"]) <= 256
    assert fields["spaced"].startswith("y y y")


def test_audit_cut_never_splits_an_escape(audit_caplog: pytest.LogCaptureFixture) -> None:
    # 255 escaped characters, then a newline whose escape "\n" straddles the cut at 256.
    claimed = " uid=0 forged=yes " + "é" * 59 + "a" + "\n"
    assert len((" uid=0 forged=yes " + "é" * 59 + "a").encode("unicode_escape")) == 255
    AuditLog().record("handshake_refused", peer(1001), claimed=claimed, reason="r x")
    line = audit_records(audit_caplog)[0].getMessage()
    fields = parse_audit_line(line)
    assert list(fields) == ["event", "pid", "uid", "gid", "claimed", "reason"]
    assert fields["uid"] == "1001"


# -- the audit rate limit ------------------------------------------------------------------------


def test_audit_burst_per_uid(audit_caplog: pytest.LogCaptureFixture, clock: Clock) -> None:
    log = AuditLog(burst=3, window=10.0)
    results = [log.record("publish_refused", peer(1001), i=i) for i in range(8)]
    assert results == [True, True, True, False, False, False, False, False]
    assert log.suppressed == 5
    assert [audit_fields(r)["i"] for r in audit_records(audit_caplog)] == [0, 1, 2]
    # Another uid has its own budget; the same uid from another pid does not.
    assert log.record("publish_refused", peer(2002), i=100)
    assert not log.record("publish_refused", peer(1001, pid=9), i=101)
    assert log.suppressed == 6
    assert len(audit_records(audit_caplog)) == 4


def test_audit_next_window_reports_suppressed(
    audit_caplog: pytest.LogCaptureFixture, clock: Clock
) -> None:
    log = AuditLog(burst=2, window=10.0)
    for _ in range(5):
        log.record("publish_refused", peer(1001))
    clock.now = 1009.5  # still the same window
    assert not log.record("publish_refused", peer(1001))
    clock.now = 1010.0  # a new window
    assert log.record("publish_refused", peer(1001), i="new")
    last = audit_records(audit_caplog)[-1]
    assert audit_fields(last)["suppressed_before"] == 4
    assert last.getMessage().endswith("i=new suppressed_before=4")
    # Reported once: the next line of the window has no count.
    assert log.record("publish_refused", peer(1001))
    assert "suppressed_before" not in audit_fields(audit_records(audit_caplog)[-1])
    # A window with nothing suppressed reports nothing.
    clock.now = 1020.0
    assert log.record("publish_refused", peer(1001))
    assert "suppressed_before" not in audit_fields(audit_records(audit_caplog)[-1])
    assert log.suppressed == 4


def test_audit_uids_are_independent(audit_caplog: pytest.LogCaptureFixture, clock: Clock) -> None:
    log = AuditLog(burst=2, window=10.0)
    for uid in (1, 2, 3):
        for _ in range(4):
            log.record("publish_refused", peer(uid))
    per_uid: dict[object, int] = {}
    for record in audit_records(audit_caplog):
        key = audit_fields(record)["uid"]
        per_uid[key] = per_uid.get(key, 0) + 1
    assert per_uid == {1: 2, 2: 2, 3: 2}
    assert log.suppressed == 6
    clock.now = 1010.0
    log.record("publish_refused", peer(2))
    assert audit_fields(audit_records(audit_caplog)[-1]) == {
        "event": "publish_refused",
        "pid": 4321,
        "uid": 2,
        "gid": 2,
        "suppressed_before": 2,
    }
    # Peers without credentials share one bucket.
    for _ in range(3):
        log.record("connection_refused", None)
    assert log.suppressed == 7


def test_audit_bucket_table_is_bounded(clock: Clock) -> None:
    log = AuditLog(burst=1, window=10.0, max_peers=4)
    for uid in range(100):
        assert log.record("publish_refused", peer(uid))
        assert len(log._buckets) <= 4


# -- filters_overlap ---------------------------------------------------------------------------

_TOPIC_ALPHABET = ("a", "b", "c")  # "c" appears in no generated filter: "some other level"
_MAX_TOPIC_LEVELS = 5


def _brute_matches(flt: tuple[str, ...], topic: tuple[str, ...]) -> bool:
    """MQTT-style matching, written independently: + one level, # the rest (even nothing)."""
    if not flt:
        return not topic
    head, rest = flt[0], flt[1:]
    if head == "#":
        return True
    if not topic:
        return False
    return (head in ("+", topic[0])) and _brute_matches(rest, topic[1:])


_ALL_TOPICS = [
    t for n in range(1, _MAX_TOPIC_LEVELS + 1) for t in itertools.product(_TOPIC_ALPHABET, repeat=n)
]


def _brute_overlap(a: str, b: str) -> bool:
    fa, fb = tuple(a.split(".")), tuple(b.split("."))
    return any(_brute_matches(fa, t) and _brute_matches(fb, t) for t in _ALL_TOPICS)


_filters = st.builds(
    lambda levels, hash_: ".".join([*levels, "#"] if hash_ else levels),
    st.lists(st.sampled_from(["a", "b", "+"]), min_size=0, max_size=4),
    st.booleans(),
).filter(lambda f: f != "" and len(f.split(".")) <= 4)


@settings(max_examples=1000, deadline=None)
@given(a=_filters, b=_filters)
def test_filters_overlap_matches_brute_force(a: str, b: str) -> None:
    expected = _brute_overlap(a, b)
    assert filters_overlap(a, b) is expected
    assert filters_overlap(b, a) is expected


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("#", "events.process.lifecycle", True),
        ("events.+.lifecycle", "events.process.anomaly", False),
        ("events.process.#", "events.process.anomaly", True),
        ("events.process.#", "events.process", True),  # '#' matches nothing too
        ("events.+", "events", False),
        ("control.collector.task.+.+", "control.collector.task", False),
        ("control.#", "control.collector.task.+.+", True),
        ("a.+.c", "a.b.+", True),
        ("a.b", "a.b.c", False),
        ("+.#", "a", True),
    ],
)
def test_filters_overlap_examples(a: str, b: str, expected: bool) -> None:
    assert filters_overlap(a, b) is expected
    assert filters_overlap(b, a) is expected


@pytest.mark.parametrize(
    ("path", "ok"),
    [
        ("/usr/sbin/procmond", True),
        ("C:\\Program Files\\DaemonEye\\procmond.exe", True),
        ("procmond", False),
        ("\\procmond.exe", False),  # no drive: relative to the current one
        ("bin/procmond", False),
    ],
)
def test_executables_are_absolute_paths_on_unix_and_windows(path: str, ok: bool) -> None:
    rules = {"components": {"procmond": {"uids": [0], "executables": [path]}}}
    if ok:
        policy = Policy.from_mapping(rules)
        assert policy.components["procmond"].executables == frozenset({path})
    else:
        with pytest.raises(PolicyError, match="absolute paths"):
            Policy.from_mapping(rules)
