"""Windows identities in the pure layers: SID syntax, ``sids`` policy rules, the
Windows default policy, and what audit lines and statistics show of a peer
that has a SID and no uid. Nothing here needs Windows: the peers are built by
hand, as the named-pipe transport would report them.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemoneye_eventbus.access import (
    EXECUTABLE_PLATFORMS,
    AuditLog,
    Identity,
    PeerCredentials,
    Policy,
    PolicyError,
    account_key,
    peer_fields,
)
from daemoneye_eventbus.errors import AccessDenied
from daemoneye_eventbus.sids import (
    ADMINISTRATORS,
    LOCAL_SYSTEM,
    MAX_SUB_AUTHORITIES,
    looks_like_sid,
    lookup_account,
    parse_sid,
    resolve_sids,
)
from daemoneye_eventbus.statistics import BrokerStatistics, ConnectionStatistics

BROKER_SID = "S-1-5-21-1004336348-1177238915-682003330-1001"
USER_SID = "S-1-5-21-1004336348-1177238915-682003330-1002"
STRANGER_SID = "S-1-5-21-1004336348-1177238915-682003330-1003"
COLLECTORS_GROUP = "S-1-5-21-1004336348-1177238915-682003330-2001"
USERS_GROUP = "S-1-5-32-545"
AUDIT_LOGGER = "daemoneye_eventbus.audit"


def win_peer(sid: str, *groups: str, pid: int = 4321) -> PeerCredentials:
    """A peer as the named-pipe transport reports it: no uid or gid, a token's SIDs."""
    return PeerCredentials(pid, -1, -1, sid=sid, group_sids=frozenset(groups))


# -- SID syntax --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("S-1-5-18", "S-1-5-18"),
        ("S-1-5-32-544", "S-1-5-32-544"),
        ("s-1-5-32-544", "S-1-5-32-544"),
        ("S-1-5-018", "S-1-5-18"),
        ("S-1-1-0", "S-1-1-0"),
        (BROKER_SID, BROKER_SID),
        # The hexadecimal form of the identifier authority, below 2**32: decimal.
        ("S-1-0x000000000005-18", "S-1-5-18"),
        ("S-1-0X00000000000a-1", "S-1-10-1"),
        # From 2**32 on, the authority is written in hexadecimal (twelve digits).
        ("S-1-4294967296-1", "S-1-0x000100000000-1"),
        ("S-1-0xffffffffffff-1", "S-1-0xFFFFFFFFFFFF-1"),
        ("S-1-5-4294967295", "S-1-5-4294967295"),
        ("S-1-5" + "-1" * MAX_SUB_AUTHORITIES, "S-1-5" + "-1" * MAX_SUB_AUTHORITIES),
    ],
)
def test_parse_sid_gives_the_canonical_form(text: str, canonical: str) -> None:
    assert parse_sid(text) == canonical
    assert parse_sid(canonical) == canonical


@pytest.mark.parametrize(
    ("text", "what"),
    [
        ("", "is not a SID"),
        ("S-1", "is not a SID"),
        ("S-1-5", "is not a SID"),  # no sub-authority
        ("S-2-5-18", "is not a SID"),  # revision 2 does not exist
        ("S-1-5-", "is not a SID"),
        ("S-1-5--18", "is not a SID"),
        ("S-1-5-18 ", "is not a SID"),
        (" S-1-5-18", "is not a SID"),
        ("S-1-5-x", "is not a SID"),
        ("S-1-+5-18", "is not a SID"),
        ("S-1-0x12-1", "is not a SID"),  # the hexadecimal form has twelve digits
        ("S-1-5-١٨", "is not a SID"),  # digits, but not ASCII ones
        ("S-1-281474976710656-1", "larger than 48 bits"),
        ("S-1-5-4294967296", "larger than 32 bits"),
        ("S-1-5" + "-1" * (MAX_SUB_AUTHORITIES + 1), "at most 15"),
    ],
)
def test_parse_sid_refuses(text: str, what: str) -> None:
    with pytest.raises(ValueError, match=what):
        parse_sid(text)


@given(
    authority=st.integers(0, 2**48 - 1),
    subs=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=MAX_SUB_AUTHORITIES),
    zeros=st.integers(0, 3),
)
def test_parse_sid_round_trips(authority: int, subs: list[int], zeros: int) -> None:
    shown = str(authority) if authority < 2**32 else f"0x{authority:012X}"
    canonical = "-".join(["S-1", shown, *map(str, subs)])
    assert parse_sid(canonical) == canonical
    # Another spelling of the same SID: lower case, leading zeros, decimal authority.
    other = "-".join(["s-1", str(authority), *("0" * zeros + str(s) for s in subs)])
    assert parse_sid(other) == canonical


