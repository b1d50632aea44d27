"""The claims collector: CSV validation, receipts, at-most-once per file, the drop directory
and the HTTP upload, against real files, real sockets and the real broker (every patient
identifier here is synthetic: MRNs SYNTH-*, national IDs of the fictional area 990000)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from confluent_kafka import Consumer

from producers import collector_class
from producers.base import (
    MAX_DEAD_LETTER_BYTES,
    MAX_REASON_CHARS,
    AsyncPublisher,
    CollectorState,
    RefusalBudget,
    SourceUnavailable,
    load_config,
)
from producers.claims import (
    _MOVING,
    REQUIRED_COLUMNS,
    BatchRules,
    ClaimsConfig,
    ClaimsProducer,
    parse_batch,
    receipt_name,
    token_sha256,
)
from schemas.identity import national_id_check_digit
from schemas.serde import COLLECTOR_HEADER, ManifestRegistry
from tests.kafka_helpers import DLQ, Published, consume, raw_topic
from tests.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
CLAIM = raw_topic("claim")
HEADER = (
    "payer_id,claim_id,organisation_id,submitted_time,patient_id_number,patient_local_id,"
    "encounter_ref,diagnosis_codes,line_no,item_code,item_name,quantity,unit_price,amount,"
    "service_date\n"
)
CST = timezone(timedelta(hours=8))
TOKEN_P001 = "test-token-p001-" + "a" * 24
TOKEN_P002 = "test-token-p002-" + "b" * 24


def national_id(n: int) -> str:
    first17 = f"99000019700101{n % 1000:03d}"
    return first17 + national_id_check_digit(first17)


def row(
    claim: str,
    line_no: int,
    *,
    payer: str = "P001",
    patient: int = 1,
    item: str = "D001",
    quantity: str = "2",
    unit_price: str = "2.35",
    amount: str = "4.70",
    service_date: str = "2026-03-01",
    id_number: str | None = None,
    submitted: str = "2026-03-02T09:15:00+08:00",
    diagnoses: str = "I10;E11.9",
    encounter: str = "ZY20260301001",
) -> str:
    id_value = national_id(patient) if id_number is None else id_number
    return (
        f"{payer},{claim},H001,{submitted},{id_value},SYNTH-MRN-{patient:04d},{encounter},"
        f"{diagnoses},{line_no},{item},Synthetic item {item},{quantity},{unit_price},{amount},"
        f"{service_date}\n"
    )


def rules(**overrides: Any) -> BatchRules:
    values: dict[str, Any] = {
        "default_organisation": "H001",
        "default_source_system": "claims-feed",
        "payers": {"P001": "p001-claims", "P002": None},
    }
    values.update(overrides)
    return BatchRules(**values)


def config(drop: Path, **overrides: Any) -> ClaimsConfig:
    values: dict[str, Any] = {
        "kind": "claims",
        "name": f"claims-{uuid.uuid4().hex[:8]}",
        "organisation_id": "H001",
        "source_system": "claims-feed",
        "drop_dir": str(drop),
        "state_dir": str(drop.parent / "state"),
        "poll_interval_s": 0.05,
        "settle_s": 0.1,
        "payers": {
            "P001": {"source_system": "p001-claims", "token_sha256": token_sha256(TOKEN_P001)},
            "P002": {"token_sha256": token_sha256(TOKEN_P002)},
        },
    }
    values.update(overrides)
    return ClaimsConfig.model_validate(values)


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp() * 1000)


# --- pure: one batch ------------------------------------------------------------------------


def test_good_batch_becomes_one_record_per_claim_with_exact_lines() -> None:
    data = (
        "\ufeff" + HEADER
        + row("C-1", 2, item="D002", quantity="28", unit_price="0.42", amount="11.76")
        + row("C-2", 1, payer="P002", patient=2, id_number="", encounter="", diagnoses="")
        + row("C-1", 1)  # lines of a claim need not be adjacent nor in order
    ).encode()
    batch = parse_batch(data, rules())
    assert batch.file_errors == [] and batch.rejected == [] and batch.rows == 3
    first, second = batch.accepted
    assert (first.payer_id, first.claim_id, first.lines) == ("P001", "C-1", [2, 4])
    assert first.partition_key == "H001:SYNTH-MRN-0001"
    assert first.record == {
        "claim_id": "C-1",
        "payer_id": "P001",
        "organisation_id": "H001",
        "source_system": "p001-claims",
        "submitted_time": ms("2026-03-02T09:15:00+08:00"),
        "patient_id_number": national_id(1),
        "patient_local_id": "SYNTH-MRN-0001",
        "encounter_ref": "ZY20260301001",
        "diagnosis_codes": ["I10", "E11.9"],
        "lines": [
            {"line_no": 1, "item_code": "D001", "item_display": "Synthetic item D001",
             "quantity": 2.0, "unit_price": 2.35, "amount": 4.7,
             "service_date": date(2026, 3, 1)},
            {"line_no": 2, "item_code": "D002", "item_display": "Synthetic item D002",
             "quantity": 28.0, "unit_price": 0.42, "amount": 11.76,
             "service_date": date(2026, 3, 1)},
        ],
    }
    assert second.record["source_system"] == "claims-feed"  # P002 names no source system
    assert second.record["patient_id_number"] is None
    assert second.record["encounter_ref"] is None
    assert second.record["diagnosis_codes"] == []


def test_simulator_claims_written_as_csv_read_back_identically() -> None:
    """The CSV format carries everything the simulator's raw Claim records (and so the
    normaliser) need: written out and parsed back, every record is the same."""
    import csv
    import io

    from medstream.simulator import RegionSimulator

    simulator = RegionSimulator(seed=11, problem_rate=0.0)
    expected: dict[tuple[str, str], dict[str, Any]] = {}
    for message in simulator.messages(400, now_ms=lambda: 1_772_400_000_000):
        if message.source_kind == "claim" and not message.labels[0]["duplicate_delivery"]:
            value = dict(message.value)
            value["diagnosis_codes"] = [c for c in value["diagnosis_codes"] if c]
            expected[(value["payer_id"], value["claim_id"])] = value
    assert len(expected) >= 10
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(HEADER.strip().split(","))
    for value in expected.values():
        submitted = datetime.fromtimestamp(value["submitted_time"] / 1000, CST).isoformat()
        for line in reversed(value["lines"]):
            writer.writerow([
                value["payer_id"], value["claim_id"], value["organisation_id"], submitted,
                value["patient_id_number"] or "", value["patient_local_id"],
                value["encounter_ref"] or "", ";".join(value["diagnosis_codes"]),
                line["line_no"], line["item_code"], line["item_display"], repr(line["quantity"]),
                repr(line["unit_price"]), repr(line["amount"]), line["service_date"].isoformat(),
            ])
    payers = {p.payer_id: p.source_system for p in simulator.region.payers}
    batch = parse_batch(out.getvalue().encode(), rules(payers=payers))
    assert batch.rejected == [] and batch.file_errors == []
    assert {(c.payer_id, c.claim_id): c.record for c in batch.accepted} == expected


def test_time_without_offset_is_read_in_the_source_time_zone_and_crlf_works() -> None:
    data = (HEADER + row("C-1", 1, submitted="2026-03-02 09:15:00")).replace("\n", "\r\n")
    batch = parse_batch(data.encode(), rules(timezone=CST))
    assert batch.accepted[0].record["submitted_time"] == ms("2026-03-02T09:15:00+08:00")
    utc = parse_batch(data.encode(), rules())
    assert utc.accepted[0].record["submitted_time"] == ms("2026-03-02T09:15:00+00:00")


def test_claim_with_a_bad_line_is_rejected_whole_with_line_numbers_and_no_values() -> None:
    bad_id = national_id(3)[:17] + ("0" if national_id(3)[17] != "0" else "1")
    data = (
        HEADER
        + row("GOOD-1", 1)                                   # line 2
        + row("BAD-1", 1, patient=3, id_number=bad_id)       # line 3: check digit
        + row("BAD-1", 2, patient=3, id_number=bad_id, quantity="two")  # line 4
        + row("BAD-2", 1, service_date="2026-02-30")         # line 5
        + row("BAD-2", 2, amount="-4.70")                    # line 6
        + row("BAD-3", 1, item="")                           # line 7: missing item_code
        + row("BAD-4", 1)                                    # line 8
        + row("BAD-4", 1)                                    # line 9: line_no repeated
        + row("BAD-5", 1)                                    # line 10
        + row("BAD-5", 2, patient=9)                         # line 11: other patient
        + ",BAD-6,H001,2026-03-02T09:15:00Z,,SYNTH-MRN-0001,,,1,D001,x,1,1,1,2026-03-01\n"
        + row("GOOD-2", 1, payer="P002", patient=2)          # line 13
        + row("BAD-7", 1, payer="P009")                      # line 14: unknown payer
        + row("BAD-8", 1).rstrip("\n") + ",extra\n"          # line 15: one field too many
    ).encode()
    batch = parse_batch(data, rules())
    assert [(c.payer_id, c.claim_id, c.lines) for c in batch.accepted] == [
        ("P001", "GOOD-1", [2]),
        ("P002", "GOOD-2", [13]),
    ]
    rejected = {c.claim_id: c for c in batch.rejected}
    assert set(rejected) == {"BAD-1", "BAD-2", "BAD-3", "BAD-4", "BAD-5", "BAD-7", "BAD-8", None}
    where = {k: [(e.line, e.field) for e in c.errors] for k, c in rejected.items()}
    assert where["BAD-1"] == [
        (3, "patient_id_number"), (4, "patient_id_number"), (4, "quantity")
    ]
    assert where["BAD-2"] == [(5, "service_date"), (6, "amount")]
    assert where["BAD-3"] == [(7, "item_code")]
    assert where["BAD-4"] == [(9, "line_no")]
    assert where["BAD-5"] == [
        (11, "patient_id_number"), (11, "patient_local_id")
    ]
    assert where["BAD-7"] == [(14, "payer_id")]
    assert where["BAD-8"] == [(15, None)]
    assert where[None] == [(12, "payer_id")]
    assert rejected["BAD-1"].lines == [3, 4]
    assert rejected["BAD-3"].errors[0].reason == "required value is empty"
    assert rejected["BAD-4"].errors[0].reason == "repeats line 8"
    assert rejected["BAD-2"].errors[1].reason.startswith("must not be negative")
    reason = rejected["BAD-1"].reason
    assert reason.startswith("claim on lines 3, 4 rejected: line 3: patient_id_number: not a valid")
    # Reasons name lines and columns, never the values sent.
    every_reason = " ".join(c.reason for c in batch.rejected)
    for value in (bad_id, "two", "2026-02-30", "-4.70", "SYNTH-MRN-0009", "P009", "extra"):
        assert value not in every_reason
    # The dead letter carries the header and the claim's exact source lines.
    original = rejected["BAD-2"].original.decode()
    assert original.splitlines() == [
        HEADER.strip(), row("BAD-2", 1, service_date="2026-02-30").strip(),
        row("BAD-2", 2, amount="-4.70").strip(),
    ]


def test_upload_payer_must_match_the_rows() -> None:
    data = (HEADER + row("C-1", 1) + row("C-2", 1, payer="P002")).encode()
    batch = parse_batch(data, rules(uploaded_by="P002"))
    assert [c.claim_id for c in batch.accepted] == ["C-2"]
    assert [(e.line, e.field) for e in batch.rejected[0].errors] == [(2, "payer_id")]


@pytest.mark.parametrize(
    ("data", "line", "reason"),
    [
        (b"", None, "file is empty"),
        (b"\xef\xbb\xbf\n\n", None, "file is empty"),
        (HEADER.encode(), None, "file has a header but no claim rows"),
        (b"%PDF-1.4\n\xff\xfe\x00binary", 2, "not UTF-8 text"),
        (b"payer_id,claim_id\nP001,C-1\n", 1, "header lacks required columns: submitted_time"),
        (b"one,two\nthree", 1, "header lacks required columns: payer_id"),
        ((HEADER.strip() + ",line_no\n" + row("C-1", 1)).encode(), 1, "column appears"),
        ((HEADER + row("C-1", 1) + 'P001,"C-2\n').encode(), 3, "not valid CSV"),
        ((HEADER + row("C-1", 1) + 'P001,"C-2"x,y\n').encode(), 3, "not valid CSV"),
    ],
)
def test_file_that_is_not_a_claims_csv_is_rejected_whole(
    data: bytes, line: int | None, reason: str
) -> None:
    batch = parse_batch(data, rules())
    assert batch.accepted == [] and batch.rejected == []
    assert len(batch.file_errors) == 1
    assert batch.file_errors[0].line == line
    assert reason in batch.file_errors[0].reason


def test_unknown_columns_are_ignored_and_named() -> None:
    data = (HEADER.strip() + ",Remarks\n" + row("C-1", 1).strip() + ",free text\n").encode()
    batch = parse_batch(data, rules())
    assert [c.claim_id for c in batch.accepted] == ["C-1"]
    assert batch.warnings == ["ignored columns: Remarks"]


def test_configuration_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="upload needs at least one payer with token_sha256"):
        config(tmp_path, payers={"P001": {}}, upload={"port": 0})
    with pytest.raises(ValueError, match="unknown time zone"):
        config(tmp_path, source_timezone="Mars/Olympus")
    with pytest.raises(ValueError, match="token_sha256"):
        config(tmp_path, payers={"P001": {"token_sha256": "not-a-hash"}})
    monkeypatch.setenv("P001_TOKEN_SHA256", token_sha256(TOKEN_P001))
    example = load_config(REPO / "deploy/collectors/claims.example.yaml", ClaimsConfig)
    assert example.payers["P001"].token_sha256 == token_sha256(TOKEN_P001)
    assert example.payers["P002"].token_sha256 is None  # unset variable: no upload for P002
    assert collector_class("claims") is ClaimsProducer
    example_csv = (REPO / "deploy/collectors/claims.example.csv").read_bytes()
    batch = parse_batch(example_csv, BatchRules.from_config(example))
    assert len(batch.accepted) == 2 and batch.rejected == [] and batch.file_errors == []
    header = example_csv.decode().split("\n")[0].split(",")
    assert set(REQUIRED_COLUMNS) <= {{"item_name": "item_display"}.get(c, c) for c in header}


def test_check_names_a_missing_drop_directory(tmp_path: Path) -> None:
    from medstream.settings import KafkaSettings

    collector = ClaimsProducer(
        config(tmp_path / "absent"), KafkaSettings(bootstrap_servers="127.0.0.1:1"),
        ManifestRegistry(),
    )
    # Often a share not mounted yet: exit 1 (restarted by `up`), not 2 (a configuration error).
    with pytest.raises(SourceUnavailable, match="drop_dir .* does not exist"):
        collector.check()
    with pytest.raises(SourceUnavailable, match="drop_dir .* does not exist"):
        collector.run(threading.Event())


# --- the running collector --------------------------------------------------------------------


class Running:
    """A collector's run() on a thread; stops and joins on exit, keeps the error."""

    def __init__(self, collector: ClaimsProducer) -> None:
        self.collector = collector
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.collector.run(self.stop)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.error = exc

    def __enter__(self) -> Running:
        self.thread.start()
        wait_for(lambda: self.collector.watching.is_set() or self.error is not None, 30, "ready")
        if self.error is not None:
            raise self.error
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(60)
        assert not self.thread.is_alive(), "collector did not stop"
        if self.error is not None:
            raise self.error




