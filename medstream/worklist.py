"""The data steward's terminology worklist: local codes the maps do not cover yet.

Reads the ClickHouse ``terminology_worklist`` aggregate (one row per organisation, code
system, local code and display: occurrences counted once per event, first and last seen,
candidate standard codes ranked by display similarity) and marks the codes that the
current dictionary now maps, so a steward sees what is left to do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from medstream.clickhouse import sql_string
from streams.terminology import SYSTEMS, Terminology


@dataclass(frozen=True, slots=True)
class WorklistEntry:
    """One unmapped (or ambiguous) local code with its counts and best candidates."""

    organisation_id: str
    code_system: str
    local_code: str
    local_display: str
    occurrences: int
    first_seen: Any
    last_seen: Any
    status: str
    last_mapping_version: str
    source_systems: list[str]
    candidates: list[tuple[str, str, float]]
    now_mapped: bool


def unmapped_worklist(
    query: Callable[[str], Any],
    database: str,
    terminology: Terminology | None = None,
    organisation_id: str | None = None,
    code_system: str | None = None,
    limit: int = 200,
) -> list[WorklistEntry]:
    """The worklist, most frequent first; ``now_mapped`` when the dictionary covers it now."""
    if code_system is not None and code_system not in SYSTEMS:
        raise ValueError(f"unknown code system {code_system!r}; one of {', '.join(SYSTEMS)}")
    filters = []
    if organisation_id:
        filters.append(f"organisation_id = {sql_string(organisation_id)}")
    if code_system:
        filters.append(f"code_system = {sql_string(code_system)}")
    where = f"WHERE {' AND '.join(filters)}" if filters else ""
    rows = query(
        f"""SELECT organisation_id, code_system, local_code, anyLast(local_display),
                   uniqExactMerge(occurrences) AS n, min(first_seen), max(last_seen),
                   anyLast(status), anyLast(last_mapping_version),
                   groupUniqArrayArray(source_systems), anyLast(candidate_codes),
                   anyLast(candidate_displays), anyLast(candidate_scores)
            FROM {database}.terminology_worklist {where}
            GROUP BY organisation_id, code_system, local_code
            ORDER BY n DESC, organisation_id, code_system, local_code
            LIMIT {int(limit)}"""
    ).rows
    entries = []
    for row in rows:
        organisation, system, code = row[0], row[1], row[2]
        now_mapped = (
            terminology is not None and terminology.status(organisation, system, code) == "mapped"
        )
        entries.append(
            WorklistEntry(
                organisation, system, code, row[3], int(row[4]), row[5], row[6], row[7],
                row[8], sorted(row[9]), list(zip(row[10], row[11], row[12], strict=False)),
                now_mapped,
            )
        )
    return entries


# What a steward does about a worklist row, by its status (unmapped needs no note).
_STATUS_NOTES = {
    "ambiguous": " [ambiguous]",
    "unit_unmapped": " [unit not convertible: add it to unit_aliases]",
}


def render_worklist(entries: list[WorklistEntry], terminology_version: str | None) -> str:
    """The worklist as a table a steward reads in a terminal."""
    if not entries:
        return "no unmapped local codes: every code seen is mapped"
    lines = [
        f"{'org':<6} {'system':<13} {'local code':<18} {'display':<28} {'seen':>6}  "
        f"{'last seen (UTC)':<19}  candidates (score)"
    ]
    for e in entries:
        candidates = ", ".join(f"{code} {display[:24]} ({score:.2f})"
                               for code, display, score in e.candidates) or "-"
        status = _STATUS_NOTES.get(e.status, "")
        fixed = f" [mapped in {terminology_version}]" if e.now_mapped else ""
        last = (
            e.last_seen.strftime("%Y-%m-%d %H:%M:%S")
            if hasattr(e.last_seen, "strftime")
            else str(e.last_seen)
        )
        lines.append(
            f"{e.organisation_id:<6} {e.code_system:<13} {e.local_code[:18]:<18} "
            f"{e.local_display[:28]:<28} {e.occurrences:>6}  {last:<19}  {candidates}"
            f"{status}{fixed}"
        )
    open_count = sum(1 for e in entries if not e.now_mapped)
    lines.append(f"{open_count} code(s) to map, {len(entries) - open_count} already mapped in the "
                 "current dictionary (they leave the list as new events are mapped)")
    return "\n".join(lines)
