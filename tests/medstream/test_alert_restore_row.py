"""A row of the restore query (`up` and `medstream alerts restore` read unresolved alerts
back from alert_current) becomes the alert's last transition, its opening time and the
opening finding's lineage. Review 7: a field added to AlertTransition for the stream stage
alone (``resent``) made every restore fail with KeyError, so `up` did not start while an
alert was open."""

from __future__ import annotations

import re

from medstream.alert_actions import _RESTORE_COLUMNS, stored_alert


def restore_query_columns() -> list[str]:
    """The names the restore query's rows carry (its aliases, else its column names)."""
    names = []
    for column in _RESTORE_COLUMNS.split(", "):
        alias = re.search(r"\bAS (\w+)$", column)
        names.append(alias.group(1) if alias else column.strip())
    return names


def test_a_row_of_the_restore_query_is_read_back_as_the_alert_it_stored() -> None:
    columns = restore_query_columns()
    values = {
        "transition_id": "t1", "alert_id": "a1", "rule_id": "critical_value.potassium",
        "rule_version": "r1", "subject": "p|2823-3", "organisation_id": "H001",
        "person_key": "p", "severity": "critical", "status": "open", "action": "opened",
        "actor": "system", "note": None, "time_ms": "1000", "first_event_time_ms": 900,
        "last_event_time_ms": 950, "occurrences": 2, "escalation_level": 0,
        "triggering_event_ids": ["e1"], "explanation": "Potassium 6.9", "opened_ms": 1000,
        "ingest_time": 990, "analyte_code": "2823-3", "value": 6.9, "unit": "mmol/L",
        "source_topic": "raw.hl7_lab", "source_partition": 1, "source_offset": 7,
        "mapping_version": "v1", "details_json": "{}",
    }
    assert set(columns) == set(values)  # the test's row is the query's
    last, opened_ms, lineage = stored_alert({name: values[name] for name in columns})
    assert (last.alert_id, last.status, last.time_ms, last.occurrences) == ("a1", "open", 1000, 2)
    assert last.triggering_event_ids == ("e1",) and last.resent is False
    assert opened_ms == 1000
    assert lineage == {
        "ingest_time": 990, "analyte_code": "2823-3", "value": 6.9, "unit": "mmol/L",
        "source_topic": "raw.hl7_lab", "source_partition": 1, "source_offset": 7,
        "mapping_version": "v1", "details_json": "{}",
    }
