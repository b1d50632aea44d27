"""Offsets read from the broker, one way for every check that needs them: a consumer
group's committed offsets, the true end of each partition, and the records in a range.

`medstream up`'s drain check (:mod:`medstream.backlog`) and `medstream reconcile`
(:mod:`medstream.reconcile`) both ask these questions; an answer that is not complete is
an error here (:class:`ReadUnfinished`), never a guess such as 0.

On tansu the end offset a broker reports is the first offset of the last produce batch + 1
while a fetch returns the whole batch, so the true end is read from the log: the last batch
is fetched from its first offset (reported end - 1), as the stream workers' table recovery
does (:func:`streams.recovery.tansu_log_ends`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from confluent_kafka import (
    Consumer,
    IsolationLevel,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, OffsetSpec

from medstream.settings import KafkaSettings

Partition = tuple[str, int]
#: Errors of a group coordinator being elected or loaded: asking again is answered.
COORDINATOR_MOVING = frozenset(
    {
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
    }
)
#: How long one poll of a probe waits; a deadline is checked between polls.
POLL_S = 0.2


class ReadUnfinished(RuntimeError):
    """Some partitions could not be read to their end in time (``partitions`` names them)."""

    def __init__(self, what: str, partitions: list[Partition], timeout_s: float) -> None:
        self.partitions = sorted(partitions)
        names = ", ".join(f"{t}[{p}]" for t, p in self.partitions[:5])
        more = f" and {len(self.partitions) - 5} more" if len(self.partitions) > 5 else ""
        super().__init__(f"{what}: {names}{more} not read to the end within {timeout_s:.0f}s")


def probe_consumer(kafka: KafkaSettings) -> Consumer:
    """A consumer that never joins a group or commits: it reads assigned partitions to their
    end (an end-of-partition event each) and skips aborted records and commit markers."""
    return Consumer(
        kafka.librdkafka(
            **{
                "group.id": "medstream-offset-probe",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "isolation.level": "read_committed",
                "fetch.wait.max.ms": 100,
            }
        )
    )


def committed_offsets(
    kafka: KafkaSettings, group_id: str, partitions: list[Partition], timeout_s: float
) -> dict[Partition, int]:
    """The group's committed offsets (OffsetFetch; the asking consumer never joins the
    group); partitions it never committed on are left out."""
    if not partitions:
        return {}
    consumer = Consumer(kafka.librdkafka(**{"group.id": group_id, "enable.auto.commit": False}))
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                answer = consumer.committed(
                    [TopicPartition(topic, index) for topic, index in partitions],
                    timeout=max(0.5, deadline - time.monotonic()),
                )
                break
            except KafkaException as exc:
                # A broker still electing the group's coordinator (a fresh one, or one that
                # just restarted) says so; asked again it answers.
                if exc.args[0].code() not in COORDINATOR_MOVING or time.monotonic() >= deadline:
                    raise
                time.sleep(POLL_S)
    finally:
        consumer.close()
    return {
        (tp.topic, tp.partition): tp.offset
        for tp in answer
        if tp.error is None and tp.offset >= 0
    }


def list_offsets(
    admin: AdminClient, partitions: list[Partition], spec: OffsetSpec, timeout_s: float
) -> dict[Partition, int]:
    """The broker's reported offsets (read_committed) of ``spec`` (earliest / latest)."""
    if not partitions:
        return {}
    futures = admin.list_offsets(
        {TopicPartition(topic, index): spec for topic, index in partitions},
        isolation_level=IsolationLevel.READ_COMMITTED,
        request_timeout=timeout_s,
    )
    return {(tp.topic, tp.partition): f.result().offset for tp, f in futures.items()}


def log_ends(
    kafka: KafkaSettings, admin: AdminClient, partitions: list[Partition], timeout_s: float
) -> dict[Partition, int]:
    """The end offset (last readable offset + 1) of each partition; on tansu read from the
    log (ReadUnfinished when a last batch could not be read in time)."""
    reported = list_offsets(admin, partitions, OffsetSpec.latest(), timeout_s)
    return tansu_log_ends(kafka, reported, timeout_s) if kafka.tansu else reported


def tansu_log_ends(
    kafka: KafkaSettings, reported: Mapping[Partition, int], timeout_s: float
) -> dict[Partition, int]:
    """The true ends of partitions whose tansu-reported ends are ``reported``: the last
    batch is read from its first offset (reported end - 1) to the end of the log."""
    ends = dict(reported)
    starts = {p: end - 1 for p, end in reported.items() if end > 0}
    for partition, last in read_to_end(kafka, starts, "the end of the log", timeout_s).items():
        if last is not None:
            ends[partition] = max(ends[partition], last + 1)
    return ends


def count_records(
    kafka: KafkaSettings,
    starts: Mapping[Partition, int],
    ends: Mapping[Partition, int],
    timeout_s: float,
) -> dict[Partition, int]:
    """The records (read_committed) at offsets [start, end) of each partition, read up to
    ``end`` (a record at or past end - 1, or the partition's end); ReadUnfinished when one
    could not be read in time."""
    counts = dict.fromkeys(starts, 0)

    def seen(message: Message) -> None:
        partition = (str(message.topic()), int(message.partition() or 0))
        if (message.offset() or 0) < ends[partition]:
            counts[partition] += 1

    read_to_end(kafka, starts, "counting records", timeout_s, on_record=seen,
                stop_at={partition: end - 1 for partition, end in ends.items()})
    return counts


def read_to_end(
    kafka: KafkaSettings,
    starts: Mapping[Partition, int],
    what: str,
    timeout_s: float,
    on_record: Callable[[Message], None] | None = None,
    stop_at: Mapping[Partition, int] | None = None,
) -> dict[Partition, int | None]:
    """Read each partition from its start until the broker says it is at its end (or a
    record at or past its ``stop_at`` offset is read); the last offset read per partition
    (None: nothing); ``on_record`` sees each record."""
    last: dict[Partition, int | None] = dict.fromkeys(starts)
    if not starts:
        return last
    consumer = probe_consumer(kafka)
    open_partitions = set(starts)
    try:
        consumer.assign([TopicPartition(t, p, start) for (t, p), start in starts.items()])
        deadline = time.monotonic() + timeout_s
        while open_partitions and time.monotonic() < deadline:
            for message in consumer.consume(num_messages=1000, timeout=POLL_S):
                topic, index = message.topic(), message.partition()
                if topic is None or index is None:
                    continue
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        open_partitions.discard((topic, index))
                    continue
                offset = message.offset()
                if offset is None or offset < starts[(topic, index)]:
                    continue
                last[(topic, index)] = max(offset, last[(topic, index)] or -1)
                if on_record is not None:
                    on_record(message)
                if stop_at is not None and offset >= stop_at.get((topic, index), offset + 1):
                    open_partitions.discard((topic, index))
    finally:
        consumer.close()
    if open_partitions:
        raise ReadUnfinished(what, list(open_partitions), timeout_s)
    return last
