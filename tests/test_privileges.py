"""``serve --user``: bind as root, drop to a user for good, refuse to run on as root.

The first part runs as any user: resolving users and groups, the listener and
broker seam that lets the drop happen between binding and accepting, and the
CLI's refusals that come before anything is created. The second part needs
root and the users of tests/users.sh: a real ``serve`` drops to ``deb-agent``
and a client running as ``deb-collector`` talks to it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import grp
import json
import os
import pwd
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_CONFIG, worker_env

import daemoneye_eventbus
from daemoneye_eventbus import privileges, transports
from daemoneye_eventbus.broker import Broker
from daemoneye_eventbus.client import Client
from daemoneye_eventbus.errors import BrokerError, PrivilegeError

SERVE = [sys.executable, "-m", "daemoneye_eventbus.cli", "serve"]
#: Generous: a loaded 2-core machine starts Python + protobuf slowly.
PROC_TIMEOUT = 60.0
IS_ROOT = os.geteuid() == 0
NO_USER = "deb-no-such-user"
NO_GROUP = "deb-no-such-group"
#: The tests of a real switch, where this system supports one (not macOS).
can_drop = pytest.mark.skipif(
    privileges.unsupported_reason(sys.platform, has_getresuid=hasattr(os, "getresuid")) is not None,
    reason="this system cannot drop privileges (privileges.unsupported_reason)",
)
REFUSAL = (
    "daemoneye-eventbus serve: error: refusing to run as root: "
    "give --user NAME to drop privileges, or --allow-root"
)


def an_ordinary_user() -> pwd.struct_passwd:
    """Some user other than root (and other than us, when we are not root)."""
    for entry in sorted(pwd.getpwall(), key=lambda e: e.pw_uid):
        if entry.pw_uid not in (0, os.geteuid()):
            return entry
    pytest.skip("no user other than root and this test's own in the passwd database")


def unused_uid() -> int:
    uid = 4_000_000
    while True:
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
        uid += 1


def serve_env() -> dict[str, str]:
    env = worker_env()
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def run_serve(*args: str) -> subprocess.CompletedProcess[str]:
    """``serve`` that is expected to exit by itself (a refusal)."""
    return subprocess.run(
        [*SERVE, *args],
        capture_output=True,
        text=True,
        env=serve_env(),
        cwd="/",
        timeout=PROC_TIMEOUT,
        check=False,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert result.returncode == 2, result
    assert result.stderr.splitlines() == [message], result.stderr
    assert result.stdout == ""


# == resolving users and groups ==================================================================


def test_resolve_a_user_by_name_and_by_number() -> None:
    user = an_ordinary_user()
    assert privileges.resolve(user.pw_name) == (user.pw_uid, user.pw_gid)
    assert privileges.resolve(str(user.pw_uid)) == (user.pw_uid, user.pw_gid)


def test_resolve_a_group_by_name_and_by_number() -> None:
    user = an_ordinary_user()
    group = next(g for g in grp.getgrall() if g.gr_gid != 0)
    assert privileges.resolve(user.pw_name, group.gr_name) == (user.pw_uid, group.gr_gid)
    # A number need not name a group in the database.
    assert privileges.resolve(user.pw_name, "4000123") == (user.pw_uid, 4000123)


def test_resolve_unknown_user_or_group() -> None:
    user = an_ordinary_user()
    with pytest.raises(PrivilegeError, match=f"no user named '{NO_USER}'"):
        privileges.resolve(NO_USER)
    with pytest.raises(PrivilegeError, match=f"no group named '{NO_GROUP}'"):
        privileges.resolve(user.pw_name, NO_GROUP)
    with pytest.raises(PrivilegeError, match="empty"):
        privileges.resolve("")


def test_resolve_a_uid_without_passwd_entry_needs_a_group() -> None:
    uid = unused_uid()
    with pytest.raises(PrivilegeError, match=f"uid {uid} has no passwd entry"):
        privileges.resolve(str(uid))
    assert privileges.resolve(str(uid), "4000123") == (uid, 4000123)


def test_resolve_refuses_root() -> None:
    root = pwd.getpwuid(0).pw_name
    for name in (root, "0"):
        with pytest.raises(PrivilegeError, match="uid 0"):
            privileges.resolve(name)


def test_privilege_error_is_a_broker_error_exported_by_the_package() -> None:
    assert issubclass(PrivilegeError, BrokerError)
    assert daemoneye_eventbus.PrivilegeError is PrivilegeError


def test_drop_privileges_refuses_uid_0() -> None:
    with pytest.raises(PrivilegeError, match="uid 0"):
        privileges.check_switch(0, 0)
    with pytest.raises(PrivilegeError, match="uid 0"):
        privileges.drop_privileges(0, 0)


@can_drop
@pytest.mark.skipif(not IS_ROOT, reason="checks what root may do")
def test_root_may_switch() -> None:
    other = an_ordinary_user()
    assert privileges.check_switch(other.pw_uid, other.pw_gid) is True


@can_drop
@pytest.mark.skipif(IS_ROOT, reason="checks what a process that is not root may do")
def test_drop_privileges_without_root() -> None:
    # Already who it should become: nothing to do.
    assert privileges.check_switch(os.getuid(), os.getgid()) is False
    privileges.drop_privileges(os.getuid(), os.getgid())
    other = an_ordinary_user()
    for call in (privileges.check_switch, privileges.drop_privileges):
        with pytest.raises(PrivilegeError, match="that needs root"):
            call(other.pw_uid, other.pw_gid)


@can_drop
@pytest.mark.skipif(not IS_ROOT, reason="checks that root is detected as not dropped")
def test_verify_dropped_refuses_a_process_that_is_still_root() -> None:
    with pytest.raises(PrivilegeError, match="privileges not dropped"):
        privileges.verify_dropped(0, 0)


# == the seam: bound, not yet accepting ==========================================================


async def test_listener_accepts_nothing_until_it_serves(sock_dir: Path) -> None:
    path = str(sock_dir / "bus.sock")
    made: list[asyncio.Protocol] = []
    accepted = asyncio.Event()

    def factory() -> asyncio.Protocol:
        made.append(asyncio.Protocol())
        accepted.set()
        return made[-1]

    listening = transports.listener(path)
    await listening.start(factory, serve=False)
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    peer.setblocking(False)
    try:
        # The socket listens: a peer waits in the backlog, but nobody accepts it.
        await asyncio.get_running_loop().sock_connect(peer, path)
        await asyncio.sleep(0.2)
        assert made == []
        await listening.serve()
        await asyncio.wait_for(accepted.wait(), 5)
        await listening.serve()  # again: nothing to do
    finally:
        peer.close()
        listening.close()
        await listening.wait_closed()
    assert not os.path.exists(path)


async def test_before_serving_runs_once_bound_and_before_any_session(sock_dir: Path) -> None:
    path = str(sock_dir / "bus.sock")
    seen: dict[str, Any] = {}

    def before_serving() -> None:
        st = os.lstat(path)
        seen.update(
            socket=stat.S_ISSOCK(st.st_mode),
            mode=stat.S_IMODE(st.st_mode),
            listener=broker.listener is not None,
            connections=broker.connections_total,
        )

    cfg = dataclasses.replace(TEST_CONFIG, socket_mode=0o660)
    broker = Broker(path, cfg, before_serving=before_serving)
    async with broker:
        assert seen == {
            "socket": True,
            "mode": 0o660,
            "listener": True,
            "connections": 0,
        }
        async with Client(path) as client:
            await client.flush()


async def test_before_serving_failure_releases_the_socket(sock_dir: Path) -> None:
    path = str(sock_dir / "bus.sock")

    def refuse() -> None:
        raise PrivilegeError("no")

    broker = Broker(path, TEST_CONFIG, before_serving=refuse)
    with pytest.raises(PrivilegeError, match="no"):
        await broker.start()
    assert not os.path.exists(path)
    assert broker.listener is None
    await broker.close()  # nothing left to do
    # The address is free again.
    async with Broker(path, TEST_CONFIG):
        assert os.path.exists(path)


async def test_listener_chown_gives_away_only_its_own_socket(sock_dir: Path) -> None:
    outer = sock_dir / "created"
    directory = outer / "bus"
    path = str(directory / "bus.sock")
    listening = transports.listener(path)
    await listening.start(asyncio.Protocol, serve=False)
    try:
        assert getattr(listening, "created_directories", None) == (str(outer), str(directory))
        # Root may give them to anyone; anyone may give them to themselves.
        owner = (4242, 4243) if os.geteuid() == 0 else (os.geteuid(), os.getegid())
        listening.chown(*owner)
        st = os.lstat(path)
        assert (st.st_uid, st.st_gid) == owner
        # Every directory the listener created, so that the user can reach its socket.
        for created in (outer, directory):
            st = os.lstat(created)
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (*owner, 0o700)
        assert os.lstat(sock_dir).st_uid == os.geteuid()  # not the one that existed
        # A file put in the socket's place is not ours to change.
        os.unlink(path)
        Path(path).write_text("")
        with pytest.raises(BrokerError, match="not this listener's socket"):
            listening.chown(os.geteuid(), os.getegid())
    finally:
        listening.close()
        await listening.wait_closed()
    assert os.path.isfile(path)  # not removed either: not a socket of ours
    existing = transports.listener(str(sock_dir / "other.sock"))
    await existing.start(asyncio.Protocol, serve=False)
    try:
        assert getattr(existing, "created_directories", "unset") == ()
    finally:
        existing.close()
        await existing.wait_closed()


# == the CLI's refusals (before anything is created) =============================================


def test_serve_help_describes_the_privilege_options() -> None:
    result = subprocess.run(
        [*SERVE, "--help"],
        capture_output=True,
        text=True,
        env=serve_env(),
        timeout=PROC_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    help_text = " ".join(result.stdout.split())
    assert "--user NAME" in help_text
    assert "drop to it for good before accepting any connection" in help_text
    assert "--group NAME" in help_text
    assert "default: the user's primary group" in help_text
    assert "--allow-root" in help_text
    assert "keep running as root without --user" in help_text


def test_serve_unknown_user_or_group_exits_2(sock_dir: Path) -> None:
    path = sock_dir / "sub" / "bus.sock"
    user = an_ordinary_user()
    for args, message in [
        (["--user", NO_USER], f"no user named '{NO_USER}'"),
        (["--user", user.pw_name, "--group", NO_GROUP], f"no group named '{NO_GROUP}'"),
        (["--group", user.pw_name], "--group needs --user"),
        (["--user", "0"], "user '0' is root (uid 0): that drops no privileges"),
    ]:
        result = run_serve("--socket", str(path), *args)
        assert_one_line_error(result, f"daemoneye-eventbus serve: error: {message}")
        assert not path.parent.exists()  # not even its directory


@can_drop
@pytest.mark.skipif(IS_ROOT, reason="checks serve started by an ordinary user")
def test_serve_as_an_ordinary_user_cannot_switch_users(sock_dir: Path) -> None:
    path = sock_dir / "bus.sock"
    other = an_ordinary_user()
    result = run_serve("--socket", str(path), "--user", other.pw_name)
    assert result.returncode == 2, result
    assert "that needs root" in result.stderr
    assert "Traceback" not in result.stderr
    assert not path.exists()


# == as root: a real drop ========================================================================


@dataclasses.dataclass(frozen=True)
class Users:
    bus: grp.struct_group
    agent: pwd.struct_passwd
    collector: pwd.struct_passwd


@pytest.fixture(scope="module")
def users() -> Users:
    if not sys.platform.startswith("linux"):
        pytest.skip("needs Linux (/proc/<pid>/status, SO_PEERCRED)")
    if not IS_ROOT:
        pytest.skip("dropping privileges needs root")
    try:
        return Users(
            bus=grp.getgrnam("deb-bus"),
            agent=pwd.getpwnam("deb-agent"),
            collector=pwd.getpwnam("deb-collector"),
        )
    except KeyError as exc:
        pytest.skip(f"the test users do not exist ({exc}): run tests/users.sh as root first")


@pytest.fixture
def agent_dir(users: Users) -> Iterator[Path]:
    """A directory the broker's user owns and other users may traverse (0711)."""
    path = Path(tempfile.mkdtemp(prefix="deb-priv-", dir="/tmp"))
    os.chown(path, users.agent.pw_uid, users.agent.pw_gid)
    os.chmod(path, 0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def root_dir(users: Users) -> Iterator[Path]:
    """A directory only root may write to, that others may traverse (0711)."""
    path = Path(tempfile.mkdtemp(prefix="deb-priv-", dir="/tmp"))
    os.chmod(path, 0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Served:
    """A ``serve`` process, its first line read."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [*SERVE, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=serve_env(),
            cwd="/",
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], PROC_TIMEOUT)
        line = self.proc.stdout.readline() if ready else ""
        if "listening" not in line:
            out, err = self.kill()
            pytest.fail(f"serve did not start ({self.proc.returncode}): {line!r} {out!r} {err!r}")
        self.line = line

    def status(self) -> dict[str, list[int]]:
        """Uid, Gid (real, effective, saved, filesystem) and Groups of /proc/<pid>/status."""
        out: dict[str, list[int]] = {}
        for row in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = row.partition(":")
            if key in ("Uid", "Gid", "Groups"):
                out[key] = [int(v) for v in value.split()]
        return out

    def stop(self) -> tuple[str, str]:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.communicate(timeout=PROC_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail("serve did not stop on SIGTERM")

    def kill(self) -> tuple[str, str]:
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.communicate(timeout=PROC_TIMEOUT)


#: A client as another user. The interpreter may live where only root can read
#: (e.g. under /root), so instead of Popen(user=, group=, extra_groups=) the
#: client starts as root, imports what it needs, then sets the same groups,
#: gid and uid as Popen would, and connects.
CLIENT = r"""
import asyncio, json, os, pwd, sys
from daemoneye_eventbus.client import Client

path, user, component = sys.argv[1:4]
asyncio.run(asyncio.sleep(0))  # what the event loop imports lazily, while root
pw = pwd.getpwnam(user)
os.setgroups(os.getgrouplist(user, pw.pw_gid))
os.setgid(pw.pw_gid)
os.setuid(pw.pw_uid)


async def main():
    try:
        async with Client(path, name="privileges-test", component=component) as client:
            await client.flush()
    except Exception as exc:
        return {"error": type(exc).__name__, "message": str(exc)}
    return {"flushed": True}


result = asyncio.run(main())
print(json.dumps({"uid": os.getuid(), "groups": sorted(os.getgroups()), **result}))
"""


def client_as(user: str, path: str, component: str = "") -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-c", CLIENT, path, user, component],
        capture_output=True,
        text=True,
        env=serve_env(),
        cwd="/",
        timeout=PROC_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    value = json.loads(result.stdout)
    assert isinstance(value, dict)
    return value


def test_root_without_user_or_allow_root_is_refused(users: Users, root_dir: Path) -> None:
    path = root_dir / "sub" / "bus.sock"
    result = run_serve("--socket", str(path))
    assert_one_line_error(result, REFUSAL)
    assert not path.parent.exists()


def test_allow_root_keeps_running_as_root(users: Users, root_dir: Path) -> None:
    path = root_dir / "bus.sock"
    served = Served("--socket", str(path), "--allow-root")
    try:
        assert "uid 0, gid 0," in served.line
        assert served.status()["Uid"] == [0, 0, 0, 0]
        assert os.lstat(path).st_uid == 0
    finally:
        _, err = served.stop()
    assert served.proc.returncode == 0, err
    assert not path.exists()


def test_serve_drops_to_the_user_before_accepting(users: Users, agent_dir: Path) -> None:
    path = agent_dir / "bus.sock"
    uid, gid = users.agent.pw_uid, users.agent.pw_gid
    served = Served(
        *("--socket", str(path), "--user", "deb-agent"),
        *("--socket-mode", "0660", "--socket-group", "deb-bus"),
    )
    try:
        assert f"mode 0660, policy default, uid {uid}, gid {gid}," in served.line
        status = served.status()
        assert status["Uid"] == [uid] * 4  # real, effective, saved, filesystem
        assert status["Gid"] == [gid] * 4
        assert status["Groups"] == [gid]  # deb-agent's deb-bus membership is gone too
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (uid, users.bus.gr_gid, 0o660)
        # A member of deb-bus connects; the default policy trusts the broker's new uid
        # (deb-agent may claim any component), not deb-collector's.
        collector = client_as("deb-collector", str(path))
        assert collector["uid"] == users.collector.pw_uid
        assert users.bus.gr_gid in collector["groups"]
        assert collector.get("flushed") is True, collector
        refused = client_as("deb-collector", str(path), "procmond")
        assert refused.get("error") == "AccessDenied", refused
        assert f"uid {users.collector.pw_uid} may not act as component" in refused["message"]
        assert client_as("deb-agent", str(path), "procmond").get("flushed") is True
    finally:
        out, err = served.stop()
    assert served.proc.returncode == 0, err
    assert "broker stopped" in out
    assert "Traceback" not in err
    assert not path.exists()  # removed by the unprivileged broker


def test_serve_gives_the_directory_it_created_to_the_user(users: Users, root_dir: Path) -> None:
    directory = root_dir / "bus"
    path = directory / "bus.sock"
    uid, bus = users.agent.pw_uid, users.bus.gr_gid
    served = Served("--socket", str(path), "--user", "deb-agent", "--group", "deb-bus")
    try:
        status = served.status()
        assert (status["Uid"], status["Gid"], status["Groups"]) == ([uid] * 4, [bus] * 4, [bus])
        st = os.lstat(directory)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (uid, bus, 0o700)
        # Without --socket-group the socket gets the target group; the mode is the default.
        st = os.lstat(path)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (uid, bus, 0o600)
    finally:
        _, err = served.stop()
    assert served.proc.returncode == 0, err
    assert "may not write" not in err
    assert not path.exists()
    assert directory.is_dir()  # the directory stays, as without --user


def test_serve_warns_when_it_cannot_remove_its_socket(users: Users, root_dir: Path) -> None:
    path = root_dir / "bus.sock"  # root's 0711 directory: deb-agent may not unlink in it
    served = Served("--socket", str(path), "--user", "deb-agent")
    try:
        assert os.lstat(path).st_uid == users.agent.pw_uid
    finally:
        _, err = served.stop()
    assert served.proc.returncode == 0, err
    assert f"uid {users.agent.pw_uid} may not write to {root_dir}" in err
    assert path.exists()  # stale: the next broker replaces it
    served = Served("--socket", str(path), "--allow-root")
    served.stop()
    assert served.proc.returncode == 0
    assert not path.exists()
