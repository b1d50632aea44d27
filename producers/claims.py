"""Insurer claim batches: the edge collector for a drop directory and an HTTP upload endpoint.

:class:`ClaimsProducer` takes CSV batches of insurance claims, one row per claim line, from
two channels: files dropped into ``drop_dir`` (polled every ``poll_interval_s``) and
``POST /claims/batches`` (aiohttp, per-payer bearer tokens). Rows are grouped into claims
by (payer_id, claim_id), validated, and every valid claim is published as one raw
``Claim`` record (``schemas/avro/claim.v1.avsc``) with its line items.

The CSV format (UTF-8 with or without BOM, comma separated, a header line first; column
names are case-insensitive, unknown columns are ignored and named in the receipt):

=====================  ========  ==========================================================
column                 required  meaning
=====================  ========  ==========================================================
payer_id               yes       insurer (letters, digits, ``. _ : / -``; at most 64)
claim_id               yes       claim number, unique per payer (same characters)
organisation_id        no        billing organisation (default: the collector's)
submitted_time         yes       ISO 8601 date-time; without an offset it is read in
                                 ``source_timezone``
patient_id_number      no        18-character national ID number (ISO 7064 MOD 11-2)
patient_local_id       yes       hospital medical record number
encounter_ref          no        local visit number
diagnosis_codes        no        local diagnosis codes separated by ``;``
line_no                yes       line number inside the claim (1, 2, ...)
item_code              yes       local item / procedure / drug code
item_display           yes       local item name (``item_name`` is accepted too)
quantity               yes       decimal number, not negative
unit_price             yes       decimal number, not negative
amount                 yes       decimal number, not negative
service_date           yes       ``YYYY-MM-DD``
=====================  ========  ==========================================================

The claim-level columns (payer_id .. diagnosis_codes) repeat on every line of a claim and
must agree; the lines of one claim need not be adjacent. ``deploy/collectors/
claims.example.csv`` is a documented example.

Every file gets a receipt (JSON, in ``drop_dir/receipts`` and as the upload response):
accepted claims, rejected claims with their line numbers and reasons, counts, and a status
``accepted`` / ``partially_accepted`` / ``rejected`` / ``duplicate``. A claim with any bad
line is rejected whole and published to the dead-letter topic (reason code
``invalid_claim``); a file that is not CSV text or lacks required columns is rejected
whole (``invalid_file``), and so is a file whose processing fails unexpectedly
(``internal_error``; not remembered, so it can be sent again once the fault is fixed). The
receipt is written only after the broker acknowledged every published record; the file is
then moved to ``processed/`` (or ``failed/`` when nothing was accepted). A claim whose
record would be larger than a Kafka record may be is rejected like an invalid one.

At most once per file: the SHA-256 of every file with a receipt is kept in
:class:`CollectorState`, so a re-dropped or re-uploaded identical file is answered with a
``duplicate`` receipt naming the original one, and nothing is published. A collector
that dies before the receipt leaves the file in ``drop_dir``; it is processed again on
restart and its claims are published a second time; the normalise stage derives event
ids from (payer_id, claim_id, line index), so those copies collapse downstream.

Only complete files are read: names starting with ``.`` or ending in one of
``ignore_suffixes`` (``.tmp``, ``.part``, ...) are skipped, and a file is read once its
size and modification time stayed the same across two polls and it is older than
``settle_s``. Senders should write ``NAME.part`` and rename it when done. Logs name files,
line numbers and counts only, never field values.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import hashlib
import hmac
import io
import json
import logging
import math
import os
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, tzinfo
from pathlib import Path
from typing import Any, ClassVar, Final, Literal, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from aiohttp import BodyPartReader, web
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from producers.base import (
    MAX_DEAD_LETTER_BYTES,
    MAX_RECORD_BYTES,
    AsyncPublisher,
    Collector,
    CollectorConfig,
    CollectorState,
    ConfigError,
    DeliveryFailed,
    RecordTooLarge,
    RefusalBudget,
    SourceUnavailable,
    run_async,
    wall_clock_ms,
)
from schemas.identity import national_id_is_valid
from schemas.serde import SerializationError

log = logging.getLogger("medstream.collector.claims")
T = TypeVar("T")

#: Columns a batch must have (after aliases are resolved).
REQUIRED_COLUMNS: Final = (
    "payer_id",
    "claim_id",
    "submitted_time",
    "patient_local_id",
    "line_no",
    "item_code",
    "item_display",
    "quantity",
    "unit_price",
    "amount",
    "service_date",
)
#: Columns a batch may have.
OPTIONAL_COLUMNS: Final = (
    "organisation_id",
    "patient_id_number",
    "encounter_ref",
    "diagnosis_codes",
)
#: Other names accepted for a column.
COLUMN_ALIASES: Final = {"item_name": "item_display"}
#: Columns that describe the claim, so every line of a claim must repeat the same value.
CLAIM_COLUMNS: Final = (
    "organisation_id",
    "submitted_time",
    "patient_id_number",
    "patient_local_id",
    "encounter_ref",
    "diagnosis_codes",
)
#: Receipt statuses.
Status = Literal["accepted", "partially_accepted", "rejected", "duplicate"]
UPLOAD_PATH: Final = "/claims/batches"

_FILES: Final = "claims.files"  # CollectorState namespace: sha256 -> original receipt summary
_MOVING: Final = "claims.moving"  # kv: a drop file with a receipt, not yet moved out
_CODE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,63}")
_DECIMAL: Final = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_WHOLE: Final = re.compile(r"\d{1,6}")
_DATE: Final = re.compile(r"\d{4}-\d{2}-\d{2}")
_DATE_TIME: Final = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}.*")
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")
_EARLIEST_SUBMITTED_MS: Final = int(datetime(1900, 1, 1, tzinfo=UTC).timestamp() * 1000)
_LATEST_SUBMITTED_MS: Final = int(datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp() * 1000)
_SAFE_NAME: Final = re.compile(r"[^A-Za-z0-9._-]+")
_RETRY_AFTER_S: Final = "5"
_READ_CHUNK: Final = 1 << 16
_SHA_PREFIX: Final = 12


# --- configuration ------------------------------------------------------------------------


class PayerConfig(BaseModel):
    """One insurer this collector takes claims from."""

    model_config = ConfigDict(extra="forbid")

    source_system: str | None = Field(
        default=None,
        min_length=1,
        description="source_system of this payer's raw records (default: the collector's)",
    )
    token_sha256: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{64}$",
        description="hex SHA-256 of the payer's upload bearer token (none: no upload)",
    )

    @field_validator("token_sha256", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        # ``${P001_TOKEN_SHA256:-}`` in the YAML: an unset variable means "no upload".
        return None if value == "" else value


class UploadConfig(BaseModel):
    """The HTTP upload endpoint (POST /claims/batches)."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field(default="127.0.0.1", description="address to listen on")
    port: int = Field(default=8091, ge=0, le=65535, description="TCP port (0: any free port)")
    max_upload_bytes: int = Field(
        default=20 * 1024 * 1024, ge=1024, description="larger uploads are answered 413"
    )
    max_concurrent_uploads: int = Field(
        default=4,
        ge=1,
        description="uploads read and processed at once (each buffers its file); more are "
        "answered 503 with Retry-After",
    )


