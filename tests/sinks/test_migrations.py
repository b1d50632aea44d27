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


def test_person_history_follows_links_merges_and_unmerges_at_any_instant(
    clickhouse: Client, database: str
) -> None:
    clickhouse.command(
        f"INSERT INTO {database}.lab_result (event_id, source_kind, source_system, "
        "organisation_id, event_time, ingest_time, normalised_time, source_topic, "
        "source_partition, source_offset, record_index, record_count, source_ref, "
        "mapping_version, person_key, order_id, loinc_code, local_code, local_display, value, "
        f"unit, mapping_status) VALUES ('e1', 'hl7_lab', 'lis', 'H001', '{T}', '{T}', '{T}', "
        "'raw', 0, 1, 0, 1, 'r', 'v', 'recA', 'o', '2823-3', 'K', 'K', 4.1, 'mmol/L', 'mapped'), "
        "('e2', 'hl7_lab', 'lis', 'H002', '2026-11-24 10:00:00', "
        f"'{T}', '{T}', 'raw', 0, 2, 0, 1, 'r', 'v', 'recB', 'o', '2823-3', 'K', 'K', 4.5, "
        "'mmol/L', 'mapped'), ('e3', 'hl7_lab', 'lis', 'H003', "
        f"'{T}', '{T}', '{T}', 'raw', 0, 3, 0, 1, 'r', 'v', 'recC', 'o', '2823-3', 'K', 'K', "
        "4.0, 'mmol/L', 'mapped')"
    )
    # recA and recB: two persons, merged at 09:00, recB split out again at 11:00.
    clickhouse.command(
        f"INSERT INTO {database}.person_link (link_event_id, action, record_key, person_key, "
        "method, explanation, effective_time, triggering_event_id, decided_time) VALUES "
        "('l1', 'link', 'recA', 'P1', 'national_id', 'x', '2026-11-24 08:00:00', 'e1', "
        "'2026-11-24 08:00:00'), ('l2', 'link', 'recB', 'P2', 'organisation_mrn', 'x', "
        "'2026-11-24 08:30:00', 'e2', '2026-11-24 08:30:00'), ('l3', 'merge', 'recB', 'P1', "
        "'national_id', 'x', '2026-11-24 09:00:00', 'e2', '2026-11-24 09:00:00'), "
        "('l4', 'review', 'recB', 'P9', 'probabilistic', 'x', '2026-11-24 10:30:00', 'e2', "
        "'2026-11-24 10:30:00'), ('l5', 'unmerge', 'recB', 'P3', 'manual', 'x', "
        "'2026-11-24 11:00:00', 'manual', '2026-11-24 11:00:00')"
    )

    def at(instant: str) -> list[tuple[str, str]]:
        return [tuple(row) for row in clickhouse.query(
            f"SELECT person, event_id FROM {database}.person_history_at(at = '{instant}') "
            "ORDER BY event_id"
        ).result_rows]

    assert at("2026-11-24 08:45:00") == [("P1", "e1"), ("P2", "e2"), ("", "e3")]
    assert at("2026-11-24 10:45:00") == [("P1", "e1"), ("P1", "e2"), ("", "e3")]  # review: no move
    assert at("2026-11-24 12:00:00") == [("P1", "e1"), ("P3", "e2"), ("", "e3")]
    now = clickhouse.query(
        f"SELECT person, kind, organisation_id FROM {database}.person_history WHERE person = 'P1'"
    ).result_rows
    assert now == [("P1", "lab_result", "H001")]


def test_the_worklist_counts_a_local_code_once_per_event_whatever_its_display(
    clickhouse: Client, database: str
) -> None:
    def occurrence(event_id: str, display: str) -> str:
        return (f"('{event_id}', 'H001', 'hl7_lab', 'lis', 'lab', 'KPOCT', '{display}', "
                f"'unmapped', '{T}', '{T}', 'v1', ['2823-3'], ['Potassium'], [0.8])")

    clickhouse.command(
        f"INSERT INTO {database}.terminology_unmapped (event_id, organisation_id, source_kind, "
        "source_system, code_system, local_code, local_display, status, event_time, "
        "ingest_time, mapping_version, candidate_codes, candidate_displays, candidate_scores) "
        "VALUES " + ", ".join([occurrence("e1", "POC K"), occurrence("e2", "POC potassium"),
                               occurrence("e1", "POC K")])  # e1 redelivered
    )
    rows = clickhouse.query(
        f"SELECT local_code, uniqExactMerge(occurrences) FROM {database}.terminology_worklist "
        "GROUP BY local_code"
    ).result_rows
    assert rows == [("KPOCT", 2)]


def test_a_transition_stored_twice_collapses_even_with_another_time(
    clickhouse: Client, database: str
) -> None:
    def transition(updated: str) -> str:
        return (f"('a1', 'news2.urgent', 'v', 'high', 'H001', NULL, '{T}', '{T}', '{T}', [], "
                f"NULL, NULL, NULL, 'x', '', -1, -1, '', 's', 'open', 'escalated', 'system', "
                f"NULL, 't-esc-1', '{updated}', '{T}', '{T}', 1, 1, '{{}}')")

    clickhouse.command(
        f"INSERT INTO {database}.alert_history (alert_id, rule_id, rule_version, severity, "
        "organisation_id, person_key, event_time, ingest_time, detected_time, "
        "triggering_event_ids, analyte_code, value, unit, explanation, source_topic, "
        "source_partition, source_offset, mapping_version, subject, status, action, actor, "
        "note, transition_id, updated_time, first_event_time, last_event_time, occurrences, "
        "escalation_level, details_json) VALUES "
        + transition("2026-11-24 08:15:00") + ", " + transition("2026-11-24 08:15:30")
    )
    count = clickhouse.query(
        f"SELECT count() FROM {database}.alert_history FINAL WHERE alert_id = 'a1'"
    ).result_rows
    assert count == [(1,)]