def counter(child: Any) -> float:
    return float(child._value.get())


def receipts(drop: Path) -> list[Path]:
    directory = drop / "receipts"
    return sorted(directory.glob("*.receipt.json")) if directory.exists() else []


def drop_file(drop: Path, name: str, content: bytes) -> Path:
    """Write NAME.part, then rename it into place (what a sender should do)."""
    partial = drop / f"{name}.part"
    partial.write_bytes(content)
    target = drop / name
    partial.rename(target)
    return target


def make_collector(kafka: Any, drop: Path, **overrides: Any) -> ClaimsProducer:
    drop.mkdir(parents=True, exist_ok=True)
    return ClaimsProducer(config(drop, **overrides), kafka, ManifestRegistry())


def by_claim(records: list[Published]) -> dict[str, dict[str, Any]]:
    return {r.value["claim_id"]: r.value for r in records}


@pytest.mark.integration
def test_dropped_file_publishes_exact_claims_and_writes_a_receipt(
    kafka_factory: Any, tmp_path: Path
) -> None:
    kafka = kafka_factory()
    drop = tmp_path / "drop"
    collector = make_collector(kafka, drop)
    content = (
        HEADER + row("C-1", 1) + row("C-2", 1, payer="P002", patient=2)
        + row("C-1", 2, item="D002", quantity="28", unit_price="0.42", amount="11.76")
    ).encode()
    with Running(collector):
        path = drop_file(drop, "batch-2026-03-02.csv", content)
        wait_for(lambda: len(receipts(drop)) == 1 and not path.exists(), 20, "the receipt")
        assert not path.exists()
        assert (drop / "processed" / "batch-2026-03-02.csv").read_bytes() == content
        assert counter(collector.metrics.read) == 2
        assert counter(collector.metrics.ready) == 1
    published = consume(kafka, [CLAIM], 2)
    assert len(published) == 2
    claims = by_claim(published)
    assert claims["C-1"]["lines"] == [
        {"line_no": 1, "item_code": "D001", "item_display": "Synthetic item D001",
         "quantity": 2.0, "unit_price": 2.35, "amount": 4.7, "service_date": date(2026, 3, 1)},
        {"line_no": 2, "item_code": "D002", "item_display": "Synthetic item D002",
         "quantity": 28.0, "unit_price": 0.42, "amount": 11.76, "service_date": date(2026, 3, 1)},
    ]
    assert claims["C-1"]["submitted_time"] == datetime(2026, 3, 2, 1, 15, tzinfo=UTC)
    assert claims["C-1"]["patient_id_number"] == national_id(1)
    assert claims["C-1"]["source_system"] == "p001-claims"
    assert claims["C-2"]["payer_id"] == "P002" and len(claims["C-2"]["lines"]) == 1
    keys = {r.value["claim_id"]: r.key for r in published}
    assert keys == {"C-1": b"H001:SYNTH-MRN-0001", "C-2": b"H001:SYNTH-MRN-0002"}
    assert all(r.headers[COLLECTOR_HEADER] == collector.config.name.encode() for r in published)
    [path] = receipts(drop)
    receipt = json.loads(path.read_text())
    sha = receipt["sha256"]
    assert path.name == receipt_name("batch-2026-03-02.csv", sha) == (
        f"batch-2026-03-02.csv.{sha[:12]}.receipt.json"
    )
    assert receipt["status"] == "accepted"
    assert receipt["file_name"] == "batch-2026-03-02.csv"
    assert receipt["channel"] == "drop_dir"
    assert receipt["size_bytes"] == len(content)
    assert receipt["counts"] == {"rows": 3, "claims": 2, "claims_accepted": 2,
                                 "claims_rejected": 0, "lines_accepted": 3, "lines_rejected": 0}
    assert receipt["claims_accepted"] == [
        {"payer_id": "P001", "claim_id": "C-1", "lines": [2, 4]},
        {"payer_id": "P002", "claim_id": "C-2", "lines": [3]},
    ]
    assert receipt["claims_rejected"] == [] and receipt["file_errors"] == []
    assert consume(kafka, [DLQ], 0, timeout_s=2) == []


