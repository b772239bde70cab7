"""The bridge's configuration checks (daemoneye_eventbus.bridge.config)."""

from __future__ import annotations

import dataclasses
import math
import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest
from nats_server import NatsServerProcess, import_nats

from daemoneye_eventbus.bridge.config import (
    BRIDGE_COMPONENT,
    DEFAULT_STREAM,
    BridgeConfig,
    BridgeConfigError,
    NatsOptions,
)
from daemoneye_eventbus.errors import EventBusError

SERVER_NAME = "nats.test"


def config(**changes: Any) -> BridgeConfig:
    return dataclasses.replace(BridgeConfig("web-01", "/var/lib/bridge/spool.db"), **changes)


# -- BridgeConfig -------------------------------------------------------------------------------


def test_the_defaults_are_accepted() -> None:
    cfg = BridgeConfig(host_id="web-01", spool_path="/tmp/spool.db")
    cfg.check()
    assert cfg.component == BRIDGE_COMPONENT == "bridge"
    assert cfg.stream == DEFAULT_STREAM
    assert cfg.forward == ("events.#",)
    assert cfg.nats == NatsOptions()
    NatsOptions().check()


def test_bridge_config_error_is_a_value_error_of_the_bus() -> None:
    assert issubclass(BridgeConfigError, ValueError)
    assert issubclass(BridgeConfigError, EventBusError)


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("", "host id is empty"),
        ("web.01", r"character '\.'"),
        ("web 01", "character ' '"),
        ("web-*", r"character '\*'"),
        ("é", "character 'é'"),
        ("h" * 65, "the limit is 64"),
        ("all", "'all' is reserved"),
    ],
)
def test_bad_host_ids(host: str, reason: str) -> None:
    with pytest.raises(BridgeConfigError, match=reason):
        config(host_id=host).check()


@pytest.mark.parametrize(
    ("forward", "reason"),
    [
        ((), "nothing to forward"),
        (("events..process",), "forward filter 'events..process'"),
        (("events.#.process",), r"forward filter 'events\.#\.process'"),
        (("events.proc*",), r"forward filter 'events\.proc\*'"),
        (("",), "forward filter ''"),
        (("control.#",), "control topics are not forwarded"),
        (("control.collector.result",), "control topics are not forwarded"),
        (("events.#", "control.presence"), "control topics are not forwarded"),
        (("events.#", "events.process.+"), "'events.#' and 'events.process.+' overlap"),
        (("events.+.lifecycle", "events.process.#"), "overlap"),
        (("events.process.lifecycle", "events.process.lifecycle"), "overlap"),
    ],
)
def test_bad_forward_filters(forward: tuple[str, ...], reason: str) -> None:
    with pytest.raises(BridgeConfigError, match=reason):
        config(forward=forward).check()


def test_disjoint_filters_are_accepted() -> None:
    config(forward=("events.process.#", "events.network.connections", "alerts.+")).check()


@pytest.mark.parametrize("stream", ["", "A.B", "A B", "A*", "A>", "a/b", "x" * 129, "é"])
def test_bad_stream_names(stream: str) -> None:
    with pytest.raises(BridgeConfigError, match="stream name"):
        config(stream=stream).check()


def test_stream_name_bounds() -> None:
    config(stream="x" * 128).check()
    config(stream="Daemoneye_events-2").check()


@pytest.mark.parametrize(
    ("stream_subjects", "forward"),
    [
        (("daemoneye.*.events.network.>",), ("events.#",)),
        (("daemoneye.*.events.>",), ("events.#",)),  # does not take daemoneye.web-01.events
        (("daemoneye.web-02.events.>",), ("events.#",)),
        (("daemoneye.*.events.process.*",), ("events.process.#",)),
        (("daemoneye.*.events.*.lifecycle",), ("events.+.+",)),
        ((), ("events.#",)),
    ],
)
def test_stream_subjects_must_take_the_forwarded_subjects(
    stream_subjects: tuple[str, ...], forward: tuple[str, ...]
) -> None:
    with pytest.raises(BridgeConfigError, match="do not take the forwarded subject"):
        config(stream_subjects=stream_subjects, forward=forward).check()


@pytest.mark.parametrize(
    ("stream_subjects", "forward"),
    [
        (("daemoneye.*.*",), ("events",)),
        (("daemoneye.*.events", "daemoneye.*.events.>"), ("events.#",)),
        (("daemoneye.web-01.events.process.>",), ("events.process.lifecycle",)),
        (("daemoneye.*.events.*.*",), ("events.+.lifecycle", "events.network.connections")),
    ],
)
def test_stream_subjects_that_take_them(
    stream_subjects: tuple[str, ...], forward: tuple[str, ...]
) -> None:
    config(stream_subjects=stream_subjects, forward=forward).check()


