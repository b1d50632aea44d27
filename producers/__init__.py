"""Edge collectors (one module and one class per source kind) and the region simulator.

:func:`collector_class` maps the kind named in a collector's YAML configuration (and in
``medstream collect KIND``) to its class. Each module is imported only when used, so a
collector's client library is loaded only by the process that runs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from producers.base import Collector

COLLECTOR_KINDS = ("postgres", "mariadb", "mllp", "devices", "claims")


def collector_class(kind: str) -> type[Collector[Any]]:
    """The collector class for a kind; ValueError names the known kinds."""
    match kind:
        case "postgres":
            from producers.postgres_cdc import PostgresCdcProducer

            return PostgresCdcProducer
        case "mariadb":
            from producers.mariadb_cdc import MariaDbCdcProducer

            return MariaDbCdcProducer
        case "mllp":
            from producers.hl7_mllp import Hl7MllpProducer

            return Hl7MllpProducer
        case "devices":
            from producers.devices import DeviceProducer

            return DeviceProducer
        case "claims":
            from producers.claims import ClaimsProducer

            return ClaimsProducer
    known = ", ".join(sorted(COLLECTOR_KINDS))
    raise ValueError(f"unknown collector kind {kind!r} (known kinds: {known})")
