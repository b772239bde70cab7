"""Windows named pipes, the parts that need no Windows: names, security
descriptors, token groups, errors, the dispatcher's choice and the CLI's
``--pipe-sddl``. They run on every platform; the pipes themselves are
exercised by tests/test_windows_pipes.py on Windows.
"""

from __future__ import annotations

import sys

import pytest

from daemoneye_eventbus import transports
from daemoneye_eventbus.access import PeerCredentials
from daemoneye_eventbus.cli import main
from daemoneye_eventbus.cli_args import parser
from daemoneye_eventbus.errors import BrokerAlreadyRunning, BrokerError
from daemoneye_eventbus.transports import pipes

USER = "S-1-5-21-1004336348-1177238915-682003330-1001"
DEFAULT = f"D:P(A;;GA;;;SY)(A;;GA;;;BA)(A;;GA;;;{USER})"

# -- names -----------------------------------------------------------------------------------


def test_the_default_pipe_and_a_named_instance() -> None:
    assert pipes.pipe_name() == pipes.pipe_name(None) == r"\\.\pipe\DaemonEye"
    assert pipes.pipe_name("prod") == r"\\.\pipe\DaemonEye-prod"
    assert pipes.pipe_name("a_b-1") == r"\\.\pipe\DaemonEye-a_b-1"
    assert pipes.DEFAULT_PIPE_NAME == r"\\.\pipe\DaemonEye"


@pytest.mark.parametrize("instance", ["a/b", "..\\x", "x y", "x.pipe", "é\n", "a\0b", "a:b"])
def test_an_instance_name_holds_only_letters_digits_dashes_underscores(instance: str) -> None:
    with pytest.raises(ValueError, match="instance name"):
        pipes.pipe_name(instance)


def test_an_instance_name_keeps_the_pipe_name_within_its_limit() -> None:
    longest = "x" * pipes.MAX_INSTANCE_CHARS
    assert len(pipes.pipe_name(longest)) == pipes.MAX_PIPE_NAME_CHARS
    with pytest.raises(ValueError, match="at most"):
        pipes.pipe_name(longest + "x")


@pytest.mark.parametrize(
    "name", [r"\\.\pipe\DaemonEye", r"\\.\PIPE\bus", r"\\.\pipe\a.b-c d", r"\\.\pipe\x"]
)
def test_local_pipe_names_are_accepted(name: str) -> None:
    assert pipes.check_pipe_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        r"\\server\pipe\DaemonEye",  # another host
        r"\\?\pipe\DaemonEye",
        r"\\.\pipe\\",
        r"\\.\pipe\a\b",
        r"\\.\pipe\a" + "\n",
        "/tmp/daemoneye.sock",
        "DaemonEye",
        "",
        r"\\.\pipe" + "\\" + "x" * 250,
    ],
)
def test_other_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="pipe"):
        pipes.check_pipe_name(name)


# -- the dispatcher --------------------------------------------------------------------------


def test_the_default_address_is_a_pipe_name_on_windows_only() -> None:
    assert transports.default_address(platform="win32") == r"\\.\pipe\DaemonEye"
    assert transports.default_address("lab", platform="win32") == r"\\.\pipe\DaemonEye-lab"
    for platform in ("linux", "darwin", "freebsd14"):
        assert transports.default_address(platform=platform) == "/tmp/daemoneye.sock"
        assert transports.default_address("lab", platform=platform) == "/tmp/daemoneye-lab.sock"
    assert transports.default_address(platform=sys.platform) == transports.DEFAULT_ADDRESS
    with pytest.raises(ValueError, match="instance name"):
        transports.default_address("../x", platform="win32")


@pytest.mark.skipif(sys.platform == "win32", reason="Unix sockets")
def test_elsewhere_the_listener_is_a_unix_socket_and_ignores_the_pipe_sddl() -> None:
    listening = transports.listener("/tmp/x.sock", pipe_sddl=DEFAULT)
    assert type(listening).__module__ == "daemoneye_eventbus.transports.unix"
    assert listening.address == "/tmp/x.sock"


