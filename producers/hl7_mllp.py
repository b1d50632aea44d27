"""HL7 v2 over MLLP: the edge collector beside a hospital's LIS or ADT interface engine.

:class:`Hl7MllpProducer` listens for MLLP connections (TCP, port 2575 by default), reads
one framed HL7 v2 message at a time (HL7 original-mode acknowledgement: a sender waits for
the ACK of a message before it sends the next, so a connection is not read while its
message is being delivered), and answers with an ACK only once the outcome is durable:

* ``AA`` after the broker acknowledged the raw ``Hl7Message`` record;
* ``AE`` (MSA-3 text and an ERR segment) for a message it understood but cannot accept:
  unsupported message type, no MSH-10, a required segment missing, an unknown facility;
* ``AR`` for input that is not an HL7 message at all, cannot be decoded, or is larger
  than ``max_message_bytes`` (the connection is then closed) or than a Kafka record can
  be; also when handling it failed unexpectedly (reason ``internal_error``), and when a
  connection sent more than 4096 bytes outside any frame (reason ``unframed``, the
  connection is then closed).

Every AE and AR is also published to the dead-letter topic with a reason, after which the
ACK is sent. MLLP has no authentication, so the dead letters a peer can cause are bounded
(:class:`producers.base.RefusalBudget`, per peer host and reason): the first 20 refusals
of a minute are dead-lettered one by one; later ones are answered the same, counted
(``medstream_collector_records_failed_total``) and summarised in one dead letter without
payload per peer, reason and minute (also when the collector stops). Accepted messages are
never held back. A message is known by its sender as the rest of the pipeline knows it (MSH-3
component 1, the organisation MSH-4 maps to) and MSH-10, see :func:`duplicate_key`: one
acknowledged before (kept in :class:`CollectorState` for ``duplicate_window_days``) is
answered AA again without being published twice, and the same key with other content is
answered AE ``duplicate_control_id`` ("LIS-A^x" correcting what LIS-A sent included).
Payloads and patient identifiers never reach the log: it names control ids, message types,
reason codes and peers only.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import hashlib
import json
import logging
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, Final, Literal

import hl7
import hl7.util
from hl7.exceptions import ParseException
from pydantic import Field, field_validator

from producers.base import (
    MAX_RECORD_BYTES,
    AsyncPublisher,
    Collector,
    CollectorConfig,
    CollectorState,
    ConfigError,
    DeliveryFailed,
    RecordTooLarge,
    RefusalBudget,
    run_async,
    wall_clock_ms,
)
from schemas.hl7_fields import (
    Hl7FieldProblem,
    hl7_field,
    hl7_field_text,
    hl7_time,
    message_clock,
    read_adt_visit,
)
from schemas.numbers import ambiguity, describe_value, is_readable_number

log = logging.getLogger("medstream.collector.mllp")

START_BLOCK: Final = b"\x0b"
END_BLOCK: Final = b"\x1c"
CARRIAGE_RETURN: Final = b"\r"
_WHITESPACE: Final = b" \t\r\n"

#: Message types this collector accepts (the ones the normalise stage turns into events).
SUPPORTED_MESSAGE_TYPES: Final = (
    "ADT^A01",
    "ADT^A02",
    "ADT^A03",
    "ADT^A04",
    "ADT^A08",
    "ORU^R01",
)
# Segments a message type cannot do without: (segment, why) in the order they are checked.
_REQUIRED_SEGMENTS: Final = {"ADT": ("PID", "PV1"), "ORU": ("PID", "OBR", "OBX")}
# MSH-18 character set (HL7 table 0211) -> Python codec.
_CHARSETS: Final = {
    "ASCII": "ascii",
    "8859/1": "latin-1",
    "8859/15": "iso8859-15",
    "UNICODE UTF-8": "utf-8",
    "UTF-8": "utf-8",
    "GB 18030-2000": "gb18030",
    "ISO IR87": "iso2022_jp",
    "KS X 1001": "euc_kr",
    "BIG-5": "big5",
}
_DEFAULT_FIELD_SEPARATOR: Final = "|"
_DEFAULT_ENCODING_CHARACTERS: Final = "^~\\&"
_SHOWN_CODE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ^._-]{0,39}")
# Acknowledged messages by duplicate_key(); "mllp.acked" held the keys of versions that
# took MSH-3 and MSH-4 as sent: moved here at start (see legacy_duplicate_key).
_DUPLICATES: Final = "mllp.acknowledged"
_LEGACY_DUPLICATES: Final = "mllp.acked"
# HL7 table 0357, message error condition codes used in ERR-3.
_HL7_ERRORS: Final = {
    "100": "Segment sequence error",
    "101": "Required field missing",
    "102": "Data type error",
    "103": "Table value not found",
    "200": "Unsupported message type",
    "201": "Unsupported event code",
    "205": "Duplicate key identifier",
    "207": "Application internal error",
}
_READ_CHUNK: Final = 65_536
#: Bytes outside any frame a connection may send before it is answered AR and closed.
MAX_UNFRAMED_BYTES: Final = 4096
_PRUNE_EVERY_S: Final = 3600.0


class MllpConfig(CollectorConfig):
    """Settings of an MLLP listener (see deploy/collectors/mllp.example.yaml)."""

    kind: Literal["mllp"] = "mllp"
    host: str = Field(default="0.0.0.0", description="address to listen on")
    port: int = Field(default=2575, ge=0, le=65535, description="TCP port (0: any free port)")
    facilities: dict[str, str] | None = Field(
        default=None,
        description="MSH-4 sending facility -> organisation_id; when given, messages from "
        "other facilities are answered AE",
    )
    message_types: list[str] = Field(
        default=list(SUPPORTED_MESSAGE_TYPES),
        description="accepted MSH-9 types (code^trigger); others are answered AE",
    )
    max_message_bytes: int = Field(
        default=MAX_RECORD_BYTES,
        ge=1024,
        le=MAX_RECORD_BYTES,
        description="larger frames are answered AR and closed (at most what Kafka accepts)",
    )
    idle_timeout_s: float = Field(
        default=300.0, gt=0, description="close a connection that sent nothing for this long"
    )
    frame_timeout_s: float = Field(
        default=60.0, gt=0, description="close a connection whose started frame is not complete"
    )
    max_connections: int = Field(
        default=200, ge=1, description="connections beyond this are closed at once"
    )
    duplicate_window_days: float = Field(
        default=7.0, gt=0, description="how long acknowledged control ids are remembered"
    )
    encoding: str = Field(
        default="utf-8", description="character encoding when MSH-18 does not name one"
    )
    ack_application: str = Field(
        default="MEDSTREAM", description="MSH-3 of ACKs when the message has no MSH-5"
    )

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        try:
            codecs.lookup(value)
        except LookupError:
            raise ValueError(f"unknown character encoding {value!r}") from None
        return value

    @field_validator("message_types")
    @classmethod
    def _supported_types(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(SUPPORTED_MESSAGE_TYPES))
        if unknown:
            raise ValueError(
                f"unsupported message types {', '.join(unknown)} "
                f"(supported: {', '.join(SUPPORTED_MESSAGE_TYPES)})"
            )
        if not value:
            raise ValueError("at least one message type must be accepted")
        return value


# --- MLLP framing -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Frame:
    """The bytes between a start block <VT> and an end block <FS><CR>."""

    content: bytes


@dataclass(frozen=True, slots=True)
class Oversize:
    """A frame that passed the size limit; ``prefix`` is its first ``max_message_bytes``."""

    prefix: bytes


class MllpFramer:
    """Splits a byte stream into MLLP frames, whatever the TCP read boundaries.

    Bytes outside a frame are dropped and counted (whitespace between frames is not
    counted: some senders end a frame with CR LF). A start block inside a frame abandons
    the unfinished frame (counted too). An end block not followed by CR still ends the
    frame, so a sender that omits the CR is not left waiting for its ACK. What was dropped
    since the last complete frame is kept as :attr:`discarded` (its first
    ``keep_discarded`` bytes) and :attr:`discarded_bytes`, so a listener can give up on a
    sender that does not speak MLLP.
    """

    def __init__(self, max_message_bytes: int, keep_discarded: int = MAX_UNFRAMED_BYTES) -> None:
        self.max_message_bytes = max_message_bytes
        self.keep_discarded = keep_discarded
        self._buffer = bytearray()
        self.in_frame = False
        self.frame_started: float | None = None
        self._skip_cr = False
        #: Bytes dropped since the last complete frame, and the first of them.
        self.discarded_bytes = 0
        self.discarded = bytearray()

    def _discard(self, dropped: bytes) -> int:
        room = self.keep_discarded - len(self.discarded)
        if room > 0:
            self.discarded += dropped[:room]
        self.discarded_bytes += len(dropped)
        return len(dropped)

    def _frame_complete(self) -> None:
        self.in_frame = False
        self.frame_started = None
        self.discarded_bytes = 0
        self.discarded.clear()

    def feed(self, data: bytes) -> tuple[list[Frame | Oversize], int]:
        """Add received bytes; returns the completed frames and how many bytes were dropped."""
        buffer = self._buffer
        buffer += data
        events: list[Frame | Oversize] = []
        dropped = 0
        while buffer:
            if self._skip_cr:
                self._skip_cr = False
                if buffer[:1] == CARRIAGE_RETURN:
                    del buffer[:1]
                    continue
            if not self.in_frame:
                start = buffer.find(START_BLOCK)
                outside = buffer if start < 0 else buffer[:start]
                dropped += self._discard(bytes(outside).translate(None, _WHITESPACE))
                if start < 0:
                    buffer.clear()
                    break
                del buffer[: start + 1]
                self.in_frame = True
                self.frame_started = time.monotonic()
            end = buffer.find(END_BLOCK)
            restart = buffer.find(START_BLOCK, 0, end if end >= 0 else len(buffer))
            if restart >= 0:
                # The unfinished frame and its start block.
                dropped += self._discard(START_BLOCK + bytes(buffer[:restart]))
                del buffer[: restart + 1]
                self.frame_started = time.monotonic()
                continue
            if (end < 0 and len(buffer) > self.max_message_bytes) or end > self.max_message_bytes:
                events.append(Oversize(bytes(buffer[: self.max_message_bytes])))
                buffer.clear()
                self._frame_complete()
                break
            if end < 0:
                break
            events.append(Frame(bytes(buffer[:end])))
            if end + 1 < len(buffer):
                del buffer[: end + (2 if buffer[end + 1 : end + 2] == CARRIAGE_RETURN else 1)]
            else:
                del buffer[: end + 1]
                self._skip_cr = True
            self._frame_complete()
        return events, dropped


def peer_host(peer: Any) -> str:
    """The host of a connection's peer address (its port changes with every connection)."""
    if isinstance(peer, tuple | list) and peer:
        return str(peer[0])
    return str(peer)