@pytest.mark.parametrize("subject", ["", "daemoneye..events", "daemoneye.*.", ".daemoneye.>"])
def test_stream_subjects_must_be_subjects(subject: str) -> None:
    with pytest.raises(BridgeConfigError, match="is not a NATS subject"):
        config(stream_subjects=(subject, "daemoneye.*.events", "daemoneye.*.events.>")).check()


@pytest.mark.parametrize(
    "subject",
    ["daemoneye.>", "daemoneye.*.>", "daemoneye.web-01.>", "daemoneye.*.*.collector.>", ">"],
)
def test_stream_subjects_must_leave_the_control_subjects_alone(subject: str) -> None:
    # JetStream would store the fleet's control messages and answer its requests.
    with pytest.raises(BridgeConfigError, match="takes the inbound control subjects"):
        config(stream_subjects=(subject,)).check()


@pytest.mark.parametrize("flt", ["#", "+.process.lifecycle", "+.#"])
def test_forward_filters_begin_with_a_name(flt: str) -> None:
    with pytest.raises(BridgeConfigError, match="the first level must be a name"):
        config(forward=(flt,)).check()


@pytest.mark.parametrize(
    ("cfg", "forwarded", "stream"),
    [
        (
            config(),
            ("daemoneye.web-01.events", "daemoneye.web-01.events.>"),
            ("daemoneye.*.events", "daemoneye.*.events.>"),
        ),
        (
            config(forward=("events.process.#", "events.network.connections")),
            (
                "daemoneye.web-01.events.process",
                "daemoneye.web-01.events.process.>",
                "daemoneye.web-01.events.network.connections",
            ),
            (
                "daemoneye.*.events.process",
                "daemoneye.*.events.process.>",
                "daemoneye.*.events.network.connections",
            ),
        ),
        (
            config(host_id="db_2", forward=("events.+.lifecycle",)),
            ("daemoneye.db_2.events.*.lifecycle",),
            ("daemoneye.*.events.*.lifecycle",),
        ),
        (
            config(stream_subjects=("daemoneye.*.events.>", "daemoneye.*.events")),
            ("daemoneye.web-01.events", "daemoneye.web-01.events.>"),
            ("daemoneye.*.events.>", "daemoneye.*.events"),
        ),
    ],
)
def test_forwarded_and_stream_subjects(
    cfg: BridgeConfig, forwarded: tuple[str, ...], stream: tuple[str, ...]
) -> None:
    cfg.check()
    assert cfg.forward_subjects() == forwarded
    assert cfg.effective_stream_subjects() == stream


def test_the_stream_subjects_name_each_subject_once() -> None:
    cfg = config(forward=("events.process.lifecycle", "events.process.lifecycle"))
    assert cfg.forward_subjects() == ("daemoneye.web-01.events.process.lifecycle",) * 2
    assert cfg.effective_stream_subjects() == ("daemoneye.*.events.process.lifecycle",)
    with pytest.raises(BridgeConfigError, match="overlap"):
        cfg.check()


DURATIONS = ["max_age", "duplicate_window", "ack_timeout", "request_timeout", "max_request_timeout"]


@pytest.mark.parametrize("name", DURATIONS)
@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf, -math.inf])
def test_durations_must_be_finite_and_not_negative(name: str, value: float) -> None:
    with pytest.raises(BridgeConfigError, match=f"{name} must be a finite number of seconds"):
        config(**{name: value}).check()


@pytest.mark.parametrize("name", [n for n in DURATIONS if n != "max_age"])
def test_durations_must_be_positive(name: str) -> None:
    with pytest.raises(BridgeConfigError, match=f"{name} must be positive"):
        config(**{name: 0.0}).check()


def test_no_max_age_means_no_limit() -> None:
    config(max_age=0.0, duplicate_window=10 * 86_400.0).check()


def test_duplicate_window_within_max_age() -> None:
    config(max_age=120.0, duplicate_window=120.0).check()
    with pytest.raises(BridgeConfigError, match="duplicate window cannot be longer"):
        config(max_age=60.0, duplicate_window=120.0).check()


