"""Property tests of the MLLP collector: framing, the accept/refuse decision, ACKs and dead
letters, with random and mutated HL7 v2 input (all identifiers synthetic).

The contract: a frame is answered AA (and its raw record is schema-valid and normalises
without an error the collector could have seen), or AE/AR with an ERR segment naming the
reason and a dead letter; never an unhandled exception, never a hang, and the listener
keeps serving the next valid message.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hl7
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from medstream.settings import KafkaSettings
from producers.base import RefusalBudget
from producers.hl7_mllp import (
    END_BLOCK,
    START_BLOCK,
    Accepted,
    Frame,
    Hl7MllpProducer,
    MllpFramer,
    Oversize,
    Rejected,
    build_ack,
    inspect_message,
    message_encoding,
    mllp_wrap,
    read_header,
)
from schemas.serde import ManifestRegistry
from streams.model import RecordRejected
from tests.kafka_helpers import DLQ, consume, raw_topic
from tests.producers.test_hl7_mllp import Client, Running, adt, config, oru
from tests.properties.pipeline import encoder, round_trip, stage_outcomes
from tests.properties.strategies import bounded, mutated, random_text

HL7_DELIMITERS = b"|^~\\&\r\n"
#: A discharge with its admit (PV1-44) and discharge (PV1-45) times: valid, so mutations
#: explore what the collector accepts as well as what it refuses.
DISCHARGE = adt("A03", "ADT-0004").replace(
    "||V-0001", "||V-0001" + "|" * 25 + "20261101080000+0800|20261103081400+0800"
)
SAMPLES = [
    oru().encode(), adt().encode(), adt("A03", "ADT-0003").encode(), DISCHARGE.encode(),
]
NOW_MS = 1_793_700_000_000


def hl7_inputs() -> st.SearchStrategy[bytes]:
    """Mutated valid ORU/ADT messages, and random bytes now and then."""
    return st.one_of(
        st.sampled_from(SAMPLES).flatmap(lambda s: mutated(s, HL7_DELIMITERS)),
        st.binary(max_size=300),
        st.sampled_from(SAMPLES).map(lambda s: s[:3] + b"".join([s[3:4]] * 3) + s[4:]),
    )


# --- framing (pure) -------------------------------------------------------------------------


@bounded(300)
@given(messages=st.lists(st.binary(max_size=200), max_size=5), cuts=st.lists(st.integers(0, 2000)))
def test_frames_survive_any_read_boundaries(messages: list[bytes], cuts: list[int]) -> None:
    """Messages without block characters come out whole, however TCP splits the stream."""
    messages = [m.replace(START_BLOCK, b"").replace(END_BLOCK, b"") for m in messages]
    stream = b"".join(mllp_wrap(m) for m in messages)
    framer = MllpFramer(1024)
    frames: list[Frame | Oversize] = []
    previous = 0
    for cut in sorted({c % (len(stream) + 1) for c in cuts}) + [len(stream)]:
        events, dropped = framer.feed(stream[previous:cut])
        assert dropped == 0
        frames.extend(events)
        previous = cut
    assert frames == [Frame(m) for m in messages]


@bounded(300)
@given(data=st.lists(st.binary(max_size=3000), max_size=6), limit=st.integers(1024, 4096))
def test_random_bytes_never_break_the_framer(data: list[bytes], limit: int) -> None:
    """Any byte stream: frames hold no block character and respect the size limit."""
    framer = MllpFramer(limit, keep_discarded=256)
    fed = dropped_total = 0
    for chunk in data:
        events, dropped = framer.feed(chunk)
        fed += len(chunk)
        dropped_total += dropped
        assert 0 <= dropped_total <= fed  # an abandoned frame counts the bytes it held
        for event in events:
            content = event.content if isinstance(event, Frame) else event.prefix
            assert START_BLOCK not in content
            assert len(content) <= limit
            if isinstance(event, Frame):
                assert END_BLOCK not in content
        assert len(framer.discarded) <= 256


# --- deciding and answering (pure) ----------------------------------------------------------


def decide(raw: bytes) -> tuple[Accepted | Rejected, str | None]:
    """What the collector decides for one complete frame (as _decide_and_answer does)."""
    settings = config()
    encoding = message_encoding(raw, settings.encoding)
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError:
        return Rejected("AR", "undecodable", f"message is not valid {encoding} text", "102"), None
    return inspect_message(text, settings), text


def raw_record(verdict: Accepted, text: str) -> dict[str, Any]:
    """The raw Hl7Message the collector publishes for an accepted message."""
    return {
        "message_control_id": verdict.control_id,
        "organisation_id": verdict.organisation_id,
        "source_system": verdict.sending_application,
        "message_type": verdict.message_type,
        "received_time": NOW_MS,
        "payload": text,
    }


def assert_ack(ack: str, code: str, rejected: Rejected | None) -> None:
    """An ACK is a parseable HL7 message whose MSA-1 is ``code``; a refusal carries its reason
    in MSA-3 and an ERR segment."""
    message = hl7.parse(ack)
    msa = message.segment("MSA")
    assert str(msa[1]) == code
    if rejected is not None:
        assert str(msa[3]), "MSA-3 must say why"
        err = message.segment("ERR")
        assert rejected.error_code in str(err)


@bounded(400)
@given(raw=hl7_inputs())
@example(raw=oru().encode())
# Bug: MSH-2 with a repeated or alphanumeric encoding character was echoed into the ACK,
# which then could not be parsed (no readable MSA: the sender never learnt why).
@example(raw=oru().replace("|^~\\&|", "|^^~\\&|", 1).encode())
@example(raw=oru().replace("|^~\\&|", "|^MSH|^~\\&|", 1).encode())
# Bug: an ADT^A03 without PV1-44 was answered AA, then refused by the stage.
@example(raw=adt("A03", "ADT-0003").encode())
@example(raw=adt("A08", "ADT-0008").replace("|I|", "|X|").encode())
def test_every_frame_is_accepted_well_formed_or_refused_with_a_reason(raw: bytes) -> None:
    verdict, text = decide(raw)
    header = read_header(text) if text is not None else None
    if isinstance(verdict, Rejected):
        assert verdict.ack_code in ("AE", "AR")
        assert verdict.reason and verdict.reason_code
        assert verdict.error_text
        ack = build_ack(
            verdict.ack_code, header, application="MEDSTREAM", facility="H001",
            control_id="ACK1", now_ms=NOW_MS, rejected=verdict,
        )
        assert_ack(ack, verdict.ack_code, verdict)
        return
    assert text is not None
    decoded = round_trip("hl7_lab", raw_record(verdict, text))
    assert decoded["payload"] == text
    ack = build_ack(
        "AA", header, application="MEDSTREAM", facility="H001", control_id="ACK1",
        now_ms=NOW_MS,
    )
    assert_ack(ack, "AA", None)
    outcomes = stage_outcomes("hl7_lab", decoded)
    assert outcomes, "an acknowledged message must give the stage something to store or refuse"
    # The collector reads OBX fields and ADT visits as the stage does (schemas.hl7_fields).
    refused = [o for o in outcomes if isinstance(o, RecordRejected)]
    assert not refused, f"acknowledged AA, then refused by the stage: {refused}"


@bounded(200)
@given(text=random_text())
def test_random_text_is_decided_without_an_exception(text: str) -> None:
    verdict = inspect_message("MSH|^~\\&|" + text, config())
    assert isinstance(verdict, Accepted | Rejected)
    verdict = inspect_message(text, config())
    assert isinstance(verdict, Accepted | Rejected)
    if isinstance(verdict, Accepted):
        encoder("hl7_lab")(raw_record(verdict, text))


# --- the real listener on real sockets and the real broker ------------------------------------


@pytest.fixture
def listener(kafka_factory: Callable[..., KafkaSettings], tmp_path: Path) -> Iterator[Running]:
    """One MLLP collector for a whole property: it must keep serving every example."""
    kafka = kafka_factory()
    collector = Hl7MllpProducer(
        config(state_dir=tmp_path / "state", max_message_bytes=4096), kafka, ManifestRegistry()
    )
    # Every refusal of these examples is dead-lettered one by one: the examples all come
    # from one peer, beyond the default budget per peer (tested in test_hl7_mllp.py).
    collector._refusals = RefusalBudget(in_full=100_000)
    running = Running(collector, kafka)
    yield running
    running.close()


def answers_until(client: Client, control_id: str) -> tuple[list[str], bool]:
    """ACKs read until the one for ``control_id``; False when the server closed first."""
    acks: list[str] = []
    while True:
        try:
            ack = client.ack()
        except (ConnectionError, TimeoutError):
            return acks, False
        acks.append(ack)
        if str(hl7.parse(ack).segment("MSA")[2]) == control_id:
            return acks, True


@pytest.mark.integration
def test_listener_answers_every_bad_frame_and_keeps_serving(listener: Running) -> None:
    refused: list[str] = []
    valid_ids: list[str] = []
    counter = iter(range(1_000_000))

    @bounded(40, deadline_s=20)
    @given(
        noise=st.one_of(
            hl7_inputs().map(mllp_wrap),
            st.binary(max_size=600),
            st.sampled_from(SAMPLES).map(lambda s: START_BLOCK + s * 3),  # never ends
            st.binary(min_size=4200, max_size=5000),  # over the unframed limit: AR, closed
            st.just(mllp_wrap(b"MSH|^~\\&|" + b"X" * 5000)),  # oversize: AR, closed
        )
    )
    def serve_noise_then_a_valid_message(noise: bytes) -> None:
        control_id = f"PROP-{next(counter):05d}"
        valid = oru(control_id).encode()
        client = Client(listener.port, timeout=10)
        try:
            client.raw(noise)
            with contextlib.suppress(ConnectionError):
                client.send(valid)
            acks, answered = answers_until(client, control_id)
        finally:
            client.close()
        if not answered:  # the noise closed the connection: the next one is served
            retry = Client(listener.port, timeout=10)
            try:
                retry.send(valid)
                acks.append(retry.ack())
            finally:
                retry.close()
        *before, last = acks
        assert str(hl7.parse(last).segment("MSA")[1]) == "AA", last
        valid_ids.append(control_id)
        for ack in before:
            parsed = hl7.parse(ack)
            code = str(parsed.segment("MSA")[1])
            assert code in ("AA", "AE", "AR"), ack
            if code != "AA":
                assert str(parsed.segment("MSA")[3]), "a refusal says why"
                assert parsed.segment("ERR")
                refused.append(ack)

    serve_noise_then_a_valid_message()
    # Every AE/AR was preceded by its dead letter; every valid message is on the raw topic.
    dead = consume(listener.kafka, [DLQ], len(refused), timeout_s=20)
    assert len(dead) == len(refused)
    assert all(d.value["reason"] and d.value["stage"] == "producer" for d in dead)
    published = consume(listener.kafka, [raw_topic("hl7_lab")], len(valid_ids), timeout_s=20)
    assert set(valid_ids) <= {r.value["message_control_id"] for r in published}