def mllp_wrap(message: bytes) -> bytes:
    """One message in an MLLP frame."""
    return START_BLOCK + message + END_BLOCK + CARRIAGE_RETURN


# --- reading the header and deciding ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Header:
    """The raw MSH fields an ACK is addressed with (read without a full parse)."""

    field_separator: str
    encoding_characters: str
    fields: tuple[str, ...]  # fields[n] is MSH-n as sent (escaped), "" when absent

    def get(self, number: int) -> str:
        """MSH-``number`` exactly as sent."""
        return self.fields[number] if number < len(self.fields) else ""

    def component(self, number: int, component: int) -> str:
        """One component of MSH-``number`` (first repetition), as sent."""
        repetition = self.get(number).split(self.encoding_characters[1:2] or "~")[0]
        parts = repetition.split(self.encoding_characters[0:1] or "^")
        return parts[component - 1].strip() if component <= len(parts) else ""


def valid_delimiters(separator: str, encoding_characters: str) -> bool:
    """True when MSH-1 and MSH-2 name five distinct delimiters an HL7 parser can use: the
    field separator and four encoding characters, none a letter, digit, space or line end.
    """
    characters = encoding_characters[:4]
    delimiters = separator + characters
    return (
        len(characters) == 4
        and len(set(delimiters)) == 5
        and not any(c.isalnum() or c in " \r\n" for c in delimiters)
    )


