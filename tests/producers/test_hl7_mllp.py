"""The HL7 v2 MLLP collector: framing, ACKs and dead letters, against real sockets and the
real broker (every patient identifier here is synthetic)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client as ClickHouseClient
from confluent_kafka import Producer
from pydantic import ValidationError

from medstream.metrics import COLLECTOR_FAILED, COLLECTOR_READ, READY, labelled
from medstream.runtime import free_port
from medstream.settings import NORM_TOPICS, KafkaSettings
from producers import collector_class
from producers.base import (
    MAX_DEAD_LETTER_BYTES,
    MAX_RECORD_BYTES,
    CollectorState,
    ConfigError,
    RefusalBudget,
    load_config,
)
from producers.hl7_mllp import (
    MAX_UNFRAMED_BYTES,
    Accepted,
    Frame,
    Hl7MllpProducer,
    MllpConfig,
    MllpFramer,
    Oversize,
    Rejected,
    build_ack,
    duplicate_key,
    inspect_message,
    legacy_duplicate_key,
    message_encoding,
    mllp_wrap,
    read_header,
)
from schemas import serde
from schemas.serde import COLLECTOR_HEADER, ManifestRegistry
from tests.kafka_helpers import DLQ, Published, consume, raw_topic

REPO = Path(__file__).resolve().parents[2]
MRN = "SYNTH-MRN-0042"


def oru(control_id: str = "LAB-0001", facility: str = "FAC1", version: str = "2.5.1") -> str:
    return (
        "\r".join(
            [
                f"MSH|^~\\&|LIS|{facility}|MEDSTREAM|REGION|20261103081500+0800||ORU^R01^ORU_R01|"
                f"{control_id}|P|{version}",
                f"PID|1||{MRN}^^^H001^MR||TESTPATIENT^ALPHA||19700101|F",
                "OBR|1|PL-77|FO-1001|PANEL^Chemistry panel^L|||20261103080000+0800",
                "OBX|1|NM|K^Potassium^L||4.1|mmol/L|3.5-5.3|N|||F",
            ]
        )
        + "\r"
    )


def adt(trigger: str = "A01", control_id: str = "ADT-0001") -> str:
    return (
        "\r".join(
            [
                f"MSH|^~\\&|HIS|FAC1|MEDSTREAM|REGION|20261103081500+0800||ADT^{trigger}^ADT_A01|"
                f"{control_id}|P|2.5.1",
                f"EVN|{trigger}|20261103081400+0800",
                f"PID|1||{MRN}^^^H001^MR||TESTPATIENT^ALPHA||19700101|F",
                "PV1|1|I|NK^101^1||||||||||||||||V-0001",
            ]
        )
        + "\r"
    )


def without(message: str, segment: str) -> str:
    return "\r".join(s for s in message.split("\r") if not s.startswith(segment + "|"))


def config(**overrides: Any) -> MllpConfig:
    values: dict[str, Any] = {
        "kind": "mllp",
        "name": "lab-mllp",
        "organisation_id": "H001",
        "source_system": "lis-mllp",
        "host": "127.0.0.1",
        "port": 0,
    }
    values.update(overrides)
    return MllpConfig.model_validate(values)


# --- framing (pure) -------------------------------------------------------------------------


def test_two_frames_in_one_read_and_whitespace_between() -> None:
    framer = MllpFramer(1024)
    events, dropped = framer.feed(mllp_wrap(b"MSH|one") + b"\r\n" + mllp_wrap(b"MSH|two"))
    assert events == [Frame(b"MSH|one"), Frame(b"MSH|two")]
    assert dropped == 0
    assert not framer.in_frame


def test_one_frame_across_reads_byte_by_byte() -> None:
    framer = MllpFramer(1024)
    framed = mllp_wrap(b"MSH|^~\\&|split")
    frames: list[Frame | Oversize] = []
    for i in range(len(framed)):
        events, dropped = framer.feed(framed[i : i + 1])
        frames.extend(events)
        assert dropped == 0
    assert frames == [Frame(b"MSH|^~\\&|split")]


def test_end_block_without_carriage_return_still_ends_the_frame() -> None:
    framer = MllpFramer(1024)
    assert framer.feed(b"\x0bMSH|a\x1c") == ([Frame(b"MSH|a")], 0)
    # The CR that follows in the next read is the rest of the end block, not junk.
    assert framer.feed(b"\r\x0bMSH|b\x1c\r") == ([Frame(b"MSH|b")], 0)


def test_bytes_outside_a_frame_are_dropped_and_counted() -> None:
    framer = MllpFramer(1024)
    events, dropped = framer.feed(b"noise" + mllp_wrap(b"MSH|x") + b"tail")
    assert events == [Frame(b"MSH|x")]
    assert dropped == 9


def test_a_new_start_block_abandons_an_unfinished_frame() -> None:
    framer = MllpFramer(1024)
    events, dropped = framer.feed(b"\x0bMSH|lost" + mllp_wrap(b"MSH|kept"))
    assert events == [Frame(b"MSH|kept")]
    assert dropped == len(b"MSH|lost") + 1


def test_oversize_frame_is_reported_with_its_prefix() -> None:
    framer = MllpFramer(1024)
    events, _ = framer.feed(b"\x0b" + b"A" * 600)
    assert events == []
    events, _ = framer.feed(b"B" * 600)
    assert events == [Oversize(b"A" * 600 + b"B" * 424)]
    complete, _ = MllpFramer(1024).feed(mllp_wrap(b"C" * 1025))
    assert complete == [Oversize(b"C" * 1024)]
    exact, _ = MllpFramer(1024).feed(mllp_wrap(b"D" * 1024))
    assert exact == [Frame(b"D" * 1024)]


def test_discarded_bytes_are_kept_until_a_frame_completes() -> None:
    framer = MllpFramer(1024, keep_discarded=8)
    _, dropped = framer.feed(b"0123456789")
    assert dropped == 10
    assert (framer.discarded_bytes, bytes(framer.discarded)) == (10, b"01234567")
    _, dropped = framer.feed(b"\x0bMSH|lost\x0b")  # an abandoned frame counts as discarded
    assert dropped == len(b"\x0bMSH|lost")
    assert framer.discarded_bytes == 10 + len(b"\x0bMSH|lost")
    events, _ = framer.feed(b"MSH|kept\x1c\r")
    assert events == [Frame(b"MSH|kept")]
    assert (framer.discarded_bytes, bytes(framer.discarded)) == (0, b"")


def test_message_size_limit_cannot_pass_the_kafka_record_limit() -> None:
    assert config().max_message_bytes == MAX_RECORD_BYTES
    assert config(max_message_bytes=MAX_RECORD_BYTES).max_message_bytes == MAX_RECORD_BYTES
    with pytest.raises(ValidationError, match="max_message_bytes"):
        config(max_message_bytes=1_048_576)


# --- deciding and acknowledging (pure) ------------------------------------------------------


def test_accepted_message_keeps_its_lineage() -> None:
    verdict = inspect_message(oru("LAB-7"), config())
    assert not isinstance(verdict, Rejected)
    assert verdict.control_id == "LAB-7"
    assert verdict.message_type == "ORU^R01"
    assert verdict.sending_application == "LIS"
    assert verdict.organisation_id == "H001"
    assert verdict.duplicate_key == duplicate_key("LIS", "H001", "LAB-7")
    assert verdict.partition_key == f"H001:{MRN}"


def lab(application: str, control_id: str, value: str, status: str,
        facility: str = "LAB-EAST") -> str:
    """An ORU^R01 with one potassium result from ``application`` at ``facility``."""
    return (
        oru(control_id, facility=facility)
        .replace("|LIS|", f"|{application}|", 1)
        .replace("||4.1|mmol/L|3.5-5.3|N|||F", f"||{value}|mmol/L|3.5-5.3|N|||{status}")
    )


def test_the_duplicate_key_is_the_sender_the_pipeline_sees() -> None:
    """Review finding H3: the key took MSH-3 and MSH-4 as sent, so "LIS-A^x" was another
    sender than "LIS-A" to the collector but the same one (component 1) downstream."""
    mapped = config(facilities={"LAB-EAST": "H001", "LAB-NORTH": "H001", "LAB-WEST": "H002"})

    def key(text: str) -> str:
        verdict = inspect_message(text, mapped)
        assert isinstance(verdict, Accepted), verdict
        return verdict.duplicate_key

    plain = key(lab("LIS-A", "CTL-1", "4.1", "F"))
    assert plain == duplicate_key("LIS-A", "H001", "CTL-1")
    assert key(lab("LIS-A^x", "CTL-1", "7.9", "C")) == plain
    assert key(lab(" LIS-A ^x~LIS-Z", "CTL-1", "4.1", "F")) == plain
    assert key(lab("LIS-A", "CTL-1", "4.1", "F", facility="LAB-EAST^x")) == plain
    # Two facilities of one organisation: one event id downstream, so one key.
    assert key(lab("LIS-A", "CTL-1", "4.1", "F", facility="LAB-NORTH")) == plain
    assert key(lab("LIS-A", "CTL-1", "4.1", "F", facility="LAB-WEST")) != plain
    assert key(lab("EVIL", "CTL-1", "4.1", "F")) != plain
    # No MSH-3: the configured source_system is the sender, as in the raw record.
    assert key(lab("", "CTL-1", "4.1", "F")) == duplicate_key("lis-mllp", "H001", "CTL-1")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hello, this is not HL7", ("AR", "not_hl7", "100")),
        ("", ("AR", "not_hl7", "100")),
        (
            oru().replace("ORU^R01^ORU_R01", "ORM^O01^ORM_O01"),
            ("AE", "unsupported_message_type", "200"),
        ),
        (oru().replace("ORU^R01^ORU_R01", "ORU^R30"), ("AE", "unsupported_message_type", "201")),
        (oru().replace("|LAB-0001|", "||"), ("AE", "missing_control_id", "101")),
        (without(oru(), "PID"), ("AE", "missing_segment", "100")),
        (without(adt(), "PV1"), ("AE", "missing_segment", "100")),
        (oru() + oru("LAB-0002"), ("AE", "multiple_messages", "100")),
    ],
)
def test_rejections(text: str, expected: tuple[str, str, str]) -> None:
    verdict = inspect_message(text, config())
    assert isinstance(verdict, Rejected)
    assert (verdict.ack_code, verdict.reason_code, verdict.error_code) == expected
    assert MRN not in verdict.reason and "TESTPATIENT" not in verdict.reason


@pytest.mark.parametrize(
    ("obx", "expected"),
    [
        (
            "OBX|1|NM|K^Potassium^L||abc|mmol/L|3.5-5.3|N|||F",
            ("102", "OBX^1^5", "OBX[0]: OBX-5 value is text of 3 characters, not a number, but "
             "OBX-2 value type is NM"),
        ),
        (
            "OBX|1|NM|K^Potassium^L||1,000|mmol/L|3.5-5.3|N|||F",
            ("102", "OBX^1^5", "OBX[0]: OBX-5 value is ambiguous: a number with one comma "
             "followed by three digits is ambiguous (decimal comma or thousands separator); "
             "send it with a decimal point"),
        ),
        (
            "OBX|1|NM|^Potassium^L||4.1|mmol/L|3.5-5.3|N|||F",
            ("101", "OBX^1^3", "OBX[0]: OBX-3 observation identifier is empty"),
        ),
        (  # review of issue 15: these were answered AA and dead-lettered downstream
            "OBX|1|NM|&K^Potassium^L||4.1|mmol/L|3.5-5.3|N|||F",
            ("101", "OBX^1^3", "OBX[0]: OBX-3 observation identifier is empty"),
        ),
        (
            "OBX|1|NM|K^Potassium^L||7.9|mmol/L|3.5-5.3|HH|||F|||2026-12-07T08:00:00",
            ("102", "OBX^1^14", "OBX[0]: OBX-14 is not an HL7 timestamp (value is text of 19 "
             "characters)"),
        ),
        (
            "OBX|1|NM|K^Potassium^L||7.9|mmol/L|3.5-5.3|HH|||F|||20261399",
            ("102", "OBX^1^14", "OBX[0]: OBX-14 is not an HL7 timestamp (value is a number)"),
        ),
    ],
)
def test_an_observation_the_pipeline_would_reject_is_answered_ae(
    obx: str, expected: tuple[str, str, str]
) -> None:
    """Issue 15: such a message was answered AA, then dead-lettered downstream unseen."""
    potassium = "OBX|1|NM|K^Potassium^L||4.1|mmol/L|3.5-5.3|N|||F"
    rejected = inspect_message(oru().replace(potassium, obx), config())
    assert isinstance(rejected, Rejected)
    assert (rejected.ack_code, rejected.reason_code) == ("AE", "invalid_record")
    assert (rejected.error_code, rejected.location, rejected.reason) == expected
    assert "abc" not in rejected.reason  # a value is described, never echoed


def test_an_observation_time_is_taken_from_the_order_then_the_header_as_the_stage_does() -> None:
    bad_order = oru().replace("|||20261103080000+0800", "|||yesterday")
    rejected = inspect_message(bad_order, config())
    assert isinstance(rejected, Rejected)
    assert (rejected.location, rejected.reason) == (
        "OBR^1^7", "OBX[0]: OBR-7 is not an HL7 timestamp (value is text of 9 characters)"
    )
    no_times = oru().replace("|||20261103080000+0800", "").replace("|20261103081500+0800|", "||")
    rejected = inspect_message(no_times, config())
    assert isinstance(rejected, Rejected)
    assert rejected.reason == "OBX[0]: no observation time: OBX-14, OBR-7 and MSH-7 are all empty"
    # OBX-14 first: a good one makes a bad OBR-7 irrelevant, as in the normalise stage.
    own_time = bad_order.replace("|N|||F", "|N|||F|||20261103080000+0800")
    assert isinstance(inspect_message(own_time, config()), Accepted)


@pytest.mark.parametrize("value", ["7,5", "<2,0", ">=7", "=5", "4.1"])
def test_readable_numbers_are_accepted(value: str) -> None:
    text = oru().replace("||4.1|", f"||{value}|")
    assert isinstance(inspect_message(text, config()), Accepted)


def test_facility_map_resolves_the_organisation_and_rejects_others() -> None:
    mapped = config(facilities={"FAC1": "H001", "FAC2": "H002"})
    accepted = inspect_message(oru(facility="FAC2"), mapped)
    assert not isinstance(accepted, Rejected)
    assert accepted.organisation_id == "H002"
    rejected = inspect_message(oru(facility="FAC9"), mapped)
    assert isinstance(rejected, Rejected)
    assert (rejected.ack_code, rejected.reason_code) == ("AE", "unknown_facility")
    assert rejected.reason == "sending facility FAC9 (MSH-4) is not configured for this collector"


def test_message_types_can_be_narrowed_but_not_extended() -> None:
    narrow = config(message_types=["ORU^R01"])
    verdict = inspect_message(adt(), narrow)
    assert isinstance(verdict, Rejected) and verdict.reason_code == "unsupported_message_type"
    with pytest.raises(ValueError, match="unsupported message types ORM\\^O01"):
        config(message_types=["ORU^R01", "ORM^O01"])
    with pytest.raises(ValueError, match="unknown character encoding"):
        config(encoding="klingon")


def test_aa_swaps_sender_and_receiver_and_keeps_version() -> None:
    header = read_header(oru("LAB-9", version="2.3.1"))
    ack = build_ack(
        "AA", header, application="MEDSTREAM", facility="H001", control_id="ACK1",
        now_ms=1_793_700_000_000,
    )  # fmt: skip
    msh, msa = ack.rstrip("\r").split("\r")
    assert msh == (
        "MSH|^~\\&|MEDSTREAM|REGION|LIS|FAC1|20261103100000+0000||ACK^R01^ACK|ACK1|P|2.3.1"
    )
    assert msa == "MSA|AA|LAB-9"


def test_ae_carries_msa_3_and_err_in_the_received_version() -> None:
    text = oru("LAB-5").replace("ORU^R01^ORU_R01", "ORM^O01^ORM_O01")
    rejected = inspect_message(text, config())
    assert isinstance(rejected, Rejected)
    ack = build_ack(
        "AE", read_header(text), application="MEDSTREAM", facility="H001", control_id="A2",
        now_ms=0, rejected=rejected,
    )  # fmt: skip
    segments = ack.rstrip("\r").split("\r")
    assert segments[1].startswith("MSA|AE|LAB-5|message type ORM\\S\\O01 is not accepted")
    assert segments[2] == (
        "ERR||MSH^1^9|200^Unsupported message type^HL70357|E||||"
        "message type ORM\\S\\O01 is not accepted (accepted: ADT\\S\\A01, ADT\\S\\A02, "
        "ADT\\S\\A03, ADT\\S\\A04, ADT\\S\\A08, ORU\\S\\R01)"
    )
    old = text.replace("|2.5.1", "|2.3")
    ack_23 = build_ack(
        "AE", read_header(old), application="M", facility="H", control_id="A3", now_ms=0,
        rejected=rejected,
    )  # fmt: skip
    assert ack_23.rstrip("\r").split("\r")[2] == "ERR|MSH^1^9^200&Unsupported message type&HL70357"


def test_ar_without_a_header_is_still_a_valid_ack() -> None:
    rejected = inspect_message("garbage", config())
    assert isinstance(rejected, Rejected)
    ack = build_ack(
        "AR", None, application="MEDSTREAM", facility="H001", control_id="A4", now_ms=0,
        rejected=rejected,
    )  # fmt: skip
    msh, msa, err = ack.rstrip("\r").split("\r")
    assert msh == "MSH|^~\\&|MEDSTREAM|H001|||19700101000000+0000||ACK|A4|P|2.5.1"
    assert msa == "MSA|AR||frame does not start with an MSH segment"
    assert err.startswith("ERR||MSH|100^Segment sequence error^HL70357|E|")


def test_msh_18_selects_the_character_set() -> None:
    text = oru().replace("|P|2.5.1", "|P|2.5.1||||||8859/1")
    assert message_encoding(text.encode("latin-1"), "utf-8") == "latin-1"
    assert message_encoding(oru().encode(), "gb18030") == "gb18030"


# --- the listener on real sockets and the real broker ---------------------------------------


class Running:
    """A collector serving in a background thread of the test process."""

    def __init__(self, collector: Hl7MllpProducer, kafka: KafkaSettings) -> None:
        self.collector = collector
        self.kafka = kafka
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert collector.listening.wait(15), "collector did not start listening"
        assert collector.port is not None
        self.port = collector.port

    def _run(self) -> None:
        try:
            self.collector.run(self.stop)
        except BaseException as exc:  # surfaced by close()
            self.errors.append(exc)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(40)
        assert not self.thread.is_alive()
        assert not self.errors, self.errors


@pytest.fixture
def serve(
    kafka_factory: Callable[..., KafkaSettings], tmp_path: Path
) -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def start(
        kafka: KafkaSettings | None = None, producer: Any = None, **overrides: Any
    ) -> Running:
        settings = kafka or kafka_factory()
        overrides.setdefault("state_dir", tmp_path / "state")
        collector = Hl7MllpProducer(
            config(**overrides), settings, ManifestRegistry(), producer=producer
        )
        running = Running(collector, settings)
        started.append(running)
        return running

    yield start
    for running in started:
        if running.thread.is_alive():
            running.close()


class Client:
    """A blocking MLLP sender on a real TCP socket."""

    def __init__(self, port: int, timeout: float = 15.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.framer = MllpFramer(1 << 20)
        self.pending: list[bytes] = []

    def send(self, message: str | bytes) -> None:
        data = message.encode() if isinstance(message, str) else message
        self.sock.sendall(mllp_wrap(data))

    def raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def ack(self) -> str:
        while not self.pending:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("connection closed before an ACK arrived")
            events, _ = self.framer.feed(data)
            self.pending.extend(e.content for e in events if isinstance(e, Frame))
        return self.pending.pop(0).decode()

    def closed_by_server(self, within: float) -> bool:
        self.sock.settimeout(within)
        try:
            return self.sock.recv(65536) == b""
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def msa(ack: str) -> list[str]:
    [segment] = [s for s in ack.split("\r") if s.startswith("MSA|")]
    return segment.split("|")


def err(ack: str) -> str:
    return next(s for s in ack.split("\r") if s.startswith("ERR|"))


def raw_records(kafka: KafkaSettings, expected: int, timeout_s: float = 15.0) -> list[Published]:
    return consume(kafka, [raw_topic("hl7_lab")], expected, timeout_s)


def dead_letters(kafka: KafkaSettings, expected: int, timeout_s: float = 15.0) -> list[Published]:
    return consume(kafka, [DLQ], expected, timeout_s)


@pytest.mark.integration
def test_aa_after_the_record_is_on_the_broker(serve: Callable[..., Running]) -> None:
    running = serve(source_system="lis-mllp")
    read_before = labelled(COLLECTOR_READ, "lab-mllp")._value.get()
    assert labelled(READY, "collector-lab-mllp")._value.get() == 1
    client = Client(running.port)
    client.send(oru("LAB-1001"))
    ack = client.ack()
    # The ACK came back: the record must already be readable from the broker.
    [record] = raw_records(running.kafka, 1, timeout_s=5)
    assert msa(ack) == ["MSA", "AA", "LAB-1001"]
    assert ack.startswith("MSH|^~\\&|MEDSTREAM|REGION|LIS|FAC1|")
    value = record.value
    assert value["message_control_id"] == "LAB-1001"
    assert (value["organisation_id"], value["source_system"]) == ("H001", "LIS")
    assert value["message_type"] == "ORU^R01"
    assert value["payload"] == oru("LAB-1001")
    assert record.key == f"H001:{MRN}".encode()
    assert record.headers[COLLECTOR_HEADER] == b"lab-mllp"
    assert labelled(COLLECTOR_READ, "lab-mllp")._value.get() == read_before + 1
    client.close()
    running.close()
    assert labelled(READY, "collector-lab-mllp")._value.get() == 0


@pytest.mark.integration
def test_no_ack_while_the_broker_cannot_take_the_message(serve: Callable[..., Running]) -> None:
    # A real producer pointed at a port where no broker listens: delivery times out.
    unreachable = KafkaSettings(bootstrap_servers="127.0.0.1:1", topic_prefix="nowhere.")
    producer = Producer(unreachable.producer_config(**{"message.timeout.ms": 2000}))
    running = serve(kafka=unreachable, producer=producer)
    client = Client(running.port)
    client.send(oru("LAB-2001"))
    # No ACK at all (the sender keeps the message and resends); the connection is closed.
    assert client.closed_by_server(within=15)
    client.close()


@pytest.mark.integration
def test_ae_and_ar_are_dead_lettered(serve: Callable[..., Running]) -> None:
    running = serve()
    failed_before = labelled(COLLECTOR_FAILED, "lab-mllp", "not_hl7")._value.get()
    client = Client(running.port)
    unsupported = oru("ORM-1").replace("ORU^R01^ORU_R01", "ORM^O01^ORM_O01")
    client.send(unsupported)
    ae = client.ack()
    client.send(b"this is not an HL7 message")
    ar = client.ack()
    no_pid = without(oru("LAB-3003"), "PID")
    client.send(no_pid)
    ae_pid = client.ack()
    assert msa(ae)[:3] == ["MSA", "AE", "ORM-1"]
    assert err(ae).startswith("ERR||MSH^1^9|200^Unsupported message type^HL70357|E|")
    assert msa(ar) == ["MSA", "AR", "", "frame does not start with an MSH segment"]
    assert msa(ae_pid) == ["MSA", "AE", "LAB-3003", "ORU\\S\\R01 message has no PID segment"]
    order = ["unsupported_message_type", "not_hl7", "missing_segment"]
    dead = sorted(
        dead_letters(running.kafka, 3), key=lambda r: order.index(r.value["reason_code"])
    )
    assert [d.value["reason_code"] for d in dead] == order
    assert [d.value["original_value"] for d in dead] == [
        unsupported.encode(),
        b"this is not an HL7 message",
        no_pid.encode(),
    ]
    assert all(d.value["stage"] == "producer" for d in dead)
    assert all(d.value["original_topic"] == "collector/lab-mllp" for d in dead)
    assert all(d.value["organisation_id"] == "H001" for d in dead)
    assert dead[2].value["reason"] == "ORU^R01 message has no PID segment"
    assert labelled(COLLECTOR_FAILED, "lab-mllp", "not_hl7")._value.get() == failed_before + 1
    assert raw_records(running.kafka, 0, timeout_s=2) == []
    client.close()


@pytest.mark.integration
def test_a_comma_decimal_is_accepted_and_unreadable_numbers_are_answered_ae(
    serve: Callable[..., Running],
) -> None:
    """Issue 15 over a real MLLP socket: "7,5" is a number (AA, published); "1,000" is
    ambiguous and "abc" is text, so the sender hears AE at once and nothing is published."""
    running = serve()
    client = Client(running.port)
    comma = oru("LAB-7001").replace("||4.1|", "||7,5|")
    ambiguous = oru("LAB-7002").replace("||4.1|", "||1,000|")
    text = oru("LAB-7003").replace("||4.1|", "||abc|")
    answers = []
    for message in (comma, ambiguous, text):
        client.send(message)
        answers.append(client.ack())
    assert [msa(a)[1:3] for a in answers] == [
        ["AA", "LAB-7001"], ["AE", "LAB-7002"], ["AE", "LAB-7003"]
    ]
    assert err(answers[1]).startswith("ERR||OBX^1^5|102^Data type error^HL70357|E|")
    [published] = raw_records(running.kafka, 1)
    assert "||7,5|" in published.value["payload"]
    dead = dead_letters(running.kafka, 2)
    assert sorted(d.value["original_value"] for d in dead) == sorted(
        [ambiguous.encode(), text.encode()]
    )
    assert {d.value["reason_code"] for d in dead} == {"invalid_record"}
    client.close()


@pytest.mark.integration
def test_facility_map(serve: Callable[..., Running]) -> None:
    running = serve(facilities={"FAC1": "H001", "FAC2": "H002"})
    client = Client(running.port)
    client.send(oru("LAB-4001", facility="FAC2"))
    assert msa(client.ack()) == ["MSA", "AA", "LAB-4001"]
    client.send(oru("LAB-4002", facility="ELSEWHERE"))
    rejected = client.ack()
    assert msa(rejected)[:3] == ["MSA", "AE", "LAB-4002"]
    assert "103^Table value not found^HL70357" in err(rejected)
    [record] = raw_records(running.kafka, 1)
    assert record.value["organisation_id"] == "H002"
    [dead] = dead_letters(running.kafka, 1)
    assert dead.value["reason_code"] == "unknown_facility"
    client.close()


@pytest.mark.integration
def test_duplicate_resend_is_acknowledged_and_published_once(
    serve: Callable[..., Running],
) -> None:
    running = serve(facilities={"FAC1": "H001", "FAC2": "H002"})
    first = Client(running.port)
    first.send(oru("LAB-5001"))
    assert msa(first.ack())[1] == "AA"
    first.send(oru("LAB-5001"))  # resend on the same connection
    assert msa(first.ack()) == ["MSA", "AA", "LAB-5001"]
    first.close()
    second = Client(running.port)
    second.send(oru("LAB-5001"))  # and on a new one
    assert msa(second.ack())[1] == "AA"
    # The same control id for a different message is an error, not a silent drop.
    changed = oru("LAB-5001").replace("||4.1|", "||4.4|")
    second.send(changed)
    reused = second.ack()
    assert msa(reused)[1] == "AE"
    assert "205^Duplicate key identifier^HL70357" in err(reused)
    # The same control id from a facility of another organisation is another message.
    second.send(oru("LAB-5001", facility="FAC2"))
    assert msa(second.ack())[1] == "AA"
    second.close()
    records = raw_records(running.kafka, 2)
    assert sorted(r.value["payload"].split("|")[3] for r in records) == ["FAC1", "FAC2"]
    [dead] = dead_letters(running.kafka, 1)
    assert dead.value["reason_code"] == "duplicate_control_id"


@pytest.mark.integration
def test_a_correction_under_another_spelling_of_the_sender_is_refused(
    serve: Callable[..., Running], clickhouse: ClickHouseClient, database: str
) -> None:
    """Review finding H3, the reviewer's repro: resends of acknowledged control ids with a
    correction (OBX-11 C) and another value, the sender spelt "LIS-A^x" or the facility
    "LAB-EAST^x", were answered AA and replaced the stored results without a report. They
    are the same sender downstream, so they are refused AE; another sender (EVIL) is a
    message of its own: published, and reconcile names it a foreign update."""
    from medstream.clickhouse import PROOF_MAX_ROWS, QueryResult, run_read_only
    from medstream.reconcile import reconcile
    from streams.model import NormalisedEvent, RawContext
    from streams.normalise import normalise
    from streams.pseudonym import Pseudonymiser
    from streams.terminology import load_terminology
    from tests.sinks.test_clickhouse import REGISTRY, make_sink, produce, running
    from tests.waiting import wait_for

    running_collector = serve(facilities={"LAB-EAST": "H001"})
    client = Client(running_collector.port)
    originals = [
        lab("LIS-A", "CTL-1", "4.1", "F"),
        lab("LIS-B", "CTL-2", "4.0", "F"),
        lab("LIS-C", "CTL-3", "4.2", "F"),
    ]
    for text in originals:
        client.send(text)
        assert msa(client.ack())[1] == "AA"
    failed = labelled(COLLECTOR_FAILED, "lab-mllp", "duplicate_control_id")
    failed_before = failed._value.get()
    same_sender = [
        lab("LIS-A^x", "CTL-1", "7.9", "C"),
        lab("LIS-C", "CTL-3", "8.1", "C", facility="LAB-EAST^x"),
    ]
    answers = []
    for text in same_sender:
        client.send(text)
        answers.append(client.ack())
    assert [msa(a)[1:3] for a in answers] == [["AE", "CTL-1"], ["AE", "CTL-3"]]
    assert all("205^Duplicate key identifier^HL70357" in err(a) for a in answers)
    assert failed._value.get() == failed_before + 2
    client.send(lab("LIS-A^x", "CTL-1", "4.1", "F"))  # a plain resend, spelt otherwise
    assert msa(client.ack())[1:3] == ["AA", "CTL-1"]
    foreign = lab("EVIL", "CTL-2", "8.0", "C")
    client.send(foreign)
    assert msa(client.ack())[1:3] == ["AA", "CTL-2"]
    client.close()
    dead = dead_letters(running_collector.kafka, 2)
    assert sorted(d.value["original_value"] for d in dead) == sorted(
        t.encode() for t in same_sender
    )
    assert {d.value["reason_code"] for d in dead} == {"duplicate_control_id"}
    records = raw_records(running_collector.kafka, 4)
    assert sorted((r.value["source_system"], r.value["message_control_id"]) for r in records) == [
        ("EVIL", "CTL-2"), ("LIS-A", "CTL-1"), ("LIS-B", "CTL-2"), ("LIS-C", "CTL-3")
    ]

    # What the stored results and reconcile say: each raw record normalised as the worker
    # does, then stored by the real sink.
    kafka = running_collector.kafka
    terminology = load_terminology()
    pseudonymiser = Pseudonymiser(b"test-only-pseudonym-key-0123456789")
    encode = serde.AvroSerializer(REGISTRY, serde.LAB_RESULT)
    events: list[tuple[str, bytes | None, bytes]] = []
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        received = record.value["received_time"]
        ctx = RawContext(record.topic, record.partition, record.offset, received)
        for outcome in normalise("hl7_lab", record.value, ctx, terminology, pseudonymiser,
                                 received):
            assert isinstance(outcome, NormalisedEvent) and outcome.kind == "lab_result"
            events.append((kafka.topic(NORM_TOPICS["lab_result"]), outcome.key.encode(),
                           encode(outcome.value)))
    assert len(events) == 4
    produce(kafka, events)
    with running(make_sink(kafka, clickhouse, database, "sink-mllp-h3")):
        wait_for(lambda: int(clickhouse.query(
            f"SELECT count() FROM {database}.lineage WHERE outcome = 'stored:lab_result'"
        ).result_rows[0][0]) == 4, what="the four results in lineage")
        # The two refusals reached the dead-letter table too (the sink reads the topic).
        wait_for(lambda: int(clickhouse.query(
            f"SELECT count() FROM {database}.dead_letter WHERE reason_code = "
            "'duplicate_control_id'").result_rows[0][0]) == 2, what="the two dead letters")
    stored = clickhouse.query(
        f"SELECT source_ref, value, result_status FROM {database}.lab_result FINAL "
        "ORDER BY source_ref"
    ).result_rows
    assert stored == [("CTL-1", 4.1, "F"), ("CTL-2", 8.0, "C"), ("CTL-3", 4.2, "F")]

    def query(sql: str) -> QueryResult:
        return run_read_only(clickhouse, sql, database, max_rows=PROOF_MAX_ROWS)

    now = datetime.now(UTC)
    report = reconcile(query, database, now - timedelta(hours=1), now + timedelta(hours=1))
    [foreign_id] = report.foreign_update_examples
    assert (report.foreign_updates, report.conflicts) == (1, 0)
    assert foreign_id == clickhouse.query(
        f"SELECT event_id FROM {database}.lineage WHERE sender = 'EVIL'"
    ).result_rows[0][0]


def test_keys_of_older_versions_are_read_as_the_sender_key() -> None:
    mapped = config(facilities={"LAB-EAST": "H001"})
    assert legacy_duplicate_key("LIS-A^x\x1fLAB-EAST^y\x1fCTL-1", mapped) == duplicate_key(
        "LIS-A", "H001", "CTL-1"
    )
    assert legacy_duplicate_key("\x1fLAB-EAST\x1fCTL-1", mapped) == duplicate_key(
        "lis-mllp", "H001", "CTL-1"
    )
    assert legacy_duplicate_key("LIS-A\x1fLAB-GONE\x1fCTL-1", mapped) is None
    assert legacy_duplicate_key("not a key", mapped) is None
    assert legacy_duplicate_key("LIS-A\x1fANY\x1fCTL-1", config()) == duplicate_key(
        "LIS-A", "H001", "CTL-1"
    )


@pytest.mark.integration
def test_control_ids_acknowledged_by_an_older_version_stay_known(
    serve: Callable[..., Running], tmp_path: Path
) -> None:
    """A state file of a version that keyed MSH-3 and MSH-4 as sent: its control ids are
    carried over at start, so neither a plain resend nor a changed one spelt otherwise
    is published."""
    original = lab("LIS-A", "CTL-1", "4.1", "F")
    accepted = inspect_message(original, config(facilities={"LAB-EAST": "H001"}))
    assert isinstance(accepted, Accepted)
    old = CollectorState(tmp_path / "state" / "state.sqlite")
    old.remember("mllp.acked", "LIS-A\x1fLAB-EAST\x1fCTL-1", accepted.content_digest)
    old.remember("mllp.acked", "LIS-A^x\x1fLAB-EAST\x1fCTL-1", "another digest")  # later
    old.close()
    running = serve(facilities={"LAB-EAST": "H001"})
    client = Client(running.port)
    client.send(original)
    assert msa(client.ack())[1:3] == ["AA", "CTL-1"]
    client.send(lab("LIS-A^x", "CTL-1", "7.9", "C"))
    assert msa(client.ack())[1:3] == ["AE", "CTL-1"]
    client.close()
    assert raw_records(running.kafka, 0, timeout_s=2) == []
    [dead] = dead_letters(running.kafka, 1)
    assert dead.value["reason_code"] == "duplicate_control_id"
    running.close()
    state = CollectorState(tmp_path / "state" / "state.sqlite")
    try:
        assert state.seen("mllp.acked", "LIS-A\x1fLAB-EAST\x1fCTL-1") is None
        assert state.seen("mllp.acknowledged", duplicate_key("LIS-A", "H001", "CTL-1")) == (
            accepted.content_digest
        )
    finally:
        state.close()


@pytest.mark.integration
def test_a_flood_of_garbage_from_one_peer_is_answered_but_dead_lettered_within_budget(
    serve: Callable[..., Running],
) -> None:
    """Review finding M1: 300 distinct non-HL7 frames gave 300 dead letters with their
    payloads. Per peer host and reason, the first ``in_full`` refusals are dead-lettered;
    the rest are answered AR the same, counted, and summarised in one dead letter."""
    running = serve()
    running.collector._refusals = RefusalBudget(in_full=3, window_s=600.0)
    not_hl7 = labelled(COLLECTOR_FAILED, "lab-mllp", "not_hl7")
    before = not_hl7._value.get()
    frames = [f"NOT HL7 {i:03d} ".encode() * 2000 for i in range(30)]  # 26 KB each
    answers = []
    # Two connections of one host: a reconnect does not renew the budget.
    for half in (frames[:15], frames[15:]):
        client = Client(running.port)
        for frame in half:
            client.send(frame)
            answers.append(client.ack())
        client.close()
    assert [msa(a)[1:4] for a in answers] == [
        ["AR", "", "frame does not start with an MSH segment"]
    ] * 30
    assert not_hl7._value.get() == before + 30
    accepted = Client(running.port)  # an accepted message is never held back
    accepted.send(oru("LAB-7501"))
    assert msa(accepted.ack())[1:3] == ["AA", "LAB-7501"]
    accepted.close()
    [published] = raw_records(running.kafka, 1)
    assert published.value["message_control_id"] == "LAB-7501"
    running.close()  # the summary of the open window is written at stop
    dead = dead_letters(running.kafka, 4)
    assert len(dead) == 4
    in_full = [d for d in dead if d.value["original_value"]]
    assert sorted(d.value["original_value"] for d in in_full) == frames[:3]
    [summary] = [d for d in dead if not d.value["original_value"]]
    assert summary.value["reason_code"] == "not_hl7"
    assert summary.value["original_key"] == b"127.0.0.1"
    assert summary.value["organisation_id"] == "H001"
    assert summary.value["reason"].startswith("27 more refusals (not_hl7) of this sender ")
    assert not_hl7._value.get() == before + 30  # the summary is not counted again


@pytest.mark.integration
def test_held_refusals_are_summarised_once_their_window_closes(
    serve: Callable[..., Running],
) -> None:
    running = serve()
    running.collector._refusals = RefusalBudget(in_full=2, window_s=5.0)
    client = Client(running.port)
    for i in range(5):
        client.send(f"garbage {i}".encode())
        assert msa(client.ack())[1] == "AR"
    client.close()
    # Written by the running collector, not only at stop.
    dead = dead_letters(running.kafka, 3)
    assert sorted(d.value["original_value"] for d in dead) == [b"", b"garbage 0", b"garbage 1"]
    [summary] = [d for d in dead if not d.value["original_value"]]
    assert summary.value["reason"].startswith("3 more refusals (not_hl7) of this sender ")
    running.close()
    assert len(dead_letters(running.kafka, 3, timeout_s=3)) == 3


@pytest.mark.integration
def test_two_messages_in_one_write_and_one_message_across_writes(
    serve: Callable[..., Running],
) -> None:
    running = serve()
    client = Client(running.port)
    client.raw(mllp_wrap(oru("LAB-6001").encode()) + mllp_wrap(adt("A01", "ADT-6002").encode()))
    assert [msa(client.ack())[2], msa(client.ack())[2]] == ["LAB-6001", "ADT-6002"]
    framed = b"junk before" + mllp_wrap(oru("LAB-6003").encode())
    for start in range(0, len(framed), 40):
        client.raw(framed[start : start + 40])
        time.sleep(0.05)
    assert msa(client.ack())[1:3] == ["AA", "LAB-6003"]
    records = raw_records(running.kafka, 3)
    assert sorted(r.value["message_control_id"] for r in records) == [
        "ADT-6002",
        "LAB-6001",
        "LAB-6003",
    ]
    adt_record = next(r for r in records if r.value["message_control_id"] == "ADT-6002")
    assert adt_record.value["message_type"] == "ADT^A01"
    assert adt_record.value["source_system"] == "HIS"
    client.close()


@pytest.mark.integration
def test_oversize_frame_is_rejected_and_closed(serve: Callable[..., Running]) -> None:
    running = serve(max_message_bytes=2048)
    client = Client(running.port)
    big = oru("LAB-7001") + "NTE|1||" + "x" * 5000 + "\r"
    client.send(big)
    ack = client.ack()
    assert msa(ack)[:3] == ["MSA", "AR", "LAB-7001"]
    assert "larger than 2048 bytes" in msa(ack)[3]
    assert client.closed_by_server(within=5)
    [dead] = dead_letters(running.kafka, 1)
    assert dead.value["reason_code"] == "oversize"
    assert dead.value["original_value"] == big.encode()[:2048]
    assert raw_records(running.kafka, 0, timeout_s=2) == []
    client.close()


@pytest.mark.integration
def test_message_too_large_for_a_kafka_record_is_answered_ar_and_dead_lettered(
    serve: Callable[..., Running],
) -> None:
    # 600 000 Latin-1 bytes pass max_message_bytes, but as UTF-8 in the record they are
    # twice that: more than Kafka takes. Retrying cannot help, so: AR and a dead letter.
    running = serve()
    client = Client(running.port, timeout=30)
    text = oru("LAB-7101").replace("|P|2.5.1", "|P|2.5.1||||||8859/1")
    big = (text + "NTE|1||" + "\u00e9" * 600_000 + "\r").encode("latin-1")
    client.send(big)
    ack = client.ack()
    assert msa(ack)[:3] == ["MSA", "AR", "LAB-7101"]
    assert "Kafka record" in msa(ack)[3]
    [dead] = dead_letters(running.kafka, 1, timeout_s=10)
    assert dead.value["reason_code"] == "oversize"
    assert dead.value["original_value"] == big[:MAX_DEAD_LETTER_BYTES]
    # The connection is still usable: the framing was intact.
    client.send(oru("LAB-7102"))
    assert msa(client.ack())[:3] == ["MSA", "AA", "LAB-7102"]
    [record] = raw_records(running.kafka, 1, timeout_s=5)
    assert record.value["message_control_id"] == "LAB-7102"
    client.close()


@pytest.mark.integration
def test_unframed_bytes_are_counted_then_answered_ar_dead_lettered_and_closed(
    serve: Callable[..., Running],
) -> None:
    running = serve()
    unframed = labelled(COLLECTOR_FAILED, "lab-mllp", "unframed")
    before = unframed._value.get()
    client = Client(running.port)
    client.raw(b"GET / HTTP/1.1\r\n")  # a little junk: counted, connection kept
    time.sleep(0.2)
    client.send(oru("LAB-7201"))
    assert msa(client.ack())[1] == "AA"
    assert unframed._value.get() >= before + 1
    junk = bytes(range(33, 127)) * 60  # 5640 bytes, no start block
    client.raw(junk)
    ack = client.ack()
    assert msa(ack)[:2] == ["MSA", "AR"]
    assert "outside an MLLP frame" in msa(ack)[3]
    assert client.closed_by_server(within=5)
    [dead] = dead_letters(running.kafka, 1)
    assert dead.value["reason_code"] == "unframed"
    assert dead.value["original_value"] == junk[:MAX_UNFRAMED_BYTES]
    client.close()


@pytest.mark.integration
def test_an_unexpected_error_is_answered_ar_and_dead_lettered(
    serve: Callable[..., Running], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(text: str, _config: MllpConfig) -> Accepted | Rejected:
        if "LAB-7301" in text:
            raise RecursionError("maximum recursion depth exceeded")
        return inspect_message(text, _config)

    monkeypatch.setattr("producers.hl7_mllp.inspect_message", broken)
    running = serve()
    client = Client(running.port)
    client.send(oru("LAB-7301"))
    ack = client.ack()
    assert msa(ack)[:3] == ["MSA", "AR", "LAB-7301"]
    assert "207^Application internal error^HL70357" in err(ack)
    [dead] = dead_letters(running.kafka, 1)
    assert dead.value["reason_code"] == "internal_error"
    assert dead.value["original_value"] == oru("LAB-7301").encode()
    client.send(oru("LAB-7302"))  # the connection and the listener live on
    assert msa(client.ack())[:3] == ["MSA", "AA", "LAB-7302"]
    client.close()


class _SlowLookupState(CollectorState):
    """Collector state whose duplicate lookup takes a while (a busy disk)."""

    def seen(self, namespace: str, key: str) -> str | None:
        time.sleep(0.2)
        return super().seen(namespace, key)


class _RecordingPublisher:
    def __init__(self) -> None:
        self.published: list[dict[str, Any]] = []

    async def publish(self, _key: str, record: dict[str, Any]) -> None:
        await asyncio.sleep(0.01)
        self.published.append(record)


def test_copies_on_two_connections_are_published_once_while_the_lookup_is_slow(
    tmp_path: Path,
) -> None:
    kafka = KafkaSettings(bootstrap_servers="127.0.0.1:1")
    collector = Hl7MllpProducer(config(state_dir=tmp_path), kafka, ManifestRegistry())
    publisher = _RecordingPublisher()
    collector._publisher = publisher  # type: ignore[assignment]
    collector._state = _SlowLookupState(tmp_path / "state.sqlite")
    text = oru("LAB-7401")
    accepted = inspect_message(text, collector.config)
    assert isinstance(accepted, Accepted)

    async def both() -> tuple[bool | Rejected, bool | Rejected]:
        return await asyncio.gather(
            collector._deliver(accepted, text, 1), collector._deliver(accepted, text, 2)
        )

    outcomes = asyncio.run(both())
    collector._state.close()
    assert len(publisher.published) == 1
    assert sorted(outcomes, key=str) == [False, True]  # published once, then a duplicate


@pytest.mark.integration
def test_idle_and_slow_clients_are_timed_out(serve: Callable[..., Running]) -> None:
    running = serve(idle_timeout_s=0.5, frame_timeout_s=1.0)
    idle = Client(running.port)
    started = time.monotonic()
    assert idle.closed_by_server(within=5)
    assert 0.4 < time.monotonic() - started < 3
    slow = Client(running.port)
    started = time.monotonic()
    for piece in (b"\x0bMSH|^~\\&|", b"LIS|", b"FAC1|", b"MED|"):
        slow.raw(piece)  # each within the idle timeout, but the frame never completes
        time.sleep(0.3)
    assert slow.closed_by_server(within=5)
    assert time.monotonic() - started < 3
    idle.close()
    slow.close()


@pytest.mark.integration
def test_connections_beyond_the_limit_are_refused(serve: Callable[..., Running]) -> None:
    running = serve(max_connections=2)
    first, second = Client(running.port), Client(running.port)
    first.send(oru("LAB-8001"))
    second.send(oru("LAB-8002"))
    assert msa(first.ack())[1] == msa(second.ack())[1] == "AA"
    third = Client(running.port)
    assert third.closed_by_server(within=5)
    first.close()
    time.sleep(0.2)
    fourth = Client(running.port)
    fourth.send(oru("LAB-8004"))
    assert msa(fourth.ack())[1] == "AA"
    for client in (second, third, fourth):
        client.close()


async def _send_many(port: int, connection: int, count: int) -> list[str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    framer = MllpFramer(1 << 20)
    acked: list[str] = []
    for n in range(count):
        writer.write(mllp_wrap(oru(f"C{connection:02d}-{n}").encode()))
        await writer.drain()
        frames: list[Frame | Oversize] = []
        while not frames:
            data = await asyncio.wait_for(reader.read(65536), 30)
            assert data, "connection closed before the ACK"
            frames, _ = framer.feed(data)
        [frame] = frames
        assert isinstance(frame, Frame)
        fields = msa(frame.content.decode())
        assert fields[1] == "AA"
        acked.append(fields[2])
    writer.close()
    await writer.wait_closed()
    return acked


@pytest.mark.integration
def test_fifty_concurrent_connections(serve: Callable[..., Running]) -> None:
    running = serve()

    async def main() -> list[list[str]]:
        return await asyncio.gather(*(_send_many(running.port, c, 4) for c in range(50)))

    acked = asyncio.run(main())
    expected = {f"C{c:02d}-{n}" for c in range(50) for n in range(4)}
    assert {control for batch in acked for control in batch} == expected
    records = raw_records(running.kafka, 200, timeout_s=30)
    assert len(records) == 200
    assert {r.value["message_control_id"] for r in records} == expected




def _start_cli(config_path: Path, kafka: KafkaSettings, data_dir: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "MEDSTREAM_KAFKA_TOPIC_PREFIX": kafka.topic_prefix,
        "MEDSTREAM_DATA_DIR": str(data_dir),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "medstream", "collect", "mllp", "--config", str(config_path)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _connect(port: int, process: subprocess.Popen[bytes], timeout_s: float = 30) -> Client:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return Client(port)
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                _, stderr = process.communicate(timeout=5)
                raise AssertionError(
                    f"collector did not listen: {stderr.decode()[-2000:]}"
                ) from None
            time.sleep(0.1)


@pytest.mark.integration
def test_restart_keeps_duplicate_detection(
    kafka_factory: Callable[..., KafkaSettings], tmp_path: Path
) -> None:
    kafka = kafka_factory()
    port = free_port()
    config_path = tmp_path / "mllp.yaml"
    config_path.write_text(
        "kind: mllp\nname: lab-restart\norganisation_id: H001\nsource_system: lis-mllp\n"
        f"host: 127.0.0.1\nport: {port}\n"
    )
    first = _start_cli(config_path, kafka, tmp_path / "data")
    try:
        client = _connect(port, first)
        client.send(oru("LAB-9001"))
        assert msa(client.ack())[1] == "AA"
        client.close()
    finally:
        first.kill()  # kill -9: the acknowledged control id must already be durable
        first.wait(10)
    second = _start_cli(config_path, kafka, tmp_path / "data")
    try:
        client = _connect(port, second)
        client.send(oru("LAB-9001"))
        assert msa(client.ack()) == ["MSA", "AA", "LAB-9001"]
        client.send(oru("LAB-9002"))
        assert msa(client.ack())[1] == "AA"
        client.close()
    finally:
        second.terminate()
        assert second.wait(30) == 0
    records = raw_records(kafka, 2)
    assert sorted(r.value["message_control_id"] for r in records) == ["LAB-9001", "LAB-9002"]
    assert (tmp_path / "data" / "collectors" / "lab-restart" / "state.sqlite").exists()


# --- real-world message shapes (tests/streams/hl7) --------------------------------------------

HL7_EXAMPLES = sorted((REPO / "tests" / "streams" / "hl7").glob("*.hl7"))


def example(path: Path) -> str:
    return path.read_text(encoding="utf-8").replace("\n", "\r")


@pytest.mark.parametrize("path", HL7_EXAMPLES, ids=lambda p: p.stem)
def test_real_world_examples_are_accepted(path: Path) -> None:
    verdict = inspect_message(example(path), config())
    assert not isinstance(verdict, Rejected), verdict
    assert verdict.message_type in {
        "ORU^R01",
        "ADT^A01",
        "ADT^A02",
        "ADT^A03",
        "ADT^A04",
        "ADT^A08",
    }


@pytest.mark.integration
def test_elr_example_from_the_wire_normalises_to_eight_results(
    serve: Callable[..., Running],
) -> None:
    from streams.model import NormalisedEvent, RawContext
    from streams.normalise import normalise
    from streams.pseudonym import Pseudonymiser
    from streams.terminology import load_terminology

    assert len(HL7_EXAMPLES) >= 9
    running = serve()
    client = Client(running.port)
    text = example(REPO / "tests" / "streams" / "hl7" / "elr_251_panel_and_culture.hl7")
    client.send(text)
    assert msa(client.ack())[1:3] == ["AA", "ELR-20261103-0002"]
    client.close()
    [record] = raw_records(running.kafka, 1)
    assert record.value["payload"] == text
    ctx = RawContext(record.topic, record.partition, record.offset, 0)
    outcomes = normalise(
        "hl7_lab",
        record.value,
        ctx,
        load_terminology(),
        Pseudonymiser(b"test-only-pseudonym-key-0123456789"),
        0,
    )
    assert len(outcomes) == 8
    assert all(isinstance(o, NormalisedEvent) and o.kind == "lab_result" for o in outcomes)


# --- configuration --------------------------------------------------------------------------


def test_example_configuration_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLLP_PORT", "12575")
    cls = collector_class("mllp")
    assert cls is Hl7MllpProducer
    loaded = load_config(REPO / "deploy" / "collectors" / "mllp.example.yaml", cls.config_model)
    assert isinstance(loaded, MllpConfig)
    assert loaded.port == 12575
    assert loaded.facilities == {"LAB-EAST": "H001", "LAB-WEST": "H002"}
    assert loaded.max_message_bytes == 950_000


def test_check_reports_a_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        kafka = KafkaSettings(bootstrap_servers="127.0.0.1:1")
        collector = Hl7MllpProducer(
            config(port=port, state_dir=tmp_path), kafka, ManifestRegistry()
        )
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
            collector.check()


def test_an_adt_the_stage_would_refuse_is_answered_ae_with_the_field() -> None:
    """ADT visits are read as the normalise stage reads them: no AA, then a dead letter."""
    verdict = inspect_message(adt("A03", "ADT-0003"), config())
    assert isinstance(verdict, Rejected)
    assert (verdict.ack_code, verdict.reason_code) == ("AE", "invalid_record")
    assert verdict.reason == "PV1-44 admit date/time is empty (ADT^A03 needs it)"
    assert (verdict.error_code, verdict.location) == ("101", "PV1^1^44")
    wrong_class = inspect_message(adt("A08", "ADT-0008").replace("|I|", "|X|"), config())
    assert isinstance(wrong_class, Rejected)
    assert wrong_class.reason == "PV1-2 patient class is not one of E, I, O (value is X)"
    assert (wrong_class.error_code, wrong_class.location) == ("103", "PV1^1^2")
    # An admission needs no PV1-44: the message itself is the admission.
    assert isinstance(inspect_message(adt("A01", "ADT-0001"), config()), Accepted)