@pytest.mark.parametrize(
    ("text", "sid"),
    [
        ("S-1-5-18", True),
        ("s-1-5-18", True),
        ("S-1-5-x", True),  # meant as a SID, malformed: refused, not looked up
        ("S-9", True),
        ("Administrators", False),
        ("BUILTIN\\Administrators", False),
        ("DOMAIN\\svc-procmond", False),
        ("Sam", False),
        ("S-", False),
        ("S", False),
        ("", False),
    ],
)
def test_looks_like_sid(text: str, sid: bool) -> None:
    assert looks_like_sid(text) is sid


def test_well_known_sids() -> None:
    assert parse_sid(LOCAL_SYSTEM) == LOCAL_SYSTEM == "S-1-5-18"
    assert parse_sid(ADMINISTRATORS) == ADMINISTRATORS == "S-1-5-32-544"


def fake_lookup(name: str) -> str:
    accounts = {
        "Administrators": "s-1-5-32-0544",
        "CORP\\svc-procmond": USER_SID,
        "broken": "not a sid",
    }
    try:
        return accounts[name]
    except KeyError:
        raise LookupError(f"no account {name!r}") from None


def test_resolve_sids_checks_sids_and_looks_up_names() -> None:
    assert resolve_sids([], None) == frozenset()
    assert resolve_sids(["s-1-5-018", "S-1-5-18"], None) == {LOCAL_SYSTEM}
    assert resolve_sids(["Administrators", "CORP\\svc-procmond", LOCAL_SYSTEM], fake_lookup) == {
        ADMINISTRATORS,
        USER_SID,
        LOCAL_SYSTEM,
    }
    # A malformed SID is refused, never looked up as a name.
    with pytest.raises(ValueError, match="'S-1-5-x' is not a SID"):
        resolve_sids(["S-1-5-x"], fake_lookup)


def test_resolve_sids_refuses_names_it_cannot_resolve() -> None:
    with pytest.raises(ValueError, match="resolved only by a broker on Windows"):
        resolve_sids(["Administrators"], None)
    with pytest.raises(ValueError, match=r"cannot resolve account 'nobody': .*no account"):
        resolve_sids(["nobody"], fake_lookup)
    with pytest.raises(ValueError, match="'not a sid' is not a SID"):
        resolve_sids(["broken"], fake_lookup)


@pytest.mark.skipif(sys.platform == "win32", reason="Windows resolves account names")
def test_lookup_account_is_windows_only() -> None:
    with pytest.raises(NotImplementedError, match="resolved only on Windows"):
        lookup_account("Administrators")
    # A policy for Windows read elsewhere cannot resolve names either, and says so.
    with pytest.raises(PolicyError, match="only on Windows"):
        Policy.from_mapping(
            {"components": {"procmond": {"sids": ["Administrators"]}}}, platform="win32"
        )


# -- sids in a policy file ---------------------------------------------------------------------


def policy(rule: dict[str, Any], **kwargs: Any) -> Policy:
    return Policy.from_mapping({"components": {"procmond": rule}}, source="p.toml", **kwargs)


def test_policy_sids_are_read_in_canonical_form() -> None:
    p = policy({"sids": ["s-1-5-32-0544", USER_SID], "uids": [998]}, platform="linux")
    rule = p.components["procmond"]
    assert rule.sids == {ADMINISTRATORS, USER_SID}
    assert rule.uids == {998}
    # sids alone make a rule.
    assert policy({"sids": [USER_SID]}).components["procmond"].sids == {USER_SID}