def read_header(text: str) -> Header | None:
    """The MSH segment of a message text, or None when the text does not start with one."""
    if not text.startswith("MSH") or len(text) < 8:
        return None
    separator = text[3]
    if separator.isalnum() or separator in "\r\n":
        return None
    segment = re.split(r"[\r\n]", text, maxsplit=1)[0]
    parts = segment.split(separator)
    encoding_characters = parts[1] if len(parts) > 1 else ""
    if len(encoding_characters) < 4:
        return None
    # MSH-1 is the separator itself, so MSH-n is parts[n - 1] for n >= 2.
    fields = ("MSH", separator, *parts[1:])
    return Header(separator, encoding_characters, fields)


@dataclass(frozen=True, slots=True)
class Accepted:
    """A message this collector takes: what the raw record and the duplicate check need."""

    control_id: str
    message_type: str
    sending_application: str
    organisation_id: str
    duplicate_key: str
    content_digest: str
    partition_key: str


@dataclass(frozen=True, slots=True)
class Rejected:
    """Why a message is not taken: ACK code, dead-letter reason and HL7 error (table 0357)."""

    ack_code: Literal["AE", "AR"]
    reason_code: str
    reason: str
    error_code: str
    location: str = ""
    organisation_id: str | None = None

    @property
    def error_text(self) -> str:
        """The HL7 table 0357 text of :attr:`error_code`."""
        return _HL7_ERRORS[self.error_code]


def _shown(text: str) -> str:
    """A code from the sender, or its shape when it does not look like a code."""
    if _SHOWN_CODE.fullmatch(text):
        return text
    return f"(text of {len(text)} characters)" if text else "(empty)"


def _extract(message: hl7.Message, accessor: str) -> str:
    """One field component via python-hl7's accessor syntax; "" when absent."""
    try:
        return str(message[accessor]).strip()
    except (KeyError, IndexError, ValueError):
        return ""


def _medical_record_number(message: hl7.Message) -> str:
    """The first PID-3 identifier of type MR, else the first identifier ("" when none)."""
    try:
        pid = message.segment("PID")
    except KeyError:
        return ""
    repetitions = len(pid[3]) if len(pid) > 3 else 0
    for repeat in range(1, repetitions + 1):
        if _extract(message, f"PID.F3.R{repeat}.C5").upper() == "MR":
            return _extract(message, f"PID.F3.R{repeat}.C1")
    return _extract(message, "PID.F3.R1.C1")


def _unreadable_observation(message: hl7.Message, organisation_id: str) -> Rejected | None:
    """AE for the first OBX the normalise stage would reject: no identifier, a numeric (NM)
    value nobody can read, or no readable observation time. Fields are read as the stage
    reads them (schemas.hl7_fields, schemas.numbers): answering AA and dead-lettering it
    downstream would leave the sender believing a result was delivered."""
    index = orders = 0
    order: tuple[int, hl7.Segment] | None = None
    message_time = ""
    for segment in message:
        name = str(segment[0]) if len(segment) else ""
        if name == "MSH":
            message_time = hl7_field(segment, 7)
        elif name == "OBR":
            orders += 1
            order = (orders, segment)
        elif name == "PID":
            order = None  # the next patient's results start
        elif name == "OBX":
            index += 1
            problem = _observation_problem(segment, index, order, message_time)
            if problem is not None:
                reason, code, location = problem
                return Rejected(
                    "AE", "invalid_record", f"OBX[{index - 1}]: {reason}", code, location,
                    organisation_id,
                )
    return None