def test_request_timeout_within_the_longest() -> None:
    config(request_timeout=60.0, max_request_timeout=60.0).check()
    with pytest.raises(BridgeConfigError, match="request_timeout is longer than max_request"):
        config(request_timeout=10.0, max_request_timeout=5.0).check()


@pytest.mark.parametrize(
    "name",
    [
        "replicas",
        "spool_max_events",
        "spool_max_bytes",
        "max_in_flight",
        "window",
        "max_inbound_pending",
    ],
)
@pytest.mark.parametrize("value", [0, -1])
def test_bounds_at_least_one(name: str, value: int) -> None:
    config(**{name: 1}).check()
    with pytest.raises(BridgeConfigError, match=f"{name} must be at least 1"):
        config(**{name: value}).check()


@pytest.mark.parametrize("value", [0, -2, -(2**40)])
def test_stream_max_bytes(value: int) -> None:
    config(stream_max_bytes=-1).check()
    config(stream_max_bytes=1).check()
    with pytest.raises(BridgeConfigError, match="stream_max_bytes must be positive, or -1"):
        config(stream_max_bytes=value).check()


def test_a_spool_path_is_needed() -> None:
    with pytest.raises(BridgeConfigError, match="needs a spool file"):
        config(spool_path="").check()


def test_the_nats_options_are_checked_with_the_config() -> None:
    with pytest.raises(BridgeConfigError, match="must start with nats://"):
        config(nats=NatsOptions(servers=("http://127.0.0.1:4222",))).check()


# -- NatsOptions --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        (NatsOptions(servers=()), "no NATS server URL"),
        (NatsOptions(servers=("http://h:4222",)), "'http://h:4222' must start with nats://"),
        (NatsOptions(servers=("127.0.0.1:4222",)), "must start with"),
        (NatsOptions(servers=("nats://a:1", "NATS://b:2")), "'NATS://b:2' must start"),
        (NatsOptions(tls_cert="c.pem"), "--nats-tls-cert and --nats-tls-key go together"),
        (NatsOptions(tls_key="k.pem"), "go together"),
        (NatsOptions(password_file="p"), "a NATS password needs a user"),
        (NatsOptions(credentials="a.creds", token_file="t"), "give one of"),
        (NatsOptions(nkey_seed="s", user="u"), "give one of"),
        (NatsOptions(token_file="t", user="u", password_file="p"), "give one of"),
        (NatsOptions(credentials="a", nkey_seed="s"), "give one of"),
        (NatsOptions(connect_timeout=0.0), "connect timeout must be positive"),
        (NatsOptions(connect_timeout=-1.0), "connect timeout must be positive"),
        (NatsOptions(connect_timeout=math.nan), "connect timeout must be positive"),
    ],
)
def test_nats_option_refusals(options: NatsOptions, reason: str) -> None:
    with pytest.raises(BridgeConfigError, match=reason):
        options.check()


@pytest.mark.parametrize(
    "url", ["nats://h:4222", "tls://h:4222", "ws://h:8080", "wss://h:443", "nats://[::1]:4222"]
)
def test_nats_url_schemes(url: str) -> None:
    NatsOptions(servers=(url,)).check()


def test_connect_options_always() -> None:
    options = NatsOptions(servers=("nats://a:1", "nats://b:2"), name="n", connect_timeout=3.5)
    assert options.connect_options() == {
        "servers": ["nats://a:1", "nats://b:2"],
        "name": "n",
        "connect_timeout": 3.5,
    }
    assert NatsOptions().connect_options() == {
        "servers": ["nats://127.0.0.1:4222"],
        "name": "daemoneye-eventbus-bridge",
        "connect_timeout": 2.0,
    }