class ClaimsConfig(CollectorConfig):
    """Settings of a claims collector (see deploy/collectors/claims.example.yaml)."""

    kind: Literal["claims"] = "claims"
    drop_dir: Path = Field(description="watched directory; receipts/, processed/, failed/ inside")
    watch: bool = Field(default=True, description="poll drop_dir (false: upload only)")
    poll_interval_s: float = Field(default=1.0, gt=0, description="seconds between polls")
    settle_s: float = Field(
        default=1.0, ge=0, description="a file must be unchanged for this long before it is read"
    )
    ignore_suffixes: list[str] = Field(
        default=[".tmp", ".part", ".partial", ".filepart", ".crdownload", ".swp", "~"],
        description="files still being written end in one of these and are skipped",
    )
    max_file_bytes: int = Field(
        default=50 * 1024 * 1024, ge=1024, description="larger dropped files are rejected whole"
    )
    delimiter: str = Field(default=",", min_length=1, max_length=1, description="CSV delimiter")
    source_timezone: str = Field(
        default="UTC", description="time zone of submitted_time values without an offset"
    )
    payers: dict[str, PayerConfig] = Field(
        default_factory=dict,
        description="accepted payer ids (empty: any payer in the drop directory, no upload)",
    )
    organisations: list[str] | None = Field(
        default=None, description="accepted organisation_id values (default: any)"
    )
    upload: UploadConfig | None = Field(default=None, description="the HTTP upload endpoint")
    max_in_flight: int = Field(
        default=5000, ge=1, description="claims of one file in flight to the broker at once"
    )
    retry_interval_s: float = Field(
        default=5.0, gt=0, description="wait before retrying a file the broker did not take"
    )

    @field_validator("source_timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}") from None
        return value

    @field_validator("payers")
    @classmethod
    def _payer_ids(cls, value: dict[str, PayerConfig]) -> dict[str, PayerConfig]:
        for payer_id in value:
            if not _CODE.fullmatch(payer_id):
                raise ValueError(f"payer id {payer_id!r} is not a valid code")
        return value

    @model_validator(mode="after")
    def _upload_needs_credentials(self) -> ClaimsConfig:
        if self.upload is not None and not any(p.token_sha256 for p in self.payers.values()):
            raise ValueError("upload needs at least one payer with token_sha256")
        if not self.watch and self.upload is None:
            raise ValueError("watch is false and no upload is configured: nothing to collect")
        return self


def token_sha256(token: str) -> str:
    """The hex SHA-256 of an upload bearer token, as stored in ``payers.*.token_sha256``."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


# --- one row -------------------------------------------------------------------------------


def _code(value: str) -> str:
    if not _CODE.fullmatch(value):
        raise ValueError("not a valid code (letters, digits, . _ : / -; at most 64 characters)")
    return value


def _text(value: str, limit: int) -> str:
    if len(value) > limit or _CONTROL.search(value):
        raise ValueError(f"not valid text (at most {limit} characters, no control characters)")
    return value


class ClaimRow(BaseModel):
    """One CSV row (one claim line) validated; empty cells are absent before validation.

    Error messages name what is wrong, never the value (it may be patient data).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    payer_id: str
    claim_id: str
    organisation_id: str
    submitted_time: int  # ms since the epoch
    patient_id_number: str | None = None
    patient_local_id: str
    encounter_ref: str | None = None
    diagnosis_codes: tuple[str, ...] = ()
    line_no: int
    item_code: str
    item_display: str
    quantity: float
    unit_price: float
    amount: float
    service_date: date

    @field_validator("payer_id", "claim_id", "organisation_id", "item_code", mode="before")
    @classmethod
    def _codes(cls, value: str) -> str:
        return _code(value)

    @field_validator("patient_local_id", "encounter_ref", mode="before")
    @classmethod
    def _identifiers(cls, value: str) -> str:
        return _text(value, 64)

    @field_validator("item_display", mode="before")
    @classmethod
    def _display(cls, value: str) -> str:
        return _text(value, 200)

    @field_validator("submitted_time", mode="before")
    @classmethod
    def _instant(cls, value: str, info: ValidationInfo) -> int:
        zone: tzinfo = (info.context or {}).get("timezone", UTC)
        moment = None
        if _DATE_TIME.fullmatch(value):
            with contextlib.suppress(ValueError):
                moment = datetime.fromisoformat(value)
        if moment is None:
            raise ValueError("not an ISO 8601 date-time (YYYY-MM-DDTHH:MM:SS, optional offset)")
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=zone)
        instant_ms = int(moment.timestamp() * 1000)
        if not _EARLIEST_SUBMITTED_MS <= instant_ms <= _LATEST_SUBMITTED_MS:
            # Beyond year 9999 (or before year 1) in UTC no reader can decode the record;
            # a claim from before 1900 is a typing error, not a claim.
            raise ValueError("not between 1900-01-01 and 9999-12-31 (UTC)")
        return instant_ms

    @field_validator("patient_id_number", mode="before")
    @classmethod
    def _national_id(cls, value: str) -> str:
        value = value.upper()
        if not national_id_is_valid(value):
            raise ValueError("not a valid 18-character national ID number (format or check digit)")
        return value

    @field_validator("diagnosis_codes", mode="before")
    @classmethod
    def _diagnoses(cls, value: str) -> tuple[str, ...]:
        codes = tuple(code.strip() for code in value.split(";") if code.strip())
        for code in codes:
            if len(code) > 32 or _CONTROL.search(code):
                raise ValueError("a code is not valid (at most 32 characters each, ';' between)")
        return codes

    @field_validator("line_no", mode="before")
    @classmethod
    def _line_no(cls, value: str) -> int:
        if not _WHOLE.fullmatch(value) or int(value) < 1:
            raise ValueError("not a positive whole number")
        return int(value)

    @field_validator("quantity", "unit_price", "amount", mode="before")
    @classmethod
    def _decimal(cls, value: str) -> float:
        if not _DECIMAL.fullmatch(value):
            raise ValueError("not a decimal number (digits with an optional '.')")
        number = float(value)
        if not math.isfinite(number):
            raise ValueError("not a finite number")
        if number < 0:
            raise ValueError("must not be negative (send reversals as a new claim)")
        return number

    @field_validator("service_date", mode="before")
    @classmethod
    def _date(cls, value: str) -> date:
        try:
            if not _DATE.fullmatch(value):
                raise ValueError
            return date.fromisoformat(value)
        except ValueError:
            raise ValueError("not a date (YYYY-MM-DD)") from None


