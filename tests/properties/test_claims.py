"""Property tests of the claims collector: CSV batches parsed row by row, and the real HTTP
upload endpoint, with random and mutated files (all patients and claims synthetic).

The contract: every claim of a file is accepted as a schema-valid raw Claim the stage can
read, or rejected with per-line errors (line, column, reason) and a dead letter; a file
that is not a claims CSV at all gets a file error and one dead letter. Never an unhandled
exception or a 500, and the endpoint keeps accepting the next valid file.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from producers.claims import Batch, ParsedBatch, build_receipt, parse_batch
from streams.model import RecordRejected
from tests.kafka_helpers import DLQ, consume, raw_topic
from tests.producers.test_claims import HEADER, Running, make_collector, post, row, rules
from tests.properties.pipeline import round_trip, stage_outcomes
from tests.properties.strategies import bounded, mutated

CSV_DELIMITERS = b',;"\r\n\x00'
GOOD = (HEADER + row("C-1", 1) + row("C-1", 2) + row("C-2", 1, patient=2)).encode()
SEMICOLONS = GOOD.replace(b",", b";")


def files() -> st.SearchStrategy[bytes]:
    """Mutated claims CSVs, odd cells, and random bytes."""
    cells = st.sampled_from(GOOD.split(b",")[15:])  # cells of the first data row
    return st.one_of(
        mutated(GOOD, CSV_DELIMITERS, max_mutations=6),
        st.tuples(cells, st.sampled_from(
            [b"", b"NaN", b"1e400", b"-1", b"9" * 400, b"\xff", b'"', b"0000-00-00",
             b"2026-02-30", b"0001-01-01T00:00:00+14:00", b"9999-12-31T23:59:59-14:00"]
        )).map(lambda swap: GOOD.replace(swap[0], swap[1], 1)),
        st.binary(max_size=300),
        st.just(SEMICOLONS),
    )


def check_parsed(data: bytes, parsed: ParsedBatch) -> None:
    """Every claim is accepted well-formed or rejected with located reasons."""
    if parsed.file_errors:
        assert not parsed.accepted and not parsed.rejected
        assert all(e.reason for e in parsed.file_errors)
    for claim in parsed.accepted:
        decoded = round_trip("claim", claim.record)
        assert decoded["claim_id"] == claim.claim_id
        assert len(decoded["lines"]) == len(claim.lines)
        refused = [o for o in stage_outcomes("claim", decoded) if isinstance(o, RecordRejected)]
        assert not refused, f"accepted in the receipt, then refused by the stage: {refused}"
    for rejected in parsed.rejected:
        assert rejected.errors, "a rejected claim names why"
        assert all(e.reason and (e.line is None or e.line >= 1) for e in rejected.errors)
        assert rejected.original and rejected.reason
    if not parsed.file_errors:
        lines = sum(len(c.lines) for c in parsed.accepted) + sum(
            len(c.lines) for c in parsed.rejected
        )
        assert lines == parsed.rows, "every row is accounted for"
    receipt = build_receipt(Batch("f.csv", data, "upload", 1_793_700_000_000), "0" * 64,
                            parsed, "claims-test")
    json.dumps(receipt)


@bounded(400)
@given(data=files())
@example(data=GOOD)
# Bug: a submitted_time before year 1 or after 9999 once in UTC was accepted and published;
# the stage could not decode the record ("date value out of range").
@example(data=GOOD.replace(b"2026-03-02T09:15:00+08:00", b"0001-01-01T00:00:00+14:00"))
@example(data=GOOD.replace(b"2026-03-02T09:15:00+08:00", b"9999-12-31T23:59:59-14:00"))
def test_every_claim_is_accepted_well_formed_or_rejected_per_line(data: bytes) -> None:
    check_parsed(data, parse_batch(data, rules()))


# --- the real upload endpoint ------------------------------------------------------------------


@pytest.mark.integration
def test_upload_endpoint_answers_every_bad_file_and_keeps_serving(
    kafka_factory: Any, tmp_path: Path
) -> None:
    kafka = kafka_factory()
    collector = make_collector(
        kafka, tmp_path / "drop", watch=False,
        upload={"host": "127.0.0.1", "port": 0, "max_upload_bytes": 65_536},
    )
    dead_letter_ids: set[str] = set()
    accepted: set[str] = set()
    counter = iter(range(1_000_000))
    with Running(collector):
        port = collector.port
        assert port

        @bounded(40, deadline_s=30)
        @given(data=files())
        def upload_bad_then_valid(data: bytes) -> None:
            status, receipt = asyncio.run(post(port, data))
            if status == 413:  # larger than max_upload_bytes: refused before it is read
                assert "max_upload_bytes" in receipt["error"] or "larger" in receipt["error"]
            else:
                assert status in (200, 201, 422), (status, receipt)
                record_answer(receipt)
            claim_id = f"V-{next(counter):05d}"
            status, receipt = asyncio.run(post(port, (HEADER + row(claim_id, 1)).encode()))
            assert (status, receipt["status"]) == (201, "accepted"), receipt
            accepted.add(claim_id)

        def record_answer(receipt: dict[str, Any]) -> None:
            for claim in receipt["claims_rejected"]:
                assert claim["errors"] and claim["dead_letter_id"], claim
                dead_letter_ids.add(claim["dead_letter_id"])
            if receipt.get("file_errors"):
                assert receipt["dead_letter_id"]
                dead_letter_ids.add(receipt["dead_letter_id"])
            accepted.update(c["claim_id"] for c in receipt["claims_accepted"])

        upload_bad_then_valid()
        dead = consume(kafka, [DLQ], len(dead_letter_ids), timeout_s=20)
        published = consume(kafka, [raw_topic("claim")], len(accepted), timeout_s=20)
    assert {d.value["dlq_id"] for d in dead} == dead_letter_ids
    assert all(d.value["reason"] for d in dead)
    # The dead letter keeps what was refused (only an empty file has nothing to keep).
    empty = [d.value["reason"] for d in dead if not d.value["original_value"]]
    assert all("file is empty" in reason for reason in empty), empty
    assert accepted <= {r.value["claim_id"] for r in published}
