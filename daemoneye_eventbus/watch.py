"""``daemoneye-eventbus stats --watch``: a live view of the broker for a person.

Every ``interval`` seconds it asks the broker for its statistics and redraws
one screen: the totals with their rates, events per second by topic, drops
and throttling, and the subscribers with the fullest queues (those are listed
only to a privileged component, as ``stats`` lists connections). :func:`render`
is pure: the figures of two snapshots in, lines out.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, TextIO

from daemoneye.eventbus.v1 import frames_pb2
from daemoneye_eventbus.cli_output import table

__all__ = ["CLEAR", "render", "watch"]

#: Move the cursor home and clear the screen (ANSI).
CLEAR: Final = "\x1b[H\x1b[2J"
#: Subscribers listed, fullest queue first.
_SLOWEST: Final = 5


def _rate(now: int, before: int | None, seconds: float) -> str:
    if before is None or seconds <= 0:
        return "-"
    return f"{max(0, now - before) / seconds:,.0f}/s"


def render(
    stats: frames_pb2.StatsResponse,
    previous: frames_pb2.StatsResponse | None,
    seconds: float,
) -> list[str]:
    """The screen for ``stats``, with rates against ``previous`` taken ``seconds`` before."""
    prev = previous
    totals = [
        f"{name} {getattr(stats, name):,} "
        f"({_rate(getattr(stats, name), prev and getattr(prev, name), seconds)})"
        for name in ("published", "delivered", "dropped")
    ]
    lines = [
        f"connections {stats.connections} open, {stats.connections_total} since start",
        "  ".join(totals),
        f"refused {stats.refused:,}  invalid payloads {stats.invalid_payloads:,}"
        f"  throttled {stats.throttled_seconds:.1f} s",
        "",
    ]
    before = {t.topic: t for t in prev.topic_stats} if prev is not None else {}
    rows: list[Sequence[str]] = [("topic", "published/s", "delivered/s", "dropped/s", "dropped")]
    for t in stats.topic_stats:
        old = before.get(t.topic)
        rows.append(
            (
                t.topic,
                _rate(t.published, old and old.published, seconds),
                _rate(t.delivered, old and old.delivered, seconds),
                _rate(t.dropped, old and old.dropped, seconds),
                f"{t.dropped:,}",
            )
        )
    lines += _table(rows)
    conns = sorted(stats.connection_stats, key=lambda c: c.queue_messages, reverse=True)
    slow = [c for c in conns[:_SLOWEST] if c.queue_messages or c.throttled_seconds]
    if slow:
        lines.append("")
        rows = [("fullest queues / throttled", "component", "queued", "bytes", "throttled")]
        rows += [
            (
                c.client_name or c.session_id,
                c.component or "-",
                f"{c.queue_messages:,}",
                f"{c.queue_bytes:,}",
                f"{c.throttled_seconds:.1f} s",
            )
            for c in slow
        ]
        lines += _table(rows)
    held = sorted(
        (s for s in stats.subscription_stats if s.held), key=lambda s: s.held, reverse=True
    )[:_SLOWEST]
    if held:  # lossless subscribers whose publishers wait for them
        names = {c.session_id: c.client_name or c.session_id for c in stats.connection_stats}
        lines.append("")
        rows = [("held for lossless subscribers", "filter", "held")]
        rows += [(names.get(s.session_id, s.session_id), s.filter, f"{s.held:,}") for s in held]
        lines += _table(rows)
    return lines


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    """Names left-aligned in the first column, figures right-aligned in the others."""
    return table(rows, right=range(1, len(rows[0])))


async def watch(
    ask: Callable[[], Awaitable[frames_pb2.StatsResponse]],
    out: TextIO,
    *,
    interval: float = 1.0,
    count: int | None = None,
) -> None:
    """Redraw ``render`` every ``interval`` seconds (``count`` times, or until cancelled)."""
    loop = asyncio.get_running_loop()
    previous: frames_pb2.StatsResponse | None = None
    then = loop.time()
    shown = 0
    while count is None or shown < count:
        stats = await ask()
        now = loop.time()
        out.write(CLEAR + "\n".join(render(stats, previous, now - then)) + "\n")
        out.flush()
        previous, then = stats, now
        shown += 1
        if count is None or shown < count:
            await asyncio.sleep(interval)
