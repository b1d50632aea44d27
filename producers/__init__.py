"""Edge collectors (one module and one class per source kind) and the region simulator.

``COLLECTOR_KINDS`` maps the kind named in a collector's YAML configuration (and in
``medstream collect KIND``) to its class, imported only when used so that a collector's
client library is loaded only by the process that needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from producers.base import Collector

COLLECTOR_KINDS: dict[str, str] = {
    "postgres": "producers.postgres_cdc:PostgresCdcCollector",
    "mariadb": "producers.mariadb_cdc:MariaDbCdcCollector",
    "mllp": "producers.hl7_mllp:MllpCollector",
    "devices": "producers.devices:DeviceGateway",
    "claims": "producers.claims:ClaimsCollector",
}


def collector_class(kind: str) -> type[Collector[Any]]:
    """The collector class for a kind; ValueError names the known kinds."""
    try:
        target = COLLECTOR_KINDS[kind]
    except KeyError:
        known = ", ".join(sorted(COLLECTOR_KINDS))
        raise ValueError(f"unknown collector kind {kind!r} (known kinds: {known})") from None
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)  # type: ignore[no-any-return]