@pytest.mark.integration
def test_mixed_file_keeps_good_claims_and_dead_letters_bad_ones(
    kafka_factory: Any, tmp_path: Path
) -> None:
    kafka = kafka_factory()
    drop = tmp_path / "drop"
    collector = make_collector(kafka, drop)
    content = (
        HEADER + row("GOOD-1", 1)
        + row("BAD-1", 1) + row("BAD-1", 2, quantity="lots")
        + row("GOOD-2", 1, payer="P002", patient=2)
        + row("BAD-2", 1, id_number="990000197001010011")
    ).encode()
    with Running(collector):
        path = drop_file(drop, "mixed.csv", content)
        wait_for(lambda: len(receipts(drop)) == 1 and not path.exists(), 20, "the receipt")
        assert (drop / "processed" / "mixed.csv").exists()
    published = consume(kafka, [CLAIM], 2)
    assert sorted(by_claim(published)) == ["GOOD-1", "GOOD-2"]
    receipt = json.loads(receipts(drop)[0].read_text())
    assert receipt["status"] == "partially_accepted"
    assert receipt["counts"]["claims_accepted"] == 2 and receipt["counts"]["claims_rejected"] == 2
    assert receipt["counts"]["lines_rejected"] == 3
    rejected = {c["claim_id"]: c for c in receipt["claims_rejected"]}
    assert rejected["BAD-1"]["lines"] == [3, 4]
    assert counter(collector.metrics.failed("invalid_claim")) == 2
    assert counter(collector.metrics.read) == 4
    assert rejected["BAD-1"]["errors"] == [
        {"line": 4, "field": "quantity",
         "reason": "not a decimal number (digits with an optional '.')"},
    ]
    assert [e["field"] for e in rejected["BAD-2"]["errors"]] == ["patient_id_number"]
    dead = consume(kafka, [DLQ], 2)
    assert len(dead) == 2
    letters = {d.key: d.value for d in dead}
    assert set(letters) == {b"P001:BAD-1", b"P001:BAD-2"}
    first = letters[b"P001:BAD-1"]
    assert first["reason_code"] == "invalid_claim"
    assert first["stage"] == "producer" and first["source_kind"] == "claim"
    assert first["organisation_id"] == "H001"
    assert first["record_count"] == 2
    assert "line 4: quantity: not a decimal number" in first["reason"]
    assert "lots" not in first["reason"]
    assert first["dlq_id"] == rejected["BAD-1"]["dead_letter_id"]
    assert first["original_value"].decode().splitlines()[1:] == [
        row("BAD-1", 1).strip(), row("BAD-1", 2, quantity="lots").strip()
    ]
    second = letters[b"P001:BAD-2"]
    assert "line 6: patient_id_number" in second["reason"]
    assert "990000197001010011" not in second["reason"]