def test_peer_credentials_carry_sids_only_when_given() -> None:
    unix = PeerCredentials(1, 2, 3)
    assert unix.sid is None
    assert unix.group_sids == frozenset()
    windows = PeerCredentials(4, -1, -1, sid=USER, group_sids=frozenset({pipes.ADMINISTRATORS_SID}))
    assert windows.sid == USER
    assert pipes.ADMINISTRATORS_SID in windows.group_sids


# -- security descriptors --------------------------------------------------------------------


def test_the_default_descriptor_lets_in_system_administrators_and_the_broker_user() -> None:
    sddl = pipes.default_sddl(USER)
    assert sddl == DEFAULT
    assert sddl.startswith("D:P")  # protected: nothing inherited
    assert pipes.check_sddl(sddl) == sddl
    assert pipes.broad_grants(sddl) == []


@pytest.mark.parametrize(
    "sid",
    ["", "S-1", "S-1-5", "s-1-5-18", "S-1-5-21-1)(A;;GA;;;WD", "BA", "S-1-5-21-1 ", "S-2-5-18"],
)
def test_the_default_descriptor_takes_only_a_sid(sid: str) -> None:
    with pytest.raises(ValueError, match="SID"):
        pipes.default_sddl(sid)


@pytest.mark.parametrize(
    "sddl",
    [
        DEFAULT,
        "D:(A;;GA;;;SY)",
        "D:PAI(A;;GA;;;SY)(A;;GRGW;;;S-1-5-21-1-2-3-1010)",
        "D:P(D;;GA;;;NU)(A;;0x12019f;;;BU)",
        "O:BAG:SYD:P(A;;GA;;;SY)",
        "D:P(A;;FA;;;SY)S:(ML;;NW;;;LW)",
        "D:P(A;OICI;GA;;;SY)(A;;268435456;;;BA)",
    ],
)
def test_descriptors_of_a_pipes_shape_are_accepted(sddl: str) -> None:
    assert pipes.check_sddl(sddl) == sddl


@pytest.mark.parametrize(
    ("sddl", "reason"),
    [
        ("", "printable ASCII"),
        ("D:P(A;;GA;;;SY) ", "no spaces"),
        ("D:P(A;;GA;;;SY)\t", "printable"),
        ("D:P(A;;GA;;;SÝ)", "ASCII"),
        ("D:P" + "(A;;GA;;;SY)" * 400, "4096"),
        ("O:BA", "no DACL"),
        ("O:BAG:BA", "no DACL"),
        ("S:(ML;;NW;;;LW)", "no DACL"),
        ("D:NO_ACCESS_CONTROL", "null DACL"),
        ("D:PNO_ACCESS_CONTROL", "null DACL"),
        ("D:", "allows nobody"),
        ("D:P", "allows nobody"),
        ("D:P(D;;GA;;;WD)", "allows nobody"),
        ("D:X(A;;GA;;;SY)", "DACL flags"),
        ("D:P(A;;GA;;;SY)x", "parentheses"),
        ("D:P(A;;GA;;;SY)(A;;GA;;;BA", "cannot read"),
        ("D:(A;;GA;;;SY)D:(A;;GA;;;BA)", "twice"),
        ("D:(OA;;GA;;;SY)", "ACE type"),
        ("D:(AU;;GA;;;SY)", "ACE type"),
        ("D:(A;;GA;;SY)", "6 fields"),
        ("D:(A;;GA;;;SY;x)", "6 fields"),
        ("D:(A;ZZ;GA;;;SY)", "ACE flags"),
        ("D:(A;;;;;SY)", "rights"),
        ("D:(A;;G;;;SY)", "rights"),
        ("D:(A;;GA;bf967aba-0de6-11d0-a285-00aa003049e2;;SY)", "object"),
        ("D:(A;;GA;;;sy)", "alias"),
        ("D:(A;;GA;;;Everyone)", "alias"),
        ("D:(A;;GA;;;)", "alias"),
        ("O:ownerD:(A;;GA;;;SY)", "alias"),
        ("Q:xD:(A;;GA;;;SY)", "cannot read"),
        ("D:(A;;GA;;;SY)S:(A;;GA;;;SY)", "ACE type"),
    ],
)
def test_descriptors_that_would_let_everybody_or_nobody_in_or_do_not_parse_are_refused(
    sddl: str, reason: str
) -> None:
    with pytest.raises(ValueError, match=reason):
        pipes.check_sddl(sddl)