def test_monitoring_rollup_counts_events_dead_letters_and_alerts_per_minute_once(
    clickhouse: Client, database: str
) -> None:
    # Three lab results in one minute and one in the next; a redelivered batch (the same
    # event ids inserted again) must not count twice.
    def labs(ids: str, minute: str) -> None:
        clickhouse.command(
            f"INSERT INTO {database}.lab_result (event_id, organisation_id, ingest_time) "
            f"SELECT concat('lab-', toString(number)), 'H001', '2026-11-24 08:{minute}:30' "
            f"FROM numbers({ids})"
        )

    labs("0, 3", "00")
    labs("0, 3", "00")  # redelivery
    clickhouse.command(
        f"INSERT INTO {database}.lab_result (event_id, organisation_id, ingest_time) "
        "VALUES ('lab-9', 'H001', '2026-11-24 08:01:10'), ('lab-7', 'H002', '2026-11-24 08:00:05')"
    )
    clickhouse.command(
        f"INSERT INTO {database}.dead_letter (dlq_id, organisation_id, ingest_time) VALUES "
        "('d1', 'H001', '2026-11-24 08:00:40'), ('d2', NULL, '2026-11-24 08:00:41')"
    )
    clickhouse.command(
        f"INSERT INTO {database}.alert_history (alert_id, transition_id, action, "
        "organisation_id, ingest_time) VALUES ('a1', 't1', 'opened', 'H001', "
        "'2026-11-24 08:00:50'), ('a1', 't2', 'acknowledged', 'H001', '2026-11-24 08:00:55')"
    )
    # The refresh recomputes every minute that received newly stored rows (every 30 s; a
    # test asks for it now and waits for it).
    clickhouse.command(f"SYSTEM REFRESH VIEW {database}.monitoring_minute_refresh")
    clickhouse.command(f"SYSTEM WAIT VIEW {database}.monitoring_minute_refresh")
    rows = clickhouse.query(
        f"SELECT toString(minute), organisation_id, event_type, count "
        f"FROM {database}.monitoring_per_minute ORDER BY 1, 2, 3"
    ).result_rows
    assert rows == [
        ("2026-11-24 08:00:00", "", "dead_letter", 1),
        ("2026-11-24 08:00:00", "H001", "alert_opened", 1),
        ("2026-11-24 08:00:00", "H001", "dead_letter", 1),
        ("2026-11-24 08:00:00", "H001", "lab_result", 3),
        ("2026-11-24 08:00:00", "H002", "lab_result", 1),
        ("2026-11-24 08:01:00", "H001", "lab_result", 1),
    ]


def test_data_dictionary_lists_every_contract_field_with_its_sensitivity(
    clickhouse: Client, database: str
) -> None:
    from schemas import serde
    from sinks.dictionary import refresh_data_dictionary

    registry = serde.ManifestRegistry()
    written = refresh_data_dictionary(clickhouse, database, registry)
    refresh_data_dictionary(clickhouse, database, registry)  # again: replaces, no duplicates
    expected = sum(
        len(serde.field_sensitivity(version.definition))
        for subject in registry.subjects() for version in registry.versions(subject)
    )
    assert written == expected > 300
    [(count,)] = clickhouse.query(
        f"SELECT count() FROM {database}.data_dictionary FINAL"
    ).result_rows
    assert count == expected
    rows = clickhouse.query(
        f"SELECT clickhouse_table, type, sensitivity, meaning FROM {database}.data_dictionary "
        "FINAL WHERE subject = 'medstream.norm.LabResult' AND version = 2 "
        "AND field IN ('event_id', 'person_key', 'value') ORDER BY field"
    ).result_rows
    assert [r[:3] for r in rows] == [
        ("lab_result", "string", "operational"),
        ("lab_result", "null | string", "pseudonym"),
        ("lab_result", "null | double", "clinical"),
    ]
    assert all(r[3] for r in rows)  # every field says what it means
    [(untagged,)] = clickhouse.query(
        f"SELECT count() FROM {database}.data_dictionary FINAL WHERE sensitivity NOT IN "
        "('direct_identifier', 'quasi_identifier', 'pseudonym', 'clinical', 'operational')"
    ).result_rows
    assert untagged == 0


def test_on_a_cluster_every_table_is_replicated_and_every_ddl_runs_on_each_replica(
    clickhouse: Client,
) -> None:
    """No replicated server runs here (no Keeper): ClickHouse's own parser checks every
    rewritten statement, and the rewrite leaves no table that a second replica would miss."""
    from medstream.clickhouse import migration_files, migration_statements

    statements = [
        statement
        for _, _, sql in migration_files()
        for statement in migration_statements(sql, "medstream", "medstream")
    ]
    assert len(statements) > 60
    for statement in statements:
        [(formatted,)] = clickhouse.query(
            "SELECT formatQuery({s:String})", {"s": statement}
        ).result_rows
        assert formatted
        if statement.startswith(("CREATE", "ALTER", "DROP")):
            assert " ON CLUSTER medstream" in statement.split(" AS ", 1)[0], statement[:120]
        if "ENGINE" in statement:
            assert "ENGINE = Replicated" in statement, statement[:200]
            assert "'/clickhouse/tables/{shard}/{database}/{table}', '{replica}'" in statement
        assert "non_replicated" not in statement
    versioned = next(s for s in statements if "alert_current ON CLUSTER" in s and "ENGINE" in s)
    assert "ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/{table}', " \
           "'{replica}', updated_time)" in versioned