@pytest.mark.integration
def test_not_a_csv_file_is_rejected_whole_with_one_dead_letter(
    kafka_factory: Any, tmp_path: Path
) -> None:
    kafka = kafka_factory()
    drop = tmp_path / "drop"
    collector = make_collector(kafka, drop)
    with Running(collector):
        path = drop_file(drop, "scan.pdf", b"%PDF-1.4\n\xff\xfe\x00\x01 not text")
        wait_for(lambda: len(receipts(drop)) == 1 and not path.exists(), 20, "the receipt")
        assert (drop / "failed" / "scan.pdf").exists()
    receipt = json.loads(receipts(drop)[0].read_text())
    assert receipt["status"] == "rejected"
    assert receipt["file_errors"] == [
        {"line": 2, "field": None, "reason": "not UTF-8 text (is this a CSV file?)"}
    ]
    [dead] = consume(kafka, [DLQ], 1)
    assert dead.value["reason_code"] == "invalid_file"
    assert dead.value["dlq_id"] == receipt["dead_letter_id"]
    assert dead.value["original_value"] == b"%PDF-1.4\n\xff\xfe\x00\x01 not text"
    assert consume(kafka, [CLAIM], 0, timeout_s=2) == []


@pytest.mark.integration
def test_redropped_identical_file_is_a_duplicate_and_publishes_nothing(
    kafka_factory: Any, tmp_path: Path
) -> None:
    kafka = kafka_factory()
    drop = tmp_path / "drop"
    content = (HEADER + row("C-1", 1) + row("C-2", 1, patient=2)).encode()
    collector = make_collector(kafka, drop)
    with Running(collector):
        path = drop_file(drop, "claims.csv", content)
        wait_for(lambda: len(receipts(drop)) == 1 and not path.exists(), 20, "a receipt")
    assert len(consume(kafka, [CLAIM], 2)) == 2
    # A new process (same state directory) recognises the file under another name too.
    again = ClaimsProducer(collector.config, kafka, ManifestRegistry())
    with Running(again):
        path = drop_file(drop, "claims.csv", content)
        wait_for(lambda: len(receipts(drop)) == 2 and not path.exists(), 20, "a duplicate")
        path = drop_file(drop, "claims-resent.csv", content)
        wait_for(lambda: len(receipts(drop)) == 3 and not path.exists(), 20, "another duplicate")
    original = json.loads((drop / "receipts" / receipt_name("claims.csv", sha(content)))
                          .read_text())
    duplicates = [json.loads(p.read_text()) for p in receipts(drop) if "duplicate" in p.name]
    assert len(duplicates) == 2
    for duplicate in duplicates:
        assert duplicate["status"] == "duplicate"
        assert duplicate["original_receipt"] == receipt_name("claims.csv", sha(content))
        assert duplicate["original_received_time"] == original["received_time"]
        assert duplicate["original_status"] == "accepted"
        assert duplicate["counts"]["claims_accepted"] == 0
    assert sorted(p.name for p in (drop / "processed").iterdir()) == sorted(
        ["claims-resent.csv", "claims.csv", f"claims.{sha(content)[:12]}.csv"]
    )
    assert len(consume(kafka, [CLAIM], 2, timeout_s=5, settle_s=1.0)) == 2  # nothing more


