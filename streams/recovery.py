"""Table recovery that never stops a worker over a changelog read further than its watermark.

Faust keeps, per changelog partition a worker holds across a rebalance, the offset up to
which it last read the changelog, and raises ``ConsistencyError`` when that offset is above
the partition's last offset ("highwater") at the next recovery. Seen when one of two
workers was killed (issue 16): the survivor took over the dead worker's partitions, read
their changelogs, and crashed at the next rebalance (the dead one restarting), which in
turn crashed the other: a crash loop.

- On tansu the end offset it reports is the *first* offset of the last produce batch + 1,
  while a fetch returns the whole batch: a recovery reads past the reported end (146 > 143
  on mpi-state: a 4-record batch), and on a quiet changelog the next recovery sees the same
  under-counted end. Recovery also stopped at the reported end and so could miss the rest
  of the last batch (a person of the patient index, a suppressed alert). Here the end on
  tansu is read from the log itself (:func:`tansu_log_ends`).
- On Apache Kafka the end offset (the high watermark, or the last stable offset under
  read_committed) never falls below a record a consumer could read, so a kept offset above
  it means the log lost records (an unclean broker restart truncated it, a topic was
  recreated). :class:`CheckedRecovery` then replays that partition from the start of its
  changelog instead of stopping, with a warning giving the numbers and a metric.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from faust.tables import TableManager
from faust.tables.recovery import Recovery
from faust.types import TP

from medstream.metrics import TABLE_STATE_REPLAYS

log = logging.getLogger("medstream.streams")
#: How long reading the last batch of the tansu changelogs may take before the reported
#: (under-counted) ends are used.
TANSU_END_PROBE_S = 10.0


async def tansu_log_ends(bootstrap_servers: list[str], reported: Mapping[TP, int]) -> dict[TP, int]:
    """The true end offsets (last offset + 1) of partitions whose tansu-reported ends are
    ``reported`` (:func:`medstream.offsets.tansu_log_ends`, read off the event loop); the
    reported ends, with a warning, when the last batches cannot be read in time."""
    from medstream.offsets import ReadUnfinished
    from medstream.offsets import tansu_log_ends as read_true_ends
    from medstream.settings import KafkaSettings

    kafka = KafkaSettings(bootstrap_servers=",".join(bootstrap_servers), broker_kind="tansu")
    by_partition = {(tp.topic, tp.partition): end for tp, end in reported.items()}
    try:
        ends = await asyncio.get_running_loop().run_in_executor(
            None, read_true_ends, kafka, by_partition, TANSU_END_PROBE_S
        )
    except ReadUnfinished as exc:
        log.warning(
            "%s: table recovery uses tansu's reported end offsets (they miss up to one batch)",
            exc,
        )
        return dict(reported)
    return {tp: ends[(tp.topic, tp.partition)] for tp in reported}


class CheckedRecovery(Recovery):
    """Faust's recovery, replaying a changelog partition from its start where the offset
    kept from an earlier recovery is above the partition's last offset."""

    async def _build_offsets(
        self, consumer: Any, tps: Any, destination: Any, title: str
    ) -> None:
        if title == "active":
            for tp in tps:
                kept, last = destination.get(tp), self.active_highwaters.get(tp)
                if kept is None or last is None or kept <= last:
                    continue
                # The changelog no longer holds offsets last+1..kept that this worker read
                # (on Apache Kafka only a truncated or recreated log does that). Replaying
                # the partition from its start applies every record it still holds in
                # order, so every key it holds ends at its last logged value: the state
                # any other worker would recover. Keys written only by the lost records
                # cannot be corrected from the changelog: hence the warning and the metric.
                log.warning(
                    "%s[%d]: read up to offset %d in an earlier recovery but the changelog "
                    "now ends at offset %d; replaying it from the start",
                    tp.topic, tp.partition, kept, last,
                )
                TABLE_STATE_REPLAYS.labels(tp.topic).inc()
                destination[tp] = None  # Faust then starts at the log start
        await super()._build_offsets(consumer, tps, destination, title)


class CheckedTableManager(TableManager):
    """Faust's table manager with :class:`CheckedRecovery` (app setting TableManager)."""

    @property
    def recovery(self) -> Recovery:
        """The recovery service of this worker's tables."""
        if self._recovery is None:
            self._recovery = CheckedRecovery(self.app, self, beacon=self.beacon, loop=self.loop)
        return self._recovery
