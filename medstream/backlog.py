"""What the pipeline accepted but has not finished with: the records in its topics beyond
the offsets the stream workers' and the sink's consumer groups have committed.

`medstream up` measures it while it drains on a graceful stop, and reports what is left
when it exits. A group commits an offset only after the work it covers is durable (the
sink after ClickHouse accepted the batch), so a record counts as unstored until every
group that reads its topic has committed past it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from confluent_kafka import OFFSET_INVALID, KafkaException
from confluent_kafka.admin import AdminClient, OffsetSpec

from medstream.offsets import (
    Partition,
    ReadUnfinished,
    committed_offsets,
    count_records,
    list_offsets,
    log_ends,
)
from medstream.settings import (
    ALERTS_TOPIC,
    DLQ_TOPIC,
    FACT_TOPICS,
    FEED_ACTIVITY_TOPIC,
    IDENTITY_TOPIC,
    LIFECYCLE_TOPIC,
    NORM_TOPICS,
    RAW_TOPICS,
    SYNDROMIC_TOPIC,
    KafkaSettings,
)

#: A partition this far or less behind is read to count its records exactly: a
#: transactional topic (exactly_once) ends in commit markers no consumer ever commits past.
EXACT_COUNT_MAX = 500
#: The categories the progress line names, in data-flow order.
CATEGORIES = ("raw", "norm", "alerts", "other")

class BacklogUnknown(RuntimeError):
    """The broker could not be asked (it is down or does not answer in time)."""


@dataclass(frozen=True)
class ConsumerGroup:
    """A consumer group of the pipeline and the topics whose records it must finish:
    ``required`` always, the rest of ``topics`` once the group reads them (its members are
    assigned them, or it committed on them)."""

    group_id: str
    topics: tuple[str, ...]
    required: tuple[str, ...] | None = None  # None: every topic

    def reading(self, active: set[str]) -> ConsumerGroup:
        """This group limited to the topics it must finish, given those it reads now."""
        required = set(self.topics if self.required is None else self.required)
        topics = tuple(t for t in self.topics if t in required or t in active)
        return ConsumerGroup(self.group_id, topics)


def pipeline_groups(
    kafka: KafkaSettings, streams_group: str, sink_group: str
) -> list[ConsumerGroup]:
    """The stream workers' group (the Faust application id) and the sink's group, each with
    the contract topics it may read (the workers read only some norm.* topics)."""
    raw = [kafka.topic(t) for t in RAW_TOPICS.values()]
    norm = [kafka.topic(t) for t in NORM_TOPICS.values()]
    internal = [
        kafka.topic(t)
        for t in (LIFECYCLE_TOPIC, IDENTITY_TOPIC, SYNDROMIC_TOPIC, FEED_ACTIVITY_TOPIC)
    ]
    stored = [kafka.topic(t) for t in (ALERTS_TOPIC, DLQ_TOPIC, *FACT_TOPICS.values())]
    return [
        ConsumerGroup(streams_group, tuple([*raw, *norm, *internal]), tuple(raw)),
        ConsumerGroup(sink_group, tuple([*raw, *norm, *stored])),
    ]


@dataclass(frozen=True)
class Backlog:
    """Records not yet finished by every group that reads them, per topic partition."""

    by_partition: Mapping[Partition, int] = field(default_factory=dict)
    topic_prefix: str = ""

    @property
    def total(self) -> int:
        """Every record still to finish."""
        return sum(self.by_partition.values())

    def by_topic(self) -> dict[str, int]:
        """Records still to finish per topic (topics with none left out), largest first."""
        topics: dict[str, int] = {}
        for (topic, _), count in self.by_partition.items():
            if count:
                topics[topic] = topics.get(topic, 0) + count
        return dict(sorted(topics.items(), key=lambda item: (-item[1], item[0])))

    def by_category(self) -> dict[str, int]:
        """raw / norm / alerts / other: where in the pipeline the records wait."""
        categories = dict.fromkeys(CATEGORIES, 0)
        for topic, count in self.by_topic().items():
            categories[self._category(topic)] += count
        return categories

    def _category(self, topic: str) -> str:
        name = topic.removeprefix(self.topic_prefix)
        if name.startswith("raw."):
            return "raw"
        if name.startswith("norm."):
            return "norm"
        return "alerts" if name == ALERTS_TOPIC else "other"

    def parts(self) -> str:
        """``raw 800, norm 400, alerts 34``; other topics only when some."""
        return ", ".join(
            f"{name} {count:,}"
            for name, count in self.by_category().items()
            if count or name != "other"
        )


def group_positions(
    groups: Iterable[ConsumerGroup],
    partitions: Iterable[Partition],
    earliest: Mapping[Partition, int],
    committed: Mapping[str, Mapping[Partition, int]],
) -> dict[Partition, int]:
    """Per partition, the position of the group furthest behind among those that read it.

    A group without a committed offset starts at the earliest one (as the pipeline's
    consumers do, auto.offset.reset=earliest).
    """
    positions: dict[Partition, int] = {}
    for partition in partitions:
        for group in groups:
            if partition[0] not in group.topics:
                continue
            start = earliest.get(partition, 0)
            position = committed.get(group.group_id, {}).get(partition, OFFSET_INVALID)
            position = start if position < 0 else max(position, start)
            positions[partition] = min(positions.get(partition, position), position)
    return positions


def backlog_from_offsets(
    groups: Iterable[ConsumerGroup],
    earliest: Mapping[Partition, int],
    latest: Mapping[Partition, int],
    committed: Mapping[str, Mapping[Partition, int]],
    topic_prefix: str = "",
) -> Backlog:
    """The backlog from offsets: per partition, the most any group that reads it is behind
    its end."""
    positions = group_positions(list(groups), latest, earliest, committed)
    return Backlog(
        {p: max(0, latest[p] - position) for p, position in positions.items()}, topic_prefix
    )


def measure_backlog(
    kafka: KafkaSettings, groups: list[ConsumerGroup], timeout_s: float = 10.0
) -> Backlog:
    """Ask the broker what every group still has to finish, within about ``timeout_s`` in
    all; BacklogUnknown when it cannot (the broker does not answer, or a partition could
    not be read to its end in time: never a guess).

    Small gaps are counted by reading them (read_committed): commit markers and aborted
    records are not records anyone has to store. On tansu, whose reported end offsets
    under-count (by up to a produce batch), the true ends are read from the log first.
    """
    deadline = time.monotonic() + timeout_s

    def left() -> float:
        return max(0.5, deadline - time.monotonic())

    admin = AdminClient(kafka.librdkafka())
    wanted = {topic for group in groups for topic in group.topics}
    try:
        metadata = admin.list_topics(timeout=left())
        partitions = [
            (name, index)
            for name, topic in metadata.topics.items()
            if name in wanted and topic.error is None
            for index in topic.partitions
        ]
        latest = log_ends(kafka, admin, partitions, left())
        earliest = list_offsets(admin, partitions, OffsetSpec.earliest(), left())
        committed = {
            group.group_id: committed_offsets(kafka, group.group_id, partitions, left())
            for group in groups
        }
        groups = [
            group.reading(
                _assigned_topics(admin, group.group_id, left())
                | {t for t, _ in committed[group.group_id]}
            )
            for group in groups
        ]
        positions = group_positions(groups, latest, earliest, committed)
        backlog = backlog_from_offsets(groups, earliest, latest, committed, kafka.topic_prefix)
        to_read = {
            p: positions[p] for p, n in backlog.by_partition.items() if 0 < n <= EXACT_COUNT_MAX
        }
        counted = count_records(kafka, to_read, latest, left())
    except KafkaException as exc:
        raise BacklogUnknown(f"the broker did not say what is left ({exc})") from exc
    except ReadUnfinished as exc:
        raise BacklogUnknown(str(exc)) from exc
    return Backlog({**backlog.by_partition, **counted}, kafka.topic_prefix)


def _assigned_topics(admin: AdminClient, group_id: str, timeout_s: float) -> set[str]:
    """The topics the group's members are assigned now (none when it has no members)."""
    future = admin.describe_consumer_groups([group_id], request_timeout=timeout_s)[group_id]
    description = future.result()
    return {
        tp.topic
        for member in description.members
        if member.assignment is not None
        for tp in member.assignment.topic_partitions
    }