@pytest.mark.integration
def test_crash_between_receipt_and_move_is_finished_on_restart_not_taken_for_a_duplicate(
    kafka_factory: Any, tmp_path: Path
) -> None:
    kafka = kafka_factory()
    drop = tmp_path / "drop"
    content = (HEADER + row("C-1", 1)).encode()
    collector = make_collector(kafka, drop, watch=False,
                               upload={"host": "127.0.0.1", "port": 0})
    path = drop / "crashed.csv"
    path.write_bytes(content)
    (drop / "receipts").mkdir()
    name = receipt_name("crashed.csv", sha(content))
    (drop / "receipts" / name).write_text('{"status": "accepted"}')
    # The state a kill -9 right after "receipt written, move pending" leaves behind.
    state = CollectorState(Path(collector.config.state_dir or "") / "claims.sqlite")
    summary = {"receipt": name, "status": "accepted", "received_time": "2026-03-02T01:00:00Z",
               "file_name": "crashed.csv"}
    state.put(_MOVING, json.dumps({"path": str(path), "sha256": sha(content),
                                   "summary": summary}))
    state.close()
    with Running(collector):
        assert not path.exists()
        assert (drop / "processed" / "crashed.csv").read_bytes() == content
        assert receipts(drop) == [drop / "receipts" / name]
        status, duplicate = asyncio.run(post(collector.port or 0, content))
        assert status == 200 and duplicate["original_receipt"] == name
    assert consume(kafka, [CLAIM], 0, timeout_s=2) == []


def sha(content: bytes) -> str:
    import hashlib

    return hashlib.sha256(content).hexdigest()


@pytest.mark.integration
def test_partially_written_file_is_ignored_until_renamed(
    kafka_factory: Any, tmp_path: Path
) -> None:
    kafka = kafka_factory()
    drop = tmp_path / "drop"
    collector = make_collector(kafka, drop)
    with Running(collector):
        partial = drop / "late.csv.part"
        with partial.open("wb") as handle:
            handle.write((HEADER + row("C-1", 1)).encode())
            handle.flush()
            time.sleep(1.0)  # many polls pass while the sender is still writing
            assert receipts(drop) == []
            handle.write(row("C-1", 2, item="D002").encode())
        time.sleep(0.5)
        assert receipts(drop) == [] and partial.exists()
        partial.rename(drop / "late.csv")
        wait_for(lambda: (drop / "processed" / "late.csv").exists(), 20, "the file processed")
        assert len(receipts(drop)) == 1
    [published] = consume(kafka, [CLAIM], 1)
    assert [line["line_no"] for line in published.value["lines"]] == [1, 2]


