"""Dropping root for good: become one user and one group, and check it held.

The standalone broker (``daemoneye-eventbus serve --user NAME``) starts as root
only to claim its socket: it binds it, applies its mode and group, gives the
socket file (and the directory it created for it) to the target user, and then
calls :func:`drop_privileges` before it accepts the first connection. From
then on it runs as that user with that one group, and cannot become root again.

Pure: ``os``, ``pwd`` and ``grp`` only, no event loop; Unix only.
"""

from __future__ import annotations

import grp
import os
import pwd
import sys

from daemoneye_eventbus.errors import PrivilegeError

# Unix only: the CLI imports this module only there (mypy skips the rest on Windows).
assert sys.platform != "win32", "dropping privileges is for Unix"

__all__ = ["check_switch", "drop_privileges", "resolve", "verify_dropped"]


def _uid(user: str) -> tuple[int, int | None]:
    """A user by name or number: its uid and primary gid (None: no passwd entry)."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        if not user.isdigit():
            raise PrivilegeError(f"no user named {user!r}") from None
        try:
            entry = pwd.getpwuid(int(user))
        except KeyError:
            return int(user), None
    return entry.pw_uid, entry.pw_gid


def _gid(group: str) -> int:
    """A group by name or number."""
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        if group.isdigit():
            return int(group)
        raise PrivilegeError(f"no group named {group!r}") from None


def resolve(user: str, group: str | None = None) -> tuple[int, int]:
    """The ``(uid, gid)`` to drop to: ``user`` and ``group`` by name or number.

    ``group`` defaults to the user's primary group (a numeric uid without a
    passwd entry needs one). Raises :class:`PrivilegeError` for an unknown user
    or group, and for uid 0: "dropping" to root keeps every privilege.
    """
    if not user:
        raise PrivilegeError("an empty user name")
    uid, primary = _uid(user)
    if uid == 0:
        raise PrivilegeError(f"user {user!r} is root (uid 0): that drops no privileges")
    if group:
        return uid, _gid(group)
    if primary is None:
        raise PrivilegeError(f"uid {uid} has no passwd entry: name its group too")
    return uid, primary


def check_switch(uid: int, gid: int) -> bool:
    """Whether becoming ``uid``/``gid`` changes anything, checked before binding.

    True for root (it may switch), False for a process that is already exactly
    ``uid`` and ``gid``; :class:`PrivilegeError` for any other process (only
    root may switch users) and for uid 0.
    """
    if uid == 0:
        raise PrivilegeError("refusing to drop privileges to uid 0 (root)")
    if os.geteuid() == 0:
        return True
    if os.getresuid() == (uid, uid, uid) and os.getresgid() == (gid, gid, gid):
        return False
    raise PrivilegeError(
        f"cannot switch to uid {uid} / gid {gid}: that needs root (running as uid {os.geteuid()})"
    )


def drop_privileges(uid: int, gid: int) -> None:
    """Become ``uid`` and ``gid`` for good (real, effective and saved ids).

    As root: the supplementary groups become just ``gid`` (``setgroups``), then
    the gid is set, then the uid (in that order: after ``setuid`` the process
    may no longer change its groups); :func:`verify_dropped` then checks that
    it holds. A process that is not root may only "drop" to who it already is
    (nothing to do). Raises :class:`PrivilegeError` when a step fails or the
    check does; the caller must not go on running then.
    """
    if not check_switch(uid, gid):
        return
    try:
        os.setgroups([gid])
        os.setgid(gid)
        os.setuid(uid)
    except OSError as exc:
        raise PrivilegeError(f"cannot switch to uid {uid} / gid {gid}: {exc}") from exc
    verify_dropped(uid, gid)


def verify_dropped(uid: int, gid: int) -> None:
    """Check that the process is ``uid``/``gid`` only and cannot regain root.

    Real, effective and saved uid and gid must be the target's, the only
    supplementary group ``gid``, and ``setuid(0)`` and ``seteuid(0)`` must
    fail. Raises :class:`PrivilegeError` otherwise.
    """
    ids = (os.getresuid(), os.getresgid(), sorted(set(os.getgroups())))
    if ids != ((uid, uid, uid), (gid, gid, gid), [gid]):
        raise PrivilegeError(
            f"privileges not dropped: uids {ids[0]}, gids {ids[1]}, groups {ids[2]} "
            f"(expected uid {uid}, gid {gid}, groups [{gid}])"
        )
    for regain in (os.setuid, os.seteuid):
        try:
            regain(0)
        except PermissionError:
            continue
        raise PrivilegeError(f"privileges not dropped: {regain.__name__}(0) succeeded")
