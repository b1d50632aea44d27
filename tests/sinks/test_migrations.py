"""The views the migrations create compute what their comments promise (real chdb engine)."""

from __future__ import annotations

import pytest
from clickhouse_connect.driver.client import Client

from streams.quality import QualityScoreWeights, load_quality_rules, quality_score

pytestmark = pytest.mark.integration
T = "2026-11-24 08:00:00"


def issue(issue_id: str, event_id: str, severity: str) -> str:
    return (f"('{issue_id}', 'r-{issue_id}', 'v', 'observation', '{event_id}', 'H001', 'device', "
            f"'gw', 'timeliness', '{severity}', 'd', '{T}', '{T}', '{T}')")


def test_daily_quality_score_counts_events_once_and_matches_the_python_formula(
    clickhouse: Client, database: str
) -> None:
    clickhouse.command(
        f"INSERT INTO {database}.observation (event_id, source_kind, source_system, "
        "organisation_id, event_time, ingest_time, normalised_time, source_topic, "
        "source_partition, source_offset, record_index, record_count, source_ref, "
        "mapping_version, device_id, device_type, local_code, original_unit, mapping_status) "
        f"SELECT toString(number), 'device', 'gw', 'H001', '{T}', '{T}', '{T}', 'raw', 0, "
        "number, 0, 1, 'r', 'v', 'd', 't', 'HR', 'bpm', 'mapped' FROM numbers(8)"
    )
    # Event 0: two warnings (one event); event x9: dead-lettered for an error (+ a warning).
    clickhouse.command(
        f"INSERT INTO {database}.quality_issue (issue_id, rule_id, rule_version, event_kind, "
        "event_id, organisation_id, source_kind, source_system, category, severity, detail, "
        "event_time, ingest_time, detected_time) VALUES "
        + ", ".join([issue("i1", "0", "warning"), issue("i2", "0", "warning"),
                     issue("i3", "x9", "error"), issue("i4", "x9", "warning")])
    )
    [row] = clickhouse.query(
        f"SELECT organisation_id, source_kind, events, errors, warnings, score "
        f"FROM {database}.quality_daily_score"
    ).result_rows
    weights = load_quality_rules().score
    assert weights == QualityScoreWeights(1.0, 0.25)  # the weights the view has written in
    assert row[:5] == ("H001", "device", 9, 1, 1)
    assert row[5] == pytest.approx(quality_score(9, 1, 1, weights))