@pytest.mark.integration
def test_thirty_thousand_bad_rows_make_one_dead_letter_that_fits_a_record(
    kafka_factory: Any, tmp_path: Path
) -> None:
    kafka = kafka_factory()
    drop = tmp_path / "drop"
    collector = make_collector(kafka, drop)
    content = (HEADER + "".join(row("", n % 999 + 1) for n in range(30_000))).encode()
    with Running(collector):
        path = drop_file(drop, "bad.csv", content)
        wait_for(lambda: len(receipts(drop)) == 1 and not path.exists(), 60, "the receipt")
        assert (drop / "failed" / "bad.csv").read_bytes() == content
    receipt = json.loads(receipts(drop)[0].read_text())
    assert receipt["status"] == "rejected"
    assert receipt["counts"]["lines_rejected"] == 30_000
    [dead] = consume(kafka, [DLQ], 1)
    assert dead.value["dlq_id"] == receipt["claims_rejected"][0]["dead_letter_id"]
    assert dead.value["original_value"] == content[:MAX_DEAD_LETTER_BYTES]
    # Cut by dead_letter() (one character over MAX_REASON_CHARS: its marker is 15 long).
    assert len(dead.value["reason"]) <= MAX_REASON_CHARS + 1
    assert dead.value["reason"].endswith("(more cut)")


@pytest.mark.integration
def test_claim_too_large_for_a_kafka_record_is_rejected_and_the_rest_published(
    kafka_factory: Any, tmp_path: Path
) -> None:
    kafka = kafka_factory()
    drop = tmp_path / "drop"
    collector = make_collector(kafka, drop)
    item = "D" + "0" * 60  # ~160 bytes per line in the record: 8000 lines pass 950 000
    content = (
        HEADER + "".join(row("HUGE-1", n + 1, item=item) for n in range(8000)) + row("OK-1", 1)
    ).encode()
    with Running(collector):
        path = drop_file(drop, "huge.csv", content)
        wait_for(lambda: len(receipts(drop)) == 1 and not path.exists(), 60, "the receipt")
    receipt = json.loads(receipts(drop)[0].read_text())
    assert receipt["status"] == "partially_accepted"
    assert [c["claim_id"] for c in receipt["claims_accepted"]] == ["OK-1"]
    [rejected] = receipt["claims_rejected"]
    assert rejected["claim_id"] == "HUGE-1"
    assert "larger than a Kafka record" in rejected["errors"][0]["reason"]
    [published] = consume(kafka, [CLAIM], 1)
    assert published.value["claim_id"] == "OK-1"
    [dead] = consume(kafka, [DLQ], 1)
    assert dead.value["dlq_id"] == rejected["dead_letter_id"]
    assert dead.key == b"P001:HUGE-1"
    # The sender's own lines (header and the claim's rows), cut to what a dead letter holds.
    huge_lines = HEADER + "".join(row("HUGE-1", n + 1, item=item) for n in range(8000))
    assert dead.value["original_value"] == huge_lines.encode()[:MAX_DEAD_LETTER_BYTES]