def test_policy_file_with_sids(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(
        "[components.procmond]\n"
        f'sids = ["{USER_SID}", "{COLLECTORS_GROUP}"]\n'
        "[components.daemoneye-agent]\n"
        f'sids = ["{LOCAL_SYSTEM}"]\n'
        "privileged = true\n"
    )
    p = Policy.load(path)
    assert p.components["procmond"].sids == {USER_SID, COLLECTORS_GROUP}
    assert p.components["daemoneye-agent"].privileged
    assert p.trusted_sids == frozenset()


@pytest.mark.parametrize(
    ("rule", "what"),
    [
        ({"sids": USER_SID}, "sids must be a list of SIDs"),
        ({"sids": [1]}, "sids must be a list of SIDs"),
        ({"sids": [""]}, "sids must be a list of SIDs"),
        ({"sids": ["S-1-5-32-5x"]}, r"\[components.procmond\]: 'S-1-5-32-5x' is not a SID"),
        ({"sids": ["S-1-5-4294967296"]}, "larger than 32 bits"),
        ({"sids": []}, "give uids, gids or sids"),
        ({"sid": [USER_SID]}, r"unknown key\(s\) \['sid'\]"),
    ],
)
def test_policy_refuses_bad_sids(rule: dict[str, Any], what: str) -> None:
    with pytest.raises(PolicyError, match=what):
        policy(rule, platform="win32", lookup_account=fake_lookup)


def test_policy_account_names_resolve_on_windows_only() -> None:
    rule = {"sids": ["Administrators", "CORP\\svc-procmond"]}
    resolved = policy(rule, platform="win32", lookup_account=fake_lookup)
    assert resolved.components["procmond"].sids == {ADMINISTRATORS, USER_SID}
    with pytest.raises(
        PolicyError,
        match=r"p.toml: \[components.procmond\]: account name 'Administrators' in sids: "
        "account names are resolved only by a broker on Windows; write the SID",
    ):
        policy(rule, platform="linux")
    with pytest.raises(PolicyError, match="cannot resolve account 'nobody'"):
        policy({"sids": ["nobody"]}, platform="win32", lookup_account=fake_lookup)


@pytest.mark.parametrize("platform", ["linux", "darwin", "win32", "freebsd14", "openbsd7"])
def test_executables_rules_only_where_the_executable_can_be_read(platform: str) -> None:
    rule = {"uids": [998], "executables": ["/usr/sbin/procmond"]}
    if platform in EXECUTABLE_PLATFORMS:
        assert policy(rule, platform=platform).needs_executable("procmond")
        return
    with pytest.raises(
        PolicyError,
        match=rf"executables rules need the peer's executable, .* not on {platform}",
    ):
        policy(rule, platform=platform)
    # Without executables the same policy is fine there.
    assert not policy({"uids": [998]}, platform=platform).needs_executable("procmond")


# -- matching ----------------------------------------------------------------------------------


@pytest.fixture
def sid_policy() -> Policy:
    return Policy.from_mapping(
        {
            "components": {
                "procmond": {"sids": [USER_SID, COLLECTORS_GROUP]},
                "netmond": {"uids": [998], "sids": [ADMINISTRATORS]},
            }
        }
    )


def test_a_user_sid_matches(sid_policy: Policy) -> None:
    identity = sid_policy.authenticate(win_peer(USER_SID, USERS_GROUP), "procmond")
    assert identity.component == "procmond"
    assert not identity.privileged


def test_a_group_sid_matches(sid_policy: Policy) -> None:
    p = win_peer(STRANGER_SID, USERS_GROUP, COLLECTORS_GROUP)
    assert sid_policy.authenticate(p, "procmond").component == "procmond"
    admin = win_peer(STRANGER_SID, ADMINISTRATORS)
    assert sid_policy.authenticate(admin, "netmond").component == "netmond"


def test_no_sid_matches(sid_policy: Policy) -> None:
    with pytest.raises(
        AccessDenied,
        match=f"component 'procmond' refused: sid {STRANGER_SID} \\(and its groups\\) "
        "is not allowed",
    ):
        sid_policy.authenticate(win_peer(STRANGER_SID, USERS_GROUP), "procmond")


def test_sids_never_match_a_unix_peer_nor_uids_a_windows_one(sid_policy: Policy) -> None:
    # A Unix peer has no SIDs: a sids-only rule refuses it, whatever its uid.
    with pytest.raises(AccessDenied, match="uid 0 / gid 0 is not allowed"):
        sid_policy.authenticate(PeerCredentials(1, 0, 0), "procmond")
    assert sid_policy.authenticate(PeerCredentials(1, 998, 998), "netmond").component == "netmond"
    # A Windows peer's uid and gid are -1, which no rule can list.
    with pytest.raises(AccessDenied, match="is not allowed"):
        sid_policy.authenticate(win_peer(STRANGER_SID), "netmond")


# -- the default policy on Windows -------------------------------------------------------------


@pytest.fixture
def windows_default() -> Policy:
    return Policy.default(-1, broker_sid=BROKER_SID)


def test_windows_default_trusts_system_administrators_and_the_broker(
    windows_default: Policy,
) -> None:
    assert windows_default.trusted_sids == {LOCAL_SYSTEM, ADMINISTRATORS, BROKER_SID}
    assert windows_default.trusted_uids == frozenset()
    assert windows_default.source == "default"
    for p in (
        win_peer(LOCAL_SYSTEM, ADMINISTRATORS),
        win_peer(USER_SID, USERS_GROUP, ADMINISTRATORS),
        win_peer(BROKER_SID, USERS_GROUP),
    ):
        assert windows_default.authenticate(p, "procmond").component == "procmond"
        agent = windows_default.authenticate(p, "daemoneye-agent")
        assert agent.privileged


def test_windows_default_refuses_other_users(windows_default: Policy) -> None:
    stranger = win_peer(STRANGER_SID, USERS_GROUP)
    with pytest.raises(
        AccessDenied, match=f"sid {STRANGER_SID} may not act as component 'procmond'"
    ):
        windows_default.authenticate(stranger, "procmond")
    # Anonymous is allowed, as under the Unix default.
    assert windows_default.authenticate(stranger, "").anonymous
    # No uid is trusted: a Windows peer's -1 does not match the broker's -1.
    with pytest.raises(AccessDenied):
        windows_default.authenticate(PeerCredentials(1, -1, -1), "procmond")


def test_windows_default_takes_the_broker_sid_in_any_spelling() -> None:
    assert BROKER_SID in Policy.default(-1, broker_sid=BROKER_SID.lower()).trusted_sids
    with pytest.raises(ValueError, match="is not a SID"):
        Policy.default(-1, broker_sid="me")


def test_unix_default_is_unchanged() -> None:
    p = Policy.default(1000)
    assert p.trusted_uids == {1000, 0}
    assert p.trusted_sids == frozenset()
    # A peer that somehow had Windows SIDs gains nothing from them here.
    with pytest.raises(AccessDenied, match=f"sid {LOCAL_SYSTEM} may not act"):
        p.authenticate(win_peer(LOCAL_SYSTEM, ADMINISTRATORS), "procmond")


# -- what logs and statistics show -------------------------------------------------------------


def test_peer_fields_and_account_key() -> None:
    unix = PeerCredentials(7, 1001, 1002)
    assert peer_fields(unix) == {"pid": 7, "uid": 1001, "gid": 1002}
    assert account_key(unix) == 1001
    windows = win_peer(USER_SID, ADMINISTRATORS, pid=7)
    assert peer_fields(windows) == {"pid": 7, "sid": USER_SID}
    assert account_key(windows) == USER_SID
    assert account_key(None) == -1
    assert Identity(windows, "procmond").describe() == f"procmond (pid 7, sid {USER_SID})"
    assert Identity(unix, "procmond").describe() == "procmond (pid 7, uid 1001, gid 1002)"


@pytest.fixture
def audit_caplog(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.WARNING, logger=AUDIT_LOGGER):
        yield caplog


def test_audit_line_of_a_windows_peer(audit_caplog: pytest.LogCaptureFixture) -> None:
    AuditLog().record("handshake_refused", win_peer(USER_SID, pid=77), claimed="procmond")
    [record] = [r for r in audit_caplog.records if r.name == AUDIT_LOGGER]
    assert record.getMessage() == (
        f"audit event=handshake_refused pid=77 sid={USER_SID} claimed=procmond"
    )


def test_audit_budget_is_per_sid(audit_caplog: pytest.LogCaptureFixture) -> None:
    # Every Windows peer has uid -1: the budget must follow the SID, or one
    # hostile account could use up every other account's lines.
    log = AuditLog(burst=2, window=3600.0)
    assert [log.record("e", win_peer(STRANGER_SID)) for _ in range(3)] == [True, True, False]
    assert log.record("e", win_peer(USER_SID))
    assert log.record("e", win_peer(USER_SID, pid=9))
    assert not log.record("e", win_peer(USER_SID, pid=10))


def test_statistics_show_the_sid_of_a_windows_peer() -> None:
    def conn(session_id: str, peer: PeerCredentials | None) -> ConnectionStatistics:
        return ConnectionStatistics(session_id, "c", "", peer, 0, 0, 0)

    stats = BrokerStatistics(
        3,
        3,
        0,
        0,
        0,
        0,
        (
            conn("w", win_peer(USER_SID, pid=5)),
            conn("u", PeerCredentials(6, 1001, 1002)),
            conn("n", None),
        ),
        (),
    )
    by_id = {c.session_id: c for c in stats.to_proto().connection_stats}
    assert (by_id["w"].peer_pid, by_id["w"].peer_uid, by_id["w"].peer_sid) == (5, 0, USER_SID)
    assert (by_id["u"].peer_pid, by_id["u"].peer_uid, by_id["u"].peer_sid) == (6, 1001, "")
    assert (by_id["n"].peer_pid, by_id["n"].peer_uid, by_id["n"].peer_sid) == (0, 0, "")