def _observation_problem(
    obx: hl7.Segment, index: int, order: tuple[int, hl7.Segment] | None, message_time: str
) -> tuple[str, str, str] | None:
    """(reason, HL7 error code, location) of what makes one OBX unusable, or None."""
    if not hl7_field(obx, 3):
        return "OBX-3 observation identifier is empty", "101", f"OBX^{index}^3"
    value = hl7_field_text(obx, 5)
    if hl7_field(obx, 2).upper() == "NM" and value and not is_readable_number(value):
        doubt = ambiguity(value)
        reason = (
            f"OBX-5 value is ambiguous: {doubt}" if doubt
            else f"OBX-5 value is {describe_value(value)}, not a number, but OBX-2 value type "
            "is NM"
        )
        return reason, "102", f"OBX^{index}^5"
    # The observation time, as the stage takes it: OBX-14, else OBR-7, else MSH-7.
    times = [("OBX-14", hl7_field(obx, 14), f"OBX^{index}^14")]
    if order is not None:
        times.append(("OBR-7", hl7_field(order[1], 7), f"OBR^{order[0]}^7"))
    times.append(("MSH-7", message_time, "MSH^1^7"))
    for label, text, location in times:
        if text:
            if hl7_time(text, UTC) is None:
                reason = f"{label} is not an HL7 timestamp (value is {describe_value(text)})"
                return reason, "102", location
            return None
    return "no observation time: OBX-14, OBR-7 and MSH-7 are all empty", "101", f"OBX^{index}^14"


def inspect_message(text: str, config: MllpConfig) -> Accepted | Rejected:
    """Decide whether one decoded message is accepted (AA) or rejected (AE, AR), and why."""
    header = read_header(text)
    if header is None:
        return Rejected(
            "AR",
            "not_hl7",
            "frame does not start with an MSH segment",
            "100",
            "MSH",
        )
    if not valid_delimiters(header.field_separator, header.encoding_characters):
        return Rejected(
            "AR",
            "not_hl7",
            "MSH-1 and MSH-2 do not name five distinct delimiters (field separator and "
            "encoding characters such as |^~\\&)",
            "102",
            "MSH^1^2",
        )
    segments = re.sub(r"[\r\n]+", "\r", text.strip(" \t\r\n"))
    try:
        message = hl7.parse(segments)
    except (ParseException, ValueError, IndexError, AssertionError) as exc:
        return Rejected(
            "AR",
            "not_hl7",
            f"message is not parseable HL7 v2 ({type(exc).__name__})",
            "102",
        )
    headers = sum(1 for segment in message if len(segment) and str(segment[0]) == "MSH")
    if headers > 1:
        return Rejected(
            "AE",
            "multiple_messages",
            f"frame holds {headers} MSH segments; send one message per frame",
            "100",
            "MSH",
        )
    facility = header.component(4, 1)
    organisation_id = config.organisation_id
    if config.facilities is not None:
        if facility not in config.facilities:
            return Rejected(
                "AE",
                "unknown_facility",
                f"sending facility {_shown(facility)} (MSH-4) is not configured for this collector",
                "103",
                "MSH^1^4",
            )
        organisation_id = config.facilities[facility]
    code = header.component(9, 1).upper()
    trigger = header.component(9, 2).upper()
    message_type = f"{code}^{trigger}" if trigger else code
    if message_type not in config.message_types:
        return Rejected(
            "AE",
            "unsupported_message_type",
            f"message type {_shown(message_type)} is not accepted "
            f"(accepted: {', '.join(config.message_types)})",
            "201" if code in {t.split("^")[0] for t in config.message_types} else "200",
            "MSH^1^9",
            organisation_id,
        )
    control_id = header.get(10).strip()
    if not control_id:
        return Rejected(
            "AE",
            "missing_control_id",
            "MSH-10 message control id is empty",
            "101",
            "MSH^1^10",
            organisation_id,
        )
    present = {str(segment[0]) for segment in message if len(segment)}
    for required in _REQUIRED_SEGMENTS[code]:
        if required not in present:
            return Rejected(
                "AE",
                "missing_segment",
                f"{message_type} message has no {required} segment",
                "100",
                required,
                organisation_id,
            )
    if code == "ORU":
        unreadable = _unreadable_observation(message, organisation_id)
        if unreadable is not None:
            return unreadable
    elif code == "ADT":
        # The visit is read as the normalise stage reads it: AA then a dead letter
        # downstream would leave the sender believing the visit was delivered.
        message_time, default_tz = message_clock(header.component(7, 1))
        try:
            read_adt_visit(trigger, message, message_time, default_tz)
        except Hl7FieldProblem as problem:
            return Rejected(
                "AE", "invalid_record", problem.reason, problem.code, problem.location,
                organisation_id,
            )
    body = segments.split("\r", 1)[1] if "\r" in segments else ""
    mrn = _medical_record_number(message)
    sending_application = header.component(3, 1) or config.source_system
    return Accepted(
        control_id=control_id,
        message_type=message_type,
        sending_application=sending_application,
        organisation_id=organisation_id,
        duplicate_key=duplicate_key(sending_application, organisation_id, control_id),
        content_digest=hashlib.sha256(body.encode("utf-8", "surrogatepass")).hexdigest(),
        partition_key=f"{organisation_id}:{mrn or control_id}",
    )