# --- one batch (pure) ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LineError:
    """Why a row (or the file) is not accepted: file line number, column, reason."""

    line: int | None
    field: str | None
    reason: str

    def as_text(self) -> str:
        """``line 7: quantity: not a decimal number`` (no values)."""
        parts = [f"line {self.line}" if self.line is not None else "file"]
        if self.field:
            parts.append(self.field)
        return ": ".join([*parts, self.reason])

    def as_json(self) -> dict[str, Any]:
        """The receipt form."""
        return {"line": self.line, "field": self.field, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class AcceptedClaim:
    """A valid claim: the raw ``Claim`` record and the file lines it came from."""

    payer_id: str
    claim_id: str
    record: dict[str, Any]
    lines: list[int]
    #: The header and the claim's source lines, for a dead letter if publishing refuses it.
    original: bytes = b""

    @property
    def partition_key(self) -> str:
        """One patient's records share a partition (as the simulator keys them)."""
        return f"{self.record['organisation_id']}:{self.record['patient_local_id']}"


@dataclass(slots=True)
class RejectedClaim:
    """A claim (or the rows without a claim id) that is not published, with every reason."""

    payer_id: str | None
    claim_id: str | None
    lines: list[int]
    errors: list[LineError]
    organisation_id: str | None
    original: bytes
    dead_letter_id: str | None = None

    @property
    def reason(self) -> str:
        """The dead-letter reason: line numbers, columns and reasons, never values."""
        what = "claim" if self.claim_id else "rows without payer_id/claim_id"
        lines = ", ".join(str(n) for n in self.lines)
        return f"{what} on lines {lines} rejected: " + "; ".join(e.as_text() for e in self.errors)


@dataclass(slots=True)
class ParsedBatch:
    """The outcome of reading one CSV batch: accepted and rejected claims or a file error."""

    rows: int = 0
    accepted: list[AcceptedClaim] = field(default_factory=list)
    rejected: list[RejectedClaim] = field(default_factory=list)
    file_errors: list[LineError] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def claims(self) -> int:
        """Claims read (accepted and rejected)."""
        return len(self.accepted) + len(self.rejected)


@dataclass(frozen=True, slots=True)
class BatchRules:
    """What a batch is checked against (from the configuration and the upload's payer)."""

    default_organisation: str
    default_source_system: str
    timezone: tzinfo = UTC
    delimiter: str = ","
    payers: dict[str, str | None] | None = None  # payer_id -> source_system; None: any payer
    organisations: frozenset[str] | None = None
    uploaded_by: str | None = None
    max_file_bytes: int | None = None

    @classmethod
    def from_config(cls, config: ClaimsConfig, uploaded_by: str | None = None) -> BatchRules:
        """The rules of a collector configuration."""
        return cls(
            default_organisation=config.organisation_id,
            default_source_system=config.source_system,
            timezone=ZoneInfo(config.source_timezone),
            delimiter=config.delimiter,
            payers={p: c.source_system for p, c in config.payers.items()} or None,
            organisations=frozenset(config.organisations) if config.organisations else None,
            uploaded_by=uploaded_by,
            max_file_bytes=config.max_file_bytes,
        )


@dataclass(slots=True)
class _Row:
    first_line: int
    last_line: int
    values: dict[str, str]
    errors: list[LineError]
    valid: ClaimRow | None = None


def _header_columns(names: list[str], first_line: int) -> tuple[list[str | None], list[str]]:
    """Canonical column per header cell (None: ignored) and the ignored names; a repeated or
    missing column rejects the file."""
    known = set(REQUIRED_COLUMNS) | set(OPTIONAL_COLUMNS)
    columns: list[str | None] = []
    ignored: list[str] = []
    seen: set[str] = set()
    for raw in names:
        name = raw.strip().lower()
        name = COLUMN_ALIASES.get(name, name)
        if name in known:
            if name in seen:
                raise _FileProblem(LineError(first_line, name, "column appears more than once"))
            seen.add(name)
            columns.append(name)
        else:
            columns.append(None)
            ignored.append(_SAFE_NAME.sub("_", raw.strip())[:40] or "(empty)")
    missing = [c for c in REQUIRED_COLUMNS if c not in seen]
    if missing:
        raise _FileProblem(
            LineError(first_line, None, f"header lacks required columns: {', '.join(missing)}")
        )
    return columns, ignored


class _FileProblem(Exception):
    def __init__(self, error: LineError) -> None:
        super().__init__(error.as_text())
        self.error = error


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise _FileProblem(LineError(line, None, "not UTF-8 text (is this a CSV file?)")) from None


def _read_rows(physical: list[str], delimiter: str) -> Iterator[tuple[int, int, list[str]]]:
    """(first line, last line, cells) of every non-blank CSV record of the file's lines."""
    reader = csv.reader(iter(physical), delimiter=delimiter, strict=True)
    last = 0
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise _FileProblem(
                LineError(reader.line_num, None, f"not valid CSV ({exc})")
            ) from None
        first, last = last + 1, reader.line_num
        if any(cell.strip() for cell in cells):
            yield first, last, cells


def _validate_row(row: _Row, rules: BatchRules) -> None:
    values: dict[str, str] = {k: v for k, v in row.values.items() if v}
    values.setdefault("organisation_id", rules.default_organisation)
    try:
        row.valid = ClaimRow.model_validate(values, context={"timezone": rules.timezone})
    except ValidationError as exc:
        for err in exc.errors():
            column = str(err["loc"][0]) if err["loc"] else None
            if err["type"] == "missing":
                reason = "required value is empty"
            elif err["type"] == "value_error":
                reason = str(err["ctx"]["error"])
            else:  # pydantic's own messages name the expected type, not the input
                reason = str(err["msg"])
            row.errors.append(LineError(row.first_line, column, reason))


def _claim_errors(rows: list[_Row], rules: BatchRules) -> list[LineError]:
    """Problems of a claim as a whole: lines that disagree, repeated line numbers, payer."""
    errors: list[LineError] = []
    first = rows[0]
    for row in rows[1:]:
        for column in CLAIM_COLUMNS:
            if row.values.get(column, "") != first.values.get(column, ""):
                errors.append(
                    LineError(row.first_line, column, f"differs from line {first.first_line}")
                )
    seen: dict[int, int] = {}
    for row in rows:
        if row.valid is None:
            continue
        earlier = seen.setdefault(row.valid.line_no, row.first_line)
        if earlier != row.first_line:
            errors.append(LineError(row.first_line, "line_no", f"repeats line {earlier}"))
    payer_id = first.values["payer_id"]
    if rules.payers is not None and payer_id not in rules.payers:
        errors.append(
            LineError(first.first_line, "payer_id", "payer is not configured for this collector")
        )
    if rules.uploaded_by is not None and payer_id != rules.uploaded_by:
        errors.append(
            LineError(first.first_line, "payer_id", "differs from the payer that uploaded the file")
        )
    organisation = first.values.get("organisation_id") or rules.default_organisation
    if rules.organisations is not None and organisation not in rules.organisations:
        errors.append(
            LineError(
                first.first_line,
                "organisation_id",
                "organisation is not served by this collector",
            )
        )
    return errors


def _claim_record(rows: list[_Row], rules: BatchRules) -> dict[str, Any]:
    head = rows[0].valid
    assert head is not None
    payer_source = rules.payers.get(head.payer_id) if rules.payers else None
    lines = sorted((r.valid for r in rows if r.valid is not None), key=lambda v: v.line_no)
    return {
        "claim_id": head.claim_id,
        "payer_id": head.payer_id,
        "organisation_id": head.organisation_id,
        "source_system": payer_source or rules.default_source_system,
        "submitted_time": head.submitted_time,
        "patient_id_number": head.patient_id_number,
        "patient_local_id": head.patient_local_id,
        "encounter_ref": head.encounter_ref,
        "diagnosis_codes": list(head.diagnosis_codes),
        "lines": [
            {
                "line_no": line.line_no,
                "item_code": line.item_code,
                "item_display": line.item_display,
                "quantity": line.quantity,
                "unit_price": line.unit_price,
                "amount": line.amount,
                "service_date": line.service_date,
            }
            for line in lines
        ],
    }


def _original(header: str, physical: list[str], rows: list[_Row]) -> bytes:
    """The header and the rows' exact source lines: the dead letter's original value."""
    parts = [header]
    for row in rows:
        parts.extend(physical[row.first_line - 1 : row.last_line])
    return "".join(parts).encode("utf-8")[:MAX_DEAD_LETTER_BYTES]


def parse_batch(data: bytes, rules: BatchRules) -> ParsedBatch:
    """Read one CSV batch: group its rows into claims and validate them (pure)."""
    batch = ParsedBatch()
    try:
        if rules.max_file_bytes is not None and len(data) > rules.max_file_bytes:
            raise _FileProblem(
                LineError(None, None, f"file is larger than {rules.max_file_bytes} bytes")
            )
        if not data.strip():
            raise _FileProblem(LineError(None, None, "file is empty"))
        text = _decode(data)
        # Physical lines as the csv module counts them (a quoted field may span lines).
        physical = list(io.StringIO(text, newline=""))
        del text
        records = _read_rows(physical, rules.delimiter)
        try:
            header_first, header_last, header_cells = next(records)
        except StopIteration:
            raise _FileProblem(LineError(None, None, "file is empty")) from None
        columns, ignored = _header_columns(header_cells, header_first)
        if ignored:
            batch.warnings.append(f"ignored columns: {', '.join(ignored)}")
        header_text = "".join(physical[header_first - 1 : header_last])
        claims: dict[tuple[str, str], list[_Row]] = {}
        unidentified: list[_Row] = []
        for first, last, cells in records:
            batch.rows += 1
            row = _Row(first, last, {}, [])
            for column, cell in zip(columns, cells, strict=False):
                if column is not None:
                    row.values[column] = cell.strip()
            if len(cells) != len(columns):
                count = f"has {len(cells)} fields, the header has {len(columns)}"
                row.errors.append(LineError(first, None, count))
            _validate_row(row, rules)
            payer_id, claim_id = row.values.get("payer_id"), row.values.get("claim_id")
            if payer_id and claim_id:
                claims.setdefault((payer_id, claim_id), []).append(row)
            else:
                unidentified.append(row)
        if batch.rows == 0:
            raise _FileProblem(LineError(None, None, "file has a header but no claim rows"))
    except _FileProblem as problem:
        batch.file_errors.append(problem.error)
        return batch
    for (payer_id, claim_id), rows in claims.items():
        errors = [e for r in rows for e in r.errors] + _claim_errors(rows, rules)
        lines = [r.first_line for r in rows]
        if errors:
            errors.sort(key=lambda e: (e.line or 0))
            valid_org = next((r.valid.organisation_id for r in rows if r.valid), None)
            batch.rejected.append(
                RejectedClaim(
                    payer_id, claim_id, lines, errors, valid_org,
                    _original(header_text, physical, rows),
                )
            )
        else:
            batch.accepted.append(
                AcceptedClaim(
                    payer_id, claim_id, _claim_record(rows, rules), lines,
                    _original(header_text, physical, rows),
                )
            )
    if unidentified:
        errors = [e for r in unidentified for e in r.errors]
        batch.rejected.append(
            RejectedClaim(
                None,
                None,
                [r.first_line for r in unidentified],
                errors,
                None,
                _original(header_text, physical, unidentified),
            )
        )
    return batch


# --- receipts ------------------------------------------------------------------------------


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def safe_file_name(name: str) -> str:
    """A file name usable in receipts/ and processed/ (no directories, no odd characters)."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = _SAFE_NAME.sub("_", base).strip("._")[:100]
    return cleaned or "batch.csv"


def receipt_name(file_name: str, sha256: str) -> str:
    """The receipt file of a batch: ``NAME.SHA256PREFIX.receipt.json``."""
    return f"{safe_file_name(file_name)}.{sha256[:_SHA_PREFIX]}.receipt.json"


@dataclass(frozen=True, slots=True)
class Batch:
    """One received file: its bytes and where it came from."""

    file_name: str
    data: bytes
    channel: Literal["drop_dir", "upload"]
    received_ms: int
    uploaded_by: str | None = None
    path: Path | None = None
    mtime_s: float | None = None

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of the file's bytes: the at-most-once key."""
        return hashlib.sha256(self.data).hexdigest()


def build_receipt(
    batch: Batch,
    sha256: str,
    parsed: ParsedBatch | None,
    collector: str,
    *,
    file_dead_letter: str | None = None,
    original: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The receipt of one batch (``parsed`` None with ``original``: a duplicate)."""
    receipt: dict[str, Any] = {
        "receipt_version": 1,
        "collector": collector,
        "channel": batch.channel,
        "uploaded_by": batch.uploaded_by,
        "file_name": batch.file_name,
        "sha256": sha256,
        "size_bytes": len(batch.data),
        "received_time": _iso(batch.received_ms),
        "completed_time": _iso(wall_clock_ms()),
    }
    if parsed is None:
        assert original is not None
        receipt.update(
            status="duplicate",
            original_receipt=original.get("receipt"),
            original_received_time=original.get("received_time"),
            original_status=original.get("status"),
            counts={"rows": 0, "claims": 0, "claims_accepted": 0, "claims_rejected": 0,
                    "lines_accepted": 0, "lines_rejected": 0},
            claims_accepted=[],
            claims_rejected=[],
            file_errors=[],
            warnings=["identical to a file received before; nothing was published"],
        )
        return receipt
    status: Status
    if parsed.accepted and not parsed.rejected:
        status = "accepted"
    elif parsed.accepted:
        status = "partially_accepted"
    else:
        status = "rejected"
    receipt.update(
        status=status,
        counts={
            "rows": parsed.rows,
            "claims": parsed.claims,
            "claims_accepted": len(parsed.accepted),
            "claims_rejected": len(parsed.rejected),
            "lines_accepted": sum(len(c.lines) for c in parsed.accepted),
            "lines_rejected": sum(len(c.lines) for c in parsed.rejected),
        },
        claims_accepted=[
            {"payer_id": c.payer_id, "claim_id": c.claim_id, "lines": c.lines}
            for c in parsed.accepted
        ],
        claims_rejected=[
            {
                "payer_id": c.payer_id,
                "claim_id": c.claim_id,
                "lines": c.lines,
                "errors": [e.as_json() for e in c.errors],
                "dead_letter_id": c.dead_letter_id,
            }
            for c in parsed.rejected
        ],
        file_errors=[e.as_json() for e in parsed.file_errors],
        warnings=parsed.warnings,
    )
    if file_dead_letter is not None:
        receipt["dead_letter_id"] = file_dead_letter
    return receipt


def _write_atomically(path: Path, content: bytes) -> None:
    """Write a file so that it is complete or absent, also after a crash."""
    partial = path.with_name(f".{path.name}.tmp")
    with open(partial, "wb") as handle:
        handle.write(content)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _free_path(directory: Path, name: str, sha256: str) -> Path:
    """``directory/name``, or a name with the hash prefix (and a counter) when taken."""
    target = directory / name
    if not target.exists():
        return target
    stem, dot, suffix = name.rpartition(".")
    if not dot:
        stem, suffix = name, ""
    for n in range(10_000):
        tail = f".{n}" if n else ""
        target = directory / f"{stem}.{sha256[:_SHA_PREFIX]}{tail}{'.' if suffix else ''}{suffix}"
        if not target.exists():
            return target
    raise OSError(f"no free name for {name} in {directory}")


# --- the collector ------------------------------------------------------------------------


class BatchNotDurable(RuntimeError):
    """The broker did not acknowledge every record of a batch: no receipt, try again later."""


class ClaimsProducer(Collector[ClaimsConfig]):
    """Drop directory and HTTP upload of CSV claim batches: one raw Claim per claim."""

    kind: ClassVar[str] = "claims"
    source_kind: ClassVar[str] = "claim"
    config_model: ClassVar[type[CollectorConfig]] = ClaimsConfig

    def __init__(self, config: ClaimsConfig, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        #: Set once the drop directory is watched and the upload endpoint (if any) listens.
        self.watching = threading.Event()
        #: The bound upload port (when ``upload`` is configured), once :attr:`watching` is set.
        self.port: int | None = None
        drop = config.drop_dir
        self.receipts_dir = drop / "receipts"
        self.processed_dir = drop / "processed"
        self.failed_dir = drop / "failed"
        self._publisher: AsyncPublisher | None = None
        self._state: CollectorState | None = None
        self._busy: dict[str, asyncio.Event] = {}
        self._uploads = 0  # uploads being read or processed now
        #: Bounds the dead letters a payer's refused uploads make (413).
        self._refusals = RefusalBudget()
        self._observed: dict[str, tuple[int, int]] = {}  # name -> (size, mtime_ns) last poll
        self._retry_after: dict[str, float] = {}
        self._tokens = {
            payer_id: payer.token_sha256
            for payer_id, payer in config.payers.items()
            if payer.token_sha256
        }

    # -- check and run ----------------------------------------------------------------------

    def check(self) -> list[str]:
        """The drop directory must exist and be writable; the upload port must be free."""
        config = self.config
        drop = config.drop_dir
        if not drop.is_dir():
            # Often a share that is not mounted yet: exit 1 so that `up` tries again.
            raise SourceUnavailable(
                f"{config.name}: drop_dir {drop} does not exist or is no directory"
            )
        if not os.access(drop, os.W_OK | os.X_OK):
            raise ConfigError(f"{config.name}: drop_dir {drop} is not writable")
        findings = [
            f"{config.name}: drop_dir {drop} is writable"
            + ("" if config.watch else " (not watched: upload only)")
        ]
        if config.upload is not None:
            upload = config.upload
            family = socket.AF_INET6 if ":" in upload.host else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind((upload.host, upload.port))
                except OSError as exc:
                    raise ConfigError(
                        f"{config.name}: cannot listen on {upload.host}:{upload.port} "
                        f"({exc.strerror})"
                    ) from None
            findings.append(
                f"{config.name}: upload on {upload.host}:{upload.port}{UPLOAD_PATH} for "
                f"{len(self._tokens)} payers"
            )
        return findings

    def run(self, stop: threading.Event) -> None:
        """Watch and listen until ``stop`` is set; a file being processed is finished first."""
        run_async(self.serve, stop)

    async def serve(self, stop: threading.Event) -> None:
        """The asyncio body of :meth:`run` (usable directly in a running loop)."""
        config = self.config
        if not config.drop_dir.is_dir():
            raise SourceUnavailable(f"{config.name}: drop_dir {config.drop_dir} does not exist")
        for directory in (self.receipts_dir, self.processed_dir, self.failed_dir):
            directory.mkdir(exist_ok=True)
        self._state = CollectorState(self.state_dir / "claims.sqlite")
        self._publisher = AsyncPublisher(self.publisher, max_in_flight=config.max_in_flight)
        self._publisher.start()
        runner: web.AppRunner | None = None
        try:
            await asyncio.to_thread(self._finish_interrupted_move)
            if config.upload is not None:
                runner = await self._start_upload(config.upload)
            self.metrics.ready.set(1)
            self.watching.set()
            log.info("%s: watching %s", config.name, config.drop_dir if config.watch else "-")
            while not stop.is_set():
                if config.watch:
                    await self._poll_drop_dir(stop)
                deadline = time.monotonic() + config.poll_interval_s
                while not stop.is_set() and time.monotonic() < deadline:
                    await asyncio.sleep(min(0.05, config.poll_interval_s))
                await self._refusals.dead_letter_due(
                    self._publisher, config.name, config.organisation_id
                )
        finally:
            self.metrics.ready.set(0)
            self.watching.clear()
            if runner is not None:
                await runner.cleanup()  # lets uploads in progress finish
            await self._refusals.dead_letter_due(
                self._publisher, config.name, config.organisation_id, final=True
            )
            unacknowledged = await self._publisher.close()
            if unacknowledged:
                log.error("%s: %d records unacknowledged at shutdown", config.name, unacknowledged)
            self._state.close()
            log.info("%s: stopped", config.name)

    # -- the drop directory -----------------------------------------------------------------

    def _ready_files(self) -> list[tuple[float, Path, os.stat_result]]:
        """Files complete enough to read, oldest first; remembers what each poll saw."""
        config = self.config
        now = time.time()
        observed: dict[str, tuple[int, int]] = {}
        ready: list[tuple[float, Path, os.stat_result]] = []
        suffixes = tuple(s.lower() for s in config.ignore_suffixes)
        try:
            entries = os.scandir(config.drop_dir)
        except FileNotFoundError:
            raise SourceUnavailable(
                f"{config.name}: drop_dir {config.drop_dir} disappeared"
            ) from None
        with entries:
            for entry in entries:
                name = entry.name
                if name.startswith(".") or name.lower().endswith(suffixes):
                    continue
                try:
                    if not entry.is_file():
                        continue
                    stat = entry.stat()
                except OSError:
                    continue
                seen = (stat.st_size, stat.st_mtime_ns)
                observed[name] = seen
                if self._observed.get(name) != seen or now - stat.st_mtime < config.settle_s:
                    continue  # still changing (or first seen): wait for the next poll
                if self._retry_after.get(name, 0.0) > time.monotonic():
                    continue
                ready.append((stat.st_mtime, Path(entry.path), stat))
        self._observed = observed
        ready.sort(key=lambda item: (item[0], item[1].name))
        return ready

    async def _poll_drop_dir(self, stop: threading.Event) -> None:
        ready = await asyncio.to_thread(self._ready_files)
        if not ready:
            self.metrics.source_lag.set(0)
        for mtime, path, stat in ready:
            if stop.is_set():
                return
            self.metrics.source_lag.set(max(0.0, time.time() - mtime))
            try:
                await self._take_dropped(path, stat)
            except BatchNotDurable as exc:
                log.error(
                    "%s: %s not completed (%s); retrying in %.0f s",
                    self.config.name, path.name, exc, self.config.retry_interval_s,
                )
                self._retry_after[path.name] = time.monotonic() + self.config.retry_interval_s
            except OSError as exc:
                log.error(
                    "%s: cannot process %s (%s); retrying in %.0f s",
                    self.config.name, path.name, exc.strerror or exc, self.config.retry_interval_s,
                )
                self._retry_after[path.name] = time.monotonic() + self.config.retry_interval_s
            except Exception as exc:
                # Never crash on (and restart into) the same file again and again.
                log.exception("%s: processing %s failed unexpectedly", self.config.name, path.name)
                await self._quarantine(path, exc)
            else:
                self._retry_after.pop(path.name, None)

    async def _quarantine(self, path: Path, failure: Exception) -> None:
        """Reject a dropped file whose processing failed unexpectedly: dead letter, receipt
        and failed/. When even that fails (other than the broker or the disk being away,
        which are retried), the file is moved to failed/ as is and the collector exits."""
        config = self.config
        try:
            data = await asyncio.to_thread(path.read_bytes)
            batch = Batch(path.name, data, "drop_dir", wall_clock_ms(), path=path)
            await self._reject_after_failure(batch, failure)
        except (DeliveryFailed, OSError) as exc:
            log.error(
                "%s: %s could not be set aside (%s); retrying in %.0f s",
                config.name, path.name, exc, config.retry_interval_s,
            )
            self._retry_after[path.name] = time.monotonic() + config.retry_interval_s
        except Exception as exc:
            with contextlib.suppress(OSError):
                target = _free_path(self.failed_dir, path.name, "0" * _SHA_PREFIX)
                await asyncio.to_thread(os.replace, path, target)
            raise RuntimeError(
                f"{config.name}: {path.name} failed ({type(failure).__name__}) and could not "
                f"be rejected ({type(exc).__name__}); moved to {self.failed_dir}"
            ) from exc
        else:
            self._retry_after.pop(path.name, None)

    async def _reject_after_failure(self, batch: Batch, failure: Exception) -> dict[str, Any]:
        """Reject a whole batch the collector failed to process: one ``internal_error`` dead
        letter with its bytes, a ``rejected`` receipt, the file to failed/. Not remembered
        as received, so the same file sent again (once the fault is fixed) is processed."""
        assert self._publisher is not None
        sha256 = batch.sha256
        reason = (
            f"the collector failed to process this file ({type(failure).__name__}); "
            "nothing of it is accepted; send it again once the fault is fixed"
        )
        parsed = ParsedBatch(file_errors=[LineError(None, None, reason)])
        dlq_id = await self._publisher.dead_letter(
            "internal_error",
            f"file {batch.file_name} ({sha256[:_SHA_PREFIX]}): {reason}",
            batch.data,
            organisation_id=self.config.organisation_id,
            original_key=sha256.encode(),
            received_ms=batch.received_ms,
        )
        receipt = build_receipt(batch, sha256, parsed, self.config.name, file_dead_letter=dlq_id)
        name = receipt_name(batch.file_name, sha256)
        await self._write_receipt(name, receipt)
        await self._finish(batch, sha256, receipt, remember=None)
        log.error(
            "%s: %s (%s) rejected after an internal error; dead letter %s, receipt %s",
            self.config.name, batch.file_name, sha256[:_SHA_PREFIX], dlq_id, name,
        )
        return receipt

    async def _take_dropped(self, path: Path, stat: os.stat_result) -> None:
        """Process one complete file of the drop directory and move it out."""
        received_ms = wall_clock_ms()
        data = await asyncio.to_thread(path.read_bytes)
        after = await asyncio.to_thread(path.stat)
        if (after.st_size, after.st_mtime_ns) != (stat.st_size, stat.st_mtime_ns):
            log.info("%s: %s changed while read; waiting", self.config.name, path.name)
            return
        batch = Batch(path.name, data, "drop_dir", received_ms, path=path, mtime_s=stat.st_mtime)
        await self.process(batch)

    def _finish_interrupted_move(self) -> None:
        """A file whose receipt was written before a crash is remembered and moved now."""
        assert self._state is not None
        pending = self._state.get(_MOVING)
        if pending is None:
            return
        moving = json.loads(pending)
        path = Path(moving["path"])
        if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == moving["sha256"]:
            self._state.remember(_FILES, moving["sha256"], json.dumps(moving["summary"]))
            self._move_out(path, moving["sha256"], moving["summary"]["status"])
            log.info("%s: moved %s out after a restart", self.config.name, path.name)
        self._state.delete(_MOVING)

    def _move_out(self, path: Path, sha256: str, status: str) -> Path:
        directory = self.failed_dir if status == "rejected" else self.processed_dir
        target = _free_path(directory, path.name, sha256)
        os.replace(path, target)
        _fsync_dir(directory)
        _fsync_dir(path.parent)
        return target

    # -- one batch, whichever channel -------------------------------------------------------

    async def process(self, batch: Batch) -> dict[str, Any]:
        """Publish a batch's valid claims and dead letters, then write its receipt.

        Returns the receipt. Raises :class:`BatchNotDurable` when the broker did not
        acknowledge everything: then no receipt exists and the batch is not remembered.
        """
        sha256 = batch.sha256
        while (pending := self._busy.get(sha256)) is not None:
            await pending.wait()  # the same bytes arriving twice at once are processed once
        done = asyncio.Event()
        self._busy[sha256] = done
        try:
            return await self._process_exclusively(batch, sha256)
        finally:
            del self._busy[sha256]
            done.set()

    async def _process_exclusively(self, batch: Batch, sha256: str) -> dict[str, Any]:
        assert self._state is not None
        config = self.config
        earlier = await asyncio.to_thread(self._state.seen, _FILES, sha256)
        if earlier is not None:
            receipt = build_receipt(batch, sha256, None, config.name, original=json.loads(earlier))
            name = f"{safe_file_name(batch.file_name)}.{sha256[:_SHA_PREFIX]}" \
                f".duplicate-{batch.received_ms}.receipt.json"
            await self._write_receipt(name, receipt)
            log.info(
                "%s: %s (%s) is a duplicate of %s; nothing published",
                config.name, batch.file_name, sha256[:_SHA_PREFIX], receipt["original_receipt"],
            )
            await self._finish(batch, sha256, receipt, remember=None)
            return receipt
        rules = BatchRules.from_config(config, uploaded_by=batch.uploaded_by)
        parsed = await asyncio.to_thread(parse_batch, batch.data, rules)
        self.metrics.read.inc(parsed.claims)
        file_dead_letter = await self._publish(batch, sha256, parsed)
        receipt = build_receipt(
            batch, sha256, parsed, config.name, file_dead_letter=file_dead_letter
        )
        name = receipt_name(batch.file_name, sha256)
        await self._write_receipt(name, receipt)
        log.info(
            "%s: %s (%s) %s: %d claims accepted, %d rejected; receipt %s",
            config.name, batch.file_name, sha256[:_SHA_PREFIX], receipt["status"],
            len(parsed.accepted), len(parsed.rejected), name,
        )
        summary = {
            "receipt": name,
            "status": receipt["status"],
            "received_time": receipt["received_time"],
            "file_name": batch.file_name,
        }
        await self._finish(batch, sha256, receipt, remember=summary)
        return receipt

    async def _finish(
        self, batch: Batch, sha256: str, receipt: dict[str, Any], remember: dict[str, Any] | None
    ) -> None:
        """Remember the file (durably) and move it (or a copy of an upload) out."""
        assert self._state is not None
        state = self._state
        status = receipt["status"]
        if batch.path is not None:
            if remember is not None:
                # Recorded first so that a crash before the move is finished on restart
                # instead of being taken for a re-dropped duplicate.
                moving = {"path": str(batch.path), "sha256": sha256, "summary": remember}
                await asyncio.to_thread(state.put, _MOVING, json.dumps(moving))
                await asyncio.to_thread(state.remember, _FILES, sha256, json.dumps(remember))
            await asyncio.to_thread(self._move_out, batch.path, sha256, status)
            if remember is not None:
                await asyncio.to_thread(state.delete, _MOVING)
            return
        if remember is not None:
            await asyncio.to_thread(state.remember, _FILES, sha256, json.dumps(remember))
        directory = self.failed_dir if status == "rejected" else self.processed_dir
        target = _free_path(directory, safe_file_name(batch.file_name), sha256)
        await asyncio.to_thread(_write_atomically, target, batch.data)

    async def _write_receipt(self, name: str, receipt: dict[str, Any]) -> None:
        content = json.dumps(receipt, indent=2, ensure_ascii=False).encode("utf-8")
        await asyncio.to_thread(_write_atomically, self.receipts_dir / name, content)

    async def _publish(self, batch: Batch, sha256: str, parsed: ParsedBatch) -> str | None:
        """Publish accepted claims and dead letters; wait for every ack. Returns the file's
        dead-letter id when the whole file was rejected."""
        assert self._publisher is not None
        publisher = self._publisher
        config = self.config
        encoded: list[tuple[str, bytes]] = []
        still_accepted: list[AcceptedClaim] = []

        def reject(claim: AcceptedClaim, field: str | None, why: str) -> None:
            parsed.rejected.append(
                RejectedClaim(
                    claim.payer_id, claim.claim_id, claim.lines,
                    [LineError(claim.lines[0], field, why)],
                    claim.record["organisation_id"], claim.original,
                )
            )

        too_large = (
            f"the claim's record is larger than a Kafka record may be ({MAX_RECORD_BYTES} "
            "bytes); send its lines as several claims"
        )
        for claim in parsed.accepted:
            try:
                value = self.publisher.encode(claim.record)
            except SerializationError as exc:  # validation should have caught it: say where
                reject(claim, exc.field, "does not fit the Claim contract")
                continue
            if len(value) > MAX_RECORD_BYTES:
                reject(claim, None, too_large)
                continue
            encoded.append((claim.partition_key, value))
            still_accepted.append(claim)
        parsed.accepted = []
        try:
            for start in range(0, len(encoded), config.max_in_flight):
                chunk = encoded[start : start + config.max_in_flight]
                async with self._slots(len(chunk)):
                    taken = await _all(self._publish_claim(key, value) for key, value in chunk)
                claims = still_accepted[start : start + config.max_in_flight]
                for claim, published in zip(claims, taken, strict=True):
                    if published:
                        parsed.accepted.append(claim)
                    else:  # the producer's own limit is lower than MAX_RECORD_BYTES
                        reject(claim, None, too_large)
            origin = f"{batch.file_name} ({sha256[:_SHA_PREFIX]})"
            file_dead_letter = None
            if parsed.file_errors:
                reason = f"file {origin} rejected: " + "; ".join(
                    e.as_text() for e in parsed.file_errors
                )
                async with self._slots(1):
                    file_dead_letter = await publisher.dead_letter(
                        "invalid_file",
                        reason,
                        batch.data,  # cut to MAX_DEAD_LETTER_BYTES by dead_letter
                        organisation_id=config.organisation_id,
                        original_key=sha256.encode(),
                        received_ms=batch.received_ms,
                    )
            for start in range(0, len(parsed.rejected), config.max_in_flight):
                chunk_rejected = parsed.rejected[start : start + config.max_in_flight]
                async with self._slots(len(chunk_rejected)):
                    ids = await _all(
                        self._dead_letter_claim(rejected, origin, batch.received_ms)
                        for rejected in chunk_rejected
                    )
                for rejected, dlq_id in zip(chunk_rejected, ids, strict=True):
                    rejected.dead_letter_id = dlq_id
        except DeliveryFailed as exc:
            raise BatchNotDurable(str(exc)) from None
        return file_dead_letter

    @contextlib.asynccontextmanager
    async def _slots(self, count: int) -> AsyncIterator[None]:
        """Hold ``count`` of the publisher's in-flight slots (shared by every batch being
        processed, drop directory and uploads alike), waiting until they are free."""
        assert self._publisher is not None
        publisher = self._publisher
        while not publisher.try_reserve(count):
            await asyncio.sleep(0.01)
        try:
            yield
        finally:
            publisher.release(count)

    async def _publish_claim(self, key: str, value: bytes) -> bool:
        """Publish one encoded claim; False when no Kafka record can hold it."""
        assert self._publisher is not None
        try:
            await self._publisher.publish(key, value)
        except RecordTooLarge:
            return False
        return True

    async def _dead_letter_claim(
        self, rejected: RejectedClaim, origin: str, received_ms: int
    ) -> str:
        assert self._publisher is not None
        key = f"{rejected.payer_id}:{rejected.claim_id}" if rejected.claim_id else None
        return await self._publisher.dead_letter(
            "invalid_claim",
            f"file {origin}: {rejected.reason}",
            rejected.original,
            organisation_id=rejected.organisation_id or self.config.organisation_id,
            original_key=key.encode() if key else None,
            received_ms=received_ms,
            record_count=len(rejected.lines),
        )

    # -- the upload endpoint ----------------------------------------------------------------

    async def _start_upload(self, upload: UploadConfig) -> web.AppRunner:
        # The body is read (and limited) by the handler; aiohttp's own limit is set above it.
        app = web.Application(client_max_size=upload.max_upload_bytes + _READ_CHUNK)
        app.router.add_post(UPLOAD_PATH, self._handle_upload)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=30.0)
        await runner.setup()
        site = web.TCPSite(runner, upload.host, upload.port)
        await site.start()
        self.port = int(runner.addresses[0][1])
        log.info("%s: upload on %s:%d%s", self.config.name, upload.host, self.port, UPLOAD_PATH)
        return runner

    def _authenticate(self, request: web.Request) -> str | None:
        """The payer whose bearer token the request carries, or None."""
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        digest = token_sha256(token.strip())
        found = None
        for payer_id, expected in self._tokens.items():
            if hmac.compare_digest(digest, expected):  # no early exit: constant time overall
                found = payer_id
        return found

    async def _handle_upload(self, request: web.Request) -> web.Response:
        config = self.config
        assert config.upload is not None
        limit = config.upload.max_upload_bytes
        received_ms = wall_clock_ms()
        payer_id = self._authenticate(request)
        if payer_id is None:
            # Counted, never dead-lettered: the sender is unknown, and writing what it
            # sends would let anyone fill the dead-letter topic.
            self.metrics.failed("unauthorized").inc()
            log.warning("%s: upload from %s refused: no valid token", config.name, request.remote)
            return _error(
                401, "a valid bearer token is required",
                {"WWW-Authenticate": 'Bearer realm="medstream-claims"'},
            )
        if request.content_length is not None and request.content_length > limit:
            return await self._too_large(payer_id, request.content_length, received_ms)
        if self._uploads >= config.upload.max_concurrent_uploads:
            # Each upload buffers its whole file and its parsed claims: bound the memory.
            return _error(
                503,
                f"{self._uploads} uploads are being processed; retry later",
                {"Retry-After": _RETRY_AFTER_S},
            )
        self._uploads += 1
        try:
            return await self._take_upload(request, payer_id, received_ms)
        finally:
            self._uploads -= 1

    async def _too_large(self, payer_id: str, size: int | None, received_ms: int) -> web.Response:
        """413, and a dead letter of the refusal (payer, size; never the oversized body).

        The payer is authenticated, so the refusal is recorded for reconcile and operators;
        the body is not kept: it is over the limit that bounds what the collector stores.
        """
        assert self.config.upload is not None and self._publisher is not None
        limit = self.config.upload.max_upload_bytes
        self.metrics.failed("payload_too_large").inc()
        sent = f"{size} bytes" if size is not None else f"more than {limit} bytes"
        answer: dict[str, Any] = {
            "error": f"the upload is larger than {limit} bytes; split the batch"
        }
        if not self._refusals.admit(payer_id, "payload_too_large", received_ms):
            # Counted; summarised in one dead letter when the budget's window closes.
            answer["dead_letter_id"] = None
            response = web.json_response(answer, status=413)
            response.force_close()
            return response
        try:
            async with self._slots(1):
                answer["dead_letter_id"] = await self._publisher.dead_letter(
                    "payload_too_large",
                    f"upload of {sent} from payer {payer_id} refused with 413: larger than "
                    f"upload.max_upload_bytes ({limit}); the body is not kept",
                    b"",
                    organisation_id=self.config.organisation_id,
                    original_key=payer_id.encode(),
                    received_ms=received_ms,
                    refusal=f"{payer_id}@{received_ms}:{sent}",
                    count_failure=False,  # counted above, with the refusals not kept
                )
        except DeliveryFailed:
            log.error("%s: the dead letter of a refused upload was not delivered",
                      self.config.name)
        response = web.json_response(answer, status=413)
        response.force_close()
        return response

    async def _take_upload(
        self, request: web.Request, payer_id: str, received_ms: int
    ) -> web.Response:
        config = self.config
        assert config.upload is not None
        limit = config.upload.max_upload_bytes
        try:
            file_name, data = await _read_upload(request, limit)
        except _UploadTooLarge:
            return await self._too_large(payer_id, None, received_ms)
        except _BadUpload as exc:
            return _error(400, str(exc))
        batch = Batch(file_name, data, "upload", received_ms, uploaded_by=payer_id)
        try:
            receipt = await self.process(batch)
        except BatchNotDurable as exc:
            log.error("%s: upload %s not completed (%s)", config.name, file_name, exc)
            return _error(
                503, "the batch could not be stored; retry later", {"Retry-After": _RETRY_AFTER_S}
            )
        except Exception as exc:
            log.exception("%s: upload %s failed unexpectedly", config.name, file_name)
            try:
                receipt = await self._reject_after_failure(batch, exc)
            except Exception:
                log.exception("%s: upload %s could not be rejected", config.name, file_name)
                return _error(500, "the collector failed to process the batch; retry later")
            return web.json_response(receipt, status=500)
        status = {"duplicate": 200, "rejected": 422}.get(receipt["status"], 201)
        return web.json_response(receipt, status=status)


async def _all(awaitables: Iterable[Awaitable[T]]) -> list[T]:
    """Await every delivery; the first failure is raised after all of them settled."""
    results = await asyncio.gather(*awaitables, return_exceptions=True)
    settled: list[T] = []
    for result in results:
        if isinstance(result, BaseException):
            raise result
        settled.append(result)
    return settled


class _UploadTooLarge(Exception):
    pass


class _BadUpload(Exception):
    pass


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


async def _read_limited(read: Any, limit: int) -> bytes:
    body = bytearray()
    while chunk := await read(_READ_CHUNK):
        body += chunk
        if len(body) > limit:
            raise _UploadTooLarge
    return bytes(body)


async def _read_upload(request: web.Request, limit: int) -> tuple[str, bytes]:
    """The file name and bytes of an upload: multipart part ``file`` or a raw CSV body with
    ``?file_name=`` (or a Content-Disposition file name)."""
    if request.content_type.startswith("multipart/"):
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if isinstance(part, BodyPartReader) and part.name == "file":
                data = await _read_limited(part.read_chunk, limit)
                return part.filename or "upload.csv", data
            if isinstance(part, BodyPartReader):
                await part.release()
        raise _BadUpload("multipart upload has no part named 'file'")
    file_name = request.query.get("file_name")
    if not file_name:
        disposition = request.headers.get("Content-Disposition", "")
        match = re.search(r'filename="?([^";]+)"?', disposition)
        file_name = match.group(1) if match else None
    if not file_name:
        raise _BadUpload("name the file: ?file_name=NAME or a Content-Disposition file name")
    return file_name, await _read_limited(request.content.read, limit)
