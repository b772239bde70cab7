"""The bridge's on-disk spool (daemoneye_eventbus.bridge.spool)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import worker_env
from hypothesis import given, settings
from hypothesis import strategies as st

from daemoneye_eventbus.bridge.spool import (
    SCHEMA_VERSION,
    Spool,
    SpoolCorrupt,
    SpooledEvent,
    SpoolError,
    SpoolLocked,
)
from daemoneye_eventbus.errors import EventBusError


def size(subject: str, payload: bytes, headers: str = "{}") -> int:
    return len(subject) + len(headers) + len(payload)


def test_fifo_peek_and_ack(tmp_path: Path) -> None:
    with Spool(tmp_path / "s.db", max_events=100, max_bytes=10_000) as spool:
        seqs = [
            spool.put(f"daemoneye.h.t{i}", bytes([i]), {"Nats-Msg-Id": f"h:1:{i}"})
            for i in range(5)
        ]
        assert seqs == sorted(seqs)
        assert spool.depth == 5
        first = spool.peek(2)
        assert first == [
            SpooledEvent(seqs[0], "daemoneye.h.t0", {"Nats-Msg-Id": "h:1:0"}, b"\x00"),
            SpooledEvent(seqs[1], "daemoneye.h.t1", {"Nats-Msg-Id": "h:1:1"}, b"\x01"),
        ]
        # peek does not remove; ack does, up to and including a seq.
        assert spool.peek(2) == first
        assert spool.ack(seqs[1]) == 2
        assert [e.subject for e in spool.peek(10)] == [f"daemoneye.h.t{i}" for i in (2, 3, 4)]
        assert spool.ack(seqs[1]) == 0
        assert spool.ack(seqs[-1]) == 3
        assert (spool.depth, spool.bytes, spool.peek(10)) == (0, 0, [])
        assert spool.peek(0) == spool.peek(-1) == []
        # seq never goes back, even when the spool was emptied.
        assert spool.put("x", b"") > seqs[-1]


def test_drops_the_oldest_when_full_of_events(tmp_path: Path) -> None:
    with Spool(tmp_path / "s.db", max_events=3, max_bytes=10_000) as spool:
        for i in range(7):
            spool.put(f"s{i}", b"p")
        assert [e.subject for e in spool.peek(10)] == ["s4", "s5", "s6"]
        assert (spool.depth, spool.dropped) == (3, 4)
        assert spool.bytes == 3 * size("s0", b"p")


def test_byte_bound_drops_as_many_oldest_as_needed(tmp_path: Path) -> None:
    one = size("s0", b"x" * 10)
    with Spool(tmp_path / "s.db", max_events=1000, max_bytes=3 * one) as spool:
        for i in range(3):
            spool.put(f"s{i}", b"x" * 10)
        assert (spool.depth, spool.bytes, spool.dropped) == (3, 3 * one, 0)
        # Twice the size of one: two of the oldest go.
        big = b"x" * (10 + one)
        spool.put("s3", big)
        assert [e.subject for e in spool.peek(10)] == ["s2", "s3"]
        assert spool.dropped == 2
        assert spool.bytes == one + size("s3", big) <= spool.max_bytes
        with pytest.raises(ValueError, match="larger than the spool"):
            spool.put("s4", b"x" * (3 * one))
        assert spool.depth == 2


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 40)), max_size=40))
def test_against_a_model(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[bool, int]]
) -> None:
    path = tmp_path_factory.mktemp("spool") / "s.db"
    with Spool(path, max_events=5, max_bytes=200) as spool:
        model: list[tuple[int, str, int]] = []
        dropped = 0
        for n, (is_put, k) in enumerate(ops):
            if is_put or not model:
                subject, payload = f"s{n}", b"y" * k
                model.append((spool.put(subject, payload), subject, k))
                while len(model) > 5 or sum(size(m[1], b"y" * m[2]) for m in model) > 200:
                    model.pop(0)
                    dropped += 1
            else:
                upto = model[min(k, len(model) - 1)][0]
                spool.ack(upto)
                model = [m for m in model if m[0] > upto]
            held = spool.peek(100)
            assert [(e.seq, e.subject, len(e.payload)) for e in held] == model
            assert spool.depth == len(model) <= 5
            assert spool.bytes == sum(size(e.subject, e.payload) for e in held) <= 200
            assert spool.dropped == dropped


def test_survives_a_restart_in_another_process(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    code = (
        "import sys\n"
        "from daemoneye_eventbus.bridge.spool import Spool\n"
        "s = Spool(sys.argv[1], max_events=3, max_bytes=10_000)\n"
        "for i in range(5):\n"
        "    s.put(f'daemoneye.h.t{i}', b'payload%d' % i, {'Nats-Msg-Id': f'h:9:{i}'})\n"
        "s.ack(s.peek(1)[0].seq)\n"
        "import os; os._exit(0)  # no close(): committed is committed\n"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(path)], check=True, env=worker_env(), timeout=60
    )
    with Spool(path, max_events=3, max_bytes=10_000) as spool:
        assert (spool.depth, spool.dropped) == (2, 2)
        held = spool.peek(10)
        assert [(e.subject, e.payload, dict(e.headers)) for e in held] == [
            ("daemoneye.h.t3", b"payload3", {"Nats-Msg-Id": "h:9:3"}),
            ("daemoneye.h.t4", b"payload4", {"Nats-Msg-Id": "h:9:4"}),
        ]
        assert spool.bytes == sum(
            size(e.subject, e.payload, '{"Nats-Msg-Id":"h:9:3"}') for e in held
        )
        assert spool.put("next", b"") > held[-1].seq
        last = held[-1].seq
    with Spool(path, max_events=3, max_bytes=10_000) as spool:
        assert spool.depth == 3
        assert spool.peek(10)[-1].seq > last


def test_a_second_spool_on_the_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with Spool(path, max_events=10, max_bytes=1000) as spool:
        spool.put("a", b"1")
        with pytest.raises(SpoolLocked, match="in use"):
            Spool(path, max_events=10, max_bytes=1000)
        code = (
            "import sys\n"
            "from daemoneye_eventbus.bridge.spool import Spool, SpoolLocked\n"
            "try:\n"
            "    Spool(sys.argv[1], max_events=10, max_bytes=1000)\n"
            "except SpoolLocked:\n"
            "    print('locked')\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, str(path)],
            check=True,
            env=worker_env(),
            timeout=60,
            capture_output=True,
            text=True,
        )
        assert out.stdout.strip() == "locked"
    # Closed: the lock is released.
    with Spool(path, max_events=10, max_bytes=1000) as spool:
        assert spool.depth == 1


def test_a_file_that_is_not_a_spool_is_refused(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(SpoolCorrupt, match="not a usable spool"):
        Spool(garbage, max_events=10, max_bytes=1000)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE t (x)")
    db.close()
    with pytest.raises(SpoolCorrupt, match="schema version 0"):
        Spool(other, max_events=10, max_bytes=1000)
    newer = tmp_path / "newer.db"
    Spool(newer, max_events=10, max_bytes=1000).close()
    with sqlite3.connect(newer) as db:
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(SpoolCorrupt, match=f"schema version {SCHEMA_VERSION + 1}"):
        Spool(newer, max_events=10, max_bytes=1000)


def test_errors_are_typed(tmp_path: Path) -> None:
    assert issubclass(SpoolLocked, SpoolError)
    assert issubclass(SpoolCorrupt, SpoolError)
    assert issubclass(SpoolError, EventBusError)
    assert issubclass(SpoolError, OSError)
    spool = Spool(tmp_path / "s.db", max_events=1, max_bytes=100)
    spool.close()
    with pytest.raises(SpoolError):
        spool.peek(1)
    with pytest.raises(SpoolError):
        spool.put("a", b"")
    with pytest.raises(SpoolError, match="cannot be opened") as info:
        Spool(tmp_path / "missing-dir" / "s.db", max_events=1, max_bytes=100)
    assert type(info.value) is SpoolError


@pytest.mark.parametrize(
    "kwargs",
    [{"max_events": 0, "max_bytes": 1}, {"max_events": 1, "max_bytes": 0}, {"synchronous": "OFF"}],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"max_events": 1, "max_bytes": 1, **kwargs}
    with pytest.raises(ValueError, match="must be"):
        Spool(tmp_path / "s.db", **args)  # type: ignore[arg-type]


def test_full_sync_and_repr(tmp_path: Path) -> None:
    with Spool(tmp_path / "s.db", max_events=2, max_bytes=100, synchronous="FULL") as spool:
        spool.put("a", b"1")
        assert repr(spool) == f"<Spool {tmp_path / 's.db'}: 1 events, 4 bytes, 0 dropped>"


def test_calls_from_threads_are_serialised(tmp_path: Path) -> None:
    with Spool(tmp_path / "s.db", max_events=10_000, max_bytes=10**6) as spool:

        def work(t: int) -> None:
            for i in range(50):
                spool.put(f"t{t}.{i}", b"z")

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        held = spool.peek(1000)
        assert spool.depth == len(held) == 200
        for t in range(4):
            mine = [e.subject for e in held if e.subject.startswith(f"t{t}.")]
            assert mine == [f"t{t}.{i}" for i in range(50)]


# -- put_many and peek_after --------------------------------------------------------------------


def held(spool: Spool) -> list[tuple[str, bytes, dict[str, str]]]:
    return [(e.subject, e.payload, dict(e.headers)) for e in spool.peek(10_000)]


def test_put_many_appends_in_order_and_returns_the_seqs(tmp_path: Path) -> None:
    with Spool(tmp_path / "s.db", max_events=100, max_bytes=100_000) as spool:
        first = spool.put("before", b"0")
        batch: list[tuple[str, bytes, dict[str, str] | None]] = [
            (f"daemoneye.h.t{i}", bytes([i]) * i, {"Nats-Msg-Id": f"h:1:{i}"} if i % 2 else None)
            for i in range(6)
        ]
        seqs = spool.put_many(batch)
        assert len(seqs) == 6
        assert seqs == sorted(seqs)
        assert len(set(seqs)) == 6
        assert seqs[0] > first
        events = spool.peek(100)
        assert [e.seq for e in events] == [first, *seqs]
        assert events[1:] == [
            SpooledEvent(seq, subject, headers or {}, payload)
            for seq, (subject, payload, headers) in zip(seqs, batch, strict=True)
        ]
        assert spool.depth == 7
        assert spool.bytes == size("before", b"0") + sum(
            size(s, p, json.dumps(h or {}, separators=(",", ":"))) for s, p, h in batch
        )
        assert spool.put("after", b"") > seqs[-1]
        assert spool.put_many([]) == []
        assert spool.depth == 8


def test_a_refused_event_refuses_the_whole_batch(tmp_path: Path) -> None:
    with Spool(tmp_path / "s.db", max_events=3, max_bytes=200) as spool:
        spool.put_many([("a", b"1", None), ("b", b"2", None)])
        before = (held(spool), spool.depth, spool.bytes, spool.dropped)
        # The first two would drop "a" (three events at most): the refusal undoes that too.
        batch: list[tuple[str, bytes, dict[str, str] | None]] = [
            ("c", b"3", None),
            ("d", b"4", None),
            ("big", b"x" * 300, None),
            ("e", b"5", None),
        ]
        with pytest.raises(ValueError, match="larger than the spool"):
            spool.put_many(batch)
        assert (held(spool), spool.depth, spool.bytes, spool.dropped) == before
    with Spool(tmp_path / "s.db", max_events=3, max_bytes=200) as spool:
        assert (held(spool), spool.depth, spool.bytes, spool.dropped) == before


def test_a_batch_into_a_full_spool_keeps_the_newest(tmp_path: Path) -> None:
    with Spool(tmp_path / "s.db", max_events=3, max_bytes=10_000) as spool:
        spool.put_many([("old0", b"", None), ("old1", b"", None)])
        seqs = spool.put_many([(f"new{i}", b"", None) for i in range(4)])
        assert [e.subject for e in spool.peek(10)] == ["new1", "new2", "new3"]
        assert [e.seq for e in spool.peek(10)] == seqs[1:]
        assert (spool.depth, spool.dropped) == (3, 3)
        # A batch longer than the spool: only its last events stay.
        seqs = spool.put_many([(f"n{i}", b"", None) for i in range(10)])
        assert [e.subject for e in spool.peek(10)] == ["n7", "n8", "n9"]
        assert [e.seq for e in spool.peek(10)] == seqs[7:]
        assert (spool.depth, spool.dropped) == (3, 3 + 10)
    with Spool(tmp_path / "s.db", max_events=3, max_bytes=10_000) as spool:
        assert (spool.depth, spool.dropped) == (3, 13)


def test_a_batch_over_the_byte_bound_drops_exactly_what_it_must(tmp_path: Path) -> None:
    one = size("s0", b"x" * 10)
    with Spool(tmp_path / "s.db", max_events=1000, max_bytes=4 * one) as spool:
        spool.put_many([(f"s{i}", b"x" * 10, None) for i in range(3)])
        # Three more of the same size: two of the oldest go (4 fit).
        spool.put_many([(f"t{i}", b"x" * 10, None) for i in range(3)])
        assert [e.subject for e in spool.peek(10)] == ["s2", "t0", "t1", "t2"]
        assert (spool.bytes, spool.dropped) == (4 * one, 2)
        # One of twice the size: two more go.
        spool.put_many([("u0", b"x" * (10 + one), None)])
        assert [e.subject for e in spool.peek(10)] == ["t1", "t2", "u0"]
        assert (spool.bytes, spool.dropped) == (4 * one, 4)


batches = st.lists(
    st.lists(
        st.tuples(st.integers(0, 60), st.booleans()),
        max_size=8,
    ),
    max_size=8,
)


@settings(max_examples=40, deadline=None)
@given(batches)
def test_put_many_is_put_for_each_in_order(
    tmp_path_factory: pytest.TempPathFactory, ops: list[list[tuple[int, bool]]]
) -> None:
    directory = tmp_path_factory.mktemp("spool")
    with (
        Spool(directory / "many.db", max_events=5, max_bytes=200) as many,
        Spool(directory / "one.db", max_events=5, max_bytes=200) as one,
    ):
        n = 0
        for batch in ops:
            events: list[tuple[str, bytes, dict[str, str] | None]] = []
            for k, with_headers in batch:
                events.append(
                    (f"s{n}", b"y" * k, {"Nats-Msg-Id": f"h:1:{n}"} if with_headers else None)
                )
                n += 1
            seqs = many.put_many(events)
            assert len(seqs) == len(events)
            assert seqs == sorted(set(seqs))
            for subject, payload, headers in events:
                one.put(subject, payload, headers)
            assert held(many) == held(one)
            assert (many.depth, many.bytes, many.dropped) == (one.depth, one.bytes, one.dropped)
            kept = {e.seq for e in many.peek(100)}
            # What is kept of the batch is a tail of it, with the seqs it was given.
            tail = [s for s in seqs if s in kept]
            assert tail == seqs[len(seqs) - len(tail) :]


def test_peek_after(tmp_path: Path) -> None:
    with Spool(tmp_path / "s.db", max_events=100, max_bytes=10_000) as spool:
        seqs = spool.put_many([(f"s{i}", bytes([i]), {"i": str(i)}) for i in range(6)])
        everything = spool.peek(100)
        assert spool.peek_after(0, 100) == everything
        assert spool.peek_after(0, 2) == spool.peek(2) == everything[:2]
        assert spool.peek_after(seqs[1], 2) == everything[2:4]
        assert spool.peek_after(seqs[1], 100) == everything[2:]
        assert spool.peek_after(seqs[-1], 10) == []
        assert spool.peek_after(seqs[2], 0) == spool.peek_after(seqs[2], -1) == []
        # Not removing anything: peek_after pages through what is not yet sent.
        pages, after = [], 0
        while page := spool.peek_after(after, 4):
            pages.append([e.subject for e in page])
            after = page[-1].seq
        assert pages == [["s0", "s1", "s2", "s3"], ["s4", "s5"]]
        assert spool.depth == 6
        # After an ack, from a seq that is gone or between events.
        spool.ack(seqs[2])
        assert [e.subject for e in spool.peek_after(seqs[0], 10)] == ["s3", "s4", "s5"]
        assert [e.subject for e in spool.peek_after(seqs[3], 1)] == ["s4"]
        assert spool.peek_after(-5, 1) == spool.peek(1)


def test_a_new_spool_is_its_owners_alone(tmp_path: Path) -> None:
    path = tmp_path / "new.spool"
    with Spool(path, max_events=10, max_bytes=10_000) as spool:
        spool.put("daemoneye.h.events.x", b"secret")
        modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes[path.name] == 0o600
    assert all(mode & 0o077 == 0 for mode in modes.values()), modes


def test_a_spool_in_a_missing_directory_is_a_spool_error(tmp_path: Path) -> None:
    with pytest.raises(SpoolError, match="cannot be opened"):
        Spool(tmp_path / "missing" / "x.spool", max_events=10, max_bytes=10_000)
