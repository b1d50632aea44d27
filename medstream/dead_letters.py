"""Replaying dead letters: their original records published again, after a fix.

A record a stage dead-lettered because of a bug (``internal_error``), or because the
patient index could not place it (``index_state``), is kept sealed in ClickHouse with its
original key, bytes and position. Once the bug is fixed or the state repaired,
``medstream dlq replay`` publishes each original record again to the topic it came from,
with the header ``medstream-replay`` naming the dead letter: the stage processes it like
a new record. Event ids depend only on what the source said, so a record that was stored
after all collapses with its first copy instead of being stored twice.

A collector's refusals (stage ``producer``) never reached a topic: their sender must send
them again, so they are not replayed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from medstream.clickhouse import QueryResult, sql_string
from medstream.sealing import derive_key, unseal
from sinks.clickhouse import DEAD_LETTER_PURPOSE

#: Kafka header of a replayed record: the id of the dead letter it comes from.
REPLAY_HEADER: Final = "medstream-replay"
#: Stages whose dead letters hold a record of a topic (not a collector's refusal).
NOT_REPLAYABLE_STAGES: Final = ("producer",)


@dataclass
class ReplayPlan:
    """The dead letters a filter selected, and those of them that cannot be replayed."""

    #: (dlq id, stage, reason code, original topic) of each one to replay.
    letters: list[tuple[str, str, str, str]] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # dlq id -> why not

    def by_stage(self) -> dict[str, int]:
        """How many of each stage would be replayed."""
        return dict(sorted(Counter(stage for _, stage, _, _ in self.letters).items()))


def plan_replay(
    query: Callable[[str], QueryResult],
    database: str,
    dlq_ids: Sequence[str] = (),
    stage: str | None = None,
    reason_code: str | None = None,
    since: datetime | None = None,
    limit: int = 1000,
) -> ReplayPlan:
    """The dead letters to replay: the given ids, else every one the filters select (the
    oldest first, at most ``limit``)."""
    where = []
    if dlq_ids:
        where.append(f"dlq_id IN ({', '.join(sql_string(i) for i in dlq_ids)})")
    if stage:
        where.append(f"stage = {sql_string(stage)}")
    if reason_code:
        where.append(f"reason_code = {sql_string(reason_code)}")
    if since is not None:
        utc = since.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
        where.append(f"failed_time >= toDateTime64({sql_string(utc)}, 3, 'UTC')")
    rows = query(
        f"SELECT dlq_id, stage, reason_code, original_topic FROM {database}.dead_letter FINAL "
        f"WHERE {' AND '.join(where) or '1'} ORDER BY failed_time, dlq_id LIMIT {int(limit)}"
    ).rows
    plan = ReplayPlan()
    for dlq_id, row_stage, reason, topic in rows:
        if row_stage in NOT_REPLAYABLE_STAGES or str(topic).startswith("collector/"):
            plan.refused[str(dlq_id)] = (
                "a collector's refusal never reached a topic: its sender must send it again"
            )
        else:
            plan.letters.append((str(dlq_id), str(row_stage), str(reason), str(topic)))
    for missing in sorted(set(dlq_ids) - {r[0] for r in plan.letters} - set(plan.refused)):
        plan.refused[missing] = "no such dead letter"
    return plan


def replay(
    query: Callable[[str], QueryResult],
    database: str,
    plan: ReplayPlan,
    secret: bytes,
    produce: Callable[[str, bytes | None, bytes, list[tuple[str, str | bytes | None]]], None],
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> int:
    """Unseal each planned dead letter and hand its original record to ``produce`` (topic,
    key, value, headers); returns how many. Raises SealingError for a letter that does not
    unseal (another secret, or a row changed in the store): nothing after it is sent."""
    key = derive_key(secret, DEAD_LETTER_PURPOSE)
    done = 0
    for dlq_id, _stage, _reason, topic in plan.letters:
        row: Any = query(
            f"SELECT hex(original_value), hex(ifNull(original_key, '')), "
            f"isNull(original_key) FROM {database}.dead_letter FINAL "
            f"WHERE dlq_id = {sql_string(dlq_id)} LIMIT 1"
        ).rows[0]
        value = unseal(bytes.fromhex(row[0]), key, dlq_id.encode())
        original_key = (
            None if int(row[2]) else unseal(bytes.fromhex(row[1]), key, dlq_id.encode() + b"|key")
        )
        produce(topic, original_key, value, [(REPLAY_HEADER, dlq_id.encode())])
        done += 1
        progress(done, len(plan.letters))
    return done