def duplicate_key(sending_application: str, organisation_id: str, control_id: str) -> str:
    """The key an acknowledged message is remembered by: the sender as the pipeline knows
    it (MSH-3 component 1, the organisation MSH-4 maps to) and MSH-10. Event ids downstream
    are made of the organisation and the control id, and reconcile tells senders apart by
    MSH-3 component 1, so "LIS-A^x" resending CTL-1 is the LIS-A that sent it."""
    return json.dumps([sending_application, organisation_id, control_id], ensure_ascii=False)


def legacy_duplicate_key(key: str, config: MllpConfig) -> str | None:
    """The :func:`duplicate_key` of a key stored by an older version (MSH-3, MSH-4 as sent
    and MSH-10, joined by US), None for a facility no longer configured (its messages are
    refused now). The delimiters were not stored: "^" and "~" are assumed, as nearly every
    sender uses them. A key read wrongly misses resends of its message (published again,
    they collapse downstream: same event ids, same content); should it equal another
    sender's key, that sender's other message under the same MSH-10 is answered AE, which
    the sender hears, for at most ``duplicate_window_days``."""
    parts = key.split("\x1f")
    if len(parts) < 3:
        return None
    # MSH-10 may hold a US itself; MSH-3 and MSH-4 are taken from the left as written.
    application, facility, control_id = parts[0], parts[1], "\x1f".join(parts[2:])

    def component_1(field: str) -> str:
        return field.split("~")[0].split("^")[0].strip()

    organisation_id = config.organisation_id
    if config.facilities is not None:
        mapped = config.facilities.get(component_1(facility))
        if mapped is None:
            return None
        organisation_id = mapped
    application = component_1(application) or config.source_system
    return duplicate_key(application, organisation_id, control_id)


def message_encoding(frame: bytes, default: str) -> str:
    """The codec named by MSH-18 (HL7 table 0211), else ``default``."""
    header = read_header(frame[:4096].decode("latin-1"))
    if header is None:
        return default
    charset = header.component(18, 1).upper()
    return _CHARSETS.get(charset, default)


# --- acknowledgements ---------------------------------------------------------------------


def _escape(text: str, separator: str, encoding_characters: str) -> str:
    """Text for an HL7 field: delimiters replaced by escape sequences."""
    characters = (encoding_characters + "^~\\&")[:4]
    component, repetition, escape, subcomponent = (
        characters[0],
        characters[1],
        characters[2],
        characters[3],
    )
    escaped = text.replace(escape, f"{escape}E{escape}")
    for char, code in (
        (separator, "F"),
        (component, "S"),
        (repetition, "R"),
        (subcomponent, "T"),
    ):
        escaped = escaped.replace(char, f"{escape}{code}{escape}")
    return escaped.replace("\r", " ").replace("\n", " ")


def build_ack(
    ack_code: str,
    header: Header | None,
    *,
    application: str,
    facility: str,
    control_id: str,
    now_ms: int,
    rejected: Rejected | None = None,
) -> str:
    """An ACK for a received message (or for input without a usable MSH).

    Sender and receiver are swapped, the received version and processing id are kept and
    MSA-2 is the received MSH-10. A rejection adds MSA-3 and an ERR segment (ERR-2/3/4/8
    from v2.5 on, ERR-1 before).
    """
    control = header.get(10) if header else ""
    if header is not None and not valid_delimiters(
        header.field_separator, header.encoding_characters
    ):
        # Delimiters the sender could not parse an answer with: a header-less ACK in the
        # default delimiters, MSA-2 still naming the control id as far as it was read.
        control = _escape(control, _DEFAULT_FIELD_SEPARATOR, _DEFAULT_ENCODING_CHARACTERS)
        header = None
    separator = header.field_separator if header else _DEFAULT_FIELD_SEPARATOR
    characters = header.encoding_characters if header else _DEFAULT_ENCODING_CHARACTERS
    component = characters[0]
    sub = characters[3] if len(characters) > 3 else "&"
    version = (header.component(12, 1) if header else "") or "2.5.1"
    trigger = header.component(9, 2) if header else ""
    moment = datetime.fromtimestamp(now_ms / 1000, UTC).strftime("%Y%m%d%H%M%S+0000")
    msh = [
        "MSH",
        characters,
        (header.get(5) if header else "") or _escape(application, separator, characters),
        (header.get(6) if header else "") or _escape(facility, separator, characters),
        header.get(3) if header else "",
        header.get(4) if header else "",
        moment,
        "",
        component.join(["ACK", trigger, "ACK"]) if trigger else "ACK",
        _escape(control_id, separator, characters),
        (header.get(11) if header else "") or "P",
        header.get(12) if header else "2.5.1",
    ]
    msa = ["MSA", ack_code, control]
    segments = [separator.join(msh)]
    if rejected is None:
        segments.append(separator.join(msa))
    else:
        reason = _escape(rejected.reason, separator, characters)
        msa.append(_escape(rejected.reason[:80], separator, characters))  # MSA-3 is 80 long
        segments.append(separator.join(msa))
        error_text = _escape(rejected.error_text, separator, characters)
        # Error location: segment^sequence^field (HL7 ERL), e.g. MSH^1^10.
        where = (rejected.location.split("^") if rejected.location else []) + ["", "", ""]
        code = [rejected.error_code, error_text, "HL70357"]
        if version[:3] in {"2.1", "2.2", "2.3", "2.4"}:
            eld = component.join([*where[:3], sub.join(code)])
            segments.append(separator.join(["ERR", eld]))
        else:
            location = component.join(where[:3]).rstrip(component)
            segments.append(
                separator.join(["ERR", "", location, component.join(code), "E", "", "", "", reason])
            )
    return "\r".join(segments) + "\r"