def test_broad_grants_name_everyone_anonymous_and_network_logons() -> None:
    assert pipes.broad_grants("D:(A;;GA;;;SY)(A;;GRGW;;;WD)") == ["Everyone"]
    assert pipes.broad_grants("D:(A;;GA;;;S-1-1-0)(A;;GA;;;AN)") == [
        "Everyone",
        "anonymous logons",
    ]
    assert pipes.broad_grants("D:(A;;GA;;;S-1-5-2)(A;;GA;;;SY)") == ["network logons"]
    # Deny entries and narrow groups are no broad grant.
    assert pipes.broad_grants("D:(D;;GA;;;WD)(D;;GA;;;AN)(A;;GA;;;BU)") == []


# -- token groups ----------------------------------------------------------------------------


def test_only_enabled_groups_that_are_not_deny_only_count() -> None:
    enabled = pipes.SE_GROUP_ENABLED | 0x1 | 0x2  # mandatory, enabled by default
    groups = [
        ("S-1-5-32-545", enabled),  # Users
        (pipes.ADMINISTRATORS_SID, pipes.SE_GROUP_USE_FOR_DENY_ONLY),  # UAC-filtered token
        ("S-1-5-32-546", enabled | pipes.SE_GROUP_USE_FOR_DENY_ONLY),  # deny-only wins
        ("S-1-5-21-1-2-3-1010", 0x2),  # enabled by default, but disabled now
        ("S-1-5-11", pipes.SE_GROUP_ENABLED),
    ]
    assert pipes.effective_group_sids(groups) == {"S-1-5-32-545", "S-1-5-11"}
    assert pipes.effective_group_sids([]) == frozenset()


# -- CreateNamedPipe errors ------------------------------------------------------------------


def test_a_name_another_process_owns_refuses_the_start() -> None:
    name = pipes.pipe_name("prod")
    for winerror in (5, 231):  # access denied, pipe busy
        error = pipes.create_error(winerror, name, first=True)
        assert isinstance(error, BrokerAlreadyRunning)
        assert name in str(error)


def test_other_creation_errors_are_broker_errors() -> None:
    name = pipes.pipe_name()
    later = pipes.create_error(5, name, first=False)  # not the first instance
    assert isinstance(later, BrokerError)
    assert not isinstance(later, BrokerAlreadyRunning)
    assert "invalid name" in str(pipes.create_error(123, name, first=True))
    assert "Windows error 1450" in str(pipes.create_error(1450, name, first=True))


# -- the command line ------------------------------------------------------------------------


def test_serve_checks_the_pipe_sddl_shape(capsys: pytest.CaptureFixture[str]) -> None:
    args = parser().parse_args(["serve", "--pipe-sddl", DEFAULT])
    assert args.pipe_sddl == DEFAULT
    assert parser().parse_args(["serve"]).pipe_sddl is None
    with pytest.raises(SystemExit) as exit_:
        parser().parse_args(["serve", "--pipe-sddl", "D:NO_ACCESS_CONTROL"])
    assert exit_.value.code == 2
    assert "null DACL" in capsys.readouterr().err


def test_serve_help_gives_the_pipe_sddl_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--pipe-sddl SDDL" in text
    assert "LocalSystem, Administrators and the broker's own user" in text


@pytest.mark.skipif(sys.platform == "win32", reason="the refusal is for other platforms")
def test_serve_refuses_a_pipe_sddl_where_there_are_no_pipes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--pipe-sddl", DEFAULT])
    assert exit_.value.code == 2
    assert "--pipe-sddl is for Windows named pipes" in capsys.readouterr().err
