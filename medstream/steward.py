"""Data stewards correct the master patient index: split a patient record out of its person.

The command travels on the index's own input topic (``mpi.identity``), so it is applied in
order with the observations by the one owner of the index; the decision then appears in
``person_link`` like any other (method ``manual``), and the record is never moved
automatically again. The reason is scrubbed of identifiers before it leaves this process.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from medstream.clickhouse import sql_string
from medstream.runtime import deliver_one
from medstream.settings import IDENTITY_TOPIC, KafkaSettings
from schemas import serde
from streams.deidentify import scrub_text


class StewardError(RuntimeError):
    """The command cannot be given: unknown record, or not delivered."""


def record_organisation(query: Callable[[str], Any], database: str, record_key: str) -> str:
    """The organisation of a record the index knows; raises StewardError otherwise."""
    if not record_key.isalnum():
        raise StewardError(f"{record_key!r} is not a record key (32 hexadecimal characters)")
    rows = query(
        f"SELECT organisation_id FROM {database}.person_membership "
        f"WHERE record_key = {sql_string(record_key)}"
    ).rows
    if not rows:
        raise StewardError(f"record {record_key} is not in the patient index (person_link)")
    return str(rows[0][0])


def send_unmerge(
    kafka: KafkaSettings,
    registry: serde.SchemaRegistry,
    record_key: str,
    organisation_id: str,
    actor: str,
    reason: str,
    timeout_s: float = 15.0,
) -> None:
    """Send an unmerge of one record to the patient index and wait for the broker's ack."""
    if not actor.strip():
        raise StewardError("name who splits the record (--by): every decision is attributed")
    now_ms = int(time.time() * 1000)
    record = {
        "record_key": record_key,
        "organisation_id": organisation_id,
        "event_id": f"manual-unmerge-{now_ms}",
        "event_time": now_ms,
        "nid_status": "absent",
        "command": "unmerge",
        "actor": actor.strip(),
        "reason": scrub_text(reason).text,
    }
    value = serde.AvroSerializer(registry, serde.IDENTITY_OBSERVATION)(record)
    error = deliver_one(
        kafka, kafka.topic(IDENTITY_TOPIC), organisation_id.encode(), value, timeout_s
    )
    if error is not None:
        raise StewardError(f"the command was not delivered ({error})")
