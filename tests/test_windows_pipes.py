"""The named-pipe transport on Windows: a real broker on a real pipe.

What only Windows has: the pipe's security descriptor as created, the first
instance's exclusivity, the peer's SID and groups read from its token, the
client end on the proactor loop. Skipped on every other platform (the pure
parts are in tests/test_pipes.py); the GitHub Actions matrix runs it on
Windows.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import uuid
from collections.abc import AsyncIterator

import pytest

from daemoneye.eventbus.v1 import events_pb2, registry
from daemoneye_eventbus import transports
from daemoneye_eventbus.access import PeerCredentials
from daemoneye_eventbus.broker import Broker, BrokerConfig
from daemoneye_eventbus.client import Client
from daemoneye_eventbus.errors import BrokerAlreadyRunning, BrokerError
from daemoneye_eventbus.transports import Listener

if sys.platform != "win32":
    pytest.skip("named pipes exist only on Windows", allow_module_level=True)

ANOMALY = registry.EVENTS_PROCESS_ANOMALY  # public: anonymous peers publish and read it


@pytest.fixture
def pipe() -> str:
    """A pipe name no other test uses."""
    return rf"\\.\pipe\DaemonEye-test-{uuid.uuid4().hex}"


@pytest.fixture
async def broker(pipe: str) -> AsyncIterator[Broker]:
    async with Broker(pipe, BrokerConfig(drain_timeout=1.0)) as b:
        yield b


class Accepted(asyncio.Protocol):
    """The broker side of a bare connection: who the listener says the peer is."""

    def __init__(self, listener: Listener, seen: asyncio.Queue[PeerCredentials | None]) -> None:
        self.listener = listener
        self.seen = seen
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.seen.put_nowait(self.listener.accept(transport))


async def test_an_event_travels_over_the_pipe(broker: Broker, pipe: str) -> None:
    async with Client(pipe) as reader, Client(pipe) as writer:
        sub = await reader.subscribe(ANOMALY)
        await writer.publish(ANOMALY, events_pb2.ProcessEvent(pid=42, name="over a pipe"))
        event = await sub.get(timeout=5.0)
        assert event.message().pid == 42
        assert event.message().name == "over a pipe"


async def test_a_second_broker_on_the_name_refuses_to_start(broker: Broker, pipe: str) -> None:
    with pytest.raises(BrokerAlreadyRunning, match="another process already serves"):
        await Broker(pipe).start()
    async with Client(pipe) as client:  # the first one still serves
        await client.publish(ANOMALY, events_pb2.ProcessEvent(pid=1))
        await client.flush()


async def test_the_peer_is_this_process_and_its_user(pipe: str) -> None:
    from daemoneye_eventbus.transports import windows

    listening = transports.listener(pipe)
    seen: asyncio.Queue[PeerCredentials | None] = asyncio.Queue()
    await listening.start(lambda: Accepted(listening, seen))
    try:
        transport = await transports.connect(pipe, asyncio.Protocol)
        async with asyncio.timeout(5):
            peer = await seen.get()
        assert peer is not None
        assert peer.pid == os.getpid()
        assert (peer.uid, peer.gid) == (-1, -1)
        assert peer.sid == windows.current_user_sid()
        assert "S-1-1-0" in peer.group_sids  # Everyone: enabled in every token
        image = listening.executable(peer)
        assert image is not None
        assert image.lower().endswith(".exe")
        assert os.path.isfile(image)
        transport.close()
    finally:
        listening.close()
        await listening.wait_closed()


async def test_the_pipe_has_the_default_descriptor(pipe: str) -> None:
    import win32security

    from daemoneye_eventbus.transports import windows

    def sid(account: str) -> str:  # an SDDL alias (SY, BA) or a SID, as a SID
        return win32security.ConvertSidToStringSid(win32security.ConvertStringSidToSid(account))

    listening = transports.listener(pipe)
    seen: asyncio.Queue[PeerCredentials | None] = asyncio.Queue()
    served: list[Accepted] = []

    def factory() -> Accepted:
        served.append(Accepted(listening, seen))
        return served[-1]

    await listening.start(factory)
    try:
        transport = await transports.connect(pipe, asyncio.Protocol)
        async with asyncio.timeout(5):
            await seen.get()
        server_end = served[0].transport
        assert server_end is not None
        handle = server_end.get_extra_info("pipe").fileno()
        descriptor = win32security.GetSecurityInfo(
            handle, win32security.SE_KERNEL_OBJECT, win32security.DACL_SECURITY_INFORMATION
        )
        dacl = win32security.ConvertSecurityDescriptorToStringSecurityDescriptor(
            descriptor, win32security.SDDL_REVISION_1, win32security.DACL_SECURITY_INFORMATION
        )
        assert dacl.startswith("D:P("), dacl  # protected: nothing inherited
        aces = re.findall(r"\((\w+);[^;]*;[^;]*;[^;]*;[^;]*;([^)]*)\)", dacl)
        assert {kind for kind, _ in aces} == {"A"}, dacl
        assert {sid(account) for _, account in aces} == {
            "S-1-5-18",
            "S-1-5-32-544",
            windows.current_user_sid(),
        }, dacl
        transport.close()
    finally:
        listening.close()
        await listening.wait_closed()


async def test_nothing_answers_after_close(pipe: str) -> None:
    async with Broker(pipe):
        transport = await transports.connect(pipe, asyncio.Protocol)
        transport.close()
    with pytest.raises(FileNotFoundError):
        await transports.connect(pipe, asyncio.Protocol)


def test_a_bad_descriptor_is_refused_before_any_pipe_exists(pipe: str) -> None:
    with pytest.raises(BrokerError, match="null DACL"):
        transports.listener(pipe, pipe_sddl="D:NO_ACCESS_CONTROL")
