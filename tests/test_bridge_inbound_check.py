"""The checks on a control message from the fleet (daemoneye_eventbus.bridge.inbound_check)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from daemoneye.eventbus.v1 import control_pb2, registry
from daemoneye.eventbus.v1.correlation_pb2 import CorrelationMetadata
from daemoneye.eventbus.v1.frames_pb2 import ErrorCode
from daemoneye.eventbus.v1.options_pb2 import AccessLevel
from daemoneye_eventbus.bridge.headers import (
    CORRELATION_ID,
    PAYLOAD_TYPE,
    SEQUENCE_NUMBER,
    InvalidHeader,
    correlation_headers,
)
from daemoneye_eventbus.bridge.inbound_check import TIMEOUT_MS, InboundCommand, check_inbound
from daemoneye_eventbus.bridge.subjects import InvalidSubject
from daemoneye_eventbus.errors import (
    AccessDenied,
    InvalidPayload,
    InvalidTopic,
    PayloadTypeMismatch,
)
from daemoneye_eventbus.registry_runtime import RequestTopicTemplate, Topic, TopicTemplate

HOST = "web-01"
BRIDGE = "bridge"
MAX_PAYLOAD = 4096
DEFAULT_TIMEOUT = 5.0
MAX_TIMEOUT = 60.0

CONFIG = control_pb2.ConfigurationUpdate(
    collector_id="procmond-1",
    config_version=3,
    settings={"scan_interval": "30s", "é": "\U0001f600"},
    requires_restart=True,
)
HEALTH = control_pb2.HealthCheckRequest(component_id="procmond-1", include_diagnostics=True)
RPC_HEALTH = "daemoneye.web-01.control.collector.rpc.health.procmond-1"


def check(
    subject: str,
    payload: bytes,
    headers: Mapping[str, str] | None = None,
    reply: str | None = None,
    *,
    component: str = BRIDGE,
    max_payload_bytes: int = MAX_PAYLOAD,
) -> InboundCommand:
    return check_inbound(
        HOST,
        component,
        subject,
        headers,
        payload,
        reply,
        max_payload_bytes=max_payload_bytes,
        default_timeout=DEFAULT_TIMEOUT,
        max_timeout=MAX_TIMEOUT,
    )


# -- accepted -----------------------------------------------------------------------------------


def test_a_command_for_this_host() -> None:
    payload = CONFIG.SerializeToString()
    cmd = check("daemoneye.web-01.control.collector.config", payload)
    assert cmd.topic is registry.CONTROL_COLLECTOR_CONFIG
    assert cmd.message == CONFIG
    assert type(cmd.message) is control_pb2.ConfigurationUpdate
    assert cmd.payload == payload
    assert cmd.correlation is None
    assert (cmd.broadcast, cmd.request) == (False, False)


def test_a_command_for_every_host_is_a_broadcast() -> None:
    cmd = check("daemoneye.all.control.collector.config", CONFIG.SerializeToString())
    assert cmd.topic is registry.CONTROL_COLLECTOR_CONFIG
    assert cmd.message == CONFIG
    assert (cmd.broadcast, cmd.request) == (True, False)


def test_the_right_payload_type_header_is_accepted() -> None:
    headers = {PAYLOAD_TYPE: "daemoneye.eventbus.v1.ConfigurationUpdate"}
    cmd = check("daemoneye.web-01.control.collector.config", CONFIG.SerializeToString(), headers)
    assert cmd.message == CONFIG


def test_an_empty_payload_is_the_default_message() -> None:
    cmd = check("daemoneye.web-01.control.collector.config", b"")
    assert cmd.message == control_pb2.ConfigurationUpdate()


def test_correlation_headers_are_parsed() -> None:
    meta = CorrelationMetadata(
        correlation_id="fleet 1", root_correlation_id="root", sequence_number=4
    )
    meta.workflow_stage = "rollout"
    meta.tags["by"] = "ops\n"
    headers = {**correlation_headers(meta), "Unrelated": "x"}
    cmd = check("daemoneye.web-01.control.collector.config", CONFIG.SerializeToString(), headers)
    assert cmd.correlation == meta


@pytest.mark.parametrize("component", [BRIDGE, "procmond", "anyone-at-all"])
def test_a_public_control_topic_is_accepted_for_any_component(component: str) -> None:
    status = control_pb2.ComponentStatus(component_id="x", message="fine")
    cmd = check(
        "daemoneye.web-01.control.health.status", status.SerializeToString(), component=component
    )
    assert cmd.topic is registry.CONTROL_HEALTH_STATUS
    assert cmd.message == status


def test_payload_at_the_limit_is_accepted() -> None:
    payload = CONFIG.SerializeToString()
    cmd = check(
        "daemoneye.web-01.control.collector.config", payload, max_payload_bytes=len(payload)
    )
    assert cmd.message == CONFIG


# -- refused ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "subject",
    [
        "daemoneye.web-02.control.collector.config",
        "daemoneye.WEB-01.control.collector.config",
        "daemoneye.web-01.events.process.lifecycle",
        "daemoneye.all.events.process.lifecycle",
        "daemoneye.web-01.control",
        "daemoneye.web-01.control.*",
        "daemoneye.web-01.control.collector.>",
        "other.web-01.control.collector.config",
        "daemoneye.web-01.control..config",
        "daemoneye.web-01.control.collector.con~2Efig",
    ],
)
def test_subjects_not_for_this_host_s_control(subject: str) -> None:
    with pytest.raises(InvalidSubject):
        check(subject, CONFIG.SerializeToString())


@pytest.mark.parametrize(
    "topic", ["control.nothing.here", "control.collector", "control.collector.config.extra"]
)
def test_an_undeclared_control_topic(topic: str) -> None:
    with pytest.raises(InvalidTopic, match="no control topic of the schema"):
        check(f"daemoneye.web-01.{topic}", b"")


@pytest.mark.parametrize(
    "topic", ["control.collector.registration", "control.presence", "control.collector.result"]
)
def test_a_restricted_topic_the_bridge_may_not_publish(topic: str) -> None:
    declared = registry.lookup(topic)
    assert declared is not None
    assert BRIDGE not in declared.publishers
    with pytest.raises(AccessDenied, match=f"component 'bridge' publish '{topic}'") as info:
        check(f"daemoneye.web-01.{topic}", b"")
    assert info.value.code == ErrorCode.ERROR_CODE_ACCESS_DENIED


def test_a_privileged_topic_for_a_component_that_is_no_publisher() -> None:
    with pytest.raises(AccessDenied, match="component 'procmond'"):
        check(
            "daemoneye.web-01.control.collector.config",
            CONFIG.SerializeToString(),
            component="procmond",
        )


@pytest.mark.parametrize(
    "given",
    [
        "daemoneye.eventbus.v1.HealthCheckRequest",
        "ConfigurationUpdate",
        "daemoneye.eventbus.v1.configurationupdate",
        "",
    ],
)
def test_a_wrong_payload_type_header(given: str) -> None:
    with pytest.raises(
        PayloadTypeMismatch, match=r"carries daemoneye\.eventbus\.v1\.ConfigurationUpdate, not "
    ) as info:
        check(
            "daemoneye.web-01.control.collector.config",
            CONFIG.SerializeToString(),
            {PAYLOAD_TYPE: given},
        )
    assert info.value.code == ErrorCode.ERROR_CODE_PAYLOAD_MISMATCH


@pytest.mark.parametrize("payload", [b"\xff\xff\xff", b"\x0a\x05ab", b"\x08"])
def test_a_payload_that_does_not_parse(payload: bytes) -> None:
    with pytest.raises(InvalidPayload, match="does not parse as") as info:
        check("daemoneye.web-01.control.collector.config", payload)
    assert info.value.code == ErrorCode.ERROR_CODE_INVALID_PAYLOAD


def test_a_payload_over_the_limit() -> None:
    payload = CONFIG.SerializeToString()
    with pytest.raises(InvalidPayload, match=f"{len(payload)} bytes is over the limit"):
        check(
            "daemoneye.web-01.control.collector.config",
            payload,
            max_payload_bytes=len(payload) - 1,
        )


def test_bad_correlation_headers() -> None:
    with pytest.raises(InvalidHeader, match="without"):
        check(
            "daemoneye.web-01.control.collector.config",
            CONFIG.SerializeToString(),
            {SEQUENCE_NUMBER: "1"},
        )
    with pytest.raises(InvalidHeader, match="not percent-encoded"):
        check(
            "daemoneye.web-01.control.collector.config",
            CONFIG.SerializeToString(),
            {CORRELATION_ID: "%FF"},
        )


# -- requests -----------------------------------------------------------------------------------


def test_a_request_needs_a_reply_subject() -> None:
    for reply in (None, ""):
        with pytest.raises(InvalidTopic, match="request topic"):
            check(RPC_HEALTH, HEALTH.SerializeToString(), reply=reply)


def test_a_request_with_a_reply_subject() -> None:
    cmd = check(RPC_HEALTH, HEALTH.SerializeToString(), reply="_INBOX.abc")
    assert cmd.topic == registry.control_collector_rpc_health(id="procmond-1")
    assert cmd.topic.template == "control.collector.rpc.health.{id}"
    assert cmd.message == HEALTH
    assert (cmd.request, cmd.broadcast, cmd.timeout) == (True, False, DEFAULT_TIMEOUT)


@pytest.mark.parametrize(
    ("value", "timeout"),
    [
        ("250", 0.25),
        ("1", 0.001),
        ("60000", MAX_TIMEOUT),
        ("60001", MAX_TIMEOUT),
        ("99999999999999999999999", MAX_TIMEOUT),
        ("9" * 5000, MAX_TIMEOUT),
    ],
)
def test_a_request_s_deadline(value: str, timeout: float) -> None:
    cmd = check(RPC_HEALTH, HEALTH.SerializeToString(), {TIMEOUT_MS: value}, reply="_INBOX.abc")
    assert cmd.request
    assert cmd.timeout == timeout


@pytest.mark.parametrize("value", ["0", "000", "abc", "", "-5", "1.5", " 250", "\u0662\u0665"])
def test_a_bad_deadline(value: str) -> None:
    with pytest.raises(InvalidHeader, match=f"{TIMEOUT_MS}: .* is not a positive number"):
        check(RPC_HEALTH, HEALTH.SerializeToString(), {TIMEOUT_MS: value}, reply="_INBOX.abc")


def test_a_broadcast_request() -> None:
    cmd = check(
        "daemoneye.all.control.collector.queue.scan",
        control_pb2.TaskAssignment().SerializeToString(),
        reply="_INBOX.x",
    )
    assert cmd.topic == registry.control_collector_queue(type="scan")
    assert (cmd.request, cmd.broadcast) == (True, True)


# -- every declared topic -----------------------------------------------------------------------


def declared() -> list[tuple[str, Topic[Any] | TopicTemplate[Any]]]:
    """Every declared topic, and every template built with a placeholder per field."""
    out: list[tuple[str, Topic[Any] | TopicTemplate[Any]]] = [
        (name, topic) for name, topic in registry.TOPICS.items()
    ]
    for template in registry.TEMPLATES:
        name = template.build(**{field: f"x{i}" for i, field in enumerate(template.parameters)})
        out.append((name.name, template))
    return out


@pytest.mark.parametrize(("name", "topic"), declared(), ids=[name for name, _ in declared()])
def test_every_declared_topic_follows_the_schema_rule(
    name: str, topic: Topic[Any] | TopicTemplate[Any]
) -> None:
    subject = f"daemoneye.{HOST}.{name}"
    payload = topic.payload_type().SerializeToString()
    if not topic.control:
        with pytest.raises(InvalidSubject):
            check(subject, payload, reply="_INBOX.r")
        return
    may = topic.access == AccessLevel.ACCESS_LEVEL_PUBLIC or BRIDGE in topic.publishers
    if not may:
        with pytest.raises(AccessDenied):
            check(subject, payload, reply="_INBOX.r")
        return
    cmd = check(subject, payload, {PAYLOAD_TYPE: topic.payload_name}, reply="_INBOX.r")
    assert cmd.topic.name == name
    assert cmd.topic == registry.lookup(name)
    assert cmd.message == topic.payload_type()
    assert cmd.request == isinstance(topic, RequestTopicTemplate)
    if isinstance(topic, TopicTemplate):
        assert cmd.topic.template == topic.pattern


def test_the_schema_lets_the_bridge_publish_the_fleet_s_control_topics() -> None:
    # The rule above is not vacuous: the schema has control topics on both sides.
    rule = {
        name: topic.access == AccessLevel.ACCESS_LEVEL_PUBLIC or BRIDGE in topic.publishers
        for name, topic in declared()
        if topic.control
    }
    assert rule["control.collector.config"]
    assert rule["control.collector.rpc.health.x0"]
    assert rule["control.health.status"]
    assert not rule["control.presence"]
    assert not rule["control.collector.registration"]