def test_connect_options_token_from_a_file(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("  s3cr3t token\n\n", encoding="utf-8")
    options = NatsOptions(token_file=str(token))
    options.check()
    out = options.connect_options()
    assert out["token"] == "s3cr3t token"
    assert not {"user", "password", "user_credentials", "nkeys_seed", "tls"} & set(out)


def test_connect_options_user_and_password_from_a_file(tmp_path: Path) -> None:
    password = tmp_path / "password"
    password.write_text("pässword\n", encoding="utf-8")
    options = NatsOptions(user="bridge", password_file=str(password))
    options.check()
    out = options.connect_options()
    assert (out["user"], out["password"]) == ("bridge", "pässword")
    # A user alone (no password file) is passed on as it is.
    assert NatsOptions(user="bridge").connect_options()["user"] == "bridge"
    assert "password" not in NatsOptions(user="bridge").connect_options()


def test_connect_options_credentials_and_nkey_are_paths(tmp_path: Path) -> None:
    creds = str(tmp_path / "bridge.creds")
    seed = str(tmp_path / "bridge.nk")
    Path(creds).write_text("creds\n")
    Path(seed).write_text("seed\n")
    out = NatsOptions(credentials=creds).connect_options()
    assert out["user_credentials"] == creds
    assert "nkeys_seed" not in out
    out = NatsOptions(nkey_seed=seed).connect_options()
    assert out["nkeys_seed"] == seed
    assert "user_credentials" not in out


@pytest.mark.parametrize("field", ["token_file", "password_file"])
def test_a_missing_secret_file(tmp_path: Path, field: str) -> None:
    missing = tmp_path / "nope"
    if field == "token_file":
        options = NatsOptions(token_file=str(missing))
    else:
        options = NatsOptions(user="u", password_file=str(missing))
    with pytest.raises(BridgeConfigError, match=f"cannot read {missing}"):
        options.connect_options()


# -- TLS ----------------------------------------------------------------------------------------


def self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for ``SERVER_NAME`` (its own CA) and its key."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed: the TLS tests make their certificates with it")
    cert, key = directory / f"{name}.pem", directory / f"{name}-key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={SERVER_NAME}",
            "-addext",
            f"subjectAltName=DNS:{SERVER_NAME}",
            "-days",
            "1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    return self_signed(tmp_path, "server")


def test_no_tls_options_no_context() -> None:
    assert NatsOptions().tls_context() is None
    assert "tls" not in NatsOptions(tls_hostname="x").connect_options()


def test_tls_with_a_ca(tls_files: tuple[Path, Path]) -> None:
    cert, _ = tls_files
    options = NatsOptions(servers=("tls://127.0.0.1:4222",), tls_ca=str(cert))
    options.check()
    out = options.connect_options()
    context = out["tls"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName", SERVER_NAME),),)]
    assert "tls_hostname" not in out
    out = dataclasses.replace(options, tls_hostname=SERVER_NAME).connect_options()
    assert out["tls_hostname"] == SERVER_NAME


def test_tls_with_a_client_certificate(tmp_path: Path, tls_files: tuple[Path, Path]) -> None:
    ca, _ = tls_files
    cert, key = self_signed(tmp_path, "client")
    options = NatsOptions(tls_ca=str(ca), tls_cert=str(cert), tls_key=str(key))
    options.check()
    context = options.connect_options()["tls"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED


def test_tls_files_that_do_not_work(tmp_path: Path, tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    _, other_key = self_signed(tmp_path, "other")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n", encoding="utf-8")
    missing = str(tmp_path / "missing.pem")
    for options in (
        NatsOptions(tls_ca=missing),
        NatsOptions(tls_ca=str(garbage)),
        NatsOptions(tls_ca=str(cert), tls_cert=missing, tls_key=str(key)),
        NatsOptions(tls_ca=str(cert), tls_cert=str(cert), tls_key=str(other_key)),
        NatsOptions(tls_ca=str(cert), tls_cert=str(garbage), tls_key=str(key)),
    ):
        with pytest.raises(BridgeConfigError, match="TLS"):
            options.connect_options()


async def test_the_tls_options_connect_to_a_tls_server(
    tmp_path: Path, tls_files: tuple[Path, Path]
) -> None:
    nats = import_nats()
    cert, key = tls_files
    args = ["--tls", "--tlscert", str(cert), "--tlskey", str(key)]
    with NatsServerProcess(tmp_path / "nats", args=args) as process:
        server = process.start()
        options = NatsOptions(
            servers=(server.url,), tls_ca=str(cert), tls_hostname=SERVER_NAME, connect_timeout=5
        )
        options.check()
        nc = await nats.connect(**options.connect_options(), allow_reconnect=False)
        try:
            assert nc.is_connected
            sub = await nc.subscribe("daemoneye.tls")
            await nc.publish("daemoneye.tls", b"over tls")
            assert (await sub.next_msg(timeout=5)).data == b"over tls"
        finally:
            await nc.close()
        # The certificate names nats.test, not 127.0.0.1: without the name the
        # server is not verified, and the connection fails.
        unnamed = dataclasses.replace(options, tls_hostname=None)
        with pytest.raises(ssl.SSLCertVerificationError, match=r"not valid for '127\.0\.0\.1'"):
            await nats.connect(**unnamed.connect_options(), allow_reconnect=False)
