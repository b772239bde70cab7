"""What the bus does on each platform, checked where it can be from Linux.

The pure parts of the Unix transport's per-system code (which call gives the
peer's credentials on which system, the macOS ``struct xucred`` layout), the
refusal of ``serve --user`` where the drop cannot be verified, and the
GitHub Actions workflow and ``make types`` that exercise macOS and Windows.
The tests over a real socket run on every system that has a method; on
Linux here, on macOS in the workflow.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import sys
import tempfile

import conftest
import pytest
from conftest import REPO

from daemoneye_eventbus import privileges
from daemoneye_eventbus.access import PeerCredentials
from daemoneye_eventbus.errors import PrivilegeError
from daemoneye_eventbus.transports.unix import (
    credentials_method,
    parse_xucred,
    peer_credentials,
    peer_executable,
)

WORKFLOW = REPO / ".github" / "workflows" / "ci.yml"
OSES = ("ubuntu-latest", "macos-latest", "windows-latest")
PLATFORMS = ("linux", "darwin", "win32")


# -- which call on which system ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("platform", "method"),
    [
        ("linux", "SO_PEERCRED"),
        ("darwin", "LOCAL_PEERCRED"),
        ("freebsd14", "getpeereid"),
        ("openbsd7", "getpeereid"),
        ("netbsd10", "getpeereid"),
        ("dragonfly6", "getpeereid"),
        ("win32", None),  # named pipes: the client's token, not a Unix socket
        ("cygwin", None),
        ("sunos5", None),
        ("aix", None),
    ],
)
def test_credentials_method(platform: str, method: str | None) -> None:
    assert credentials_method(platform) == method


def xucred(version: int, uid: int, groups: list[int], ngroups: int | None = None) -> bytes:
    """A macOS ``struct xucred``, laid out by hand (<sys/ucred.h>): u_int cr_version,
    uid_t cr_uid, short cr_ngroups (and two bytes of padding), gid_t cr_groups[16]."""
    order = sys.byteorder
    padded = groups + [0] * (16 - len(groups))
    return b"".join(
        [
            version.to_bytes(4, order),
            uid.to_bytes(4, order),
            (len(groups) if ngroups is None else ngroups).to_bytes(2, order, signed=True),
            b"\0\0",
            *(g.to_bytes(4, order) for g in padded),
        ]
    )


def test_parse_xucred() -> None:
    raw = xucred(0, 501, [20, 12, 61, 79])
    assert len(raw) == 76
    # The effective gid is the first group.
    assert parse_xucred(raw) == (501, 20)
    assert parse_xucred(xucred(0, 0, [0])) == (0, 0)
    assert parse_xucred(xucred(0, 4294967294, [4294967294] * 16)) == (4294967294, 4294967294)
    # The kernel may hand back more than asked for: the struct is read from the start.
    assert parse_xucred(raw + b"\xff" * 8) == (501, 20)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        xucred(0, 501, [20])[:75],  # short
        xucred(1, 501, [20]),  # another layout version
        xucred(0, 501, [], ngroups=0),  # no group: no gid
        xucred(0, 501, [20], ngroups=17),  # more groups than the struct holds
        xucred(0, 501, [20], ngroups=-1),
    ],
)
def test_parse_xucred_refuses_what_it_does_not_understand(raw: bytes) -> None:
    assert parse_xucred(raw) is None


def test_peer_credentials_over_a_real_socket() -> None:
    if sys.platform == "win32" or credentials_method(sys.platform) is None:
        pytest.skip("this system gives no peer credentials over a Unix socket")
    # A short directory: socket paths are limited to about 104 bytes (macOS).
    directory = tempfile.mkdtemp(prefix="deb-", dir="/tmp")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
            server.bind(os.path.join(directory, "s"))
            server.listen(1)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.connect(os.path.join(directory, "s"))
                accepted, _ = server.accept()
                with accepted:
                    peer = peer_credentials(accepted)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    # getpeereid (the BSDs) gives no pid.
    pid = 0 if credentials_method(sys.platform) == "getpeereid" else os.getpid()
    assert peer == PeerCredentials(pid, os.geteuid(), os.getegid())


def test_peer_executable_of_no_pid() -> None:
    # pid 0 is "the kernel did not say" (the BSDs), never a process to look up.
    assert peer_executable(0) is None
    assert peer_executable(-1) is None


@pytest.mark.skipif(sys.platform != "darwin", reason="proc_pidpath is macOS's")
def test_peer_executable_on_macos() -> None:
    exe = peer_executable(os.getpid())
    assert exe is not None
    assert os.path.isabs(exe)
    assert os.path.exists(exe)


# -- serve --user ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("platform", "has_getresuid", "what"),
    [
        ("linux", True, None),
        ("freebsd14", True, None),
        ("openbsd7", True, None),
        ("netbsd10", False, "no os.getresuid"),
        ("darwin", False, "launchd: UserName and GroupName"),
        ("win32", False, "service account"),
    ],
)
def test_where_privileges_can_be_dropped(
    platform: str, has_getresuid: bool, what: str | None
) -> None:
    reason = privileges.unsupported_reason(platform, has_getresuid=has_getresuid)
    if what is None:
        assert reason is None
    else:
        assert reason is not None
        assert what in reason


def test_an_unsupported_system_refuses_before_anything_else(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if sys.platform == "win32":
        pytest.skip("no uids on Windows")
    # As on a system whose Python has no os.getresuid (NetBSD): refused at
    # check_switch, which serve calls before binding, and by each later step.
    monkeypatch.setattr(privileges, "_HAS_RESIDS", False)
    for call in (privileges.check_switch, privileges.drop_privileges, privileges.verify_dropped):
        with pytest.raises(PrivilegeError, match=r"cannot drop privileges here: .*getresuid"):
            call(os.getuid() + 1, os.getgid())
    # Dropping to root is refused as such everywhere.
    with pytest.raises(PrivilegeError, match="uid 0"):
        privileges.check_switch(0, 0)


# -- verified where: the linux_only marker, the workflow and make types ---------------------------


def test_linux_only_tests_are_skipped_elsewhere(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The marks are read at collection; this item has run its setup already,
    # so marking it now changes nothing about this run.
    item = request.node
    assert isinstance(item, pytest.Item)
    item.add_marker(pytest.mark.linux_only("reads /proc"))
    conftest.pytest_collection_modifyitems([item])
    if sys.platform.startswith("linux"):
        assert item.get_closest_marker("skip") is None
    monkeypatch.setattr(sys, "platform", "darwin")
    conftest.pytest_collection_modifyitems([item])
    skip = item.get_closest_marker("skip")
    assert skip is not None
    assert skip.kwargs["reason"] == "needs Linux: reads /proc"


def test_the_workflow_runs_on_the_three_systems() -> None:
    text = WORKFLOW.read_text(encoding="utf-8")
    matrix = re.search(r"^\s+os: \[(.*)\]$", text, re.M)
    assert matrix is not None
    assert tuple(o.strip() for o in matrix.group(1).split(",")) == OSES
    versions = re.search(r"^\s+python: \[(.*)\]$", text, re.M)
    assert versions is not None
    assert [v.strip().strip('"') for v in versions.group(1).split(",")] == ["3.11", "3.12"]
    for platform in PLATFORMS:
        assert re.search(rf"mypy .*--platform {platform}\b", text), platform


def test_make_types_checks_each_platform_the_workflow_checks() -> None:
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    target = re.search(r"^types:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert target is not None
    assert re.search(r"\$\(BIN\)/mypy\s*(#.*)?$", target.group(1), re.M)  # this system
    assert "--platform darwin" in target.group(1)
