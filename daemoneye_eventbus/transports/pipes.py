"""Windows named pipes: names, security descriptors and token groups (pure).

No Win32 call and no event loop here: what the named-pipe transport
(:mod:`daemoneye_eventbus.transports.windows`) decides before and after it
calls Windows, kept apart so that it is tested on every platform.

* **Names.** The broker serves ``\\\\.\\pipe\\DaemonEye``, or
  ``\\\\.\\pipe\\DaemonEye-{instance}`` for a named instance (the instance
  names that ``/tmp/daemoneye-{instance}.sock`` takes on Unix).
  :func:`check_pipe_name` accepts only local pipe names.
* **Security descriptor.** Each pipe instance is created with an explicit,
  protected DACL (:func:`default_sddl`): full access for LocalSystem (``SY``),
  the Administrators group (``BA``) and the broker's own user; nobody else.
  Windows' default DACL for a pipe would also let Everyone and anonymous
  logons read it. :func:`check_sddl` checks the shape of a descriptor given
  with ``serve --pipe-sddl``: it must carry a DACL, that DACL must not be
  null (``NO_ACCESS_CONTROL``) nor empty, and each entry must be a plain
  allow or deny entry for one account. Windows parses the string again when
  the pipe is created and refuses what it does not understand.
* **Token groups.** :func:`effective_group_sids` keeps the groups of a peer's
  token that grant access: enabled, and not deny-only (a non-elevated
  administrator's token holds Administrators as deny-only).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from typing import Final

from daemoneye_eventbus.errors import BrokerAlreadyRunning, BrokerError

__all__ = [
    "ADMINISTRATORS_SID",
    "DEFAULT_PIPE_NAME",
    "LOCAL_SYSTEM_SID",
    "MAX_INSTANCE_CHARS",
    "MAX_PIPE_NAME_CHARS",
    "PIPE_PREFIX",
    "SE_GROUP_ENABLED",
    "SE_GROUP_USE_FOR_DENY_ONLY",
    "broad_grants",
    "check_instance",
    "check_pipe_name",
    "check_sddl",
    "check_sid",
    "create_error",
    "default_address",
    "default_sddl",
    "effective_group_sids",
    "pipe_name",
]

#: Every local pipe name starts so (``\\.\pipe\``); Windows compares it without case.
PIPE_PREFIX: Final = "\\\\.\\pipe\\"
#: Where the broker listens on Windows unless told otherwise.
DEFAULT_PIPE_NAME: Final = PIPE_PREFIX + "DaemonEye"
#: The longest pipe name Windows accepts, prefix included.
MAX_PIPE_NAME_CHARS: Final = 256
#: The longest instance name (so that the pipe name stays within the limit).
MAX_INSTANCE_CHARS: Final = MAX_PIPE_NAME_CHARS - len(DEFAULT_PIPE_NAME) - 1

#: Well-known SIDs: LocalSystem and the builtin Administrators group.
LOCAL_SYSTEM_SID: Final = "S-1-5-18"
ADMINISTRATORS_SID: Final = "S-1-5-32-544"

#: Token group attributes (winnt.h): the group counts for access checks only
#: when it is enabled and not marked for deny only.
SE_GROUP_ENABLED: Final = 0x00000004
SE_GROUP_USE_FOR_DENY_ONLY: Final = 0x00000010

# Win32 error codes CreateNamedPipe fails with (winerror.h).
_ERROR_ACCESS_DENIED: Final = 5
_ERROR_INVALID_PARAMETER: Final = 87
_ERROR_INVALID_NAME: Final = 123
_ERROR_PIPE_BUSY: Final = 231

_SID: Final = re.compile(r"S-1-\d{1,15}(?:-\d{1,10}){1,15}")
# SDDL's two-letter account aliases (SY, BA, WD, AU, ...).
_ALIAS: Final = re.compile(r"[A-Z]{2}")
_RIGHTS: Final = re.compile(r"(?:[A-Z]{2})+|0[xX][0-9a-fA-F]{1,8}|\d{1,10}")
_ACE_FLAGS: Final = re.compile(r"(?:CI|OI|NP|IO|ID|SA|FA|TP|CR)*")
_DACL_FLAGS: Final = re.compile(r"(?:P|AI|AR)*")
# One component: O:, G:, D: or S:, up to the next one (ACEs are in parentheses).
_COMPONENT: Final = re.compile(r"([OGDS]):((?:(?![OGDS]:)[^():]|\([^()]*\))*)")
#: Accounts that a DACL should think twice about granting (``broad_grants``).
_BROAD: Final = {
    "WD": "Everyone",
    "AN": "anonymous logons",
    "NU": "network logons",
    "S-1-1-0": "Everyone",
    "S-1-5-7": "anonymous logons",
    "S-1-5-2": "network logons",
}


def check_instance(instance: str) -> str:
    """``instance`` if it names a broker instance: letters, digits, '-' and '_'."""
    if not instance or not all(c.isalnum() or c in "-_" for c in instance):
        raise ValueError(f"instance name {instance!r} may hold only letters, digits, '-' and '_'")
    if len(instance) > MAX_INSTANCE_CHARS:
        raise ValueError(f"instance name is at most {MAX_INSTANCE_CHARS} characters")
    return instance


def pipe_name(instance: str | None = None) -> str:
    """``\\\\.\\pipe\\DaemonEye``, or ``\\\\.\\pipe\\DaemonEye-{instance}`` for a named instance."""
    if not instance:
        return DEFAULT_PIPE_NAME
    return f"{DEFAULT_PIPE_NAME}-{check_instance(instance)}"


def default_address(instance: str | None = None, platform: str = sys.platform) -> str:
    """Where a broker listens unless told otherwise, on ``platform``.

    On Windows the pipe :func:`pipe_name` names; elsewhere the Unix socket
    ``/tmp/daemoneye.sock``, or ``/tmp/daemoneye-{instance}.sock`` for a named
    instance (as ``transports.unix.default_socket_path`` says).
    """
    if platform == "win32":
        return pipe_name(instance)
    if not instance:
        return "/tmp/daemoneye.sock"
    return f"/tmp/daemoneye-{check_instance(instance)}.sock"


def check_pipe_name(name: str) -> str:
    """``name`` if it is a local pipe name (``\\\\.\\pipe\\NAME``), else ValueError.

    Pipes on other hosts (``\\\\server\\pipe\\...``) are refused: the broker
    serves local peers only, and a client that opened a remote pipe would
    authenticate to that host.
    """
    if not name[: len(PIPE_PREFIX)].lower() == PIPE_PREFIX.lower():
        raise ValueError(f"{name!r} is not a local pipe name (\\\\.\\pipe\\NAME)")
    rest = name[len(PIPE_PREFIX) :]
    if not rest or "\\" in rest or not rest.isprintable():
        raise ValueError(
            f"{name!r}: the part after \\\\.\\pipe\\ must be printable, non-empty and "
            "hold no backslash"
        )
    if len(name) > MAX_PIPE_NAME_CHARS:
        raise ValueError(f"a pipe name is at most {MAX_PIPE_NAME_CHARS} characters")
    return name


def check_sid(sid: str) -> str:
    """``sid`` if it is a SID in its string form (``S-1-5-21-...``), else ValueError."""
    if not _SID.fullmatch(sid):
        raise ValueError(f"{sid!r} is not a SID such as S-1-5-21-1-2-3-1001")
    return sid


def default_sddl(user_sid: str) -> str:
    """The pipe's default security descriptor: a protected DACL granting full
    access to LocalSystem, the Administrators group and ``user_sid`` (the
    broker's own user), and nothing to anybody else."""
    return f"D:P(A;;GA;;;SY)(A;;GA;;;BA)(A;;GA;;;{check_sid(user_sid)})"


def _account(text: str, where: str) -> str:
    if _ALIAS.fullmatch(text) or _SID.fullmatch(text):
        return text
    raise ValueError(f"{where}: {text!r} is neither an SDDL alias (SY, BA, ...) nor a SID")


def _aces(body: str, where: str, types: frozenset[str]) -> list[tuple[str, str]]:
    """The ``(type, account)`` of each ACE in ``body`` (what follows the flags)."""
    if not re.fullmatch(r"(?:\([^()]*\))*", body):
        raise ValueError(f"{where}: expected ACEs in parentheses after the flags, not {body!r}")
    aces: list[tuple[str, str]] = []
    for ace in re.findall(r"\(([^()]*)\)", body):
        fields = ace.split(";")
        if len(fields) != 6:
            raise ValueError(
                f"{where}: ACE ({ace}) must have 6 fields "
                "(type;flags;rights;object;inherited object;account)"
            )
        kind, flags, rights, obj, inherited, account = fields
        if kind not in types:
            raise ValueError(f"{where}: ACE type {kind!r} is not one of {', '.join(sorted(types))}")
        if not _ACE_FLAGS.fullmatch(flags):
            raise ValueError(f"{where}: ACE flags {flags!r} are not SDDL ACE flags")
        if not _RIGHTS.fullmatch(rights):
            raise ValueError(f"{where}: access rights {rights!r} are not SDDL rights")
        if obj or inherited:
            raise ValueError(f"{where}: object ACEs do not apply to pipes")
        aces.append((kind, _account(account, where)))
    return aces


def check_sddl(sddl: str) -> str:
    """``sddl`` if it has the shape of a pipe's security descriptor, else ValueError.

    It must consist of owner (``O:``), group (``G:``), DACL (``D:``) and SACL
    (``S:``) parts, each at most once, and carry a DACL that is neither null
    (``D:NO_ACCESS_CONTROL``, which lets everyone in) nor empty (nobody could
    connect). DACL entries are allow (``A``) or deny (``D``) entries, SACL
    entries audit (``AU``) or mandatory-label (``ML``) entries, each with six
    fields and one account (an alias such as ``BA`` or a SID). Windows checks
    the rest when it converts the string.
    """
    where = "pipe security descriptor"
    if not sddl or len(sddl) > 4096 or not sddl.isascii() or not sddl.isprintable():
        raise ValueError(f"{where}: expected printable ASCII SDDL of at most 4096 characters")
    if any(c.isspace() for c in sddl):
        raise ValueError(f"{where}: SDDL holds no spaces")
    parts: dict[str, str] = {}
    end = 0
    for match in _COMPONENT.finditer(sddl):
        if match.start() != end:
            break
        kind, body = match.groups()
        if kind in parts:
            raise ValueError(f"{where}: {kind}: appears twice")
        parts[kind] = body
        end = match.end()
    if end != len(sddl):
        raise ValueError(f"{where}: cannot read {sddl[end:]!r} (expected O:, G:, D: or S: parts)")
    for kind in ("O", "G"):
        if kind in parts:
            _account(parts[kind], f"{where}, {'owner' if kind == 'O' else 'group'}")
    dacl = parts.get("D")
    if dacl is None:
        raise ValueError(f"{where}: no DACL (D:...); without one everybody could connect")
    flags, _, _ = dacl.partition("(")
    if "NO_ACCESS_CONTROL" in flags:
        raise ValueError(f"{where}: a null DACL (NO_ACCESS_CONTROL) lets everybody connect")
    if not _DACL_FLAGS.fullmatch(flags):
        raise ValueError(f"{where}: DACL flags {flags!r} are not P, AI or AR")
    aces = _aces(dacl[len(flags) :], f"{where}, DACL", frozenset({"A", "D"}))
    if not any(kind == "A" for kind, _ in aces):
        raise ValueError(f"{where}: the DACL allows nobody, so no peer could connect")
    if "S" in parts:
        sacl = parts["S"]
        sacl_flags, _, _ = sacl.partition("(")
        if not _DACL_FLAGS.fullmatch(sacl_flags):
            raise ValueError(f"{where}: SACL flags {sacl_flags!r} are not P, AI or AR")
        _aces(sacl[len(sacl_flags) :], f"{where}, SACL", frozenset({"AU", "ML"}))
    return sddl


def broad_grants(sddl: str) -> list[str]:
    """The broad groups (Everyone, anonymous or network logons) that ``sddl``'s
    DACL allows, for a warning; ``sddl`` has passed :func:`check_sddl`."""
    dacl = next((b for k, b in _COMPONENT.findall(sddl) if k == "D"), "")
    flags, _, _ = dacl.partition("(")
    aces = _aces(dacl[len(flags) :], "DACL", frozenset({"A", "D"}))
    granted = {account for kind, account in aces if kind == "A"}
    return sorted({_BROAD[a] for a in granted if a in _BROAD})


def effective_group_sids(groups: Iterable[tuple[str, int]]) -> frozenset[str]:
    """The SIDs of a token's groups (``(sid, attributes)`` pairs) that grant
    access: enabled and not for deny only."""
    return frozenset(
        sid
        for sid, attributes in groups
        if attributes & SE_GROUP_ENABLED and not attributes & SE_GROUP_USE_FOR_DENY_ONLY
    )


def create_error(winerror: int, name: str, *, first: bool) -> BrokerError:
    """The error for ``CreateNamedPipe(name)`` failing with ``winerror``.

    The first instance is created with ``FILE_FLAG_FIRST_PIPE_INSTANCE``:
    access denied then means that another process already has instances of
    the name (a live broker, or a process squatting on it), and the broker
    refuses to start rather than share the name.
    """
    if first and winerror in (_ERROR_ACCESS_DENIED, _ERROR_PIPE_BUSY):
        return BrokerAlreadyRunning(
            f"another process already serves {name} (the broker does not share a pipe name)"
        )
    if winerror in (_ERROR_INVALID_NAME, _ERROR_INVALID_PARAMETER):
        return BrokerError(f"cannot create pipe {name}: invalid name or parameters")
    return BrokerError(f"cannot create pipe {name}: Windows error {winerror}")
