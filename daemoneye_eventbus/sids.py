"""Windows security identifiers (SIDs) as the policy names them.

Pure code: no sockets, no event loop. A policy lists SIDs in their string
form (``S-1-5-32-544``); :func:`parse_sid` checks the syntax and returns the
canonical form, the one Windows' ``ConvertSidToStringSid`` writes and the
named-pipe transport reports for a peer, so that a rule matches a peer by
plain string equality. :func:`lookup_account` turns an account name
(``Administrators``, ``DOMAIN\\user``) into a SID; only Windows can, so it is
called when a policy is loaded there and refused everywhere else.

The form (MS-DTYP 2.4.2.1): ``S-1-`` (revision 1), the identifier authority
(decimal below 2**32, else ``0x`` and twelve hexadecimal digits), then one to
fifteen sub-authorities, each a decimal number below 2**32.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable
from typing import Final

__all__ = [
    "ADMINISTRATORS",
    "LOCAL_SYSTEM",
    "MAX_SUB_AUTHORITIES",
    "looks_like_sid",
    "lookup_account",
    "parse_sid",
    "resolve_sids",
]

#: The LocalSystem account (``NT AUTHORITY\\SYSTEM``), which services run as.
LOCAL_SYSTEM: Final = "S-1-5-18"
#: The built-in Administrators group (``BUILTIN\\Administrators``).
ADMINISTRATORS: Final = "S-1-5-32-544"
#: Most sub-authorities a SID has (``SID_MAX_SUB_AUTHORITIES``).
MAX_SUB_AUTHORITIES: Final = 15

_SID: Final = re.compile(r"[Ss]-1-(0[xX][0-9a-fA-F]{12}|[0-9]+)((?:-[0-9]+)+)")
_U32: Final = 2**32
_U48: Final = 2**48


def looks_like_sid(text: str) -> bool:
    """Whether ``text`` is meant as a SID (``S-`` and a digit), well formed or not.

    Anything else in a policy's ``sids`` is an account name.
    """
    return len(text) > 2 and text[:2] in ("S-", "s-") and text[2].isdigit()


def parse_sid(text: str) -> str:
    """The canonical string form of the SID ``text``; ValueError saying what is wrong.

    Case and leading zeros are normalised (``s-1-5-018`` is ``S-1-5-18``), an
    identifier authority below 2**32 is written in decimal.
    """
    match = _SID.fullmatch(text)
    if match is None:
        raise ValueError(
            f"{text!r} is not a SID: expected S-1-<authority>-<sub-authority>..., e.g. S-1-5-32-544"
        )
    raw_authority, raw_subs = match.groups()
    authority = int(raw_authority, 16 if raw_authority[:2].lower() == "0x" else 10)
    if authority >= _U48:
        raise ValueError(f"{text!r}: the identifier authority is larger than 48 bits")
    subs = [int(s) for s in raw_subs[1:].split("-")]
    if len(subs) > MAX_SUB_AUTHORITIES:
        raise ValueError(
            f"{text!r}: {len(subs)} sub-authorities, at most {MAX_SUB_AUTHORITIES} are allowed"
        )
    if any(s >= _U32 for s in subs):
        raise ValueError(f"{text!r}: a sub-authority is larger than 32 bits")
    shown = str(authority) if authority < _U32 else f"0x{authority:012X}"
    return "-".join(["S-1", shown, *map(str, subs)])


def resolve_sids(values: Iterable[str], lookup: Callable[[str], str] | None) -> frozenset[str]:
    """A policy's ``sids``: each SID checked and made canonical, each account
    name turned into a SID by ``lookup`` (None: account names are refused).

    Raises ValueError naming the first value that is wrong.
    """
    out: set[str] = set()
    for text in values:
        if looks_like_sid(text):
            out.add(parse_sid(text))
        elif lookup is None:
            raise ValueError(
                f"account name {text!r} in sids: account names are resolved only by a "
                "broker on Windows; write the SID (S-1-...) instead"
            )
        else:
            try:
                sid = lookup(text)
            except (LookupError, OSError, NotImplementedError) as exc:
                raise ValueError(f"cannot resolve account {text!r}: {exc}") from None
            out.add(parse_sid(sid))
    return frozenset(out)


def lookup_account(name: str) -> str:
    """The SID of the account or group ``name``, resolved by Windows.

    Raises LookupError when Windows does not know the name, and
    NotImplementedError on any other system (nothing there can resolve it).
    """
    if sys.platform == "win32":  # pragma: no cover - Windows only
        import pywintypes
        import win32security

        try:
            sid, _domain, _kind = win32security.LookupAccountName(None, name)
        except pywintypes.error as exc:
            raise LookupError(f"Windows does not know the account {name!r}: {exc}") from None
        return parse_sid(win32security.ConvertSidToStringSid(sid))
    raise NotImplementedError(
        f"account names (here {name!r}) are resolved only on Windows; write the SID instead"
    )