# --- the collector ------------------------------------------------------------------------


class Hl7MllpProducer(Collector[MllpConfig]):
    """MLLP listener: publishes each accepted HL7 v2 message as one raw Hl7Message record."""

    kind: ClassVar[str] = "mllp"
    source_kind: ClassVar[str] = "hl7_lab"
    config_model: ClassVar[type[CollectorConfig]] = MllpConfig

    def __init__(self, config: MllpConfig, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        #: Set once the listener accepts connections; :attr:`port` is then the bound port.
        self.listening = threading.Event()
        self.port: int | None = None
        self._publisher: AsyncPublisher | None = None
        self._state: CollectorState | None = None
        self._open = 0
        self._in_flight: dict[str, asyncio.Event] = {}
        self._waiting_for_input: set[asyncio.Task[Any]] = set()
        self._connections: set[asyncio.Task[Any]] = set()
        self._stopping = False
        # MLLP has no authentication: refusals are budgeted per peer host.
        self._refusals = RefusalBudget()

    def check(self) -> list[str]:
        """The listening address must be free to bind."""
        config = self.config
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((config.host, config.port))
            except OSError as exc:
                raise ConfigError(
                    f"{config.name}: cannot listen on {config.host}:{config.port} ({exc.strerror})"
                ) from None
        facilities = config.facilities
        mapped = f"{len(facilities)} facilities mapped" if facilities else "no facility map"
        return [
            f"{config.name}: {config.host}:{config.port} is free; accepts "
            f"{', '.join(config.message_types)}; {mapped}"
        ]

    def run(self, stop: threading.Event) -> None:
        """Listen until ``stop`` is set; in-flight messages are delivered and acknowledged."""
        run_async(self.serve, stop)

    async def serve(self, stop: threading.Event) -> None:
        """The asyncio body of :meth:`run` (usable directly in a running loop)."""
        config = self.config
        self._state = CollectorState(self.state_dir / "state.sqlite")
        publisher = self._publisher = AsyncPublisher(
            self.publisher, max_in_flight=config.max_connections * 2
        )
        publisher.start()
        await self._move_legacy_duplicates()
        await self._forget_old_duplicates()
        server = await asyncio.start_server(
            self._serve_connection, config.host, config.port, limit=_READ_CHUNK * 2
        )
        self.port = int(server.sockets[0].getsockname()[1])
        log.info("%s: listening for MLLP on %s:%d", config.name, config.host, self.port)
        self.metrics.ready.set(1)
        self.listening.set()
        last_prune = next_summary = time.monotonic()
        try:
            while not stop.is_set():
                await asyncio.sleep(0.1)
                if time.monotonic() >= next_summary:
                    next_summary = time.monotonic() + 1
                    await self._refusals.dead_letter_due(
                        publisher, config.name, config.organisation_id
                    )
                if time.monotonic() - last_prune > _PRUNE_EVERY_S:
                    last_prune = time.monotonic()
                    await self._forget_old_duplicates()
        finally:
            self.metrics.ready.set(0)
            self._stopping = True
            server.close()
            # Connections waiting for input are closed; those delivering a message finish it.
            for task in list(self._waiting_for_input):
                task.cancel()
            if self._connections:
                await asyncio.wait(list(self._connections), timeout=30.0)
            await server.wait_closed()
            await self._refusals.dead_letter_due(
                publisher, config.name, config.organisation_id, final=True
            )
            unacknowledged = await publisher.close()
            if unacknowledged:
                log.error("%s: %d records unacknowledged at shutdown", config.name, unacknowledged)
            self._state.close()
            self.listening.clear()
            log.info("%s: stopped", config.name)

    async def _move_legacy_duplicates(self) -> None:
        """Carry the control ids an older version acknowledged over to today's key, so a
        resend spelt otherwise (e.g. "LIS-A^x") is recognised across an upgrade too."""
        assert self._state is not None
        config = self.config
        moved = await asyncio.to_thread(
            self._state.rekey,
            _LEGACY_DUPLICATES,
            _DUPLICATES,
            lambda key: legacy_duplicate_key(key, config),
        )
        if moved:
            log.info("%s: carried %d acknowledged control ids over to the sender key",
                     config.name, moved)

    async def _forget_old_duplicates(self) -> None:
        assert self._state is not None
        window_ms = int(self.config.duplicate_window_days * 86_400_000)
        forgotten = await asyncio.to_thread(
            self._state.forget_older_than, _DUPLICATES, wall_clock_ms() - window_ms
        )
        if forgotten:
            log.info("%s: forgot %d control ids older than the window", self.config.name, forgotten)

    # -- one connection -------------------------------------------------------------------

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        config = self.config
        peer = writer.get_extra_info("peername")
        task = asyncio.current_task()
        assert task is not None
        if self._stopping or self._open >= config.max_connections:
            log.warning(
                "%s: refusing connection from %s (%d connections open, limit %d)",
                config.name,
                peer,
                self._open,
                config.max_connections,
            )
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            return
        self._open += 1
        self._connections.add(task)
        framer = MllpFramer(config.max_message_bytes)
        try:
            while not self._stopping:
                timeout = config.idle_timeout_s
                if framer.frame_started is not None:
                    elapsed = time.monotonic() - framer.frame_started
                    timeout = min(timeout, max(0.0, config.frame_timeout_s - elapsed))
                self._waiting_for_input.add(task)
                try:
                    data = await asyncio.wait_for(reader.read(_READ_CHUNK), timeout)
                except TimeoutError:
                    why = "an unfinished frame" if framer.in_frame else "no input"
                    log.info("%s: closing connection from %s after %s", config.name, peer, why)
                    return
                finally:
                    self._waiting_for_input.discard(task)
                if not data:
                    return
                events, dropped = framer.feed(data)
                if dropped:
                    self.metrics.failed("unframed").inc()
                    log.warning(
                        "%s: discarded %d bytes outside an MLLP frame from %s",
                        config.name,
                        dropped,
                        peer,
                    )
                for event in events:
                    ack = await self._handle(event, peer)
                    if ack is None:
                        return  # not durable: no ACK, the sender resends
                    writer.write(mllp_wrap(ack))
                    await writer.drain()
                    if isinstance(event, Oversize):
                        return
                if framer.discarded_bytes > MAX_UNFRAMED_BYTES:
                    # Not an MLLP sender (or hopelessly out of step): say so once and close.
                    ack = await self._reject_unframed(framer, peer)
                    if ack is not None:
                        writer.write(mllp_wrap(ack))
                        await writer.drain()
                    return
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            log.info("%s: connection from %s ended (%s)", config.name, peer, type(exc).__name__)
        except asyncio.CancelledError:
            if not self._stopping:
                raise
        except Exception:
            # A message being handled was answered by _handle; this closes the connection
            # (the sender reconnects) instead of leaving a dead task behind an open socket.
            self.metrics.failed("internal_error").inc()
            log.exception("%s: connection from %s failed; closing it", config.name, peer)
        finally:
            self._open -= 1
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()

    # -- one message ----------------------------------------------------------------------

    async def _handle(self, event: Frame | Oversize, peer: Any) -> bytes | None:
        """Deliver or dead-letter one frame; returns the encoded ACK (None: no ACK).

        Whatever goes wrong, the frame is answered: an unexpected error is dead-lettered
        (``internal_error``) and answered AR, so the sender is never left waiting.
        """
        received_ms = wall_clock_ms()
        self.metrics.read.inc()
        raw = event.content if isinstance(event, Frame) else event.prefix
        try:
            return await self._decide_and_answer(event, raw, peer, received_ms)
        except Exception as exc:
            log.exception(
                "%s: handling a message from %s failed unexpectedly", self.config.name, peer
            )
            rejected = Rejected(
                "AR",
                "internal_error",
                f"the collector failed to handle this message ({type(exc).__name__})",
                "207",
            )
            encoding = self.config.encoding
            header = None
            with contextlib.suppress(Exception):  # the failure may lie in reading the header
                encoding = message_encoding(raw, encoding)
                header = read_header(raw[:4096].decode(encoding, "replace"))
            return await self._answer_rejected(rejected, raw, received_ms, peer, header, encoding)

    async def _reject_unframed(self, framer: MllpFramer, peer: Any) -> bytes | None:
        """Dead-letter the start of what a connection sent outside any frame; its AR."""
        rejected = Rejected(
            "AR",
            "unframed",
            f"{framer.discarded_bytes} bytes arrived outside an MLLP frame "
            "(<VT> message <FS><CR>); closing the connection",
            "100",
        )
        return await self._answer_rejected(
            rejected, bytes(framer.discarded), wall_clock_ms(), peer, None, self.config.encoding
        )

    async def _decide_and_answer(
        self, event: Frame | Oversize, raw: bytes, peer: Any, received_ms: int
    ) -> bytes | None:
        config = self.config
        encoding = message_encoding(raw, config.encoding)
        # The ACK is addressed from MSH even when the rest cannot be read or decoded.
        header = read_header(raw[:4096].decode(encoding, "replace"))
        if isinstance(event, Oversize):
            verdict: Accepted | Rejected = Rejected(
                "AR",
                "oversize",
                f"message is larger than {config.max_message_bytes} bytes (max_message_bytes)",
                "207",
            )
        else:
            try:
                text = raw.decode(encoding)
            except UnicodeDecodeError:
                verdict = Rejected(
                    "AR",
                    "undecodable",
                    f"message is not valid {encoding} text",
                    "102",
                )
            else:
                verdict = inspect_message(text, config)
                header = read_header(text)
        if isinstance(verdict, Accepted):
            try:
                duplicate = await self._deliver(verdict, text, received_ms)
            except RecordTooLarge as exc:
                duplicate = Rejected(
                    "AR",
                    "oversize",
                    f"message does not fit in a Kafka record ({exc})",
                    "207",
                    organisation_id=verdict.organisation_id,
                )
            except DeliveryFailed as exc:
                log.error(
                    "%s: message %s not delivered (%s); closing without ACK",
                    config.name,
                    verdict.control_id,
                    exc,
                )
                return None
            if isinstance(duplicate, Rejected):
                verdict = duplicate
            else:
                log.debug(
                    "%s: %s %s from %s %s",
                    config.name,
                    verdict.message_type,
                    verdict.control_id,
                    peer,
                    "(duplicate, not published again)" if duplicate else "published",
                )
                return self._encode_ack("AA", header, received_ms, None, encoding)
        return await self._answer_rejected(verdict, raw, received_ms, peer, header, encoding)

    async def _answer_rejected(
        self,
        verdict: Rejected,
        raw: bytes,
        received_ms: int,
        peer: Any,
        header: Header | None,
        encoding: str,
    ) -> bytes | None:
        """Dead-letter a rejected frame, then its AE/AR (None: the dead letter failed).

        Beyond the peer's refusal budget (per host and reason, see :class:`RefusalBudget`)
        the frame is answered the same but only counted: one summary dead letter without
        payload stands for it, so an unauthenticated peer cannot fill the dead-letter topic.
        """
        config = self.config
        control = header.get(10).strip() if header else ""
        if not self._refusals.admit(
            peer_host(peer), verdict.reason_code, received_ms, verdict.organisation_id
        ):
            self.metrics.failed(verdict.reason_code).inc()
            log.debug(
                "%s: %s for message %s from %s: %s (over the refusal budget: counted, "
                "summarised later)",
                config.name,
                verdict.ack_code,
                control or "(no control id)",
                peer,
                verdict.reason_code,
            )
            return self._encode_ack(verdict.ack_code, header, received_ms, verdict, encoding)
        try:
            dlq_id = await self._dead_letter(verdict, raw, received_ms)
        except DeliveryFailed as exc:
            log.error(
                "%s: dead letter for message %s not delivered (%s); closing without ACK",
                config.name,
                control or "(no control id)",
                exc,
            )
            return None
        log.warning(
            "%s: %s for message %s from %s: %s (dead letter %s)",
            config.name,
            verdict.ack_code,
            control or "(no control id)",
            peer,
            verdict.reason_code,
            dlq_id,
        )
        return self._encode_ack(verdict.ack_code, header, received_ms, verdict, encoding)

    def _encode_ack(
        self,
        ack_code: str,
        header: Header | None,
        now_ms: int,
        rejected: Rejected | None,
        encoding: str,
    ) -> bytes:
        text = build_ack(
            ack_code,
            header,
            application=self.config.ack_application,
            facility=self.config.organisation_id,
            control_id=f"ACK{uuid.uuid4().hex[:17]}",
            now_ms=now_ms,
            rejected=rejected,
        )
        return text.encode(encoding, "replace")

    async def _deliver(self, accepted: Accepted, text: str, received_ms: int) -> bool | Rejected:
        """Publish unless already acknowledged; True for a duplicate (answered AA again).

        Returns a rejection when the control id was acknowledged for a different message.
        Concurrent copies of one message wait for the first, so it is published once.
        """
        assert self._publisher is not None and self._state is not None
        key = accepted.duplicate_key
        while (pending := self._in_flight.get(key)) is not None:
            await pending.wait()
        # Marked in flight before the (awaited) lookup: a copy arriving on another
        # connection meanwhile waits above instead of being published a second time.
        done = asyncio.Event()
        self._in_flight[key] = done
        try:
            earlier = await asyncio.to_thread(self._state.seen, _DUPLICATES, key)
            if earlier is not None:
                if earlier != accepted.content_digest:
                    return Rejected(
                        "AE",
                        "duplicate_control_id",
                        f"control id {accepted.control_id} was already acknowledged for a "
                        "different message",
                        "205",
                        "MSH^1^10",
                        accepted.organisation_id,
                    )
                log.info(
                    "%s: %s is a resend of an acknowledged message; not published again",
                    self.config.name,
                    accepted.control_id,
                )
                return True
            record = {
                "message_control_id": accepted.control_id,
                "organisation_id": accepted.organisation_id,
                "source_system": accepted.sending_application,
                "message_type": accepted.message_type,
                "received_time": received_ms,
                "payload": text,
            }
            await self._publisher.publish(accepted.partition_key, record)
            # Remembered after the broker's ack: a crash in between means one more copy
            # downstream (same control id, so the same event ids), never a lost message.
            await asyncio.to_thread(self._state.remember, _DUPLICATES, key, accepted.content_digest)
        finally:
            del self._in_flight[key]
            done.set()
        return False

    async def _dead_letter(self, rejected: Rejected, raw: bytes, received_ms: int) -> str:
        assert self._publisher is not None
        return await self._publisher.dead_letter(
            rejected.reason_code,
            rejected.reason,
            raw,
            organisation_id=rejected.organisation_id or self.config.organisation_id,
            received_ms=received_ms,
        )