@pytest.mark.integration
def test_a_file_that_fails_unexpectedly_is_rejected_once_and_the_loop_goes_on(
    kafka_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from producers import claims

    real_parse = claims.parse_batch

    def parse_or_fail(data: bytes, batch_rules: BatchRules) -> Any:
        if b"BOOM" in data:
            raise RuntimeError("a bug")
        return real_parse(data, batch_rules)

    monkeypatch.setattr(claims, "parse_batch", parse_or_fail)
    kafka = kafka_factory()
    drop = tmp_path / "drop"
    collector = make_collector(kafka, drop)
    poison = (HEADER + row("BOOM", 1)).encode()
    good = (HEADER + row("FINE-1", 1)).encode()
    with Running(collector) as running:
        path = drop_file(drop, "poison.csv", poison)
        wait_for(lambda: (drop / "failed" / "poison.csv").exists(), 20, "poison.csv in failed/")
        assert not path.exists()
        later = drop_file(drop, "good.csv", good)
        wait_for(lambda: (drop / "processed" / "good.csv").exists(), 20, "good.csv processed")
        assert not later.exists() and running.thread.is_alive()
    by_file = {json.loads(p.read_text())["file_name"]: json.loads(p.read_text())
               for p in receipts(drop)}
    failed = by_file["poison.csv"]
    assert failed["status"] == "rejected"
    assert "RuntimeError" in failed["file_errors"][0]["reason"]
    assert by_file["good.csv"]["status"] == "accepted"
    [dead] = consume(kafka, [DLQ], 1)
    assert dead.value["reason_code"] == "internal_error"
    assert dead.value["dlq_id"] == failed["dead_letter_id"]
    assert dead.value["original_value"] == poison
    assert [r.value["claim_id"] for r in consume(kafka, [CLAIM], 1)] == ["FINE-1"]


@pytest.mark.integration
def test_claims_are_published_within_reserved_in_flight_slots(
    kafka_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reserved: list[tuple[int, int]] = []  # (slots asked for, slots in use after)
    real_reserve = AsyncPublisher.try_reserve

    def recording(self: AsyncPublisher, count: int = 1) -> bool:
        taken = real_reserve(self, count)
        if taken:
            reserved.append((count, self.in_flight))
        return taken

    monkeypatch.setattr(AsyncPublisher, "try_reserve", recording)
    kafka = kafka_factory()
    drop = tmp_path / "drop"
    collector = make_collector(kafka, drop, max_in_flight=2)
    content = (
        HEADER + "".join(row(f"G-{n}", 1, patient=n + 1) for n in range(5))
        + row("B-1", 1, quantity="lots") + row("B-2", 1, quantity="lots")
    ).encode()
    with Running(collector):
        path = drop_file(drop, "slots.csv", content)
        wait_for(lambda: len(receipts(drop)) == 1 and not path.exists(), 20, "the receipt")
        assert collector._publisher is not None and collector._publisher.in_flight == 0
    assert [count for count, _ in reserved] == [2, 2, 1, 2]  # claims in 2s, then dead letters
    assert all(in_use <= 2 for _, in_use in reserved)
    assert len(consume(kafka, [CLAIM], 5)) == 5


# --- the upload endpoint ---------------------------------------------------------------------


async def post(
    port: int, body: bytes | aiohttp.FormData | Any, token: str | None = TOKEN_P001,
    query: str = "?file_name=upload.csv", content_type: str | None = "text/csv",
) -> tuple[int, dict[str, Any]]:
    headers = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if content_type and not isinstance(body, aiohttp.FormData):
        headers["Content-Type"] = content_type
    async with aiohttp.ClientSession() as session, session.post(
        f"http://127.0.0.1:{port}/claims/batches{query}", data=body, headers=headers
    ) as response:
        return response.status, await response.json()


@pytest.mark.integration
def test_http_upload_accepts_recognises_duplicates_and_refuses(
    kafka_factory: Any, tmp_path: Path
) -> None:
    kafka = kafka_factory()
    drop = tmp_path / "drop"
    collector = make_collector(
        kafka, drop, watch=False, upload={"host": "127.0.0.1", "port": 0, "max_upload_bytes": 4096}
    )
    content = (HEADER + row("UP-1", 1) + row("UP-1", 2) + row("UP-2", 1, patient=2)).encode()
    with Running(collector):
        port = collector.port
        assert port
        status, receipt = asyncio.run(post(port, content))
        assert status == 201
        assert receipt["status"] == "accepted" and receipt["uploaded_by"] == "P001"
        assert [c["claim_id"] for c in receipt["claims_accepted"]] == ["UP-1", "UP-2"]
        assert receipt["channel"] == "upload"
        # The same bytes again, as multipart this time: a duplicate, nothing published.
        form = aiohttp.FormData()
        form.add_field("file", content, filename="again.csv", content_type="text/csv")
        status, duplicate = asyncio.run(post(port, form, query=""))
        assert status == 200 and duplicate["status"] == "duplicate"
        assert duplicate["file_name"] == "again.csv"
        assert duplicate["original_receipt"] == receipt_name("upload.csv", receipt["sha256"])
        # Another payer's rows in P002's upload: rejected whole, 422.
        status, rejected = asyncio.run(
            post(port, (HEADER + row("UP-3", 1)).encode(), token=TOKEN_P002)
        )
        assert status == 422 and rejected["status"] == "rejected"
        assert rejected["claims_rejected"][0]["errors"] == [
            {"line": 2, "field": "payer_id",
             "reason": "differs from the payer that uploaded the file"}
        ]
        unauthorized = collector.metrics.failed("unauthorized")
        refused_before = unauthorized._value.get()
        status, body = asyncio.run(post(port, content, token=None))
        assert status == 401 and "bearer token" in body["error"]
        status, _ = asyncio.run(post(port, content, token="wrong-token"))
        assert status == 401
        # Counted, but nothing of an unauthenticated sender is written anywhere.
        assert unauthorized._value.get() - refused_before == 2
        big = HEADER.encode() + row("BIG", 1).encode() * 60
        assert len(big) > 4096
        status, body = asyncio.run(post(port, big))
        assert status == 413 and "4096" in body["error"]
        too_large_ids = [body["dead_letter_id"]]

        async def chunks() -> Any:  # no Content-Length: the limit applies while reading
            for start in range(0, len(big), 512):
                yield big[start : start + 512]

        status, body = asyncio.run(post(port, chunks()))
        assert status == 413
        too_large_ids.append(body["dead_letter_id"])
        status, body = asyncio.run(post(port, content, query=""))
        assert status == 400 and "file_name" in body["error"]
    published = consume(kafka, [CLAIM], 2, timeout_s=10, settle_s=1.0)
    assert sorted(r.value["claim_id"] for r in published) == ["UP-1", "UP-2"]
    assert [len(r.value["lines"]) for r in sorted(published, key=lambda r: r.value["claim_id"])] \
        == [2, 1]
    assert sorted(p.name.split(".")[0] for p in receipts(drop)) == ["again", "upload", "upload"]
    assert (drop / "processed" / "upload.csv").read_bytes() == content
    dead = {d.value["dlq_id"]: d for d in consume(kafka, [DLQ], 3)}
    assert len(dead) == 3
    refusals = [dead.pop(dlq_id) for dlq_id in too_large_ids]
    assert [d.key for d in dead.values()] == [b"P001:UP-3"]
    # The 413 refusals of an authenticated payer are recorded, without the body.
    assert [(d.value["reason_code"], d.value["original_key"], d.value["original_value"])
            for d in refusals] == [("payload_too_large", b"P001", b"")] * 2
    assert f"upload of {len(big)} bytes from payer P001" in refusals[0].value["reason"]
    assert "more than 4096 bytes" in refusals[1].value["reason"]
    assert all("upload.max_upload_bytes (4096)" in d.value["reason"] for d in refusals)


@pytest.mark.integration
def test_a_payer_sending_oversized_uploads_cannot_fill_the_dead_letter_topic(
    kafka_factory: Any, tmp_path: Path
) -> None:
    # Review finding L15: each 413 of an authenticated payer was one more dead letter.
    kafka = kafka_factory()
    drop = tmp_path / "drop"
    collector = make_collector(
        kafka, drop, watch=False, upload={"host": "127.0.0.1", "port": 0, "max_upload_bytes": 4096}
    )
    collector._refusals = RefusalBudget(in_full=2, window_s=600.0)
    big = HEADER.encode() + row("BIG", 1).encode() * 60
    refused = collector.metrics.failed("payload_too_large")
    before = refused._value.get()
    with Running(collector):
        port = collector.port
        assert port
        answers = [asyncio.run(post(port, big)) for _ in range(7)]
    assert [status for status, _ in answers] == [413] * 7
    ids = [body["dead_letter_id"] for _, body in answers]
    assert all(ids[:2]) and ids[2:] == [None] * 5
    assert refused._value.get() - before == 7
    dead = {d.value["dlq_id"]: d.value for d in consume(kafka, [DLQ], 3, settle_s=2.0)}
    assert len(dead) == 3 and set(ids[:2]) < set(dead)
    [summary] = [d for dlq_id, d in dead.items() if dlq_id not in ids]
    assert (summary["reason_code"], summary["original_key"], summary["original_value"]) == (
        "payload_too_large", b"P001", b""
    )
    assert summary["reason"].startswith("5 more refusals (payload_too_large) of this sender")


@pytest.mark.integration
def test_uploads_beyond_the_bound_are_answered_503_with_retry_after(
    kafka_factory: Any, tmp_path: Path
) -> None:
    kafka = kafka_factory()
    drop = tmp_path / "drop"
    upload = {"host": "127.0.0.1", "port": 0, "max_concurrent_uploads": 1}
    collector = make_collector(kafka, drop, watch=False, upload=upload)
    content = (HEADER + row("SLOW-1", 1)).encode()
    with Running(collector):
        port = collector.port
        assert port
        # A first upload whose body is still arriving holds the only place.
        slow = socket.create_connection(("127.0.0.1", port), timeout=10)
        slow.sendall(
            b"POST /claims/batches?file_name=slow.csv HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: Bearer {TOKEN_P001}\r\nContent-Type: text/csv\r\n".encode()
            + f"Content-Length: {len(content)}\r\nConnection: close\r\n\r\n".encode()
            + content[:10]
        )
        wait_for(lambda: collector._uploads == 1, 10, "the first upload to start")

        async def refused() -> tuple[int, dict[str, str], dict[str, Any]]:
            async with aiohttp.ClientSession() as session, session.post(
                f"http://127.0.0.1:{port}/claims/batches?file_name=other.csv",
                data=(HEADER + row("FAST-1", 1)).encode(),
                headers={"Authorization": f"Bearer {TOKEN_P001}", "Content-Type": "text/csv"},
            ) as response:
                return response.status, dict(response.headers), await response.json()

        status, headers, body = asyncio.run(refused())
        assert status == 503 and headers["Retry-After"] == "5"
        assert "uploads are being processed" in body["error"]
        slow.sendall(content[10:])
        answer = b""
        while chunk := slow.recv(65536):
            answer += chunk
        slow.close()
        assert answer.startswith(b"HTTP/1.1 201")
        wait_for(lambda: collector._uploads == 0, 10, "the place to be free again")
        status, _ = asyncio.run(post(port, (HEADER + row("FAST-1", 1)).encode()))
        assert status == 201
    assert sorted(r.value["claim_id"] for r in consume(kafka, [CLAIM], 2)) == ["FAST-1", "SLOW-1"]


# --- a real process killed with -9 ----------------------------------------------------------------


def first_record(kafka: Any, timeout_s: float) -> None:
    consumer = Consumer(kafka.consumer_config(f"test-first-{uuid.uuid4().hex[:8]}"))
    consumer.subscribe([kafka.topic(CLAIM)])
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            message = consumer.poll(0.02)
            if message is not None and message.error() is None:
                return
        raise AssertionError("no claim was published")
    finally:
        consumer.close()


@pytest.mark.integration
def test_kill_9_mid_batch_then_restart_publishes_every_claim_with_one_receipt(
    kafka_factory: Any, tmp_path: Path
) -> None:
    kafka = kafka_factory()
    drop = tmp_path / "drop"
    drop.mkdir()
    name = f"claims-{uuid.uuid4().hex[:8]}"
    config_path = tmp_path / "claims.yaml"
    config_path.write_text(yaml.safe_dump({
        "kind": "claims", "name": name, "organisation_id": "H001",
        "source_system": "claims-feed", "drop_dir": str(drop),
        "poll_interval_s": 0.05, "settle_s": 0.1, "max_in_flight": 200,
    }))
    claims = 20_000
    content = HEADER + "".join(
        row(f"K-{n:06d}", line, patient=n % 500) for n in range(claims) for line in (1, 2)
    )
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
           "MEDSTREAM_KAFKA_TOPIC_PREFIX": kafka.topic_prefix,
           "MEDSTREAM_DATA_DIR": str(tmp_path / "data")}
    command = [sys.executable, "-m", "medstream", "collect", "claims", "--config",
               str(config_path)]
    log = (tmp_path / "collector.log").open("w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        drop_file(drop, "big.csv", content.encode())
        first_record(kafka, 60)
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        assert receipts(drop) == [], "the batch finished before the kill: make it larger"
        assert (drop / "big.csv").exists()
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: (drop / "processed" / "big.csv").exists(), 120, "the file processed")
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    published = consume(kafka, [CLAIM], claims, timeout_s=120, settle_s=2.0)
    ids = {r.value["claim_id"] for r in published}
    assert ids == {f"K-{n:06d}" for n in range(claims)}
    assert len(published) > claims  # the first run's claims were published again
    assert all(len(r.value["lines"]) == 2 for r in published)
    [receipt_path] = receipts(drop)
    receipt = json.loads(receipt_path.read_text())
    assert receipt["status"] == "accepted" and receipt["counts"]["claims_accepted"] == claims
    assert not (drop / "big.csv").exists() and (drop / "processed" / "big.csv").exists()
